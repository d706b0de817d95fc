"""The bad-input table: one project holding every kind of bad model, recipe and source, validated in one run.

Each row is a (file, field/value, next step) the single `python -m xportbuild validate` report must contain;
the report must also leave the good target alone and the build must not start."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from xportbuild.keys import SCHEMA

from tests import tiny
from tests.conftest import REPO
from tests.integration.models import local, model_toml

QUANT = 'doc = "q"\nbackend = "xnnpack"\n[quantize]\nlinear = "8da4w"\nlinear_group_size = {size}\n' \
        'per_axis_fallback = {fallback}\n'


def _bad_project(root, weights):
    """Writes the project; returns its recipes folder."""
    models, recipes = root / "recipes" / "models", root / "recipes" / "recipes"
    models.mkdir(parents=True)
    shutil.copytree(REPO / "recipes" / "recipes", recipes)
    src = root / "sources"
    src.mkdir()
    truncated = tiny.copy_model(weights / "tiny-llama", src / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[:-100])
    remote = tiny.copy_model(weights / "tiny-llama", src / "remote-code")
    config = json.loads((remote / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomLM"}
    (remote / "config.json").write_text(json.dumps(config))
    pickled = src / "pickled"
    pickled.mkdir()
    shutil.copyfile(weights / "tiny-llama" / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    gguf_data = (weights / "tiny-llama.gguf").read_bytes()
    (src / "short.gguf").write_bytes(gguf_data[: len(gguf_data) // 3])
    tiny.save_foreign_gguf(src / "rwkv.gguf", "rwkv9")
    tiny.save_image_classifier(src / "vit")
    commit = (weights / "hub-commit").read_text()

    def model(name, source, recipes=("xnnpack-fp32",), **kwargs):
        (models / f"{name}.toml").write_text(model_toml(source, list(recipes), **kwargs))

    _hostile_sources(src, weights, model, models, recipes)

    model("good", local(weights / "tiny-llama"), recipes=("xnnpack-fp32", "q-none-divides", "q-no-fallback"))
    model("missing-dir", local(src / "nowhere"))
    model("truncated", local(truncated))
    model("remote-code", local(remote))
    model("pickled", local(pickled))
    model("short-gguf", f'kind = "gguf"\npath = "{src / "short.gguf"}"')
    model("rwkv-gguf", f'kind = "gguf"\npath = "{src / "rwkv.gguf"}"')
    model("missing-gguf", f'kind = "gguf"\npath = "{src / "nowhere.gguf"}"')
    model("no-package", 'kind = "gguf"\npackage = "no_such_gguf_package"')
    model("vit", local(src / "vit"))
    mpt = tiny.copy_model(weights / "tiny-llama", src / "mpt")  # only its config's model_type is read before a build
    (mpt / "config.json").write_text((mpt / "config.json").read_text().replace('"llama"', '"mpt"'))
    model("mpt-like", local(mpt))
    # A ViT declared as a masked LM: the kind's Auto classes decide, from the config alone.
    (models / "vit-as-fill-mask.toml").write_text(model_toml(local(src / "vit"), ["xnnpack-fp32"]).replace(
        'task = "causal-lm"', 'task = "masked-lm"'))
    model("too-long", local(weights / "tiny-llama"), max_seq_len=4096)
    model("hub-no-repo", 'kind = "hub"\nrepo = "tiny-org/absent"\nrevision = "main"')
    model("hub-no-revision", f'kind = "hub"\nrepo = "tiny-org/tiny-qwen3"\nrevision = "{"0" * 40}"')
    model("hub-good", f'kind = "hub"\nrepo = "tiny-org/tiny-qwen3"\nrevision = "{commit}"')
    model("typo", local(weights / "tiny-llama").replace("path", "pth"))
    (models / "wrong-type.toml").write_text(model_toml(local(weights / "tiny-llama"), ["xnnpack-fp32"])
                                            .replace("max_seq_len = 32", 'max_seq_len = "32"'))
    model("Bad Name", local(weights / "tiny-llama"))
    model("dup-a", local(weights / "tiny-llama"))  # dup-a + xnnpack-fp32 ...
    model("dup", local(weights / "tiny-llama"), recipes=("a-xnnpack-fp32",))  # ... and dup + a-xnnpack-fp32
    model("uses-bad-recipes", local(weights / "tiny-llama"),
          recipes=("tpu", "pass-missing", "pass-raises", "pass-not-callable"))
    model("empty-prompt", local(weights / "tiny-llama"), prompts=("hello", "  "))
    model("long-prompt", local(weights / "tiny-llama"), prompts=("hello", "the quick brown fox " * 8))
    (models / "latin1.toml").write_bytes(model_toml(local(weights / "tiny-llama"), ["xnnpack-fp32"],
                                                    prompts=("caf\xe9",)).encode("latin-1"))
    model("typo-source", local(weights / "tiny-llama").replace('kind = "local"', 'kind = "local"\nrepo = "x/y"'))
    shutil.copyfile(recipes / "xnnpack-fp32.toml", recipes / "a-xnnpack-fp32.toml")
    (recipes / "q-none-divides.toml").write_text(QUANT.format(size=128, fallback="true"))
    (recipes / "q-no-fallback.toml").write_text(QUANT.format(size=64, fallback="false"))
    (recipes / "tpu.toml").write_text('doc = "x"\nbackend = "tpu"\n[quantize]\nlinear = "3w"\n'
                                      '[lower]\nextract_delegate_segmentz = true\n')
    (root / "raising_passes.py").write_text("raise ValueError('broken at import')\n")
    (root / "flat_passes.py").write_text("boom = 3\n")
    (recipes / "pass-raises.toml").write_text('doc = "x"\nbackend = "xnnpack"\n[lower]\npasses = ["raising_passes:boom"]\n')
    (recipes / "pass-not-callable.toml").write_text('doc = "x"\nbackend = "xnnpack"\n[lower]\n'
                                                    'passes = ["flat_passes:boom"]\n')
    (recipes / "pass-missing.toml").write_text('doc = "x"\nbackend = "xnnpack"\n[lower]\npasses = ["nowhere:fn"]\n')
    return root / "recipes"


def _edited_json(folder, name, edit) -> None:
    path = folder / name
    value = json.loads(path.read_text())
    edit(value)
    path.write_text(json.dumps(value))


def _hostile_sources(src, weights, model, models, recipes) -> None:
    """Sources made carelessly or with intent: links out, special files, code of their own, damaged headers and
    configs, tokenizers that do not fit, weights missing; and numbers TOML allows that no gate can use."""
    from safetensors.torch import load_file, save_file

    def copy(name):
        return tiny.copy_model(weights / "tiny-llama", src / name)

    secret = src / "secret.txt"
    secret.write_text("password")
    (copy("link-out") / "notes.txt").symlink_to(secret)
    model("link-out", local(src / "link-out"))
    os.mkfifo(copy("fifo") / "weights.safetensors")
    model("fifo", local(src / "fifo"))
    _edited_json(copy("tokenizer-code"), "tokenizer_config.json",
                 lambda c: c.update(auto_map={"AutoTokenizer": ["tokenization_custom.CustomTokenizer", None]}))
    model("tokenizer-code", local(src / "tokenizer-code"))
    model("trusting", local(weights / "tiny-llama") + "\ntrust_remote_code = true")
    (copy("config-list") / "config.json").write_text("[1, 2]")
    model("config-list", local(src / "config-list"))
    _edited_json(copy("config-positions"), "config.json", lambda c: c.update(max_position_embeddings="many"))
    model("config-positions", local(src / "config-positions"))
    header = json.dumps({"w": {"dtype": "F32", "shape": "big", "data_offsets": [0, 4]}}).encode()
    (copy("bad-header") / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))
    model("bad-header", local(src / "bad-header"))
    (copy("bad-tokenizer") / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": 3}}')
    model("bad-tokenizer", local(src / "bad-tokenizer"))
    _edited_json(copy("small-vocab"), "config.json", lambda c: c.update(vocab_size=64))
    model("small-vocab", local(src / "small-vocab"))
    model("unknown-text", local(weights / "tiny-llama"), prompts=("hello \u2603 world",))
    tensors = load_file(weights / "tiny-llama" / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if "mlp.down_proj" not in k}, copy("no-mlp") / "model.safetensors",
              metadata={"format": "pt"})
    model("no-mlp", local(src / "no-mlp"))
    save_file({}, copy("no-tensors") / "model.safetensors", metadata={"format": "pt"})
    model("no-tensors", local(src / "no-tensors"))
    (models / "nan-tolerance.toml").write_text(
        model_toml(local(weights / "tiny-llama"), ["xnnpack-fp32"]) + "\n[tolerances.xnnpack-fp32]\nmin_cosine = nan\n")
    (recipes / "inf-gate.toml").write_text('doc = "x"\nbackend = "xnnpack"\n[verify]\nmax_abs = inf\n')
    (recipes / "pass-path.toml").write_text('doc = "x"\nbackend = "xnnpack"\n[lower]\npasses = ["/tmp/evil:fn"]\n')
    model("uses-hostile-recipes", local(weights / "tiny-llama"), recipes=("inf-gate", "pass-path"))


# (what is wrong, text the report must contain: file, field and value, and a next step where one exists)
TABLE = [
    ("unknown key", ["typo.toml: source.pth: unknown key"]),
    ("field of another source kind", ["typo-source.toml: source.repo: not used by a local source"]),
    ("wrong type", ["wrong-type.toml: max_seq_len: expected int, got str '32'"]),
    ("unknown backend", ["tpu.toml: backend: 'tpu' is not one of 'xnnpack', 'portable'"]),
    ("unknown scheme", ["tpu.toml: quantize.linear: '3w' is not one of"]),
    ("unknown lowering option", ["tpu.toml: lower.extract_delegate_segmentz: unknown key"]),
    ("pass not importable", ["pass-missing.toml: lower.passes: 'nowhere:fn'"]),
    ("pass raises on import", ["pass-raises.toml: lower.passes: 'raising_passes:boom': importing 'raising_passes' "
                               "raised ValueError: broken at import"]),
    ("pass not callable", ["pass-not-callable.toml: lower.passes: 'flat_passes:boom': 'boom' is not a callable"]),
    ("empty prompt", ["empty-prompt.toml: verify.prompts[1]: '  ' is empty"]),
    ("prompt over max_seq_len", ["long-prompt.toml: verify.prompts[1]:", "tokens + max_new_tokens 6 exceed "
                                 "max_seq_len 32; shorten the prompt or raise max_seq_len"]),
    ("model file not UTF-8", ["latin1.toml: (file): not UTF-8 text: byte 0xe9 at offset", "save the file as UTF-8"]),
    ("group size divides no layer", ["q-none-divides.toml: quantize.linear_group_size: 128 divides no linear layer "
                                     "of model good", "pick a divisor"]),
    ("group size without fallback", ["q-no-fallback.toml: quantize.linear_group_size: 64 does not divide",
                                     "set per_axis_fallback = true"]),
    ("max_seq_len over the limit", ["too-long.toml: max_seq_len: 4096 exceeds the model's limit of 256 positions",
                                    "lower max_seq_len"]),
    ("duplicate target", ["target 'dup-a-xnnpack-fp32' also produced by"]),
    ("bad file name", ["Bad Name.toml: (file name): 'Bad Name'"]),
    ("missing path", ["missing-dir.toml: source.path:", "nowhere is not a saved model folder"]),
    ("missing GGUF path", ["missing-gguf.toml: source.path: GGUF file", "nowhere.gguf does not exist"]),
    ("GGUF package not installed", ["no-package.toml: source.package: 'no_such_gguf_package' is not installed",
                                    "pip install no-such-gguf-package"]),
    ("hub repo not downloaded: a step, not a problem", ["need their weights downloaded first",
                                                        "  hub-no-repo: hf download tiny-org/absent --revision main"]),
    ("hub revision not downloaded", ["  hub-no-revision: hf download tiny-org/tiny-qwen3 --revision " + "0" * 40]),
    ("truncated safetensors", ["truncated.toml: source:", "model.safetensors: truncated", "re-download"]),
    ("truncated GGUF", ["short-gguf.toml: source:", "short.gguf: not a readable GGUF file"]),
    ("unsupported GGUF architecture", ["rwkv-gguf.toml: source:", "GGUF architecture 'rwkv9' has no causal-lm class"]),
    ("config not exportable", ["vit.toml: source:", "model_type 'vit' has no causal-lm class"]),
    ("family refused", ["mpt-like.toml: source:", "model_type 'mpt' cannot be exported as task \"causal-lm\": its "
                        "ALiBi bias is sliced by the cache's length"]),
    ("config not of its task kind", ["vit-as-fill-mask.toml: source:", "model_type 'vit' has no masked-lm class in "
                                     "this transformers version, so it cannot be exported as task \"masked-lm\""]),
    ("remote code in config.json", ["remote-code.toml: source:", "config.json: auto_map.AutoModelForCausalLM = "
                                    "'modeling_custom.CustomLM': the model names code of its own, and xportbuild "
                                    "never runs code a model folder ships"]),
    ("remote code in tokenizer_config.json", ["tokenizer-code.toml: source:", "tokenizer_config.json: "
                                              "auto_map.AutoTokenizer = ", "never runs code a model folder ships"]),
    ("trust_remote_code asked for", ["trusting.toml: source.trust_remote_code: xportbuild never runs code"]),
    ("link leaving the model folder", ["link-out.toml: source:", "notes.txt: a link to", "secret.txt, outside the "
                                       "model folder"]),
    ("special file in the model folder", ["fifo.toml: source:", "weights.safetensors: not a regular file"]),
    ("config not an object", ["config-list.toml: source:", "config.json: a JSON list, not an object"]),
    ("config field of the wrong type", ["config-positions.toml: source:", "max_position_embeddings: 'many' is not a "
                                        "positive whole number"]),
    ("malformed safetensors header", ["bad-header.toml: source:", "model.safetensors: not a readable safetensors "
                                      "file (tensor 'w': shape 'big' is not a list of sizes)"]),
    ("malformed tokenizer.json", ["bad-tokenizer.toml: source:", "tokenizer.json: not a readable tokenizer"]),
    ("tokenizer beyond the vocabulary", ["small-vocab.toml: source:", "tokenizer.json: token ids go up to 119, but "
                                         "the model's vocabulary", "has 64 rows",
                                         "small-vocab does not match its model class: weights of "
                                         "another shape lm_head.weight, model.embed_tokens.weight"]),
    ("prompt the tokenizer cannot encode", ["unknown-text.toml: verify.prompts[0]:", "has text the model's tokenizer "
                                            "cannot encode (it becomes <unk>)"]),
    ("a layer's weights missing", ["no-mlp.toml: source:", "weights missing model.layers.0.mlp.down_proj.weight",
                                   "a missing one would be random"]),
    ("no weights at all", ["no-tensors.toml: source:", "weights missing", "and 8 more"]),
    ("NaN tolerance", ["nan-tolerance.toml: tolerances.xnnpack-fp32.min_cosine: nan: not a finite number"]),
    ("infinite gate", ["inf-gate.toml: verify.max_abs: inf: not a finite number"]),
    ("pass named by a path", ["pass-path.toml: lower.passes: '/tmp/evil:fn': not 'module:attr' with a dotted "
                              "module name"]),
    ("pickled weights only", ["pickled.toml: source:", "has no .safetensors weights; pickled checkpoints are not"]),
]


def _validate(recipes, env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xportbuild", "validate", str(recipes)], env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def report(tmp_path_factory, weights):
    import os

    root = tmp_path_factory.mktemp("bad")
    recipes = _bad_project(root, weights)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(weights / "hf-cache"),
           "XPORTBUILD_CACHE": str(root / "cache")}
    result = _validate(recipes, env)
    return root, env, result


@pytest.mark.parametrize("case, expected", TABLE, ids=[row[0] for row in TABLE])
def test_every_bad_input_is_reported_in_one_validate_run(report, case, expected):
    _, _, result = report
    assert result.returncode == 2
    for text in expected:  # problems on stderr; what builds and what needs a download first on stdout
        assert text in result.stderr + result.stdout, f"{case}: {text!r} missing from:\n{result.stderr}{result.stdout}"


def test_good_targets_are_not_reported_and_nothing_is_built(report):
    root, _, result = report
    lines = result.stderr.splitlines()
    assert not [line for line in lines if "good.toml" in line or "hub-good.toml" in line]
    assert len([line for line in lines if line.startswith("  - ")]) >= len(TABLE)
    assert not (root / "cache" / SCHEMA).exists()


def test_a_hub_source_not_downloaded_is_a_step_to_take_not_a_problem(tmp_path, weights):
    import os

    (tmp_path / "recipes" / "models").mkdir(parents=True)
    shutil.copytree(REPO / "recipes" / "recipes", tmp_path / "recipes" / "recipes")
    commit = (weights / "hub-commit").read_text()
    (tmp_path / "recipes" / "models" / "q.toml").write_text(
        model_toml(f'kind = "hub"\nrepo = "tiny-org/tiny-qwen3"\nrevision = "{commit}"', ["xnnpack-fp32"]))
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty")}
    result = _validate(tmp_path / "recipes", env)
    assert result.returncode == 0, result.stderr  # nothing wrong with the project: its weights are not here yet
    assert "0 targets valid and buildable here" in result.stdout
    assert f"  q: hf download tiny-org/tiny-qwen3 --revision {commit}" in result.stdout


def test_fetch_refuses_a_truncated_source_and_keeps_finished_work(project, weights):
    """The same checks guard the build itself: a bad source fails its fetch, naming the file."""
    project.write_model("ok", model_toml(local(weights / "tiny-llama"), ["xnnpack-fp32"]))
    project.doit("fetch:ok")
    truncated = tiny.copy_model(weights / "tiny-llama", project.root / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[:-1])
    project.write_model("cut", model_toml(local(truncated), ["xnnpack-fp32"]))
    result = project.doit("export:cut-xnnpack-fp32", check=False)
    assert result.returncode != 0
    assert "fetch:cut: " in result.stdout and "cut.toml: source:" in result.stdout
    assert "model.safetensors: truncated" in result.stderr + result.stdout
    events = project.events()
    assert not [e for e in events if e["task"] == "fetch:cut" and e["event"] == "built"]
    assert "status     : up-to-date" in project.doit("info", "fetch:ok").stdout


def test_a_source_folder_gone_since_planning_is_one_line_under_doit(project, weights):
    """doit asks each task's freshness before running it: a source that is not there fails that task in one line."""
    project.write_model("gone", model_toml(local(project.root / "nowhere"), ["xnnpack-fp32"]))
    result = project.doit("export:gone-xnnpack-fp32", check=False)
    assert result.returncode == 1, result.stdout + result.stderr  # a failed task, not doit's crash (3)
    assert "fetch:gone: " in result.stdout and "nowhere is not a saved model folder" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


CUSTOM_CODE = """print("the model's own code ran")
raise SystemExit(3)
"""


@pytest.mark.parametrize("config", ["config.json", "tokenizer_config.json"])
def test_code_a_model_folder_ships_never_runs_and_nothing_prompts(project, weights, config):
    """No option turns it on; the build refuses at fetch, in one line, with no terminal to answer a prompt."""
    folder = tiny.copy_model(weights / "tiny-llama", project.root / "custom")
    _edited_json(folder, config, lambda c: c.update(auto_map={"AutoModelForCausalLM": "modeling_custom.CustomLM",
                                                              "AutoTokenizer": ["modeling_custom.CustomLM", None]}))
    (folder / "modeling_custom.py").write_text(CUSTOM_CODE)
    project.write_model("custom", model_toml(local(folder), ["xnnpack-fp32"]))
    refused = project.doit("export:custom-xnnpack-fp32", check=False)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert f"{config}: auto_map." in refused.stdout and "never runs code a model folder ships" in refused.stdout
    assert "own code ran" not in refused.stdout + refused.stderr and "[y/N]" not in refused.stdout + refused.stderr
    assert "Traceback" not in refused.stdout + refused.stderr
    assert not [e for e in project.events() if e["event"] == "built"]


@pytest.mark.parametrize("body, expected", [
    ("def broken(program):\n    raise RuntimeError('pass bug')\n", "pass 'app_passes:broken' raised RuntimeError: pass bug"),
    ("def broken(program):\n    program.graph_module.recompile()\n",
     "pass 'app_passes:broken' returned NoneType, not the ExportedProgram it was given"),
], ids=["raises", "returns-none"])
def test_a_pass_that_fails_at_lower_is_one_line(project, weights, body, expected):
    """validate can import a pass, not run it on a program: a pass that raises or forgets to return its program is
    found at lower, named, in one line."""
    (project.root / "app_passes.py").write_text(body)
    project.write_recipe("with-pass", 'doc = "x"\nbackend = "xnnpack"\n[lower]\npasses = ["app_passes:broken"]\n')
    project.write_model("tiny-llama", model_toml(local(weights / "tiny-llama"), ["with-pass"]))
    result = project.doit("export:tiny-llama-with-pass", check=False)
    assert result.returncode == 1
    assert f"lower:tiny-llama-with-pass: lower: {expected}" in result.stdout, result.stdout[-2000:]
    assert "Traceback" not in result.stdout + result.stderr


SORT_PASS = '''import operator

import torch


def sort_logits(program):
    """Adds 0 * sort(logits).values to the logits: the numbers stay, an operator with no portable kernel enters."""
    graph = program.graph
    output = next(n for n in graph.nodes if n.op == "output")
    logits = output.args[0][-1]
    with graph.inserting_before(output):
        ordered = graph.call_function(torch.ops.aten.sort.default, (logits,))
        values = graph.call_function(operator.getitem, (ordered, 0))
        zero = graph.call_function(torch.ops.aten.mul.Scalar, (values, 0.0))
        total = graph.call_function(torch.ops.aten.add.Tensor, (logits, zero))
    for node in (values, zero, total):
        node.meta = dict(logits.meta)
    ordered.meta = {**logits.meta, "val": (logits.meta["val"], logits.meta["val"].long())}
    output.args = ((*output.args[0][:-1], total),)
    program.graph_module.recompile()
    return program
'''


def test_a_program_the_runtime_cannot_run_never_leaves_lower(project, weights):
    """aten::sort has no kernel in ExecuTorch's portable runtime: the lowered program is refused at lower, naming
    the operator, its method and the source line it came from, before verify spends any time on it."""
    (project.root / "sorting.py").write_text(SORT_PASS)
    project.write_recipe("with-sort", 'doc = "x"\nbackend = "xnnpack"\n[lower]\npasses = ["sorting:sort_logits"]\n')
    project.write_model("tiny-llama", model_toml(local(weights / "tiny-llama"), ["with-sort"]))
    result = project.doit("export:tiny-llama-with-sort", check=False)
    assert result.returncode == 1
    assert ("lower:tiny-llama-with-sort: the .pte would not run: the ExecuTorch runtime has no kernel for "
            "aten::sort.values (method forward, from modeling_llama.py:") in result.stdout, result.stdout[-2000:]
    assert "Traceback" not in result.stdout + result.stderr
    assert not [e for e in project.events() if e["task"].startswith("verify:")]
