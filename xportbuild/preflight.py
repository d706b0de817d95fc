"""Checks that read a model's sources but load no weights: run for every target by `doit validate`, and by
fetch before any conversion. Each problem names the file, the field, the value and what to do."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

from xportbuild import passes, sources
from xportbuild.errors import RecipeError, SourceError, SourceNotHere, ValidationFailed, XportError
from xportbuild.models.kinds import kind_of, kinds_with
from xportbuild.recipe.spec import ModelSpec, SourceSpec, Target

_EMBEDDING_NAMES = ("embed_tokens", "word_embeddings", "wte", "token_embd")
# Every token covers at least one byte of the prompt, apart from the few special tokens a tokenizer adds around it
# (BOS, EOS): a prompt this far under its budget fits without loading the tokenizer (13 s for Gemma's GGUF).
_ADDED_TOKENS_BOUND = 4
_MASK = "<mask>"  # a masked LM's prompts name its mask token so (models/masked_lm.py)
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F4": 1, "I16": 2, "U16": 2,
                "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


@dataclass(frozen=True)
class SourceFacts:
    """What the checks need to know of a source: where its config came from and its layer widths."""

    location: Path  # the resolved source: a weights folder or a .gguf file
    described_by: str  # the file the facts were read from, for messages
    model_type: str
    max_positions: int | None
    remote_code: str  # where a config file names code of the model's own ("<file>: auto_map.<class> = ..."), or ""
    linear_widths: dict[str, int] = field(default_factory=dict)
    embedding_widths: dict[str, int] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)  # a folder's files, each checked by sources.model_files
    vocab_size: int | None = None


def _is_embedding(name: str) -> bool:
    return any(part in name for part in _EMBEDDING_NAMES)


def _header_tensor(name: str, info) -> tuple[list[int], int, int]:
    """(shape, start, end) of one safetensors header entry, or ValueError saying what is malformed."""
    if not isinstance(info, dict) or info.get("dtype") not in _DTYPE_BYTES:
        raise ValueError(f"tensor {name!r}: dtype {info.get('dtype') if isinstance(info, dict) else info!r} is not a "
                         "safetensors dtype")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise ValueError(f"tensor {name!r}: shape {shape!r} is not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise ValueError(f"tensor {name!r}: data_offsets {offsets!r} are not a [start, end] pair")
    if offsets[1] - offsets[0] != math.prod(shape) * _DTYPE_BYTES[info["dtype"]]:
        raise ValueError(f"tensor {name!r}: {offsets[1] - offsets[0]} bytes for shape {shape} of {info['dtype']}")
    return shape, offsets[0], offsets[1]


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor shapes from a .safetensors header, every entry checked; a file shorter than its header promises is
    truncated."""
    size = path.stat().st_size
    try:
        with path.open("rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            if header_len > size:
                raise ValueError(f"header length {header_len} is larger than the file")
            header = json.loads(handle.read(header_len))
        if not isinstance(header, dict):
            raise ValueError(f"its header is a JSON {type(header).__name__}, not an object")
        header.pop("__metadata__", None)
        tensors = {name: _header_tensor(name, info) for name, info in header.items()}
    except (struct.error, ValueError, UnicodeDecodeError, RecursionError) as err:
        raise SourceError(f"{path}: not a readable safetensors file ({err}); re-download or re-save it") from err
    data_end = max((end for _, _, end in tensors.values()), default=0)
    if 8 + header_len + data_end != size:
        raise SourceError(f"{path}: truncated: its header describes {8 + header_len + data_end} bytes, the file has "
                          f"{size}; re-download or re-save it")
    return {name: shape for name, (shape, _, _) in tensors.items()}


def _json_object(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:
        raise SourceError(f"{path}: not readable JSON ({err}); re-download or re-save it") from err
    if not isinstance(value, dict):
        raise SourceError(f"{path}: a JSON {type(value).__name__}, not an object; re-download or re-save it")
    return value


def _config_int(config: dict, key: str, path: Path) -> int | None:
    value = config.get(key)
    if value is not None and (type(value) is not int or value < 1):
        raise SourceError(f"{path}: {key}: {value!r} is not a positive whole number; fix or re-download the config")
    return value


def _remote_code(files: dict[str, Path]) -> str:
    """The first code of the model's own that a config file names (`auto_map`): xportbuild never runs it."""
    for name, path in files.items():
        if "/" in name or "config" not in name or not name.endswith(".json"):
            continue
        auto_map = _json_object(path).get("auto_map")
        if auto_map:
            first = next(iter(auto_map.items())) if isinstance(auto_map, dict) else ("", auto_map)
            return f"{path}: auto_map.{first[0]} = {first[1]!r}"
    return ""


def _folder_facts(folder: Path, files: dict[str, Path]) -> SourceFacts:
    config_path = folder / "config.json"
    config = _json_object(config_path)
    text = config.get("text_config") or config
    if not isinstance(text, dict):
        raise SourceError(f"{config_path}: text_config: {text!r} is not an object; fix or re-download the config")
    model_type = config.get("model_type", "")
    if not isinstance(model_type, str):
        raise SourceError(f"{config_path}: model_type: {model_type!r} is not a name; fix or re-download the config")
    linears, embeddings = {}, {}
    for name, path in files.items():
        if "/" in name or not name.endswith(".safetensors"):
            continue
        for tensor, shape in _safetensors_shapes(path).items():
            if len(shape) == 2 and tensor.endswith(".weight"):
                (embeddings if _is_embedding(tensor) else linears)[tensor] = shape[1]
    return SourceFacts(
        location=folder,
        described_by=str(config_path),
        model_type=model_type,
        max_positions=_config_int(text, "max_position_embeddings", config_path)
        or _config_int(config, "max_position_embeddings", config_path),
        remote_code=_remote_code(files),
        linear_widths=linears,
        embedding_widths=embeddings,
        files=files,
        vocab_size=_config_int(text, "vocab_size", config_path),
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


def source_folder(source: SourceSpec, model_file: str) -> tuple[Path, dict[str, Path]]:
    """The folder of a local or hub source and its files (read as data: sources.model_files), which must include
    safetensors weights."""
    if source.kind == "local":
        folder = sources.local_dir(source, model_file)
        within = folder
    else:
        folder = sources.hub_snapshot(source, model_file)[0]
        within = folder.parents[1]  # the repository's cache: snapshot files link to its blobs
    try:
        files = sources.model_files(folder, within)
    except SourceError as err:
        raise SourceError(f"{model_file}: source: {err}") from err
    if not any(name.endswith(".safetensors") for name in files):
        raise SourceError(
            f"{model_file}: source: {folder} has no .safetensors weights; pickled checkpoints are not loaded "
            "(convert them with save_pretrained(safe_serialization=True))"
        )
    return folder, files


def source_facts(source: SourceSpec, model_file: str, scratch_root: Path) -> SourceFacts:
    """Resolve the source (raising SourceError if it is absent or unreadable) and read its facts."""
    if source.kind == "gguf":
        path = sources.gguf_path(source, model_file, scratch_root)
    else:
        path, files = source_folder(source, model_file)
    try:
        return _gguf_facts(path) if source.kind == "gguf" else _folder_facts(path, files)
    except SourceError as err:
        raise SourceError(f"{model_file}: source: {err}") from err


def remote_code_problem(source: SourceSpec, model_file: str, facts: SourceFacts) -> str | None:
    if facts.remote_code:
        return (f"{model_file}: source: {facts.remote_code}: the model names code of its own, and xportbuild never "
                "runs code a model folder ships; use an architecture transformers includes")
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
    max_seq_len, or that hold text the tokenizer cannot encode. A folder's tokenizer is read for every prompt; a
    GGUF's (13 s to convert Gemma's) only for prompts near the budget, and it has a token for every byte."""
    kind = kind_of(model.task)
    if not kind.prompted:
        return []
    generated = model.verify.max_new_tokens if kind.prompt_continued else 0
    budget = model.max_seq_len - generated
    near = [i for i, prompt in enumerate(model.verify.prompts) if len(prompt.encode()) + _ADDED_TOKENS_BOUND > budget]
    checked = range(len(model.verify.prompts)) if model.source.kind != "gguf" else near
    if not checked:
        return []
    tokenizer = _tokenizer(model, facts)
    problems = []
    for index in checked:
        prompt = model.verify.prompts[index].replace(_MASK, getattr(tokenizer, "mask_token", None) or _MASK)
        ids = tokenizer(prompt)["input_ids"]
        if len(ids) > budget:
            plus = f" + max_new_tokens {generated}" if generated else ""
            problems.append(f"{model.file}: verify.prompts[{index}]: {len(ids)} tokens{plus} exceed max_seq_len "
                            f"{model.max_seq_len}; shorten the prompt or raise max_seq_len")
        if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids:
            problems.append(f"{model.file}: verify.prompts[{index}]: {model.verify.prompts[index]!r} has text the "
                            f"model's tokenizer cannot encode (it becomes {tokenizer.unk_token}); reword the prompt")
    return problems


def _tokenizer(model: ModelSpec, facts: SourceFacts):
    from transformers import AutoTokenizer

    location = Path(facts.location)
    try:
        if model.source.kind == "gguf":
            return AutoTokenizer.from_pretrained(location.parent, gguf_file=location.name)
        return AutoTokenizer.from_pretrained(location, trust_remote_code=False)
    except Exception as err:  # noqa: BLE001  tokenizer files are parsed in Rust and Python: any failure is the finding
        raise SourceError(f"{model.file}: source: cannot load the tokenizer of {location} ({type(err).__name__}: "
                          f"{_first_line(err)}); re-download or re-save it") from err


def tokenizer_problems(model: ModelSpec, facts: SourceFacts) -> list[str]:
    """A folder's tokenizer.json must parse, and its ids fit the model's vocabulary: a larger id would index past
    the embedding table in the program."""
    path = facts.files.get("tokenizer.json")
    if path is None:
        return []
    from tokenizers import Tokenizer

    try:
        vocabulary = Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)
    except Exception as err:  # noqa: BLE001  the Rust parser raises a bare Exception
        return [f"{model.file}: source: {path}: not a readable tokenizer ({_first_line(err)}); re-download or re-save it"]
    highest = max(vocabulary.values(), default=-1)
    if facts.vocab_size is not None and highest >= facts.vocab_size:
        return [f"{model.file}: source: {path}: token ids go up to {highest}, but the model's vocabulary "
                f"({facts.described_by}: vocab_size) has {facts.vocab_size} rows; use the tokenizer the model was "
                "made with"]
    return []


def weight_problems(model: ModelSpec, facts: SourceFacts) -> list[str]:
    """Weights the model's class expects that the checkpoint lacks or holds in another shape, read on the meta
    device (names and shapes, no data)."""
    from xportbuild.models.common import load_pretrained

    wrapper = kind_of(model.task).wrapper()
    try:
        load_pretrained(wrapper.auto_class(facts.location), facts.location, wrapper.WHAT, weights=False)
    except XportError as err:
        return [f"{model.file}: source: {err}"]
    return []


def _first_line(err: BaseException) -> str:
    """The message's first line, and the next where the first only announces it ("Validation error for x:")."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()] or [""]
    return " ".join(lines[:2] if lines[0].endswith(":") else lines[:1])[:300]


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


@dataclass
class Validation:
    """What validate found: problems (each one line), and models that are fine but not on this machine yet, with
    the command that brings each."""

    targets: list[Target]
    problems: list[str] = field(default_factory=list)
    downloads: dict[str, str] = field(default_factory=dict)  # model name -> the command that downloads it

    def summary(self) -> str:
        waiting = [t for t in self.targets if t.model.name in self.downloads]
        lines = [f"{len(self.targets) - len(waiting)} targets valid and buildable here"]
        if self.downloads:
            lines.append(f"{len(waiting)} targets of {len(self.downloads)} models need their weights downloaded "
                         "first (their sources are checked once they are here):")
            lines += [f"  {model}: {command}" for model, command in sorted(self.downloads.items())]
        return "\n".join(lines)


def validate(targets: list[Target], scratch_root: Path) -> Validation:
    """Every problem of every target that can be found before building, each model's source read once."""
    found = Validation(targets)
    facts_by_model: dict[str, SourceFacts | None] = {}
    for recipe in {target.recipe.name: target.recipe for target in targets}.values():
        try:
            found.problems.extend(passes.import_problems(passes.locate(recipe.lower.passes, recipe.file), recipe.file))
        except RecipeError as err:
            found.problems.extend(err.problems)
    for target in targets:
        model = target.model
        if model.name not in facts_by_model:
            try:
                facts_by_model[model.name], problems = _model_findings(model, scratch_root)
                found.problems.extend(problems)
            except SourceNotHere as err:
                facts_by_model[model.name] = None
                found.downloads[model.name] = err.download
        facts = facts_by_model[model.name]
        if facts is not None:
            found.problems.extend(recipe_problems(target, facts))
    return found


def _model_findings(model: ModelSpec, scratch_root: Path) -> tuple[SourceFacts | None, list[str]]:
    """The model's source facts (None if they cannot be read) and every problem of the model and its source."""
    try:
        facts = source_facts(model.source, model.file, scratch_root)
    except SourceNotHere:
        raise
    except SourceError as err:
        return None, [str(err)]
    problems = model_problems(model, facts)
    if problems:  # a model that cannot be built as its kind, or runs code of its own: nothing more is read
        return facts, problems
    checks = [tokenizer_problems, weight_problems] if model.source.kind != "gguf" else []
    for check in (*checks, prompt_problems):
        try:
            problems.extend(check(model, facts))
        except SourceError as err:
            problems.append(str(err))
        except Exception as err:  # noqa: BLE001  validate reports, it never crashes: a check that broke is a finding
            problems.append(f"{model.file}: source: {facts.described_by}: checking it raised {type(err).__name__}: "
                            f"{_first_line(err)}; the build would likely fail the same way")
    return facts, problems


def validate_project(recipes_dir: Path, scratch_root: Path) -> Validation:
    """Check recipes, then every loadable target's source; raises ValidationFailed with all problems."""
    from xportbuild.recipe.load import load_what_loads

    targets, problems = load_what_loads(recipes_dir)
    found = validate(targets, scratch_root)
    found.problems[:0] = problems
    if found.problems:
        raise ValidationFailed(found.problems)
    return found
