"""Publish: copy a verified target's .pte with its manifest and report into artifacts/<target>/, atomically; check
and repair what was published. Orchestration over stage entries, not a stage: it builds nothing cacheable."""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from xportbuild import __version__
from xportbuild.build import Resolver, Workspace, checked_entry
from xportbuild.cache import Entry, Store
from xportbuild.errors import CacheCorrupt
from xportbuild.keys import digest_value, hash_file, is_key
from xportbuild.pipeline import node_libraries
from xportbuild.plan import Plan
from xportbuild.published import (MANIFEST, BadManifest, intact, interrupted_targets, read_manifest, recover,
                                  staging_folder, swap_into_place, target_lock)
from xportbuild.report import QUALITY_PLOT, has_kl, render_report
from xportbuild.stages.lower import DATA_FILE, PTE_FILE
from xportbuild.stages.program import KL_BY_POSITION

# What an app needs beside the program: its tokenizer, and the image or audio preprocessing the model expects.
SHIPPED = {PTE_FILE: "lower", DATA_FILE: "lower", "tokenizer.json": "fetch", "tokenizer_config.json": "fetch",
           "special_tokens_map.json": "fetch", "chat_template.jinja": "fetch", "chat_template.json": "fetch",
           "preprocessor_config.json": "fetch", "processor_config.json": "fetch"}
_SHIPPED_NAMES = frozenset(SHIPPED)
log = logging.getLogger(__name__)


def _stage_record(task: str, entry: Entry) -> dict:
    record = entry.record
    doc = record["key_doc"]
    return {"task": task, "key": record["key"], "output_digest": record["digest"], "inputs": doc["inputs"],
            "params": doc["params"],
            "seconds": record.get("seconds"), "peak_rss_mb": record.get("peak_rss_mb"), "result": record["result"]}


def manifest(plan: Plan, resolver: Resolver, target: str) -> dict:
    """Every stage's key, inputs, timing and result, plus tool versions: the machine-readable record."""
    # A program or quantize node is named as lower names its input: "quantize", or "quantize.<method>" for a kind of
    # several methods.
    method_of = {task: name.partition(".")[2] for name, task in plan.targets[target].programs.items()}
    stages = {}
    for task in plan.ancestors(plan.targets[target].verify):
        stage, method = plan.nodes[task].stage, method_of.get(task)
        stages[f"{stage}.{method}" if method else stage] = _stage_record(task, resolver.entry(task))
    target_spec = plan.targets[target].target
    # The CPU whose kernels produced the verification numbers (a shared cache may have brought them from another).
    verified_on = stages["verify"]["result"].get("machine")
    return {"target": target, "model": target_spec.model.name, "recipe": target_spec.recipe.name,
            "xportbuild": __version__, "libraries": node_libraries(plan.nodes[plan.targets[target].verify]),
            "verified_on": verified_on, "stages": stages}


def published_state(plan: Plan, workspace: Workspace, target: str) -> tuple[bool, str]:
    """(fresh, reason): fresh when the published manifest names the current verify key and files match."""
    resolver = Resolver(plan, workspace)
    folder = workspace.artifacts_dir / target
    if not (folder / MANIFEST).exists():
        return False, f"export:{target} is stale: not published yet"
    try:
        published = read_manifest(folder, _SHIPPED_NAMES)
    except BadManifest as err:
        return False, f"export:{target} is stale: {err}"
    verify_task = plan.targets[target].verify
    doc, _ = resolver.key_doc(verify_task)
    if doc is None or resolver.entry(verify_task) is None:
        return False, f"export:{target} is stale: {first_stale_reason(plan, resolver, verify_task)}"
    if published["stages"]["verify"]["key"] != digest_value(doc):
        return False, f"export:{target} is stale: the published artifact was verified under another key"
    if damaged := damaged_files(folder, published):
        return False, f"export:{target} is stale: published {damaged[0]} is missing or modified"
    return True, f"export:{target} is up to date"


@dataclass(frozen=True)
class Published:
    """A published folder at a glance, from its manifest: its files' bytes on disk, the .pte's numbers against the
    float model, the C++ runner's figures, when it was published (seconds since the epoch), and how long its
    lowering took where it was built."""

    size: int
    against_float: dict
    runner: dict
    published_at: float
    lower_seconds: float | None = None


def read_published(folder: Path) -> Published | None:
    """None where nothing (or no manifest of publish's shape) is published."""
    try:
        manifest = read_manifest(folder, _SHIPPED_NAMES)
    except BadManifest:
        return None
    verify = manifest["stages"]["verify"].get("result") or {}
    files = [folder / name for name in manifest["files"] if (folder / name).is_file()]
    return Published(sum(file.stat().st_size for file in files), verify.get("vs_reference") or {},
                     verify.get("runner") or {}, (folder / MANIFEST).stat().st_mtime,
                     manifest["stages"].get("lower", {}).get("seconds"))


def damaged_files(folder: Path, published: dict) -> list[str]:
    """Published files that are missing or differ from their manifest. Read whole every time (no stamp is
    trusted: bit rot keeps mtimes), which xxh3 does at memory speed: a fraction of a second for a 300 MB model."""
    return [name for name, digest in published["files"].items() if not intact(folder / name, digest)]


def first_stale_reason(plan: Plan, resolver: Resolver, task: str) -> str:
    """Why the earliest stale stage feeding `task` must rerun: the root cause, not its echoes downstream."""
    for upstream in plan.ancestors(task):
        fresh, reason = resolver.status(upstream)
        if not fresh:
            return reason
    return f"{task} is stale"


def publish(plan: Plan, workspace: Workspace, target: str) -> Path:
    """Write artifacts/<target>/ (model.pte, tokenizer, manifest.json, report.md), replacing it whole."""
    # Every stage read whole against its hashes (rebuilt if damaged): what is published is what was verified.
    entries = {task: checked_entry(plan, workspace, task) for task in plan.ancestors(plan.targets[target].verify)}
    record = manifest(plan, Resolver(plan, workspace), target)
    workspace.artifacts_dir.mkdir(parents=True, exist_ok=True)
    with target_lock(workspace.state_dir, target):
        for line in recover(workspace.artifacts_dir, target):
            log.warning(line)
        _publish_folder(entries, record, workspace.artifacts_dir, target)
    return workspace.artifacts_dir / target


def _publish_folder(entries: dict[str, Entry], record: dict, artifacts_dir: Path, target: str) -> None:
    staging = staging_folder(artifacts_dir, target)
    try:
        files = {}
        for name, stage in SHIPPED.items():
            entry = entries[record["stages"][stage]["task"]]
            if entry.file(name).is_file():
                shutil.copyfile(entry.file(name), staging / name)
                files[name] = hash_file(staging / name)
        record["files"] = files
        (staging / MANIFEST).write_text(json.dumps(record, indent=1, sort_keys=True))
        (staging / "report.md").write_text(render_report(record))
        if has_kl(record["stages"]["verify"]["result"]):
            from xportbuild.plots import kl_along_sequence

            kl_along_sequence(record["stages"]["verify"]["result"][KL_BY_POSITION], staging / QUALITY_PLOT)
        _readable_by_everyone(staging)
        swap_into_place(staging, artifacts_dir / target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _readable_by_everyone(folder: Path) -> None:
    """mkdtemp makes a private (0700) folder; a published one gets the modes any new folder would (umask)."""
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)


def repair_published(workspace: Workspace) -> tuple[int, list[str]]:
    """Re-read every published folder against its manifest; a damaged file is copied again from the cache entry
    the manifest names when that entry is intact. Leftovers of interrupted publishes are undone. Returns (folders
    checked, one line per finding)."""
    artifacts = workspace.artifacts_dir
    findings, folders = [], sorted(p.parent for p in artifacts.glob(f"*/{MANIFEST}"))
    for target in interrupted_targets(artifacts):
        with target_lock(workspace.state_dir, target):
            findings.extend(recover(artifacts, target))
    for folder in folders:
        with target_lock(workspace.state_dir, folder.name):
            findings.extend(_repair_folder(folder, workspace.store))
    return len(folders), findings


def _repair_folder(folder: Path, store: Store) -> list[str]:
    try:
        published = read_manifest(folder, _SHIPPED_NAMES)
    except BadManifest as err:
        return [f"{err}; nothing in it was touched, `doit export:{folder.name}` publishes it again"]
    return [f"{folder / name}: {_repair_file(folder, name, published, store)}" for name in damaged_files(folder, published)]


def fsck(workspace: Workspace) -> tuple[list[str], str]:
    """Every cache entry and published file read whole against its hashes, what can be repaired repaired:
    (one line per finding, a summary line)."""
    entries, in_cache = workspace.store.fsck()
    folders, published = repair_published(workspace)
    findings = in_cache + published
    return findings, (f"fsck: {entries} cache entries and {folders} published folders read; "
                      f"{len(findings) or 'nothing'} damaged")


def _repair_file(folder: Path, name: str, published: dict, store: Store) -> str:
    """`name` is one of SHIPPED (read_manifest checked it): a plain name inside the folder."""
    expected = published["files"][name]
    stage = published["stages"].get(SHIPPED[name])
    entry = store.lookup(stage.get("key")) if isinstance(stage, dict) and is_key(stage.get("key")) else None
    try:
        if entry is None:
            raise CacheCorrupt("its cache entry is gone")
        store.check(entry)
    except CacheCorrupt:
        (folder / name).unlink(missing_ok=True)
        return f"missing or modified; removed, `doit export:{folder.name}` rebuilds and publishes it"
    if entry.record["files"].get(name, {}).get("digest") != expected:
        return f"missing or modified, and the cache holds other bytes; `doit export:{folder.name}` publishes it again"
    shutil.copyfile(entry.file(name), folder / f".{name}.tmp")
    os.replace(folder / f".{name}.tmp", folder / name)
    return "missing or modified; restored from the cache"


def copies_of(destination: Path, published: dict) -> dict[str, Path]:
    """Where each published program file goes when an app names `destination` for the .pte: the .ptd (weights
    kept apart) beside it, with the same stem."""
    return {name: destination.with_suffix(Path(name).suffix) for name in (PTE_FILE, DATA_FILE)
            if name in published["files"]}


def copy_state(workspace: Workspace, target: str, destination: Path) -> tuple[bool, str]:
    """(fresh, reason): fresh when the app's copies hold exactly the published bytes."""
    try:
        published = read_manifest(workspace.artifacts_dir / target, _SHIPPED_NAMES)
    except BadManifest:
        return False, f"copy:{target} is stale: export:{target} has not published yet"
    for name, copy in copies_of(destination, published).items():
        if not intact(copy, published["files"][name]):
            return False, f"copy:{target} is stale: {copy} is missing or differs from the published {name}"
    return True, f"copy:{target} is up to date"


def copy_published(workspace: Workspace, target: str, destination: Path) -> Path:
    """Copy the published program (and its .ptd) to where the app's own build reads it, atomically."""
    folder = workspace.artifacts_dir / target
    published = read_manifest(folder, _SHIPPED_NAMES)
    for name, copy in copies_of(destination, published).items():
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder / name, copy.parent / f".{copy.name}.tmp")
        os.replace(copy.parent / f".{copy.name}.tmp", copy)
    return destination
