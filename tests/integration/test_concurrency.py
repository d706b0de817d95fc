"""Concurrent builds: two `doit` processes on overlapping targets, and `doit -n 2`, build each stage once,
lose no records and publish verified artifacts."""

from __future__ import annotations

import json
from collections import Counter

from xportbuild.keys import hash_file

from tests.forked_doit import ForkedRun, start_doit
from tests.integration.models import local, model_toml

TARGETS = ("tiny-llama-xnnpack-fp32", "tiny-llama-xnnpack-8da8w-shared")


def _start(project, *args: str) -> ForkedRun:
    """A `doit` process of its own (tests/forked_doit.py), not waited for."""
    return start_doit(list(args), project.root, project.env, merged=True)


def _finish(run: ForkedRun) -> str:
    code = run.wait(timeout=1200)
    output = run.stdout.read_text()
    assert code == 0, output[-6000:]
    return output


def _assert_built_once_and_published(project) -> None:
    built = Counter(e["key"] for e in project.events() if e["event"] == "built")
    assert built and max(built.values()) == 1, f"a stage was built twice: {built}"
    for target in TARGETS:
        folder = project.root / "artifacts" / target
        manifest = json.loads((folder / "manifest.json").read_text())
        assert all(hash_file(folder / name) == digest for name, digest in manifest["files"].items())
    # No lost records: a third run finds every stage and both targets up to date, and builds nothing.
    before = len(project.events())
    rerun = project.doit(*[f"export:{t}" for t in TARGETS])
    assert project.built_since(before) == []
    assert all(f"-- export:{t}" in rerun.stdout for t in TARGETS), rerun.stdout


def _fresh_project(project, weights, tmp_path):
    project.write_model("tiny-llama", model_toml(local(weights / "tiny-llama"), ["xnnpack-fp32", "xnnpack-8da8w-shared"]))
    project.env["XPORTBUILD_CACHE"] = str(tmp_path / "cache")


def test_two_doit_processes_on_overlapping_targets(project, weights, tmp_path):
    _fresh_project(project, weights, tmp_path)
    both = _start(project, *[f"export:{t}" for t in TARGETS])
    one = _start(project, f"export:{TARGETS[1]}")
    _finish(both), _finish(one)
    waited = [e for e in project.events() if e["event"] == "hit"]
    assert waited, "the second process never reused a stage the first one built"
    _assert_built_once_and_published(project)


def test_doit_parallel_workers_share_stages(project, weights, tmp_path):
    _fresh_project(project, weights, tmp_path)
    _finish(_start(project, "-n", "2", *[f"export:{t}" for t in TARGETS]))
    pids = {e["pid"] for e in project.events() if e["event"] == "built"}
    assert len(pids) == 2, "doit -n 2 did not build in two processes"
    _assert_built_once_and_published(project)
