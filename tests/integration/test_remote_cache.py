"""A remote cache shared by CI jobs: a fresh machine pulls every stage instead of building it; an entry whose
content does not match its hash is rejected with a warning and rebuilt; new entries are pushed."""

from __future__ import annotations

import json
import shutil

from xportbuild.keys import SCHEMA
from xportbuild.cache import ENTRY_FILE, Store
from xportbuild.remote import RemoteCache

from tests.integration.models import local, model_toml

TARGET = "tiny-llama-xnnpack-fp32"


def _entry_of(cache, stage: str):
    for record_file in cache.glob(f"{SCHEMA}/xxh3_128/*/*/{ENTRY_FILE}"):
        record = json.loads(record_file.read_text())
        if record["task"] == f"{stage}:{TARGET}":
            return record_file.parent
    raise AssertionError(f"no {stage} entry in {cache}")


def test_pull_verify_and_push(project, weights, shared_cache, tmp_path):
    project.write_model("tiny-llama", model_toml(local(weights / "tiny-llama"), ["xnnpack-fp32"]))
    project.doit(f"export:{TARGET}")  # fills the session cache, which plays the CI job that ran first
    remote = tmp_path / "remote"
    shutil.copytree(shared_cache, remote, ignore=shutil.ignore_patterns("locks", "tmp", "stat", "sources"))

    # a copy of the run's cache, whose entries are unsigned: declared trusted (test_hostile.py: stores that are not)
    project.env.update(XPORTBUILD_CACHE=str(tmp_path / "fresh"), XPORTBUILD_REMOTE_CACHE=str(remote),
                       XPORTBUILD_REMOTE_TRUST="1")
    shutil.rmtree(project.root / "artifacts")
    mark = len(project.events())
    result = project.doit(f"export:{TARGET}")
    assert project.built_since(mark) == []
    assert "pulled" in result.stderr and (project.root / "artifacts" / TARGET / "model.pte").is_file()

    lowered = _entry_of(remote, "lower") / "model.pte"
    data = bytearray(lowered.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content: only the content hash can tell
    lowered.write_bytes(bytes(data))
    project.env["XPORTBUILD_CACHE"] = str(tmp_path / "fresh-2")
    mark = len(project.events())
    result = project.doit(f"export:{TARGET}")
    assert "rejected" in result.stderr and "does not match its content hash" in result.stderr
    assert f"lower:{TARGET}" in project.built_since(mark)
    assert "fetch:tiny-llama" not in project.built_since(mark)
    repaired = _entry_of(remote, "lower")  # the rebuilt entry replaced the damaged one in the remote
    assert Store(tmp_path / "fresh-4", remote=RemoteCache(str(remote), False, tmp_path / "notes-4")).lookup(repaired.name) is not None

    pushed_to = tmp_path / "remote-2"
    project.env["XPORTBUILD_REMOTE_CACHE"] = str(pushed_to)
    project.edit_recipe("xnnpack-fp32", "max_abs = 0.1", "max_abs = 0.2")
    mark = len(project.events())
    project.doit(f"export:{TARGET}")
    assert project.built_since(mark) == [f"verify:{TARGET}"]
    pushed = _entry_of(pushed_to, "verify")
    # a verify record decides what is published: taken from an unsigned store only when it is declared trusted
    assert Store(tmp_path / "fresh-3", remote=RemoteCache(str(pushed_to), False, tmp_path / "notes-3")).lookup(pushed.name) is None
    trusting = RemoteCache(str(pushed_to), False, tmp_path / "notes-5", trusted=True)
    assert Store(tmp_path / "fresh-5", remote=trusting).lookup(pushed.name) is not None
