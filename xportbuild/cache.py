"""Content-addressed store of stage outputs: atomic writes, forgiving reads, one lock per key.

Two ways to trust a file: its stamp (size, mtime, inode) unchanged since it was hashed, which is what the no-op
path uses, and reading it whole against its recorded hash, which is what a stage's inputs get before it runs and
what `fsck` does to everything. Bit rot leaves stamps alone; only the second way catches it."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from xportbuild.errors import CacheCorrupt, DamagedEntry, StageError
import xxhash

from xportbuild.keys import (ALGORITHM, SCHEMA, canonical_json, digest_value, file_stamp, hash_file, is_key,
                             record_digest, tree_digest)

log = logging.getLogger(__name__)
ENTRY_FILE = "entry.json"


def safe_relative_name(name: str) -> bool:
    """True for a plain relative path that stays inside the folder it is joined to."""
    parts = Path(name).parts
    return bool(parts) and not Path(name).is_absolute() and ".." not in parts and "\\" not in name


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.filename is None:  # a failed write names no file: say which one
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise


class StatCache:
    """Remembers file digests by absolute path and stamp, so big files are read once.

    `rehashing()` gives one that reads every file again (and remembers what it read): for the moments where a
    digest decides what gets built, not merely whether anything must."""

    def __init__(self, folder: Path, trust_stamps: bool = True):
        self.folder = Path(folder)
        self.trust_stamps = trust_stamps

    def rehashing(self) -> "StatCache":
        return StatCache(self.folder, trust_stamps=False)

    def _record_path(self, path: Path) -> Path:
        return self.folder / f"{xxhash.xxh3_64_hexdigest(str(path).encode())}.json"

    def digest(self, path: Path) -> str:
        path = Path(path).resolve()
        stamp = file_stamp(path)
        if self.trust_stamps:
            try:
                record = json.loads(self._record_path(path).read_text())
                if record["path"] == str(path) and record["stamp"] == stamp:
                    return record["digest"]
            except (OSError, ValueError, KeyError):
                pass
        digest = hash_file(path)
        self.remember(path, stamp, digest)
        return digest

    def remember(self, path: Path, stamp: list[int], digest: str) -> None:
        record = {"path": str(Path(path).resolve()), "stamp": stamp, "digest": digest}
        try:
            write_atomic(self._record_path(Path(path).resolve()), canonical_json(record).encode())
        except OSError:
            pass  # only a shortcut: without it the file is hashed again next time; the build reports storage errors

    def forget_missing(self) -> None:
        """Drop records of files that no longer exist."""
        for record_path in self.folder.glob("*.json"):
            try:
                gone = not Path(json.loads(record_path.read_text())["path"]).exists()
            except (OSError, ValueError, KeyError, TypeError):
                gone = True
            if gone:
                record_path.unlink(missing_ok=True)


@contextlib.contextmanager
def reading_entry(entry_dir: Path):
    """Parsing an input entry's archives failed: the entry is damaged (it is discarded and rebuilt), not the build."""
    try:
        yield
    except (zipfile.BadZipFile, EOFError, ValueError, KeyError, RuntimeError) as err:
        raise DamagedEntry(entry_dir, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err


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
    """Entries live at <root>/<SCHEMA>/xxh3_128/<ab>/<key>/; temporary builds under <root>/tmp.

    With a `remote` (remote.py: a store shared by machines and CI jobs), a local miss is pulled from it after
    checking every file against its content hash, and new entries are pushed to it."""

    def __init__(self, root: Path, remote=None):  # a remote.RemoteCache: not imported, so stage keys leave it out
        self.root = Path(root)
        self.remote = remote
        self.stats = StatCache(self.root / "stat")

    def entry_path(self, key: str) -> Path:
        if not is_key(key):
            raise CacheCorrupt(f"{key!r} is not a cache key")
        return self.root / SCHEMA / ALGORITHM / key[:2] / key

    def lock(self, key: str) -> FileLock:
        path = self.root / "locks" / f"{key}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(path))

    def lookup(self, key: str) -> Entry | None:
        """The entry for `key` if present and intact; a damaged entry is discarded with a warning."""
        path = self.entry_path(key)
        if not (path / ENTRY_FILE).exists():
            if path.exists():  # entries are placed whole, record included: a folder without one was damaged
                log.warning("cache entry %s has no record; discarding it and rebuilding", path)
                self._discard(path)
            return self._pull(key) if self.remote else None
        try:
            return Entry(path, self._validated_record(path, key, self.stats.digest))
        except CacheCorrupt as err:
            log.warning("%s; discarding it and rebuilding", err)
            self._discard(path)
            return self._pull(key) if self.remote else None

    def _validated_record(self, path: Path, key: str, digest_of) -> dict:
        """The entry's record, after checking its shape, that it belongs to `key`, that it is whole (its digest
        covers its result too) and signed where a shared store's key asks it, and every file against its hash."""
        try:
            record = json.loads((path / ENTRY_FILE).read_text())
            files = record["files"]
            shaped = isinstance(record["key_doc"], dict) and "result" in record and all(
                safe_relative_name(name) and type(f["size"]) is int and isinstance(f["digest"], str)
                for name, f in files.items())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise CacheCorrupt(f"cache entry {path}: unreadable record ({err})") from err
        if not shaped:
            raise CacheCorrupt(f"cache entry {path}: its record is not of the cache's shape (or names a file "
                               "outside the entry folder)")
        if record.get("key") != key or digest_value(record.get("key_doc")) != key:
            raise CacheCorrupt(f"cache entry {path}: its record was not built for key {key}")
        if record.get("record_digest") != record_digest(record):
            raise CacheCorrupt(f"cache entry {path}: its record was changed after it was written")
        if self.remote is not None and (problem := self.remote.signature_problem(record)):
            raise CacheCorrupt(f"cache entry {path}: {problem}")
        for name, expected in files.items():
            file = path / name
            if not file.is_file() or file.stat().st_size != expected["size"]:
                raise CacheCorrupt(f"cache entry {path}: {name} is missing or truncated")
            if digest_of(file) != expected["digest"]:
                raise CacheCorrupt(f"cache entry {path}: {name} does not match its content hash")
        if tree_digest({n: f["digest"] for n, f in files.items()}) != record.get("digest"):
            raise CacheCorrupt(f"cache entry {path}: record digest does not match its files")
        return record

    def check(self, entry: Entry) -> None:
        """Read every file of `entry` against its recorded hash, trusting no stamp; raises CacheCorrupt."""
        self._validated_record(entry.path, entry.record["key"], hash_file)
        self._remember_files(entry.path, entry.record["files"])

    def discard(self, entry: Entry) -> None:
        self._discard(entry.path)

    def fsck(self) -> tuple[int, list[str]]:
        """Re-read every entry against its hashes; a damaged one is discarded (the next build rebuilds it, or pulls
        it from the remote). Returns (entries checked, one line per finding)."""
        findings: list[str] = []
        folders = sorted(p for p in (self.root / SCHEMA / ALGORITHM).glob("*/*") if p.is_dir())
        for path in folders:
            try:
                record = self._validated_record(path, path.name, hash_file)
            except CacheCorrupt as err:
                findings.append(f"{err}: discarded; the next build rebuilds it")
                self._discard(path)
                continue
            self._remember_files(path, record["files"])
        if (self.root / "tmp").is_dir():
            self._prune_orphans(self.root / "tmp")
        self.stats.forget_missing()
        return len(folders), findings

    def _remember_files(self, path: Path, files: dict) -> None:
        for name, expected in files.items():
            self.stats.remember(path / name, file_stamp(path / name), expected["digest"])

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
        self._prune_orphans(scratch_root)
        scratch = Path(tempfile.mkdtemp(dir=scratch_root, prefix=f"{key[:12]}-{os.getpid()}-"))
        try:
            yield scratch
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    @staticmethod
    def _prune_orphans(scratch_root: Path) -> None:
        """Remove scratch folders of processes that died (kill -9) before cleaning up."""
        for folder in scratch_root.iterdir():
            fields = folder.name.split("-")
            if len(fields) >= 3 and fields[1].isdigit() and not _pid_alive(int(fields[1])):
                shutil.rmtree(folder, ignore_errors=True)

    def _pull(self, key: str) -> Entry | None:
        """Copy the remote entry for `key` into the local store, trusting nothing it has not hashed."""
        with self.building(key) as scratch:
            if self.remote.fetch(key, scratch) is None:
                return None
            try:
                record = self._validated_record(scratch, key, hash_file)
            except CacheCorrupt as err:
                log.warning("remote cache entry %s rejected (%s); building it locally", key, err)
                self.remote.note_damaged(key)
                return None
            if not self.remote.trusts(record):
                return None
            log.info("pulled %s from the remote cache", key)
            return self._place(key, scratch, record)

    def push(self, entry: Entry) -> None:
        """Copy a local entry to the remote (a remote that cannot be written is a warning), then whatever earlier
        builds could not push."""
        if self.remote is None:
            return
        self.remote.push(entry.record["key"], entry.path, entry.record)
        self.push_pending()

    def push_pending(self) -> None:
        """Push the entries an earlier build could not (the remote was down or full), if still intact here."""
        if self.remote is None or self.remote.read_only:
            return
        for key in filter(is_key, self.remote.pending()):
            path = self.entry_path(key)
            try:
                record = self._validated_record(path, key, self.stats.digest)
            except CacheCorrupt:
                continue
            self.remote.push(key, path, record)

    def commit(self, key: str, scratch: Path, record: dict) -> Entry:
        """Record the files in `scratch` and move it into place as the entry for `key`."""
        if (scratch / ENTRY_FILE).exists():
            raise StageError(f"the stage wrote a file named {ENTRY_FILE}, the name of the cache's own record")
        files = {}
        for file in sorted(p for p in scratch.rglob("*") if p.is_file()):
            name = file.relative_to(scratch).as_posix()
            digest = hash_file(file)
            files[name] = {"size": file.stat().st_size, "digest": digest}
        full = {**record, "key": key, "files": files, "digest": tree_digest({n: f["digest"] for n, f in files.items()})}
        full["record_digest"] = record_digest(full)
        write_atomic(scratch / ENTRY_FILE, canonical_json(full).encode())
        return self._place(key, scratch, full)

    def _place(self, key: str, scratch: Path, full: dict) -> Entry:
        files = full["files"]
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
        self._remember_files(final, files)
        return Entry(final, full)
