"""Runtime-grade LLM artifacts: the metadata ExecuTorch's LLM runner reads, the provenance record inside the .pte,
and `python -m xportbuild run`, which generates with the C++ runner from the published folder alone."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.integration.models import local, model_toml

TARGET = "tiny-gemma3-xnnpack-fp32"
MAX_SEQ_LEN = 48


def _constant_methods(pte) -> dict:
    from executorch.extension.pybindings.portable_lib import _load_for_executorch

    module = _load_for_executorch(str(pte), None)
    values = {name: module.run_method(name, ()) for name in module.method_names() if name != "forward"}
    return {name: value if name == "get_eos_ids" else value[0] for name, value in values.items()}


def test_runner_metadata_and_provenance(project, weights):
    """Pinned on a model where the naive values are wrong, as in Gemma 3: head_dim 48 is not hidden / heads (32),
    generation_config lists a second end id, and the weights are stored in bfloat16 but exported in float32."""
    config = json.loads((weights / "tiny-gemma3" / "config.json").read_text())
    assert config["head_dim"] != config["hidden_size"] // config["num_attention_heads"]
    assert config["dtype"] == "bfloat16"
    project.write_model("tiny-gemma3", model_toml(local(weights / "tiny-gemma3"), ["xnnpack-fp32"],
                                                  max_seq_len=MAX_SEQ_LEN))
    project.doit(f"export:{TARGET}")
    folder = project.root / "artifacts" / TARGET
    methods = _constant_methods(folder / "model.pte")
    provenance = json.loads(methods.pop("get_provenance"))
    assert methods == {
        "get_max_seq_len": MAX_SEQ_LEN, "get_max_context_len": MAX_SEQ_LEN, "get_bos_id": 1, "get_eos_ids": [2, 7],
        "get_vocab_size": config["vocab_size"], "use_kv_cache": True, "use_sdpa_with_kv_cache": False,
        "enable_dynamic_shape": True, "get_n_layers": 2, "get_n_kv_heads": 1, "get_head_dim": 48,
        "get_dtype": "float32", "get_task": "causal-lm",
    }
    manifest = json.loads((folder / "manifest.json").read_text())
    assert provenance["target"] == TARGET
    assert provenance["program_key"] == manifest["stages"]["program"]["key"]
    assert provenance["lower_params"] == manifest["stages"]["lower"]["params"]
    assert provenance["source"]["kind"] == "local" and provenance["source"]["tree"]
    assert provenance["libraries"] == manifest["libraries"]


def test_run_command_generates_the_verified_text(project, weights):
    project.write_model("tiny-gemma3", model_toml(local(weights / "tiny-gemma3"), ["xnnpack-fp32"],
                                                  max_seq_len=MAX_SEQ_LEN))
    project.doit(f"export:{TARGET}")
    folder = project.root / "artifacts" / TARGET
    verify = json.loads((folder / "manifest.json").read_text())["stages"]["verify"]["result"]
    result = subprocess.run([sys.executable, "-m", "xportbuild", "run", str(folder), "--prompt",
                             "the capital of france is", "--max-new-tokens", "6"],
                            cwd=project.root, env=project.env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith(verify["runner"]["text"]), (result.stdout, verify["runner"])
    assert verify["runner"]["matches_pte_greedy"]
    (summary,) = result.stderr.strip().splitlines()  # one line of figures: the runner's own log is not shown
    assert summary.startswith("load ") and "first token" in summary and "prefill" in summary and "decode" in summary
    report = (folder / "report.md").read_text()
    assert "## ExecuTorch LLM runner" in report and "equals the .pte's greedy text: yes" in report
    missing = subprocess.run([sys.executable, "-m", "xportbuild", "run", str(folder / "nope.pte"), "--prompt", "x"],
                             cwd=project.root, env=project.env, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and f"program {folder / 'nope.pte'} does not exist" in missing.stderr


def _ending_early(weights, folder):
    """tiny-llama whose end token is the third token its greedy continuation of the first prompt generates: the
    continuation then ends inside max_new_tokens. Returns (folder, the text before the end token)."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shutil.copytree(weights / "tiny-llama", folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    prompt = tokenizer("the capital of france is", return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**prompt, max_new_tokens=6, do_sample=False)[0, prompt["input_ids"].shape[1]:]
    end = next(index for index, token in enumerate(generated.tolist()) if index >= 1 and token not in generated[:index])
    for name in ("config.json", "generation_config.json"):
        config = json.loads((folder / name).read_text())
        config["eos_token_id"] = int(generated[end])
        (folder / name).write_text(json.dumps(config))
    return folder, tokenizer.decode(generated[:end])


def test_a_continuation_that_reaches_its_end_token_is_what_the_runner_prints(project, weights, tmp_path):
    """The C++ runner streams the end token's own text before it stops; the .pte's greedy text stops before it."""
    folder, before_end = _ending_early(weights, tmp_path / "ends-early")
    project.write_model("ends-early", model_toml(local(folder), ["xnnpack-fp32"]))
    project.doit("export:ends-early-xnnpack-fp32")
    runner = json.loads((project.root / "artifacts" / "ends-early-xnnpack-fp32" / "manifest.json").read_text())[
        "stages"]["verify"]["result"]["runner"]
    assert runner["matches_pte_greedy"] and runner["expected"] == before_end
    assert runner["text"].strip() != before_end.strip()  # the end token's text is there, and was not compared
