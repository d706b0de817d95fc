"""What a person sees: one line when each stage starts and one when it ends, libraries' output in log files (live
with XPORTBUILD_VERBOSE=1), an unexpected failure as one line naming its log, status and compare at a glance."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests import tiny
from tests.integration.models import local, model_toml

TARGET = "tiny-llama-xnnpack-fp32"
OWN_LINE = re.compile(r"^(\S+:\S+: (building( \(last build here: .+\))?|built in \S+ s, peak RSS .+|publishing)"
                      r"|published \S+|-- \S+)$")


def _lines(result) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]


def test_a_build_prints_one_line_per_stage_start_and_end_and_keeps_the_rest_in_logs(project, weights, tmp_path):
    project.write_model("tiny-llama", model_toml(local(weights / "tiny-llama"), ["xnnpack-fp32"]))
    project.env["XPORTBUILD_CACHE"] = str(tmp_path / "cache")  # cold: every stage runs, and its libraries speak
    lines = _lines(project.doit(f"export:{TARGET}"))
    assert [line for line in lines if not OWN_LINE.match(line)] == [], "\n".join(lines)
    built = [line.split(":")[0] for line in lines if ": built in " in line]
    assert built.count("verify") == 1 and len(built) == len([line for line in lines if line.endswith(": building")])
    verify_line = next(line for line in lines if line.startswith(f"verify:{TARGET}: built in"))
    assert "vs float: top-1 1.000" in verify_line and "mean KL" in verify_line

    logs = project.root / ".xportbuild" / "logs"
    verify_log = (logs / f"verify__{TARGET}.log").read_text()
    assert "PyTorchObserver" in verify_log  # ExecuTorch's runner's own log: kept, not shown
    assert (project.entry(f"verify:{TARGET}").path / "stage.log").read_text() == verify_log

    project.edit_recipe("xnnpack-fp32", "max_abs = 0.1", "max_abs = 0.2")  # verify only reruns
    project.env["XPORTBUILD_VERBOSE"] = "1"
    verbose = project.doit(f"export:{TARGET}")
    assert "PyTorchObserver" in verbose.stdout + verbose.stderr
    assert "PyTorchObserver" in (logs / f"verify__{TARGET}.log").read_text()


def test_an_unexpected_failure_is_one_line_naming_its_log(project, weights):
    """A config torch cannot build a model from (a padding id beyond the vocabulary: an AssertionError inside
    torch), built without validate: the failing stage says what, in one line, and where the rest is."""
    folder = tiny.copy_model(weights / "tiny-llama", project.root / "source" / "bad")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "pad_token_id": 1000}))
    project.write_model("bad", model_toml(local(folder), ["xnnpack-fp32"]))
    result = project.doit("export:bad-xnnpack-fp32", check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    failures = [line for line in _lines(result) if "AssertionError" in line]
    assert len(failures) == 1, "\n".join(_lines(result))
    found = re.match(r"^(reference|program):bad: AssertionError: Padding_idx must be within num_embeddings "
                     r"\(log: (\S+)\)$", failures[0])
    assert found, failures[0]
    log = Path(found[2]).read_text()
    assert "Traceback" in log and "pad_token_id must be" in log  # the traceback and what the library said
    assert "Traceback" not in result.stdout + result.stderr
    validate = subprocess.run([sys.executable, "-m", "xportbuild", "validate", str(project.root / "recipes")],
                              env=project.env, capture_output=True, text=True, timeout=600)
    assert validate.returncode == 2 and "Padding_idx must be within num_embeddings" in validate.stderr
    assert "Traceback" not in validate.stdout + validate.stderr


def _xportbuild(project, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xportbuild", *args, str(project.root / "recipes")],
                          cwd=project.root, env=project.env, capture_output=True, text=True, timeout=600)


def test_status_and_compare(project, weights, tmp_path, shared_cache):
    recipes = ["xnnpack-fp32", "xnnpack-8da8w"]
    project.write_model("tiny-llama", model_toml(local(weights / "tiny-llama"), recipes) + (
        "\n[tolerances.xnnpack-8da8w]\nmin_cosine = 0.8\nmin_top1 = 0.5\nmax_abs = 100.0\nmax_kl = 10.0\n"))
    exports = [f"export:tiny-llama-{recipe}" for recipe in recipes]
    project.env["XPORTBUILD_CACHE"] = str(shared_cache)
    project.doit(*exports)  # the run's cache holds every stage, built here or by another test
    shutil.rmtree(project.root / ".xportbuild")  # then a fresh clone: no doit state, no record of what was built
    shutil.rmtree(project.root / "artifacts")
    project.env["XPORTBUILD_CACHE"] = str(tmp_path / "cache")
    project.doit_pulling(shared_cache, *exports)  # every stage pulled by doit's up-to-date check: no action runs
    project.edit_recipe("xnnpack-fp32", 'backend = "xnnpack"',
                        'backend = "xnnpack"\n[lower]\nextract_delegate_segments = false')
    status = _xportbuild(project, "status")
    assert status.returncode == 0, status.stderr
    rows = {line.split()[0]: line for line in status.stdout.splitlines()[1:]}
    assert "up to date" in rows["tiny-llama-xnnpack-8da8w"] and "1.000 [" in rows["tiny-llama-xnnpack-8da8w"]
    assert f"lower:{TARGET} is stale: params.lower.extract_delegate_segments true→false" in rows[TARGET]

    compare = _xportbuild(project, "compare")
    assert compare.returncode == 0, compare.stderr
    summary, picture = (Path(line) for line in compare.stdout.split())
    assert all(f"| {recipe} |" in summary.read_text() for recipe in recipes)
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and picture.stat().st_size > 10_000
    report = project.root / "artifacts" / "tiny-llama-xnnpack-8da8w"
    assert "(quality.png)" in (report / "report.md").read_text() and (report / "quality.png").stat().st_size > 10_000
