"""All hashing: canonical JSON, xxh3-128 digests of values and files, code and library versions. Writes nothing."""

from __future__ import annotations

import ast
import functools
import hashlib
import hmac
import importlib.metadata
import json
import math
import os
from pathlib import Path

import xxhash

SCHEMA = "v2"  # v2: records carry a digest of their whole content
ALGORITHM = "xxh3_128"
LIBRARIES = ("torch", "executorch", "torchao", "transformers")
_CHUNK = 8 << 20
_UNDIGESTED = ("record_digest", "signature")
PACKAGE = "xportbuild"
PACKAGE_DIR = Path(__file__).resolve().parent


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


def record_digest(record: dict) -> str:
    """Digest of a cache record's whole content (key, files, result, timings), apart from this digest itself and
    the signature made over it."""
    return digest_value({name: value for name, value in record.items() if name not in _UNDIGESTED})


def signature(digest: str, secret: bytes) -> str:
    """HMAC-SHA256 of a record digest: only a holder of `secret` can make it (xxh3 is a checksum, not a MAC)."""
    return hmac.new(secret, digest.encode(), hashlib.sha256).hexdigest()


def signed_by(record: dict, secret: bytes) -> bool:
    return hmac.compare_digest(str(record.get("signature", "")), signature(record_digest(record), secret))


def is_key(value) -> bool:
    """A digest as this module writes them (32 hex digits): anything else read from a file names no entry."""
    return isinstance(value, str) and len(value) == 32 and all(c in "0123456789abcdef" for c in value)


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


def package_module_file(module: str, package_dir: Path = PACKAGE_DIR) -> Path | None:
    """The source file of `module` inside this package (a module or a package's __init__), or None."""
    if module != PACKAGE and not module.startswith(PACKAGE + "."):
        return None
    parts = module.split(".")[1:]
    for candidate in (package_dir.joinpath(*parts).with_suffix(".py"), package_dir.joinpath(*parts, "__init__.py")):
        if parts and candidate.is_file() or not parts and candidate.name == "__init__.py" and candidate.is_file():
            return candidate
    return None


@functools.lru_cache(maxsize=None)
def _imported_names(module: str, source: bytes) -> frozenset[str]:
    """Every module an import statement anywhere in `source` may name (function-level imports included: stages
    import lazily), with `from a import b` also offering `a.b` in case b is a submodule. Kept per source text: the
    keys of one build's stages share most of their modules, and parsing them again was half a no-op rebuild."""
    tree = ast.parse(source, module)
    names: set[str] = set()
    package = module if module == PACKAGE else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return frozenset(names)


def module_closure(roots: tuple[str, ...], locate) -> dict[str, Path]:
    """{module: source file} of `roots` and every module they import, directly or not, that `locate(name)` finds a
    file for (None: outside the code being keyed), read from source (nothing is imported). Parent packages count
    too: their __init__ runs on import."""
    found: dict[str, Path] = {}
    pending = list(roots)
    while pending:
        module = pending.pop()
        if module in found or (file := locate(module)) is None:
            continue
        found[module] = file
        pending.extend(".".join(module.split(".")[:n]) for n in range(1, module.count(".") + 1))
        pending.extend(_imported_names(module, file.read_bytes()))
    return found


@functools.lru_cache(maxsize=None)
def import_closure(roots: tuple[str, ...], package_dir: Path = PACKAGE_DIR) -> tuple[str, ...]:
    """The modules of this package that `roots` import (`module_closure`). A stage's key covers exactly these:
    editing any of them reruns the stage, editing another does not."""
    return tuple(sorted(module_closure(roots, functools.partial(package_module_file, package_dir=package_dir))))


def code_digests(roots: tuple[str, ...], package_dir: Path = PACKAGE_DIR) -> dict[str, str]:
    """{module: digest of its source} over the import closure of `roots`."""
    return {module: xxhash.xxh3_128_hexdigest(package_module_file(module, package_dir).read_bytes())
            for module in import_closure(tuple(sorted(roots)), package_dir)}


def library_versions(names: tuple[str, ...] = LIBRARIES) -> dict[str, str]:
    """Installed versions, read from package metadata (no import of the libraries)."""
    return dict(_installed_versions(names))


def public_versions(versions: dict[str, str]) -> dict[str, str]:
    """Versions as a key holds them: without a local build label (torch `2.13.0+cpu` on Linux is `2.13.0` on macOS,
    one source release), so a Mac reuses what a Linux machine built up to a backend only the Mac runs. The manifest
    and the .pte's provenance keep the whole version."""
    return {name: version.split("+")[0] for name, version in versions.items()}


@functools.lru_cache(maxsize=None)
def _installed_versions(names: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """Read once per process: a build does not install packages while it runs."""
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    return tuple(versions.items())
