"""Hostile or careless input at build time: a shared store written by someone else, manifests that point outside
artifacts/, publishes killed or run twice at once, model folders that link out or hold damaged weights. None of it
runs code, publishes what was not verified here, or touches a file outside the project's own folders."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from xportbuild.cache import ENTRY_FILE
from xportbuild.keys import SCHEMA, digest_value, hash_file, record_digest, tree_digest

from tests import tiny
from tests.integration.models import local, model_toml

TARGET = "tiny-llama-xnnpack-fp32"
STAGES = ("fetch", "reference", "program", "replay", "lower", "verify")


def _built(project, weights, tmp_path, shared_cache):
    """The target published from a cache of the project's own (pulled from the run's cache)."""
    project.write_model("tiny-llama", model_toml(local(weights / "tiny-llama"), ["xnnpack-fp32"]))
    project.env["XPORTBUILD_CACHE"] = str(tmp_path / "cache")
    project.doit_pulling(shared_cache, f"export:{TARGET}")
    return project


def _records(store: Path) -> dict[str, Path]:
    """{task: entry folder} of a store's entries."""
    return {json.loads(path.read_text())["task"]: path.parent for path in store.glob(f"{SCHEMA}/*/*/*/{ENTRY_FILE}")}


def _rewrite(folder: Path, edit) -> dict:
    """Edit a record as a writer of the store could: the record made whole again, its signature left as it was."""
    record = json.loads((folder / ENTRY_FILE).read_text())
    edit(record)
    record["digest"] = tree_digest({name: file["digest"] for name, file in record["files"].items()})
    record["record_digest"] = record_digest(record)
    (folder / ENTRY_FILE).write_text(json.dumps(record))
    return record


def _forge(store: Path) -> None:
    """Replace the lowered program with junk and add a verify record that passes it, both whole and consistent."""
    entries = _records(store)
    pte = entries[f"lower:{TARGET}"] / "model.pte"
    junk = bytearray(pte.read_bytes())
    junk[len(junk) // 2: len(junk) // 2 + 4096] = bytes(4096)
    pte.write_bytes(bytes(junk))
    lowered = _rewrite(entries[f"lower:{TARGET}"], lambda r: r["files"]["model.pte"].update(
        size=len(junk), digest=hash_file(pte)))
    verified = json.loads((entries[f"verify:{TARGET}"] / ENTRY_FILE).read_text())
    verified["key_doc"]["inputs"]["lower"] = lowered["digest"]
    key = digest_value(verified["key_doc"])
    forged = store / SCHEMA / "xxh3_128" / key[:2] / key
    shutil.copytree(entries[f"verify:{TARGET}"], forged)
    _rewrite(forged, lambda r: r.update(key=key, key_doc=verified["key_doc"]))


def _fresh_clone(project, tmp_path, name: str, remote: Path, **env) -> None:
    """The same project as on another machine: an empty cache, nothing published, the shared store."""
    shutil.rmtree(project.root / "artifacts", ignore_errors=True)
    shutil.rmtree(project.root / ".xportbuild", ignore_errors=True)
    project.env.pop("XPORTBUILD_REMOTE_KEY", None)
    project.env.update(XPORTBUILD_CACHE=str(tmp_path / name), XPORTBUILD_REMOTE_CACHE=str(remote), **env)


def test_a_forged_shared_store_never_publishes_its_program(project, weights, tmp_path, shared_cache):
    _built(project, weights, tmp_path, shared_cache)
    genuine = (project.root / "artifacts" / TARGET / "model.pte").read_bytes()
    unsigned, signed = tmp_path / "unsigned", tmp_path / "signed"
    for store, key in ((unsigned, None), (signed, "ci-secret")):
        project.env.update(XPORTBUILD_REMOTE_CACHE=str(store), **({"XPORTBUILD_REMOTE_KEY": key} if key else {}))
        mark = len(project.events())
        project.doit(f"export:{TARGET}")  # everything up to date: the restored cache is shared all the same
        assert project.built_since(mark) == []
        assert {task.partition(":")[0] for task in _records(store)} == set(STAGES)
        _forge(store)

    _fresh_clone(project, tmp_path, "clone-1", unsigned)  # no key: fetch, reference and verify computed here
    mark = len(project.events())
    refused = project.doit(f"export:{TARGET}", check=False)
    assert refused.returncode == 1, refused.stdout[-3000:]
    assert f"verify:{TARGET}" in refused.stdout and f"export:{TARGET}" not in project.built_since(mark)
    assert "fetch, reference and verify are computed here" in refused.stderr
    assert {"fetch:tiny-llama", "reference:tiny-llama"} <= set(project.built_since(mark))
    assert not (project.root / "artifacts" / TARGET).exists()

    _fresh_clone(project, tmp_path, "clone-2", signed, XPORTBUILD_REMOTE_KEY="ci-secret")
    mark = len(project.events())
    result = project.doit(f"export:{TARGET}")
    assert "is not signed with XPORTBUILD_REMOTE_KEY" in result.stderr or "signature was not made" in result.stderr
    assert project.built_since(mark) == [f"lower:{TARGET}"]  # the forged program refused; the rest pulled, signed
    assert (project.root / "artifacts" / TARGET / "model.pte").read_bytes() == genuine


def _fsck(project) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xportbuild", "fsck"], cwd=project.root, env=project.env,
                          capture_output=True, text=True, timeout=600)


def test_fsck_never_touches_a_file_a_manifest_points_outside_to(project, tmp_path):
    victims = [tmp_path / "victim.txt", project.root / "victim.txt", tmp_path / "elsewhere" / "model.pte"]
    for victim in victims:
        victim.parent.mkdir(parents=True, exist_ok=True)
        victim.write_text("keep me")
    artifacts = project.root / "artifacts"
    folder = artifacts / "a-b"
    folder.mkdir(parents=True)
    files = {"../victim.txt": "0" * 32, "../../victim.txt": "0" * 32, str(victims[0]): "0" * 32}
    (folder / "manifest.json").write_text(json.dumps({"files": files, "stages": {"verify": {"key": "0" * 32}}}))
    (victims[2].parent / "manifest.json").write_text(json.dumps(
        {"files": {"model.pte": "0" * 32}, "stages": {"verify": {"key": "0" * 32}, "lower": {"key": "../../x"}}}))
    (artifacts / "c-d").symlink_to(victims[2].parent)  # a published folder that is a link elsewhere
    (artifacts / "e-f").mkdir()
    (artifacts / "e-f" / "manifest.json").write_text("[]")

    result = _fsck(project)
    assert result.returncode == 1, result.stdout + result.stderr
    assert all(victim.read_text() == "keep me" for victim in victims)
    assert "a-b/manifest.json: not of a published manifest's shape" in result.stdout
    assert "c-d is not a folder of its own" in result.stdout
    assert "e-f/manifest.json: unreadable or not a manifest" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def _publish_times(root: str, times: int) -> None:
    from xportbuild.build import Workspace
    from xportbuild.plan import plan_targets
    from xportbuild.publish import publish, repair_published
    from xportbuild.recipe import load_project

    workspace = Workspace.for_project(Path(root) / "recipes")
    plan = plan_targets(load_project(Path(root) / "recipes"))
    for _ in range(times):
        publish(plan, workspace, TARGET)
        repair_published(workspace)


def test_publishes_killed_concurrent_or_beside_fsck_leave_one_whole_folder(project, weights, tmp_path, shared_cache,
                                                                          monkeypatch):
    _built(project, weights, tmp_path, shared_cache)
    artifacts = project.root / "artifacts"
    published = {p.name: p.read_bytes() for p in (artifacts / TARGET).iterdir()}

    # killed between the two renames of a publish without an atomic exchange, and while writing a new folder
    moved = artifacts / f".{TARGET}~old-x1"
    moved.mkdir()
    os.replace(artifacts / TARGET, moved / TARGET)
    (artifacts / f".{TARGET}~new-x2").mkdir()
    (artifacts / f".{TARGET}~new-x2" / "model.pte").write_bytes(b"half written")
    result = _fsck(project)
    assert "put back from an interrupted publish" in result.stdout, result.stdout + result.stderr
    assert {p.name: p.read_bytes() for p in (artifacts / TARGET).iterdir()} == published
    assert sorted(p.name for p in artifacts.iterdir()) == [TARGET]
    assert "status     : up-to-date" in project.doit("info", f"export:{TARGET}").stdout

    for name, value in project.env.items():
        if name.startswith(("XPORTBUILD", "HF_")):
            monkeypatch.setenv(name, value)  # the publishing processes fork from this one
    with ProcessPoolExecutor(3) as pool:
        for done in [pool.submit(_publish_times, str(project.root), 4) for _ in range(3)]:
            done.result()  # two publishes of one target used to fail with "Directory not empty"
    assert {p.name: p.read_bytes() for p in (artifacts / TARGET).iterdir()} == published
    assert sorted(p.name for p in artifacts.iterdir()) == [TARGET]

    (artifacts / TARGET / "manifest.json").write_text(json.dumps({"files": []}))  # of another shape: republished
    info = project.doit("info", f"export:{TARGET}", check=False).stdout
    assert "unreadable or not a manifest (KeyError: 'stages')" in info
    project.doit(f"export:{TARGET}")
    assert {p.name: p.read_bytes() for p in (artifacts / TARGET).iterdir()} == published

    lowered = project.entry(f"lower:{TARGET}")  # a record removed, its files kept: rebuilt, not "not empty"
    (lowered.path / ENTRY_FILE).unlink()
    mark = len(project.events())
    result = project.doit(f"export:{TARGET}")
    assert "has no record" in result.stderr and project.built_since(mark) == [f"lower:{TARGET}"]


def _nan_weights(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _no_mlp(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if "mlp" not in k}, folder / "model.safetensors",
              metadata={"format": "pt"})


def _link_out(folder: Path) -> None:
    (folder.parent / "secret.txt").write_text("password")
    (folder / "notes.txt").symlink_to(folder.parent / "secret.txt")


@pytest.mark.parametrize("damage, expected", [
    (_nan_weights, "the checkpoint holds weights with NaN or infinite values: model.layers.0.mlp.up_proj.weight"),
    (_no_mlp, "weights missing model.layers.0.mlp.down_proj.weight, model.layers.0.mlp.gate_proj.weight"),
    (_link_out, "notes.txt: a link to"),
], ids=["nan-weights", "missing-weights", "link-out"])
def test_a_damaged_or_linking_source_stops_the_build_in_one_line(project, weights, tmp_path, damage, expected):
    project.env["XPORTBUILD_CACHE"] = str(tmp_path / "cache")  # its own: searched below for the secret
    folder = tiny.copy_model(weights / "tiny-llama", project.root / "source" / "model")
    damage(folder)
    project.write_model("bad", model_toml(local(folder), ["xnnpack-fp32"]))
    result = project.doit("export:bad-xnnpack-fp32", check=False)
    assert result.returncode == 1 and expected in result.stdout, result.stdout[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    built = {e["task"] for e in project.events() if e["event"] == "built"}
    assert built <= {"fetch:bad"}  # data checks at fetch (links) or when the weights are first loaded (reference)
    cached = Path(project.env["XPORTBUILD_CACHE"])
    assert not any(p.is_file() and p.read_bytes() == b"password" for p in cached.rglob("*"))


def test_a_model_folder_file_named_like_a_record_does_not_break_its_builds(project, weights):
    folder = tiny.copy_model(weights / "tiny-llama", project.root / "source" / "model")
    (folder / ENTRY_FILE).write_text('{"files": {}}')
    (folder / "xportbuild-source.json").write_text('{"source": "forged"}')
    project.write_model("named", model_toml(local(folder), ["xnnpack-fp32"]))
    first = project.doit("fetch:named")
    assert "not copied: xportbuild writes a file of that name itself" in first.stderr
    assert "status     : up-to-date" in project.doit("info", "fetch:named").stdout
