"""Integrity end to end: bit rot (content changed, size and mtime kept) in a cached program or a published .pte is
never lowered, verified or served; an archive that cannot be read is a damaged entry, rebuilt, not a traceback;
`fsck` reads everything and repairs what it can."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from xportbuild.keys import hash_file, record_digest, tree_digest

from tests.integration.models import local, model_toml

TARGET = "tiny-llama-tied-xnnpack-8da8w-shared"  # the default recipe on a tied model: quantize -> lower -> verify
QUANTIZE, LOWER = f"quantize:{TARGET}", f"lower:{TARGET}"
LOWERING_ONLY_CHANGE = ("extract_delegate_segments = true", "extract_delegate_segments = false")


def flip_in_place(path: Path, offset: int) -> None:
    """One byte changed, size and mtime kept: what bit rot leaves, and what a stat check cannot see."""
    stamp = path.stat()
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)[0]
        handle.seek(offset)
        handle.write(bytes([byte ^ 0x10]))
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))


def member_offset(archive: Path, pick) -> int:
    """File offset of the middle of the first member whose name `pick` accepts (stored members: data as is)."""
    with zipfile.ZipFile(archive) as zf:
        info = next(i for i in zf.infolist() if pick(i.filename))
    with open(archive, "rb") as handle:
        handle.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(handle.read(2), "little"), int.from_bytes(handle.read(2), "little")
    return info.header_offset + 30 + name_len + extra_len + info.file_size // 2


def _project(project, weights, tmp_path, shared_cache):
    project.write_model("tiny-llama-tied", model_toml(local(weights / "tiny-llama-tied"), ["xnnpack-8da8w-shared"]))
    project.env["XPORTBUILD_CACHE"] = str(tmp_path / "cache")  # its own cache: this test damages entries
    project.doit_pulling(shared_cache, f"export:{TARGET}")
    return project


def _is_weight(name: str) -> bool:
    return "/data/weights/" in name and not name.endswith(("weights_config.json", ".json"))


def _is_model_json(name: str) -> bool:
    return name.endswith("/models/model.json")


@pytest.mark.parametrize("pick", [_is_weight, _is_model_json], ids=["tensor", "model.json"])
def test_bit_rot_in_a_cached_program_is_rebuilt_before_lowering(project, weights, tmp_path, shared_cache, pick):
    _project(project, weights, tmp_path, shared_cache)
    program = project.entry(QUANTIZE).file("forward.pt2")
    intact = program.read_bytes()
    flip_in_place(program, member_offset(program, pick))
    assert "status     : up-to-date" in project.doit("info", QUANTIZE).stdout  # the no-op path trusts stamps

    project.edit_recipe("xnnpack-8da8w-shared", *LOWERING_ONLY_CHANGE)
    before = len(project.events())
    result = project.doit(f"export:{TARGET}")
    assert "forward.pt2 does not match its content hash; discarding it and rebuilding " + QUANTIZE in result.stderr
    assert project.built_since(before) == sorted([QUANTIZE, LOWER, f"verify:{TARGET}"])
    assert project.entry(QUANTIZE).file("forward.pt2").read_bytes() == intact  # what lower read
    manifest = json.loads((project.root / "artifacts" / TARGET / "manifest.json").read_text())
    assert manifest["stages"]["lower"]["inputs"]["program"] == project.entry(QUANTIZE).digest


def test_an_unreadable_archive_with_matching_hashes_is_a_damaged_entry(project, weights, tmp_path, shared_cache):
    """Hashes say the bytes are what was recorded; the archive still cannot be read (damaged before it was recorded,
    or rewritten together with its record): discarded and rebuilt, never a traceback."""
    _project(project, weights, tmp_path, shared_cache)
    entry = project.entry(QUANTIZE)
    (entry.file("forward.pt2")).write_bytes(b"PK\x03\x04 not a zip archive")
    record = entry.record
    record["files"]["forward.pt2"] = {"size": entry.file("forward.pt2").stat().st_size,
                                      "digest": hash_file(entry.file("forward.pt2"))}
    record["digest"] = tree_digest({name: f["digest"] for name, f in record["files"].items()})
    record["record_digest"] = record_digest(record)
    (entry.path / "entry.json").write_text(json.dumps(record))

    before = len(project.events())
    result = project.doit(f"export:{TARGET}")
    # lower and replay both read the program: whichever doit runs first finds the damage
    assert any(f"{reader}: input {QUANTIZE}:" in result.stderr for reader in (LOWER, f"replay:{TARGET}"))
    assert "unreadable (BadZipFile" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert QUANTIZE in project.built_since(before)


def test_a_published_pte_with_bit_rot_is_published_again(project, weights, tmp_path, shared_cache):
    _project(project, weights, tmp_path, shared_cache)
    pte = project.root / "artifacts" / TARGET / "model.pte"
    intact = pte.read_bytes()
    flip_in_place(pte, len(intact) // 2)
    info = project.doit("info", f"export:{TARGET}", check=False).stdout  # doit info exits 1 for a stale task
    assert "published model.pte is missing or modified" in info
    before = len(project.events())
    project.doit(f"export:{TARGET}")
    assert project.built_since(before) == []  # the cache entry was intact: copied again, nothing rebuilt
    assert pte.read_bytes() == intact
    assert "status     : up-to-date" in project.doit("info", f"export:{TARGET}").stdout
    assert oct(pte.parent.stat().st_mode & 0o077) == "0o55"  # group and others may read the published folder


def _fsck(project) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xportbuild", "fsck"], cwd=project.root, env=project.env,
                          capture_output=True, text=True, timeout=600)


def test_fsck_reads_everything_discards_damaged_entries_and_restores_published_files(project, weights, tmp_path,
                                                                                    shared_cache):
    _project(project, weights, tmp_path, shared_cache)
    clean = _fsck(project)
    assert clean.returncode == 0 and "nothing damaged" in clean.stdout, clean.stdout + clean.stderr

    program = project.entry(QUANTIZE).file("forward.pt2")
    flip_in_place(program, member_offset(program, _is_weight))
    pte = project.root / "artifacts" / TARGET / "model.pte"
    intact = pte.read_bytes()
    flip_in_place(pte, len(intact) // 3)
    found = _fsck(project)
    assert found.returncode == 1
    assert "forward.pt2 does not match its content hash: discarded; the next build rebuilds it" in found.stdout
    assert f"{pte}: missing or modified; restored from the cache" in found.stdout
    assert "2 damaged" in found.stdout
    assert pte.read_bytes() == intact
    assert _fsck(project).returncode == 0

    before = len(project.events())
    project.doit(f"export:{TARGET}")  # the discarded program is rebuilt, the same bytes: nothing else reruns
    assert project.built_since(before) == [QUANTIZE]


def test_a_source_is_identified_by_its_content_not_by_how_its_path_is_spelled(project, weights):
    project.write_model("tiny-llama", model_toml(local(weights / "tiny-llama"), ["xnnpack-fp32"]))
    project.doit("fetch:tiny-llama")
    spelled = os.path.relpath(weights / "tiny-llama", project.root / "recipes" / "models")
    assert spelled.startswith("..")
    project.write_model("tiny-llama", model_toml(local(spelled), ["xnnpack-fp32"]))
    assert "status     : up-to-date" in project.doit("info", "fetch:tiny-llama").stdout
    before = len(project.events())
    project.doit("fetch:tiny-llama")
    assert project.built_since(before) == []
