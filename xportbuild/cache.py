"""Content-addressed store of stage outputs: atomic writes, forgiving reads, one lock per key."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from xportbuild.errors import CacheCorrupt
from xportbuild.keys import ALGORITHM, SCHEMA, StatCache, canonical_json, file_stamp, hash_file, tree_digest

log = logging.getLogger(__name__)
ENTRY_FILE = "entry.json"


def write_atomic(path: Path, data: bytes) -> None:
    """Write a file so that readers see the old content or the new, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@dataclass(frozen=True)
class Entry:
    """A complete, validated cache entry: a folder of output files plus its record."""

    path: Path
    record: dict

    @property
    def digest(self) -> str:
        """Digest of the output files' content: what downstream keys depend on."""
        return self.record["digest"]

    @property
    def result(self) -> dict:
        return self.record["result"]

    def file(self, name: str) -> Path:
        return self.path / name


class Store:
    """Entries live at <root>/v1/xxh3_128/<ab>/<key>/; temporary builds under <root>/tmp."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.stats = StatCache(self.root / "stat")

    def entry_path(self, key: str) -> Path:
        return self.root / SCHEMA / ALGORITHM / key[:2] / key

    def lock(self, key: str) -> FileLock:
        path = self.root / "locks" / f"{key}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(path))

    def lookup(self, key: str) -> Entry | None:
        """The entry for `key` if present and intact; a damaged entry is discarded with a warning."""
        path = self.entry_path(key)
        if not (path / ENTRY_FILE).exists():
            return None
        try:
            return Entry(path, self._validated_record(path))
        except CacheCorrupt as err:
            log.warning("%s; discarding it and rebuilding", err)
            self._discard(path)
            return None

    def _validated_record(self, path: Path) -> dict:
        try:
            record = json.loads((path / ENTRY_FILE).read_text())
            files = record["files"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CacheCorrupt(f"cache entry {path}: unreadable record ({err})") from err
        for name, expected in files.items():
            file = path / name
            if not file.is_file() or file.stat().st_size != expected["size"]:
                raise CacheCorrupt(f"cache entry {path}: {name} is missing or truncated")
            if self.stats.digest(file) != expected["digest"]:
                raise CacheCorrupt(f"cache entry {path}: {name} does not match its content hash")
        if tree_digest({n: f["digest"] for n, f in files.items()}) != record.get("digest"):
            raise CacheCorrupt(f"cache entry {path}: record digest does not match its files")
        return record

    def _discard(self, path: Path) -> None:
        trash = self.root / "trash"
        trash.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            os.replace(path, tempfile.mkdtemp(dir=trash))
        shutil.rmtree(trash, ignore_errors=True)

    @contextlib.contextmanager
    def building(self, key: str):
        """A scratch folder for a stage's outputs; `commit` on it publishes the entry atomically."""
        scratch_root = self.root / "tmp"
        scratch_root.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(dir=scratch_root, prefix=f"{key[:12]}-"))
        try:
            yield scratch
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def commit(self, key: str, scratch: Path, record: dict) -> Entry:
        """Record the files in `scratch` and move it into place as the entry for `key`."""
        files = {}
        for file in sorted(p for p in scratch.rglob("*") if p.is_file()):
            name = file.relative_to(scratch).as_posix()
            digest = hash_file(file)
            files[name] = {"size": file.stat().st_size, "digest": digest}
        full = {**record, "key": key, "files": files, "digest": tree_digest({n: f["digest"] for n, f in files.items()})}
        write_atomic(scratch / ENTRY_FILE, canonical_json(full).encode())
        final = self.entry_path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(scratch, final)
        except OSError:
            existing = self.lookup(key)
            if existing is None:
                raise
            log.info("entry %s was committed by another build; keeping that one", key)
            return existing
        for name in files:
            self.stats.remember(final / name, file_stamp(final / name), files[name]["digest"])
        return Entry(final, full)
