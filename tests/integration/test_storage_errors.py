"""Disk full and an unwritable cache: a clear error naming the place and the next step; nothing half-written
is left behind and what was already published survives."""

from __future__ import annotations

import json
import resource

from xportbuild.keys import hash_file

from tests.integration.models import local, model_toml

TARGET = "tiny-llama-xnnpack-fp32"


def _limit_file_size(limit: int):
    def apply() -> None:  # Python ignores SIGXFSZ, so an oversized write fails with EFBIG like a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_disk_full_while_lowering_keeps_the_published_artifact(project, weights, tmp_path):
    import subprocess
    import sys

    project.write_model("tiny-llama", model_toml(local(weights / "tiny-llama"), ["xnnpack-fp32"]))
    project.env["XPORTBUILD_CACHE"] = str(tmp_path / "cache")
    project.doit(f"export:{TARGET}")
    published = project.root / "artifacts" / TARGET
    before = {p.name: hash_file(p) for p in published.iterdir()}
    project.edit_recipe("xnnpack-fp32", 'backend = "xnnpack"',
                        'backend = "xnnpack"\n[lower]\nextract_delegate_segments = false')
    result = subprocess.run([sys.executable, "-m", "doit", f"export:{TARGET}"], cwd=project.root, env=project.env,
                            capture_output=True, text=True, timeout=900, preexec_fn=_limit_file_size(64 * 1024))
    output = result.stdout + result.stderr
    assert result.returncode != 0
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
