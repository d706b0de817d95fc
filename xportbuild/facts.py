"""What a model's source says of itself, read as data without loading weights: its config, its safetensors
headers (every entry checked), the code of its own it names, its files (sources.model_files). Raises SourceError
naming the file."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

from xportbuild import sources
from xportbuild.errors import SourceError
from xportbuild.recipe.spec import SourceSpec

_EMBEDDING_NAMES = ("embed_tokens", "word_embeddings", "wte", "token_embd")
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


def source_folder(source: SourceSpec, model_file: str, scratch_root: Path) -> tuple[Path, dict[str, Path]]:
    """The folder of a local or hub source and its files (read as data: sources.model_files), which must include
    safetensors weights."""
    if source.kind == "local":
        folder = sources.local_dir(source, model_file, scratch_root)
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
        path, files = source_folder(source, model_file, scratch_root)
    try:
        return _gguf_facts(path) if source.kind == "gguf" else _folder_facts(path, files)
    except SourceError as err:
        raise SourceError(f"{model_file}: source: {err}") from err


