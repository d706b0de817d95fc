"""Publish: copy a verified target's .pte with its manifest and report into artifacts/<target>/, atomically."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from xportbuild import __version__
from xportbuild.build import Resolver, Workspace
from xportbuild.cache import Entry
from xportbuild.keys import digest_value, file_stamp, library_versions
from xportbuild.plan import Plan
from xportbuild.report import render_report
from xportbuild.stages.lower import DATA_FILE, PTE_FILE

MANIFEST = "manifest.json"
# What an app needs beside the program: its tokenizer, and the image or audio preprocessing the model expects.
SHIPPED = {PTE_FILE: "lower", DATA_FILE: "lower", "tokenizer.json": "fetch", "tokenizer_config.json": "fetch",
           "preprocessor_config.json": "fetch"}


def _stage_record(task: str, entry: Entry) -> dict:
    record = entry.record
    doc = record["key_doc"]
    return {"task": task, "key": record["key"], "output_digest": record["digest"], "inputs": doc["inputs"],
            "params": doc["params"],
            "seconds": record.get("seconds"), "peak_rss_mb": record.get("peak_rss_mb"), "result": record["result"]}


def manifest(plan: Plan, resolver: Resolver, target: str) -> dict:
    """Every stage's key, inputs, timing and result, plus tool versions: the machine-readable record."""
    stages = {}
    for task in plan.ancestors(plan.targets[target].verify):
        node = plan.nodes[task]
        stages[f"{node.stage}.{node.part}" if node.part else node.stage] = _stage_record(task, resolver.entry(task))
    target_spec = plan.targets[target].target
    # The CPU whose kernels produced the verification numbers (a shared cache may have brought them from another).
    verified_on = stages["verify"]["result"].get("machine")
    return {"target": target, "model": target_spec.model.name, "recipe": target_spec.recipe.name,
            "xportbuild": __version__, "libraries": library_versions(), "verified_on": verified_on, "stages": stages}


def published_state(plan: Plan, workspace: Workspace, target: str) -> tuple[bool, str]:
    """(fresh, reason): fresh when the published manifest names the current verify key and files match."""
    resolver = Resolver(plan, workspace)
    folder = workspace.artifacts_dir / target
    try:
        published = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return False, f"export:{target} is stale: not published yet"
    verify_task = plan.targets[target].verify
    doc, _ = resolver.key_doc(verify_task)
    if doc is None or resolver.entry(verify_task) is None:
        return False, f"export:{target} is stale: {first_stale_reason(plan, resolver, verify_task)}"
    if published["stages"]["verify"]["key"] != digest_value(doc):
        return False, f"export:{target} is stale: the published artifact was verified under another key"
    for name, digest in published.get("files", {}).items():
        path = folder / name
        if not path.is_file() or workspace.store.stats.digest(path) != digest:
            return False, f"export:{target} is stale: published {name} is missing or modified"
    return True, f"export:{target} is up to date"


def first_stale_reason(plan: Plan, resolver: Resolver, task: str) -> str:
    """Why the earliest stale stage feeding `task` must rerun: the root cause, not its echoes downstream."""
    for upstream in plan.ancestors(task):
        fresh, reason = resolver.status(upstream)
        if not fresh:
            return reason
    return f"{task} is stale"


def publish(plan: Plan, workspace: Workspace, target: str) -> Path:
    """Write artifacts/<target>/ (model.pte, tokenizer, manifest.json, report.md), replacing it whole."""
    resolver = Resolver(plan, workspace)
    record = manifest(plan, resolver, target)
    workspace.artifacts_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=workspace.artifacts_dir, prefix=f".{target}-"))
    try:
        files = {}
        for name, stage in SHIPPED.items():
            source = resolver.entry(record["stages"][stage]["task"]).file(name)
            if source.is_file():
                shutil.copyfile(source, staging / name)
                files[name] = workspace.store.stats.digest(staging / name)
        record["files"] = files
        (staging / MANIFEST).write_text(json.dumps(record, indent=1, sort_keys=True))
        (staging / "report.md").write_text(render_report(record))
        _swap_into_place(staging, workspace.artifacts_dir / target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    final = workspace.artifacts_dir / target
    for name, digest in files.items():
        workspace.store.stats.remember(final / name, file_stamp(final / name), digest)
    return final


def _swap_into_place(staging: Path, final: Path) -> None:
    """Replace `final` by `staging` with renames, so readers never see a half-written folder."""
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}-old-"))
        os.replace(final, old / final.name)
    os.replace(staging, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
