"""Checks that read a model's sources but load no weights: run for every target by `doit validate`, and by
fetch before any conversion. Each problem names the file, the field, the value and what to do."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from xportbuild import passes, sources
from xportbuild.errors import RecipeError, SourceError, ValidationFailed
from xportbuild.models.kinds import kind_of, kinds_with
from xportbuild.recipe.spec import ModelSpec, SourceSpec, Target

_EMBEDDING_NAMES = ("embed_tokens", "word_embeddings", "wte", "token_embd")
# Every token covers at least one byte of the prompt, apart from the few special tokens a tokenizer adds around it
# (BOS, EOS): a prompt this far under its budget fits without loading the tokenizer (13 s for Gemma's GGUF).
_ADDED_TOKENS_BOUND = 4


@dataclass(frozen=True)
class SourceFacts:
    """What the checks need to know of a source: where its config came from and its layer widths."""

    location: Path  # the resolved source: a weights folder or a .gguf file
    described_by: str  # the file the facts were read from, for messages
    model_type: str
    max_positions: int | None
    remote_code: str  # the config's first auto_map entry for a model class, or ""
    linear_widths: dict[str, int] = field(default_factory=dict)
    embedding_widths: dict[str, int] = field(default_factory=dict)


def _is_embedding(name: str) -> bool:
    return any(part in name for part in _EMBEDDING_NAMES)


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor shapes from a .safetensors header; a file shorter than its header promises is truncated."""
    size = path.stat().st_size
    try:
        with path.open("rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            if header_len > size:
                raise ValueError(f"header length {header_len} is larger than the file")
            header = json.loads(handle.read(header_len))
    except (struct.error, ValueError, UnicodeDecodeError) as err:
        raise SourceError(f"{path}: not a readable safetensors file ({err}); re-download or re-save it") from err
    header.pop("__metadata__", None)
    data_end = max((info["data_offsets"][1] for info in header.values()), default=0)
    if 8 + header_len + data_end != size:
        raise SourceError(f"{path}: truncated: its header describes {8 + header_len + data_end} bytes, the file has "
                          f"{size}; re-download or re-save it")
    return {name: info["shape"] for name, info in header.items()}


def _folder_facts(folder: Path) -> SourceFacts:
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as err:
        raise SourceError(f"{config_path}: cannot read the model config ({err})") from err
    text = config.get("text_config") or config
    linears, embeddings = {}, {}
    for file in sorted(folder.glob("*.safetensors")):
        for name, shape in _safetensors_shapes(file).items():
            if len(shape) == 2 and name.endswith(".weight"):
                (embeddings if _is_embedding(name) else linears)[name] = shape[1]
    return SourceFacts(
        location=folder,
        described_by=str(config_path),
        model_type=str(config.get("model_type", "")),
        max_positions=text.get("max_position_embeddings") or config.get("max_position_embeddings"),
        remote_code=next((f"{name} = {entry!r}" for name, entry in (config.get("auto_map") or {}).items()
                          if name.startswith("AutoModel")), ""),
        linear_widths=linears,
        embedding_widths=embeddings,
    )


def _gguf_facts(path: Path) -> SourceFacts:
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        architecture = reader.get_field("general.architecture").contents()
    except Exception as err:  # the reader raises whatever numpy raises on a short or foreign file
        raise SourceError(f"{path}: not a readable GGUF file ({type(err).__name__}: {err}); "
                          "re-download it or check the path") from err
    context = reader.get_field(f"{architecture}.context_length")
    linears, embeddings = {}, {}
    for tensor in reader.tensors:
        # GGUF lists dimensions innermost first: shape[0] is a weight matrix's input width.
        if len(tensor.shape) == 2 and tensor.name.endswith(".weight"):
            (embeddings if _is_embedding(tensor.name) else linears)[tensor.name] = int(tensor.shape[0])
    return SourceFacts(location=path, described_by=str(path), model_type=str(architecture),
                       max_positions=int(context.contents()) if context is not None else None,
                       remote_code="", linear_widths=linears, embedding_widths=embeddings)


def source_folder(source: SourceSpec, model_file: str) -> Path:
    """The folder of a local or hub source, which must hold safetensors weights."""
    folder = sources.local_dir(source, model_file) if source.kind == "local" else sources.hub_snapshot(source, model_file)[0]
    if not any(folder.glob("*.safetensors")):
        raise SourceError(
            f"{model_file}: source: {folder} has no .safetensors weights; pickled checkpoints are not loaded "
            "(convert them with save_pretrained(safe_serialization=True))"
        )
    return folder


def source_facts(source: SourceSpec, model_file: str, scratch_root: Path) -> SourceFacts:
    """Resolve the source (raising SourceError if it is absent or unreadable) and read its facts."""
    if source.kind == "gguf":
        path = sources.gguf_path(source, model_file, scratch_root)
    else:
        path = source_folder(source, model_file)
    try:
        return _gguf_facts(path) if source.kind == "gguf" else _folder_facts(path)
    except SourceError as err:
        raise SourceError(f"{model_file}: source: {err}") from err


def remote_code_problem(source: SourceSpec, model_file: str, facts: SourceFacts) -> str | None:
    if facts.remote_code and not source.trust_remote_code:
        return (f"{model_file}: source.trust_remote_code: false, but {facts.described_by} needs remote code "
                f"(auto_map.{facts.remote_code}); set trust_remote_code = true in [source] "
                "only if you trust that repository")
    return None


def gguf_task() -> str:
    """The task kind transformers converts GGUF files to."""
    return kinds_with("from_gguf")[0]


def model_type_problems(source: SourceSpec, model_file: str, facts: SourceFacts, task: str) -> list[str]:
    """Remote code without the opt-in, or an architecture transformers cannot build as the task's kind."""
    if remote_code := remote_code_problem(source, model_file, facts):
        return [remote_code]
    if source.kind == "gguf" and not kind_of(task).from_gguf:
        return [f"{model_file}: source.kind: \"gguf\" converts to a {gguf_task()} model only, and this model is "
                f"task {task!r}"]
    if not facts.remote_code and not _transformers_supports(source.kind, facts.model_type, task):
        what = "GGUF architecture" if source.kind == "gguf" else "model_type"
        return [f"{model_file}: source: {facts.described_by}: {what} {facts.model_type!r} has no {task} class "
                f"in this transformers version, so it cannot be exported as task \"{task}\""]
    if reason := kind_of(task).refused.get(facts.model_type):
        return [f"{model_file}: source: {facts.described_by}: model_type {facts.model_type!r} cannot be exported as "
                f"task \"{task}\": {reason}"]
    return []


def model_problems(model: ModelSpec, facts: SourceFacts) -> list[str]:
    """Why this model cannot be exported as its task kind, from its config alone."""
    problems = model_type_problems(model.source, model.file, facts, model.task)
    if facts.max_positions is not None and model.max_seq_len > facts.max_positions:
        problems.append(f"{model.file}: max_seq_len: {model.max_seq_len} exceeds the model's limit of "
                        f"{facts.max_positions} positions ({facts.described_by}); lower max_seq_len")
    return problems


def prompt_problems(model: ModelSpec, facts: SourceFacts) -> list[str]:
    """Prompts whose tokens (plus the tokens generated after them, where they share the sequence) exceed
    max_seq_len."""
    kind = kind_of(model.task)
    if not kind.prompted:
        return []
    generated = model.verify.max_new_tokens if kind.prompt_continued else 0
    budget = model.max_seq_len - generated
    near = [i for i, prompt in enumerate(model.verify.prompts) if len(prompt.encode()) + _ADDED_TOKENS_BOUND > budget]
    if not near:
        return []
    tokenizer = _tokenizer(model, facts)
    problems = []
    for index in near:
        count = len(tokenizer(model.verify.prompts[index])["input_ids"])
        if count > budget:
            plus = f" + max_new_tokens {generated}" if generated else ""
            problems.append(f"{model.file}: verify.prompts[{index}]: {count} tokens{plus} exceed max_seq_len "
                            f"{model.max_seq_len}; shorten the prompt or raise max_seq_len")
    return problems


def _tokenizer(model: ModelSpec, facts: SourceFacts):
    from transformers import AutoTokenizer

    location = Path(facts.location)
    try:
        if model.source.kind == "gguf":
            return AutoTokenizer.from_pretrained(location.parent, gguf_file=location.name)
        return AutoTokenizer.from_pretrained(location, trust_remote_code=model.source.trust_remote_code)
    except (OSError, ValueError, KeyError) as err:
        raise SourceError(f"{model.file}: source: cannot load the tokenizer of {location} to count prompt tokens "
                          f"({err})") from err


def _transformers_supports(kind: str, model_type: str, task: str) -> bool:
    if kind == "gguf":
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        return model_type in GGUF_SUPPORTED_ARCHITECTURES or model_type.replace("-", "_") in GGUF_SUPPORTED_ARCHITECTURES
    from transformers.models.auto import modeling_auto

    return any(model_type in getattr(modeling_auto, mapping) for mapping in kind_of(task).auto_mappings)


def recipe_problems(target: Target, facts: SourceFacts) -> list[str]:
    """Quantization knobs that this model's layer widths would make fail or do nothing."""
    quantize, problems = target.recipe.quantize, []
    for part, scheme, group_size, widths in (
        ("linear", quantize.linear, quantize.linear_group_size, facts.linear_widths),
        ("embedding", quantize.embedding, quantize.embedding_group_size, facts.embedding_widths),
    ):
        if scheme == "none" or group_size == 0 or not widths:
            continue
        undivided = sorted(name for name, width in widths.items() if width % group_size)
        key = f"{target.recipe.file}: quantize.{part}_group_size: {group_size}"
        if len(undivided) == len(widths):
            problems.append(f"{key} divides no {part} layer of model {target.model.name} (widths "
                            f"{sorted(set(widths.values()))}); pick a divisor of one of them")
        elif undivided and not quantize.per_axis_fallback:
            problems.append(f"{key} does not divide {len(undivided)} {part} layers of model {target.model.name} "
                            f"(e.g. {undivided[0]}, width {widths[undivided[0]]}); set per_axis_fallback = true "
                            "or pick another group size")
    return problems


def validate(targets: list[Target], scratch_root: Path) -> list[str]:
    """Every problem of every target that can be found before building, each model's source read once."""
    problems: list[str] = []
    facts_by_model: dict[str, SourceFacts | None] = {}
    for recipe in {target.recipe.name: target.recipe for target in targets}.values():
        try:
            problems.extend(passes.import_problems(passes.locate(recipe.lower.passes, recipe.file), recipe.file))
        except RecipeError as err:
            problems.extend(err.problems)
    for target in targets:
        model = target.model
        if model.name not in facts_by_model:
            try:
                facts_by_model[model.name] = source_facts(model.source, model.file, scratch_root)
                problems.extend(model_problems(model, facts_by_model[model.name]))
                problems.extend(prompt_problems(model, facts_by_model[model.name]))
            except SourceError as err:
                facts_by_model[model.name] = None
                problems.append(str(err))
        facts = facts_by_model[model.name]
        if facts is not None:
            problems.extend(recipe_problems(target, facts))
    return problems


def validate_project(recipes_dir: Path, scratch_root: Path) -> int:
    """Check recipes, then every loadable target's source; raises ValidationFailed with all problems."""
    from xportbuild.recipe.load import load_what_loads

    targets, problems = load_what_loads(recipes_dir)
    problems.extend(validate(targets, scratch_root))
    if problems:
        raise ValidationFailed(problems)
    return len(targets)
