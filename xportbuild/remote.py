"""The remote cache: entries shared between machines and CI jobs, on any store fsspec reaches.

`XPORTBUILD_REMOTE_CACHE` is an fsspec URL: a folder (`/mnt/cache`, `file:///mnt/cache`), `s3://bucket/prefix`
(s3fs: the usual AWS variables, `AWS_ENDPOINT_URL` for an S3-compatible server), or any protocol installed.
`XPORTBUILD_REMOTE_READ_ONLY=1` pulls and never pushes (a job that must not write the shared cache, such as a pull
request's). The layout is the local cache's: `v2/xxh3_128/<ab>/<key>/<files>` and `entry.json`.

Nothing pulled is trusted: the store hashes every file against the record, the record against its key and its whole
content against its digest before the entry is used. Anyone who can write the store could still write a whole,
consistent entry of their own, so `XPORTBUILD_REMOTE_KEY` (a secret shared by the machines and CI jobs, e.g. a CI
secret) signs every record pushed (HMAC-SHA256 over its digest) and every pulled record must carry that signature.
Without a key, entries of the stages that decide what is published (fetch, reference, verify: `pipeline.Stage
.decides`) are not taken from the store but computed here, so a pulled program is always judged against this
machine's float model; `XPORTBUILD_REMOTE_TRUST=1` declares an unsigned store trusted instead.

A push writes each file under a temporary name and moves it into place, and the record last, so
a reader sees a whole entry or none (two pushes of one key write the same names; whichever record lands last, its
files landed before it). The remote is optional: when it cannot be reached the build goes on locally, warns once,
and notes what it could not push; a later build pushes it. An entry found damaged here is noted too, so the push of
the rebuilt entry replaces it whatever is there.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path

from xportbuild.cache import ENTRY_FILE, safe_relative_name
from xportbuild.keys import ALGORITHM, SCHEMA, record_digest, signature, signed_by

log = logging.getLogger(__name__)
# Files above this size are copied with a progress bar (on a terminal).
_PROGRESS_FROM_BYTES = 32 * 2**20


class RemoteCache:
    """One remote store, as one build sees it: `fetch` and `push` entries; remembers, for this build, that the
    remote failed (one warning, no more waiting on it) and, across builds, which pushes are still owed."""

    def __init__(self, url: str, read_only: bool, notes_dir: Path, secret: bytes = b"", trusted: bool = False):
        self.url = url
        self.read_only = read_only
        self.notes_dir = Path(notes_dir)  # local: which keys wait for a push, which were found damaged
        self.secret = secret  # signs pushed records; pulled ones must carry its signature
        self.trusted = trusted  # without a secret: take entries of deciding stages from the store all the same
        self._fs = None
        self._root = ""
        self._unreachable = False
        self._said_unsigned = False

    @classmethod
    def from_environment(cls, cache_dir: Path) -> "RemoteCache | None":
        url = os.environ.get("XPORTBUILD_REMOTE_CACHE")
        if not url:
            return None
        return cls(url, _flag("XPORTBUILD_REMOTE_READ_ONLY"), Path(cache_dir) / "remote-notes",
                   os.environ.get("XPORTBUILD_REMOTE_KEY", "").encode(), _flag("XPORTBUILD_REMOTE_TRUST"))

    def __repr__(self) -> str:
        return self.url

    def _filesystem(self):
        if self._fs is None:
            from fsspec.core import url_to_fs

            self._fs, self._root = url_to_fs(self.url)
        return self._fs

    def _path(self, key: str, name: str = "") -> str:
        folder = f"{self._root.rstrip('/')}/{SCHEMA}/{ALGORITHM}/{key[:2]}/{key}"
        return f"{folder}/{name}" if name else folder

    def fetch(self, key: str, into: Path) -> dict | None:
        """Download the entry for `key` into the folder `into` (files and record): its record, unchecked, or None
        when the remote has no such entry or cannot be read."""
        if self._unreachable:
            return None
        try:
            fs = self._filesystem()
            try:
                raw = fs.cat_file(self._path(key, ENTRY_FILE))
            except FileNotFoundError:
                return None
            record = json.loads(raw)
            names = list(record["files"])
            if not all(safe_relative_name(name) for name in names):
                raise ValueError("a file name leaves the entry folder")
            for name in names:
                (into / name).parent.mkdir(parents=True, exist_ok=True)
                self._copy(fs.get_file, self._path(key, name), str(into / name), record["files"][name]["size"], name)
            (into / ENTRY_FILE).write_bytes(raw)
            return record
        except (FileNotFoundError, ValueError, KeyError, TypeError, AttributeError) as err:
            log.warning("remote cache entry %s rejected (%s); building it locally", key, _one_line(err))
            self.note_damaged(key)
            return None
        except Exception as err:  # noqa: BLE001  any failure of an optional remote: build locally
            self._give_up(f"could not read the remote cache {self.url} ({_one_line(err)}); building locally, and "
                          "a later build pushes what is missing")
            return None

    def note_damaged(self, key: str) -> None:
        self._note("damaged", key)

    def signature_problem(self, record: dict) -> str | None:
        """A signature that this store's key did not make (an unsigned record, built locally, has none)."""
        if self.secret and "signature" in record and not signed_by(record, self.secret):
            return "its signature was not made with XPORTBUILD_REMOTE_KEY"
        return None

    def trusts(self, record: dict) -> bool:
        """Whether a pulled, whole record may be used: signed with the key, or of a stage that does not decide
        what is published, or from a store declared trusted."""
        key, stage = record["key"], record["key_doc"].get("stage")
        if self.secret:
            if signed_by(record, self.secret):
                return True
            log.warning("remote cache entry %s (%s) is not signed with XPORTBUILD_REMOTE_KEY; building it locally",
                        key, stage)
            self.note_damaged(key)  # the push of the local build replaces it
            return False
        if self.trusted or not _decides(stage):
            return True
        if not self._said_unsigned:
            log.info("the remote cache has no key (XPORTBUILD_REMOTE_KEY): fetch, reference and verify are computed "
                     "here, the rest is pulled; XPORTBUILD_REMOTE_TRUST=1 takes them from the store too")
            self._said_unsigned = True
        return False

    def _signed(self, record: dict) -> dict:
        unsigned = {name: value for name, value in record.items() if name != "signature"}
        return {**unsigned, "signature": signature(record_digest(unsigned), self.secret)} if self.secret else unsigned

    def push(self, key: str, folder: Path, record: dict) -> None:
        """Copy the local entry in `folder` to the remote, unless the remote already holds it whole."""
        if self.read_only:
            return
        if self._unreachable:
            self._note("pending", key)
            return
        record = self._signed(record)
        try:
            fs = self._filesystem()
            damaged = self._noted("damaged", key)
            if not damaged and self._holds(fs, key, record):
                self._forget("pending", key)
                return
            for name, file in record["files"].items():
                self._put(fs, folder / name, self._path(key, name), file["size"], name)
            self._put_record(fs, key, record)
        except Exception as err:  # noqa: BLE001  the local build is what counts; the push is retried later
            self._note("pending", key)
            self._give_up(f"could not push {key} to the remote cache {self.url} ({_one_line(err)}); the build "
                          "goes on locally, and a later build pushes what is missing")
            return
        self._forget("damaged", key)
        self._forget("pending", key)
        log.info("pushed %s to the remote cache", key)

    def pending(self) -> list[str]:
        """Keys built here whose push has not completed."""
        folder = self.notes_dir / "pending"
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []

    def _holds(self, fs, key: str, record: dict) -> bool:
        """The remote has this very record and every file at its size (content is checked by whoever pulls)."""
        try:
            if json.loads(fs.cat_file(self._path(key, ENTRY_FILE))) != record:
                return False
            return all(fs.size(self._path(key, name)) == file["size"] for name, file in record["files"].items())
        except FileNotFoundError:
            return False
        except ValueError:
            return False

    def _put_record(self, fs, key: str, record: dict) -> None:
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            local = Path(folder) / ENTRY_FILE
            local.write_text(json.dumps(record, sort_keys=True))
            self._put(fs, local, self._path(key, ENTRY_FILE), local.stat().st_size, ENTRY_FILE)

    def _put(self, fs, local: Path, remote: str, size: int, label: str) -> None:
        staging = f"{self._root.rstrip('/')}/incoming/{uuid.uuid4().hex}"
        fs.makedirs(staging.rsplit("/", 1)[0], exist_ok=True)
        fs.makedirs(remote.rsplit("/", 1)[0], exist_ok=True)
        try:
            self._copy(fs.put_file, str(local), staging, size, label)
            fs.mv(staging, remote)
        except BaseException:
            try:
                fs.rm(staging)
            except Exception:  # noqa: BLE001  what failed the push is what gets reported
                pass
            raise

    @staticmethod
    def _copy(copy, source: str, destination: str, size: int, label: str) -> None:
        if size < _PROGRESS_FROM_BYTES:
            copy(source, destination)
            return
        from fsspec.callbacks import TqdmCallback

        progress = TqdmCallback(tqdm_kwargs={"desc": label, "unit": "B", "unit_scale": True, "disable": None,
                                             "leave": False})
        copy(source, destination, callback=progress)

    def _give_up(self, message: str) -> None:
        """One warning per build: later calls skip the remote instead of waiting for it again."""
        if not self._unreachable:
            log.warning(message)
        self._unreachable = True

    def _note(self, kind: str, key: str) -> None:
        try:
            (self.notes_dir / kind).mkdir(parents=True, exist_ok=True)
            (self.notes_dir / kind / key).touch()
        except OSError:
            pass  # a note only saves work later; the build reports storage errors itself

    def _noted(self, kind: str, key: str) -> bool:
        return (self.notes_dir / kind / key).exists()

    def _forget(self, kind: str, key: str) -> None:
        try:
            (self.notes_dir / kind / key).unlink(missing_ok=True)
        except OSError:
            pass


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0", "false", "no")


def _decides(stage: str | None) -> bool:
    from xportbuild.pipeline import STAGE_BY_NAME

    return stage not in STAGE_BY_NAME or STAGE_BY_NAME[stage].decides


def _one_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]
