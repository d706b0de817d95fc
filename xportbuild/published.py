"""The folders under artifacts/: a manifest read as untrusted data, one lock per target, the atomic swap that
publishes a folder, and the leftovers of a publish that was killed. Nothing here writes or removes a path outside
artifacts/<target>/ and its own hidden siblings, whatever a manifest says."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path

from filelock import FileLock

from xportbuild.keys import hash_file

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
# Hidden siblings of artifacts/<target> while it is replaced: "~" never occurs in a target name (recipe/load.py).
_NEW, _OLD = "~new-", "~old-"
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


class BadManifest(ValueError):
    """A published manifest.json that is not what publish writes."""


def read_manifest(folder: Path, shipped: frozenset[str]) -> dict:
    """The manifest of a published folder, checked to be of publish's shape, its files among `shipped` (plain
    names): what fsck may restore or remove, and what `copy:` copies. Raises BadManifest saying what is wrong."""
    if folder.is_symlink() or not folder.is_dir():
        raise BadManifest(f"{folder} is not a folder of its own (a link or a file): not read")
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        verify_key = manifest["stages"]["verify"]["key"]
        files = manifest["files"]
        names_ok = isinstance(files, dict) and all(name in shipped and isinstance(digest, str)
                                                   for name, digest in files.items())
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise BadManifest(f"{folder / MANIFEST}: unreadable or not a manifest ({type(err).__name__}: {err})") from err
    if not isinstance(verify_key, str) or not names_ok:
        raise BadManifest(f"{folder / MANIFEST}: not of a published manifest's shape (files must be among "
                          f"{', '.join(sorted(shipped))}, each with its digest)")
    return manifest


def intact(path: Path, digest: str) -> bool:
    """A regular file (not a link, pipe or device, which reading could follow out or hang on) with this content."""
    try:
        regular = stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False
    return regular and hash_file(path) == digest


@contextlib.contextmanager
def target_lock(state_dir: Path, target: str):
    """Held by publish and by fsck's repair of one target: neither sees the other's half-done folder."""
    path = state_dir / "locks" / f"publish-{target}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path)):
        yield


def staging_folder(artifacts_dir: Path, target: str) -> Path:
    return Path(tempfile.mkdtemp(dir=artifacts_dir, prefix=f".{target}{_NEW}"))


def swap_into_place(staging: Path, final: Path) -> None:
    """Make `staging` the folder `final`: an atomic exchange where the system has one (Linux), so `final` is always
    the old folder or the new; elsewhere two renames, whose interruption `recover` undoes."""
    if final.is_dir() and not final.is_symlink() and _exchange(staging, final):
        _remove(staging)  # now the old folder
        return
    old = None
    if final.exists() or final.is_symlink():
        old = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}{_OLD}"))
        os.replace(final, old / final.name)
    os.replace(staging, final)
    if old is not None:
        _remove(old)


def recover(artifacts_dir: Path, target: str) -> list[str]:
    """Undo what a killed publish of `target` left: the old folder put back if it was moved away and the new one
    never placed, every hidden staging folder removed. Call under `target_lock`. Returns what was done."""
    final, done = artifacts_dir / target, []
    for leftover in sorted(artifacts_dir.glob(f".{target}~*")):
        if leftover.name.startswith(f".{target}{_OLD}") and not final.exists() \
                and (leftover / target).is_dir() and not (leftover / target).is_symlink():
            os.replace(leftover / target, final)
            done.append(f"{final}: put back from an interrupted publish")
        if leftover.name.startswith((f".{target}{_OLD}", f".{target}{_NEW}")):
            _remove(leftover)
            done.append(f"{leftover}: left by an interrupted publish; removed")
    return done


def interrupted_targets(artifacts_dir: Path) -> list[str]:
    """Targets with leftovers of an interrupted publish."""
    names = {path.name[1:].split("~", 1)[0] for path in artifacts_dir.glob(".*~*")
             if _NEW in path.name or _OLD in path.name}
    return sorted(names)


def _remove(path: Path) -> None:
    """Remove a folder of ours; a link is removed as a link, never followed."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (renameat2 RENAME_EXCHANGE); False where the system or file system has no such
    call."""
    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "renameat2"):
        return False
    if libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))
