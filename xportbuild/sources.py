"""Weights sources: a content fingerprint for the fetch key, and the local files behind it (no torch)."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import re
import stat
import tempfile
from pathlib import Path

from xportbuild.errors import SourceError, SourceNotHere
from xportbuild.cache import StatCache
from xportbuild.keys import library_versions, tree_digest
from xportbuild.recipe.spec import SourceSpec, resolve_relative

log = logging.getLogger(__name__)
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def local_dir(source: SourceSpec, model_file: str, scratch_root: Path) -> Path:
    """The model folder of a local source: its path, or the folder an installed package ships (unpacked once into
    `scratch_root` when it ships a zip)."""
    path = _packaged_folder(source.package, model_file, scratch_root) if source.package else \
        resolve_relative(model_file, source.path)
    if not (path / "config.json").is_file():
        field = "package" if source.package else "path"
        raise SourceError(f"{model_file}: source.{field}: {path} is not a saved model folder (no config.json)")
    return path


def model_files(folder: Path, within: Path | None = None) -> dict[str, Path]:
    """{name relative to `folder`: file} of every file in a model folder, read as data: a link is followed only
    while it stays inside `within` (the folder itself; for a hub snapshot, its repository's cache, whose snapshot
    files link to blobs beside it), and anything but a regular file (a pipe, a device, a socket) is refused, since
    reading it could hang or leak. Raises SourceError naming the file."""
    root = Path(within or folder).resolve()
    files = {}
    for path in sorted(Path(folder).rglob("*")):
        name = path.relative_to(folder).as_posix()
        target = path.resolve()
        if path.is_symlink() and not target.is_relative_to(root):
            raise SourceError(f"{path}: a link to {target}, outside the model folder {root}: a model folder is read "
                              "as data, and nothing outside it; copy the file in or remove the link")
        try:
            mode = os.stat(path).st_mode
        except OSError as err:
            raise SourceError(f"{path}: cannot be read ({err.strerror}): a broken link or a file removed meanwhile") from err
        if stat.S_ISDIR(mode):
            continue
        if not stat.S_ISREG(mode):
            raise SourceError(f"{path}: not a regular file (a pipe, device or socket): a model folder holds files only; "
                              "remove it")
        files[name] = path
    return files


def gguf_path(source: SourceSpec, model_file: str, scratch_root: Path) -> Path:
    """The .gguf file of a gguf source; a packaged one is assembled once into `scratch_root`."""
    if source.path:
        path = resolve_relative(model_file, source.path)
        if not path.is_file():
            raise SourceError(f"{model_file}: source.path: GGUF file {path} does not exist")
        return path
    return _packaged_gguf(source.package, model_file, scratch_root)


def _packaged_gguf(package: str, model_file: str, scratch_root: Path) -> Path:
    module = _package_module(package, model_file)
    shipped = sorted(Path(module.__file__).parent.rglob("*.gguf"))
    if shipped:
        return shipped[0]
    if not hasattr(module, "assemble"):
        raise SourceError(f"{model_file}: source.package: {package!r} ships no .gguf file and has no assemble()")
    return _made_once(package, getattr(module, "MODEL_NAME", f"{package}.gguf"), scratch_root, module.assemble)


def _packaged_folder(package: str, model_file: str, scratch_root: Path) -> Path:
    """A model folder a package ships: as a folder holding config.json, or as a zip of one. Found without importing
    the package (its code is not run)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(f"{model_file}: source.package: {package!r} is not installed "
                          f"(pip install {package.replace('_', '-')})")
    root = Path(next(iter(spec.submodule_search_locations)))
    folders = sorted(config.parent for config in root.rglob("config.json")
                     if any(config.parent.glob("*.safetensors")))
    if folders:
        return folders[0]
    archives = sorted(root.rglob("*.zip"))
    if not archives:
        raise SourceError(f"{model_file}: source.package: {package!r} ships no model folder (config.json beside "
                          "safetensors weights) and no .zip of one")
    return _made_once(package, "model", scratch_root, lambda folder: unpack_zip(archives[0], folder))


def unpack_zip(archive: Path, folder: Path) -> None:
    """Unpack a zip of a model folder, refusing any member that would land outside `folder` or is a link."""
    import zipfile

    with zipfile.ZipFile(archive) as opened:
        for member in opened.infolist():
            parts = Path(member.filename).parts
            is_link = stat.S_ISLNK(member.external_attr >> 16)
            if Path(member.filename).is_absolute() or ".." in parts or is_link:
                raise SourceError(f"{archive}: member {member.filename!r} is "
                                  f"{'a link' if is_link else 'a path outside the folder'}: refused")
        opened.extractall(folder)


def _package_module(package: str, model_file: str):
    try:
        return importlib.import_module(package)
    except ImportError as err:
        raise SourceError(
            f"{model_file}: source.package: {package!r} is not installed (pip install {package.replace('_', '-')})"
        ) from err


def _made_once(package: str, name: str, scratch_root: Path, make) -> Path:
    """scratch_root/<package>-<version>/<name>, made by `make(path)` the first time (atomically)."""
    version = library_versions((package.replace("_", "-"),))[package.replace("_", "-")]
    final = scratch_root / f"{package}-{version}" / name
    if not final.exists():
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent)) / name
        log.info("unpacking %s from package %s", name, package)
        make(tmp)
        os.replace(tmp, final)
        tmp.parent.rmdir()
    return final


def hub_snapshot(source: SourceSpec, model_file: str) -> tuple[Path, str]:
    """(snapshot folder, commit SHA) of a hub source, through huggingface_hub's cache: the local copy when there is
    one for a pinned commit, else the hub unless offline. A source that cannot be had now is SourceNotHere."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    pinned = bool(_COMMIT.match(source.revision))
    try:
        folder = Path(snapshot_download(source.repo, revision=source.revision, local_files_only=offline() or pinned))
    except (RepositoryNotFoundError, RevisionNotFoundError) as err:
        raise SourceError(f"{model_file}: source: {source.repo}@{source.revision} not found on the hub") from err
    except LocalEntryNotFoundError as err:
        if pinned and not offline():
            return _downloaded(source, model_file)
        raise _not_here(source, model_file, "the hub is offline (HF_HUB_OFFLINE=1)") from err
    if not pinned:
        log.warning(
            "%s: source.revision %r is a branch or tag, not a commit: the build is not reproducible "
            "(resolved to %s); pin revision to that commit SHA", model_file, source.revision, folder.name,
        )
    return folder, folder.name


def _downloaded(source: SourceSpec, model_file: str) -> tuple[Path, str]:
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(source.repo, revision=source.revision))
    except Exception as err:  # noqa: BLE001  any failure to reach the hub: the same next step
        raise _not_here(source, model_file, f"the hub cannot be reached ({type(err).__name__})") from err
    return folder, folder.name


def _not_here(source: SourceSpec, model_file: str, why: str) -> SourceNotHere:
    command = f"hf download {source.repo} --revision {source.revision}"
    return SourceNotHere(f"{model_file}: {_missing_from_cache(source)} and {why}: download it once ({command}) or "
                         "point source at a local folder", command)


def _missing_from_cache(source: SourceSpec) -> str:
    """Which part is missing from the local hub cache: the repository, or only that revision."""
    from huggingface_hub import constants

    repo_dir = Path(constants.HF_HUB_CACHE) / f"models--{source.repo.replace('/', '--')}"
    if not repo_dir.is_dir():
        return f"source.repo: {source.repo!r} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE})"
    known = sorted(p.name for p in (repo_dir / "refs").glob("*")) + sorted(p.name for p in (repo_dir / "snapshots").glob("*"))
    return (f"source.revision: {source.revision!r} of {source.repo!r} is not in the local Hugging Face cache "
            f"(cached: {', '.join(known) or 'nothing'})")


def fingerprint(source: SourceSpec, model_file: str, stats: StatCache, scratch_root: Path) -> dict:
    """What the fetch key depends on: content digests (or a commit SHA) of the source."""
    if source.kind == "hub":
        _, commit = hub_snapshot(source, model_file)
        return {"repo": source.repo, "commit": commit, "reproducible": bool(_COMMIT.match(source.revision))}
    if source.kind == "local":
        folder = local_dir(source, model_file, scratch_root)
        return {"tree": tree_digest({name: stats.digest(path) for name, path in model_files(folder).items()})}
    path = gguf_path(source, model_file, scratch_root)
    return {"gguf": stats.digest(path), "versions": library_versions(("gguf",))}


def source_of(node) -> SourceSpec:
    """The source a fetch node reads: its keyed fields and where it is found."""
    return SourceSpec(**node.params["source"], **node.locator)
