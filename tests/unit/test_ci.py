"""CI fan-out: the targets as a job matrix, and the GitHub Actions workflow that runs one job per target, checked
by actionlint (a broken copy of it must fail the same check)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORKFLOW = REPO / ".github" / "workflows" / "export.yml"


def _targets(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xportbuild", "targets", str(REPO / "recipes"), *args],
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def _actionlint(path: Path) -> subprocess.CompletedProcess:
    scripts = Path(sysconfig.get_path("scripts")) / "actionlint"
    command = str(scripts) if scripts.exists() else shutil.which("actionlint")
    assert command, "actionlint is not installed (pip install -e '.[test]')"
    return subprocess.run([command, "-no-color", str(path)], capture_output=True, text=True, timeout=120)


def test_the_matrix_lists_every_target_or_a_selection():
    everything = json.loads(_targets().stdout)["include"]
    names = {row["target"] for row in everything}
    assert "gemma3-xnnpack-8da8w-shared" in names
    assert all(row["target"] == f"{row['model']}-{row['recipe']}" for row in everything)

    by_recipe = json.loads(_targets("--recipe", "xnnpack-fp32").stdout)["include"]
    assert by_recipe and {row["recipe"] for row in by_recipe} == {"xnnpack-fp32"}
    both = json.loads(_targets("--model", "gemma3", "--model", "bert-base", "--recipe", "xnnpack-8da8w-shared").stdout)
    assert [row["target"] for row in both["include"]] == ["gemma3-xnnpack-8da8w-shared"]

    runners = {row["recipe"]: row["runner"] for row in json.loads(_targets("--model", "vit-base").stdout)["include"]}
    assert runners["coreml-fp32"] == runners["coreml-fp32-xnnpack"] == "macos-14"
    assert runners["openvino-fp32"] == runners["xnnpack-fp32"] == "ubuntu-latest"

    unknown = _targets("--model", "gemma9")
    assert unknown.returncode == 2
    assert "--model gemma9: no target has it (known: " in unknown.stderr and "gemma3" in unknown.stderr


def test_the_workflow_runs_one_job_per_target_and_passes_actionlint(tmp_path):
    text = WORKFLOW.read_text()
    assert "python -m xportbuild targets" in text and "fromJSON(needs.plan.outputs.matrix)" in text
    assert 'doit "export:${{ matrix.target }}"' in text and "path: artifacts/${{ matrix.target }}" in text
    assert "runs-on: ${{ matrix.runner }}" in text and "runner.os == 'macOS'" in text
    checked = _actionlint(WORKFLOW)
    assert checked.returncode == 0, checked.stdout + checked.stderr

    broken = tmp_path / ".github" / "workflows" / "export.yml"
    broken.parent.mkdir(parents=True)
    broken.write_text(text.replace("needs.plan.outputs.matrix", "needs.plan.outputs.matrx"))
    found = _actionlint(broken)
    assert found.returncode != 0 and "matrx" in found.stdout, found.stdout + found.stderr
