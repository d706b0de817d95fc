"""Disk full and an unwritable cache: a clear error naming the place and the next step; nothing half-written
is left behind and what was already published survives."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from xportbuild.keys import hash_file

from tests.conftest import DODO, REPO, Project, made_once
from tests.forked_doit import Confinement, start_doit
from tests.integration.models import local, model_toml

TARGET = "tiny-llama-xnnpack-fp32"


def test_disk_full_while_lowering_keeps_the_published_artifact(project, weights, tmp_path, shared_cache):
    project.write_model("tiny-llama", model_toml(local(weights / "tiny-llama"), ["xnnpack-fp32"]))
    project.env["XPORTBUILD_CACHE"] = str(tmp_path / "cache")
    project.doit_pulling(shared_cache, f"export:{TARGET}")
    published = project.root / "artifacts" / TARGET
    before = {p.name: hash_file(p) for p in published.iterdir()}
    project.edit_recipe("xnnpack-fp32", 'backend = "xnnpack"',
                        'backend = "xnnpack"\n[lower]\nextract_delegate_segments = false')
    run = start_doit([f"export:{TARGET}"], project.root, project.env, merged=True,
                     confinement=Confinement(file_size_limit=64 * 1024))
    code, output = run.wait(timeout=900), run.stdout.read_text()
    assert code != 0
    assert f"lower:{TARGET}: cannot write to" in output and "File too large" in output, output[-3000:]
    assert "free disk space or fix permissions, then run again (finished stages are kept)" in output
    assert not list((tmp_path / "cache" / "tmp").iterdir()), "a half-written scratch folder was left behind"
    assert {p.name: hash_file(p) for p in published.iterdir()} == before
    manifest = json.loads((published / "manifest.json").read_text())
    assert manifest["stages"]["lower"]["params"]["lower"]["extract_delegate_segments"] is True


def test_unwritable_cache_directory(project, weights):
    project.write_model("tiny-llama", model_toml(local(weights / "tiny-llama"), ["xnnpack-fp32"]))
    project.env["XPORTBUILD_CACHE"] = "/sys/xportbuild-cache"  # /sys refuses new folders, even to root
    result = project.doit(f"export:{TARGET}", check=False)
    assert result.returncode != 0
    assert "fetch:tiny-llama: cannot write to /sys/xportbuild-cache" in result.stdout, result.stdout + result.stderr
    assert "free disk space or fix permissions" in result.stdout
    assert not (project.root / "artifacts" / TARGET).exists()


FULL_DISK = """set -e
mount -t tmpfs -o size=64m tmpfs "$CACHE"
mount -t tmpfs -o size=64m tmpfs "$ARTIFACTS"
cp -a "$SAVED_CACHE/." "$CACHE/"
cp -a "$SAVED_ARTIFACTS/." "$ARTIFACTS/"
if [ -n "$DROP" ]; then rm -rf "$CACHE/$DROP"; fi
if [ -n "$UNPUBLISH" ]; then rm -rf "$ARTIFACTS/$UNPUBLISH"; fi
if [ -z "$LOCAL_ROOM" ]; then
  dd if=/dev/zero of="$CACHE/filler" bs=64k 2>/dev/null || true
  dd if=/dev/zero of="$ARTIFACTS/filler" bs=64k 2>/dev/null || true
fi
if [ -n "$STATE" ]; then
  kept=$(mktemp -d)
  cp -a "$STATE/." "$kept/"
  mount -t tmpfs -o size=1m tmpfs "$STATE"
  cp -a "$kept/." "$STATE/"
  dd if=/dev/zero of="$STATE/filler" bs=4k 2>/dev/null || true
fi
if [ -n "$XPORTBUILD_REMOTE_CACHE" ]; then
  mount -t tmpfs -o size=1m tmpfs "$XPORTBUILD_REMOTE_CACHE"
  dd if=/dev/zero of="$XPORTBUILD_REMOTE_CACHE/filler" bs=64k 2>/dev/null || true
fi
"""
QUANTIZED = "tiny-llama-tied-xnnpack-8da8w-shared"
FLOAT = "tiny-llama-tied-xnnpack-fp32"
# Every stage that writes, on a real full file system: a private tmpfs (a user and mount namespace of the test's
# own) holding the cache and artifacts folders, filled up before the stage runs.
FULL_DISK_CASES = ["fetch:tiny-llama-tied", "reference:tiny-llama-tied", "program:tiny-llama-tied", f"quantize:{QUANTIZED}",
                   f"lower:{QUANTIZED}", f"verify:{QUANTIZED}", f"export:{FLOAT}"]


def _build_and_keep_aside(root: Path, weights: Path, shared_cache: Path) -> None:
    """An app with both targets built and published, its cache and artifacts moved aside to copy from."""
    (root / "app" / "recipes" / "models").mkdir(parents=True)
    shutil.copytree(REPO / "recipes" / "recipes", root / "app" / "recipes" / "recipes")
    (root / "app" / "dodo.py").write_text(DODO)
    project = Project(root / "app", _env(root / "saved-cache"))
    project.write_model("tiny-llama-tied", model_toml(local(weights / "tiny-llama-tied"), ["xnnpack-8da8w-shared", "xnnpack-fp32"]))
    project.doit_pulling(shared_cache, "export")
    shutil.move(project.root / "artifacts", root / "saved-artifacts")


def _env(cache: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "XPORTBUILD_CACHE": str(cache)}


@pytest.fixture(scope="module")
def built(tmp_path_factory, run_folder, weights, shared_cache):
    """Built once per run, however many workers use it; each worker runs a copy of the app (its own doit state)."""
    saved = made_once(run_folder / "full-disk", lambda root: _build_and_keep_aside(root, weights, shared_cache))
    root = tmp_path_factory.mktemp("full-disk")
    shutil.copytree(saved / "app", root / "app")
    return Project(root / "app", _env(saved / "saved-cache")), saved


def _run_on_full_disk(project, root, task: str, **extra_env: str):
    cache, artifacts = project.root / "full-cache", project.root / "artifacts"
    cache.mkdir(exist_ok=True)
    artifacts.mkdir(exist_ok=True)
    drop = "" if task.startswith("export:") else project.entry(task).path.relative_to(root / "saved-cache")
    env = {**project.env, "XPORTBUILD_CACHE": str(cache), "SAVED_CACHE": str(root / "saved-cache"), "CACHE": str(cache),
           "SAVED_ARTIFACTS": str(root / "saved-artifacts"), "ARTIFACTS": str(artifacts), "DROP": str(drop),
           "UNPUBLISH": task.removeprefix("export:") if task.startswith("export:") else "",
           "XPORTBUILD_REMOTE_CACHE": "", "LOCAL_ROOM": "", "STATE": "", **extra_env}
    run = start_doit([task], project.root, env, merged=True, confinement=Confinement(private_mounts=FULL_DISK))
    return run.wait(timeout=900), run.stdout.read_text()


@pytest.mark.parametrize("task", FULL_DISK_CASES)
def test_a_full_disk_in_any_stage_is_one_clean_line(built, task):
    returncode, output = _run_on_full_disk(*built, task)
    assert returncode == 1, output[-3000:]  # doit's "task failed", not an abort (134) or a crash (3)
    assert f"{task}: cannot write to" in output and "No space left on device" in output, output[-3000:]
    assert "free disk space or fix permissions, then run again (finished stages are kept)" in output
    assert "Traceback" not in output and "terminate called" not in output, output[-3000:]


def test_a_full_remote_cache_is_a_warning_and_the_build_goes_on(built, tmp_path):
    """The remote is shared and optional: a push that finds it full is skipped, the local build is what counts."""
    project, root = built
    remote = tmp_path / "remote"
    remote.mkdir()
    returncode, output = _run_on_full_disk(project, root, "program:tiny-llama-tied", XPORTBUILD_REMOTE_CACHE=str(remote),
                                           LOCAL_ROOM="yes")
    assert returncode == 0, output[-3000:]
    assert "could not push" in output and "No space left on device" in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]


def test_a_full_disk_under_the_project_state_is_one_clean_line(built):
    """The project's own state (.xportbuild: the build log, doit's state file) on a full disk: the stage's result is
    in the cache, the task fails naming the state folder, and doit's state file is one warning, no traceback."""
    project, root = built
    state = project.root / ".xportbuild"
    returncode, output = _run_on_full_disk(project, root, "program:tiny-llama-tied", STATE=str(state), LOCAL_ROOM="yes")
    assert returncode == 1, output[-3000:]
    assert f"program:tiny-llama-tied: cannot write to {state}" in output and "No space left on device" in output, \
        output[-3000:]
    assert "Traceback" not in output, output[-3000:]
