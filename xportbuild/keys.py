"""All hashing: canonical JSON, xxh3-128 digests of values and files, code and library versions. Writes nothing."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import os
from pathlib import Path

import xxhash

SCHEMA = "v1"
ALGORITHM = "xxh3_128"
LIBRARIES = ("torch", "executorch", "torchao", "transformers")
_CHUNK = 8 << 20


def canonical_json(value) -> str:
    """Sorted keys, no whitespace, no NaN: the same value always encodes to the same text."""
    _reject_nan(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _reject_nan(value) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"non-finite number {value!r} cannot be part of a key")
    if isinstance(value, dict):
        for item in value.values():
            _reject_nan(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _reject_nan(item)


def digest_value(value) -> str:
    """xxh3-128 hex digest of a JSON-able value."""
    return xxhash.xxh3_128_hexdigest(canonical_json(value).encode())


def digest_bytes(data: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(data)


def hash_file(path: Path) -> str:
    """xxh3-128 of a file's content, read in chunks."""
    hasher = xxhash.xxh3_128()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


def file_stamp(path: Path) -> list[int]:
    """(size, mtime_ns, inode): unchanged stamp means unchanged content, without reading it."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def tree_digest(files: dict[str, str]) -> str:
    """Digest of a set of files given as {relative path: content digest}."""
    return digest_value(sorted(files.items()))


def module_source_digest(module: str) -> str:
    """Digest of a module's source file, found without importing the module itself."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None or not os.path.isfile(spec.origin):
        raise ModuleNotFoundError(f"no source file for module {module!r}")
    return xxhash.xxh3_128_hexdigest(Path(spec.origin).read_bytes())


def library_versions(names: tuple[str, ...] = LIBRARIES) -> dict[str, str]:
    """Installed versions, read from package metadata (no import of the libraries)."""
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions
