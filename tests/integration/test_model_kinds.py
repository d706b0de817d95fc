"""Every task kind beyond the causal LM, on two tiny architectures each, through the whole graph.

Per kind the first architecture builds with the fp32 recipe, the second with the 8-bit one (verify compares its
.pte with the quantized program and with the float model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests import tiny
from tests.conftest import made_once
from tests.integration.models import QUANT_TOLERANCES, local

# task -> (tiny builder, first architecture, second architecture)
KINDS = {
    "masked-lm": ("save_masked_lm", "bert", "roberta"),
    "feature-extraction": ("save_sentence_encoder", "bert", "roberta"),
    "image-classification": ("save_image_classifier", "vit", "resnet"),
    "text2text": ("save_seq2seq", "t5", "bart"),
    "speech-recognition": ("save_speech", "whisper", "speech_to_text"),
    "image-text-to-text": ("save_multimodal", "llava", "smolvlm"),
    "audio-text-to-text": ("save_multimodal", "voxtral", "audioflamingo3"),
}
PROMPTS = ("the capital of france is <mask>", "hello world one two")
QUANTIZED = "xnnpack-8da8w"


@pytest.fixture(scope="session")
def kind_weights(run_folder):
    """Builds a tiny model the first time a test of this run asks for it."""
    root = run_folder / "kind-weights"
    root.mkdir(exist_ok=True)

    def build(task: str, arch: str) -> Path:
        # By task too: BERT is both a masked LM and a sentence encoder, saved differently.
        return made_once(root / f"{task}-{arch}", lambda folder: getattr(tiny, KINDS[task][0])(folder, arch))

    return build


def kind_model_toml(task: str, folder: Path, recipes: list[str], max_seq_len: int = 64) -> str:
    """A model file with exactly the keys its kind uses (an unused one is refused)."""
    from xportbuild.models.kinds import KINDS as TASK_KINDS

    kind = TASK_KINDS[task]
    quoted = ", ".join(f'"{r}"' for r in recipes)
    prompts = ", ".join(f'"{p}"' for p in PROMPTS)
    overrides = "".join(QUANT_TOLERANCES.format(recipe=r) for r in recipes if r != "xnnpack-fp32")
    sequence = f"max_seq_len = {max_seq_len}\n" if kind.has_sequence else ""
    inputs = f"prompts = [{prompts}]\n" if kind.prompted else "samples = 2\n"
    generation = "max_new_tokens = 6\n" if kind.generates else ""
    return (f'doc = "tiny {task} model"\ntask = "{task}"\n{sequence}recipes = [{quoted}]\n\n'
            f"[source]\n{local(folder)}\n\n[verify]\n{inputs}{generation}{overrides}")


def _manifest(project, target: str) -> dict:
    return json.loads((project.root / "artifacts" / target / "manifest.json").read_text())


def _stage_name(stage: str, kind, method: str) -> str:
    return f"{stage}.{method}" if len(kind.methods) > 1 else stage


def _check_target(project, target: str, task: str, fp32: bool) -> dict:
    from xportbuild.models.kinds import KINDS as TASK_KINDS

    kind = TASK_KINDS[task]
    manifest = _manifest(project, target)
    verify = manifest["stages"]["verify"]["result"]
    assert set(verify["methods"]) == set(kind.methods)
    # One program (float) or quantize node per method, each feeding lower (named by method if there are several).
    programs = [name for name in manifest["stages"] if name.split(".")[0] in ("program", "quantize")]
    assert set(manifest["stages"]["lower"]["inputs"]) == {name.replace("quantize", "program") for name in programs}
    per_method = {name.partition(".")[2] or kind.methods[0] for name in programs}
    assert per_method == set(kind.methods) and len(programs) == len(kind.methods)
    lower = manifest["stages"]["lower"]["result"]
    assert set(lower["delegation"]) == set(kind.methods)
    assert sum(m["delegate_calls"] for m in lower["delegation"].values()) > 0
    # The app's whole chain with the .pte gives the float model's outcome (tokens or labels), sample by sample; with
    # dynamically quantized activations a choice may flip where the program, fed the same context, had a near-tie
    # (recipe margin).
    for outcome in verify["greedy"]:
        margin = outcome["program_margin_at_divergence"]
        assert outcome["pte"] == outcome["reference"] or not fp32 and margin is not None and margin <= 0.5, outcome
    references = [token for outcome in verify["greedy"] for token in outcome["reference"]]
    if kind.generates or task == "masked-lm":
        assert len(set(references)) > 1, f"degenerate reference outcome {references}: the test could not fail"
    if fp32:
        for method, compared in verify["methods"].items():
            assert compared["vs_reference"]["cosine_min"] > 0.9999, (method, compared)
            assert compared["vs_reference"].get("top1", 1.0) == 1.0, (method, compared)
        assert all(outcome["pte"] == outcome["reference"] for outcome in verify["greedy"])
    else:
        for method in kind.methods:
            quantized = manifest["stages"][_stage_name("quantize", kind, method)]["result"]["quantized"]
            assert quantized.get("linear", {}).get("scheme", "8da8w") == "8da8w", (method, quantized)
        assert any("linear" in manifest["stages"][_stage_name("quantize", kind, m)]["result"]["quantized"]
                   for m in kind.methods)
    if kind.compares_neighbours:
        assert verify["neighbours"]["samples"] == len(PROMPTS) and verify["neighbours"]["agreement"] == 1.0
    files = set(manifest["files"])
    assert "model.pte" in files
    if task in ("image-classification",):
        assert "tokenizer.json" not in files
    else:
        assert "tokenizer.json" in files
    if task in ("speech-recognition", "audio-text-to-text"):
        assert "preprocessor_config.json" in files  # the app needs the feature extractor
    return manifest


def _pte_methods(project, target: str) -> set[str]:
    from executorch.extension.pybindings.portable_lib import _load_for_executorch

    from xportbuild.runtime import load_kernels

    load_kernels()
    return set(_load_for_executorch(str(project.root / "artifacts" / target / "model.pte")).method_names())


@pytest.mark.parametrize("task", list(KINDS))
def test_each_kind_builds_two_architectures_fp32_and_quantized(project, kind_weights, capfd, task):
    _, first, second = KINDS[task]
    project.write_model(f"tiny-{first}", kind_model_toml(task, kind_weights(task, first), ["xnnpack-fp32"]))
    project.write_model(f"tiny-{second}", kind_model_toml(task, kind_weights(task, second), [QUANTIZED]))
    targets = {f"tiny-{first}-xnnpack-fp32": True, f"tiny-{second}-{QUANTIZED}": False}
    listed = project.doit("list").stdout
    assert all(f"export:{target}" in listed for target in targets)
    project.doit(*(f"export:{target}" for target in targets))
    for target, fp32 in targets.items():
        manifest = _check_target(project, target, task, fp32)
        methods = _pte_methods(project, target)
        assert set(manifest["stages"]["verify"]["result"]["methods"]) <= methods
        assert "get_provenance" in methods
    report = (project.root / "artifacts" / f"tiny-{second}-{QUANTIZED}" / "report.md").read_text()
    assert "| method | vs |" in report
    # What an app gets from the fp32 .pte (API and command) is what transformers gives with the float model.
    APP_CHECKS[task](project, capfd, project.root / "artifacts" / f"tiny-{first}-xnnpack-fp32", kind_weights(task, first))


def _run_command(capfd, folder: Path, *options: str) -> list[str]:
    """`python -m xportbuild run` on the artifact (its main, in this process: a new one would spend seconds importing
    the libraries again): its output lines, after checking its one line of figures."""
    from xportbuild.__main__ import main

    capfd.readouterr()
    returncode = main(["run", str(folder), *options])
    shown = capfd.readouterr()
    assert returncode == 0, shown.err[-3000:]
    (figures,) = shown.err.strip().splitlines()  # the libraries' output goes to a log
    assert figures.startswith("load ") and "first output" in figures, figures
    return shown.out.strip().splitlines()


def _fill_mask_app(project, capfd, folder: Path, weights: Path) -> None:
    from transformers import pipeline

    from xportbuild import app

    text = "the capital of france is <mask>"
    fills = app.load(folder).fill_mask(text, top_k=3)
    expected = pipeline("fill-mask", model=str(weights), top_k=3)(text)
    assert [row["token"] for row in fills] == [row["token"] for row in expected]
    assert [row["sequence"] for row in fills] == [row["sequence"] for row in expected]
    assert max(abs(a["score"] - b["score"]) for a, b in zip(fills, expected)) < 1e-4, (fills, expected)
    (line,) = _run_command(capfd, folder, "--text", text, "--top-k", "3")
    assert line.startswith(repr(expected[0]["token_str"].strip())), (line, expected)


def _write_png(path: Path, size: int = 48) -> Path:
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size]
    pixels = np.stack([(x * 5) % 256, (y * 3) % 256, ((x + y) * 7) % 256], axis=-1).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _classify_app(project, capfd, folder: Path, weights: Path) -> None:
    from transformers import pipeline

    from xportbuild import app

    image = _write_png(project.root / "photo.png")
    labels = app.load(folder).classify(image, top_k=3)
    expected = pipeline("image-classification", model=str(weights), top_k=3)(str(image))
    assert [row["label"] for row in labels] == [row["label"] for row in expected]
    assert max(abs(a["score"] - b["score"]) for a, b in zip(labels, expected)) < 1e-4, (labels, expected)
    lines = _run_command(capfd, folder, "--image", str(image), "--top-k", "3")
    assert [line.split("  ", 1)[1] for line in lines] == [row["label"] for row in expected]


def _text_to_text_app(project, capfd, folder: Path, weights: Path) -> None:
    """transformers 5 has no text2text pipeline: its generate and tokenizer, as that pipeline ran them."""
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from xportbuild import app

    text = "hello world one two"
    tokenizer, model = AutoTokenizer.from_pretrained(weights), AutoModelForSeq2SeqLM.from_pretrained(weights)
    with torch.no_grad():
        generated = model.generate(**tokenizer(text, return_tensors="pt"), max_new_tokens=6, do_sample=False,
                                   num_beams=1)[0]
    expected = tokenizer.decode(generated, skip_special_tokens=True)
    assert expected.strip(), "the float model generated nothing: the comparison could not fail"
    assert app.load(folder).generate(text, max_new_tokens=6) == expected
    assert _run_command(capfd, folder, "--text", text, "--max-new-tokens", "6") == [expected.strip()]


def _write_wav(path: Path, rate: int, seconds: float = 1.0) -> Path:
    import wave

    import numpy as np

    t = np.arange(int(rate * seconds)) / rate
    samples = (0.4 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 1250 * t * t)) * 32767
    with wave.open(str(path), "wb") as clip:
        clip.setnchannels(1)
        clip.setsampwidth(2)
        clip.setframerate(rate)
        clip.writeframes(samples.astype("<i2").tobytes())
    return path


def _transcribe_app(project, capfd, folder: Path, weights: Path) -> None:
    """Whisper's pipeline decodes with Whisper's own tokenizer, which the tiny model has not: its generate (with
    the language and task tokens, and language detection) and tokenizer, as the pipeline runs them."""
    import torch
    from transformers import AutoFeatureExtractor, AutoModelForSpeechSeq2Seq, AutoTokenizer

    from xportbuild import app
    from xportbuild.app import read_audio

    clip = _write_wav(project.root / "clip.wav", 16000)
    extractor, model = AutoFeatureExtractor.from_pretrained(weights), AutoModelForSpeechSeq2Seq.from_pretrained(weights)
    tokenizer = AutoTokenizer.from_pretrained(weights)
    samples, rate = read_audio(clip)
    features = extractor(samples, sampling_rate=rate, return_tensors="pt").input_features
    loaded = app.load(folder)
    texts = set()
    for language, task in ((None, None), ("fr", "translate")):
        with torch.no_grad():
            generated = model.generate(features, language=language, task=task, max_new_tokens=6, do_sample=False,
                                       num_beams=1)[0]
        expected = tokenizer.decode(generated, skip_special_tokens=True).strip()
        assert loaded.transcribe(clip, language=language, task=task, max_new_tokens=6) == expected
        texts.add(expected)
    assert len(texts) == 2, f"language and task changed nothing ({texts}): the comparison could not fail"
    # Another sampling rate is resampled to the model's: the command prints what the API gives on that file
    slower = _write_wav(project.root / "clip-8k.wav", 8000)
    options = ("--language", "fr", "--task", "translate", "--max-new-tokens", "6")
    assert _run_command(capfd, folder, "--audio", str(slower), *options) == \
        [loaded.transcribe(slower, language="fr", task="translate", max_new_tokens=6)]


def _embed_app(project, capfd, folder: Path, weights: Path) -> None:
    import numpy as np
    from sentence_transformers import SentenceTransformer

    from xportbuild import app

    texts = ["the capital of france is paris", "hello world one two", "water boils at ten degrees"]
    expected = SentenceTransformer(str(weights), device="cpu").encode(texts)
    vectors = app.load(folder).embed(texts)
    assert np.abs(vectors - expected).max() < 1e-4, np.abs(vectors - expected).max()
    lines = _run_command(capfd, folder, "--text", texts[0], "--text", texts[1])
    assert lines == [f"cosine {app.cosine(expected[0], expected[1]):.4f}  {texts[0]!r} ~ {texts[1]!r}"]


def _image_text_app(project, capfd, folder: Path, weights: Path) -> None:
    """LLaVA: the prompt in its chat template and the image through its processor, as its pipeline runs them."""
    from transformers import pipeline

    from xportbuild import app

    image, prompt = _write_png(project.root / "photo.png"), "hello world one two"
    messages = [{"role": "user", "content": [{"type": "image", "image": str(image)}, {"type": "text", "text": prompt}]}]
    expected = pipeline("image-text-to-text", model=str(weights))(text=messages, max_new_tokens=6,
                                                                  return_full_text=False)[0]["generated_text"].strip()
    assert expected, "the float model generated nothing: the comparison could not fail"
    assert app.load(folder).generate(prompt, image=image, max_new_tokens=6) == expected
    assert _run_command(capfd, folder, "--prompt", prompt, "--image", str(image), "--max-new-tokens", "6") == \
        [expected]


def _audio_text_app(project, capfd, folder: Path, weights: Path) -> None:
    """Voxtral's processor needs mistral-common's tokenizer, which the tiny model has not: its generate on the clip's
    features with the placeholders after BOS, as the app lays them out for a model without a chat template."""
    import torch
    from transformers import AutoFeatureExtractor, AutoModelForMultimodalLM, AutoTokenizer

    from xportbuild import app
    from xportbuild.app import read_audio

    clip, prompt = _write_wav(project.root / "clip.wav", 16000), "hello world one two"
    loaded = app.load(folder)
    extractor, tokenizer = AutoFeatureExtractor.from_pretrained(weights), AutoTokenizer.from_pretrained(weights)
    samples, rate = read_audio(clip)
    features = torch.from_numpy(extractor(samples, sampling_rate=rate, return_tensors="np")["input_features"])
    rows = loaded.facts["get_media_rows"]
    ids = tokenizer(prompt)["input_ids"]
    ids = torch.tensor([ids[:1] + [loaded.facts["get_placeholder_token_id"]] * rows + ids[1:]])
    with torch.no_grad():
        generated = AutoModelForMultimodalLM.from_pretrained(weights).generate(
            input_ids=ids, input_features=features, max_new_tokens=6, do_sample=False, num_beams=1)[0, ids.shape[1]:]
    expected = tokenizer.decode(generated, skip_special_tokens=True).strip()
    assert expected, "the float model generated nothing: the comparison could not fail"
    assert loaded.generate(prompt, audio=clip, max_new_tokens=6) == expected
    assert _run_command(capfd, folder, "--prompt", prompt, "--audio", str(clip), "--max-new-tokens", "6") == [expected]


APP_CHECKS = {"masked-lm": _fill_mask_app, "image-classification": _classify_app, "text2text": _text_to_text_app,
              "speech-recognition": _transcribe_app, "feature-extraction": _embed_app,
              "image-text-to-text": _image_text_app, "audio-text-to-text": _audio_text_app}


def test_changing_one_methods_quantization_reruns_only_that_method(project, kind_weights):
    recipe = "xnnpack-8da4w-decoder"
    project.write_model("tiny-t5", kind_model_toml("text2text", kind_weights("text2text", "t5"), [recipe]))
    project.doit(f"export:tiny-t5-{recipe}")
    stages = _manifest(project, f"tiny-t5-{recipe}")["stages"]
    # 2 decoder layers x (self-attention q, k, v, o; cross-attention q, o; 2 feed-forward): the cross-attention keys
    # and values are projected in the encoder method.
    assert stages["quantize.text_decoder"]["result"]["quantized"]["linear"] == {"scheme": "8da4w",
                                                                                "layers": {"group 32": 16}}
    assert stages["quantize.encoder"]["result"]["quantized"]["linear"]["scheme"] == "8da8w"
    before = len(project.events())
    project.edit_recipe(recipe, "[quantize.text_decoder]\n", "[quantize.text_decoder]\nqparams = \"hqq\"\n")
    project.doit(f"export:tiny-t5-{recipe}")
    assert project.built_since(before) == [f"lower:tiny-t5-{recipe}", f"quantize:tiny-t5-{recipe}.text_decoder",
                                           f"replay:tiny-t5-{recipe}", f"verify:tiny-t5-{recipe}"]
    after = _manifest(project, f"tiny-t5-{recipe}")["stages"]
    assert after["quantize.encoder"]["key"] == stages["quantize.encoder"]["key"]
    assert after["quantize.text_decoder"]["params"]["quantize"]["qparams"] == "hqq"


def test_a_recipe_naming_a_method_the_model_lacks_is_refused(project, kind_weights):
    project.write_recipe("vision-8bit", 'backend = "xnnpack"\ndoc = "8-bit, float vision encoder"\n\n[quantize]\n'
                         'linear = "8da8w"\nlinear_group_size = 0\n\n[quantize.vision_encoder]\nlinear = "none"\n')
    project.write_model("tiny-t5", kind_model_toml("text2text", kind_weights("text2text", "t5"), ["vision-8bit"]))
    result = project.doit("list", check=False)
    assert result.returncode != 0
    assert "vision-8bit.toml: quantize.vision_encoder: model tiny-t5 (task 'text2text'" in result.stderr
    assert "its methods: encoder, text_decoder" in result.stderr


def test_a_model_declared_as_the_wrong_kind_fails_naming_model_and_method(project, kind_weights):
    project.write_model("tiny-llava", kind_model_toml("audio-text-to-text", kind_weights("image-text-to-text", "llava"),
                                                      ["xnnpack-fp32"]))
    result = project.doit("export:tiny-llava-xnnpack-fp32", check=False)
    assert result.returncode != 0
    assert "tiny-llava: task 'audio-text-to-text' exports method audio_encoder, but this model provides" in \
        result.stdout + result.stderr


@pytest.mark.parametrize("task, arch", [("text2text", "t5"), ("text2text", "bart"), ("image-text-to-text", "llava"),
                                        ("image-text-to-text", "smolvlm"), ("audio-text-to-text", "voxtral"),
                                        ("audio-text-to-text", "audioflamingo3")])
def test_the_method_chain_generates_what_transformers_generates(kind_weights, tmp_path, task, arch):
    """The float reference is our methods chained as an app chains them: it must be the model itself."""
    import shutil

    import torch

    from xportbuild.models.kinds import kind_of
    from xportbuild.models.methods import module_call
    from xportbuild.recipe.spec import VerifyInputs

    folder = shutil.copytree(kind_weights(task, arch), tmp_path / arch)
    wrapper = kind_of(task).wrapper()
    model = wrapper.load_model(folder)
    modules = {method: exportable.module for method, exportable in wrapper.exportables(model, 64).items()}
    facts = wrapper.metadata(model, folder, 64)
    generated = []
    for sample in wrapper.samples(folder, model, VerifyInputs(prompts=PROMPTS, samples=2)):
        ours = wrapper.run(module_call(modules), sample, facts, 6).tokens
        with torch.no_grad():
            if task == "text2text":
                theirs = model.generate(torch.from_numpy(sample["inputs"]), max_new_tokens=6, do_sample=False,
                                        num_beams=1)[0, 1:].tolist()
            else:
                ids, media = torch.from_numpy(sample["input_ids"]), torch.from_numpy(sample["media"])
                kwargs = {"pixel_values": media[None] if arch == "smolvlm" else media} \
                    if task == "image-text-to-text" else {"input_features": media}
                if arch == "audioflamingo3":
                    kwargs["input_features_mask"] = torch.ones(1, media.shape[-1], dtype=torch.long)
                theirs = model.generate(input_ids=ids, **kwargs, max_new_tokens=6, do_sample=False,
                                        num_beams=1)[0, ids.shape[1]:].tolist()
        assert ours == theirs[:len(ours)], (ours, theirs)
        generated += ours
    assert len(set(generated)) > 1, f"degenerate generation {generated}: the comparison could not fail"


def test_a_prompt_longer_than_max_seq_len_is_a_clear_error(project, kind_weights):
    project.write_model("tiny-bert", kind_model_toml("masked-lm", kind_weights("masked-lm", "bert"), ["xnnpack-fp32"],
                                                     max_seq_len=4))
    result = project.doit("reference:tiny-bert", check=False)
    assert result.returncode != 0
    assert "verify prompt 0 has 14 tokens (input_ids), more than max_seq_len=4: shorten it" in result.stdout
