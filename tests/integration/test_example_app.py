"""examples/app, built from a temporary copy as its README says: a shipped recipe it does not copy, a recipe and a
pass of its own, the verified program copied into the app's assets, and an edit of its pass rebuilding just the
lower and verify stages of the target that uses it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from xportbuild.keys import hash_file

from tests.conftest import REPO, Project

OWN = "tiny-llama-xnnpack-fp32-tidy"


def test_the_example_app_builds_copies_and_reruns_only_what_its_pass_edit_touches(tmp_path, shared_cache):
    root = tmp_path / "app"
    shutil.copytree(REPO / "examples" / "app", root)
    subprocess.run([sys.executable, "make_model.py"], cwd=root, check=True, capture_output=True, timeout=300)
    assert not (root / "recipes" / "recipes" / "xnnpack-fp32.toml").exists()  # shipped, not copied
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "XPORTBUILD_CACHE": str(tmp_path / "cache")}
    app = Project(root, env)

    listed = app.doit("list").stdout
    assert "export:tiny-llama-xnnpack-fp32 " in listed and "| shipped recipe" in listed
    assert f"| own recipe recipes/recipes/{OWN.removeprefix('tiny-llama-')}.toml" in listed
    assert f"copy:{OWN}" in listed

    app.doit_pulling(shared_cache, "export:tiny-llama-xnnpack-fp32", "bundle")
    asset = root / "app" / "src" / "main" / "assets" / "model.pte"
    published = json.loads((root / "artifacts" / OWN / "manifest.json").read_text())
    assert hash_file(asset) == published["files"]["model.pte"]
    assert json.loads((root / "app" / "build" / "bundle.json").read_text())["model.pte"] == hash_file(asset)

    mark = len(app.events())
    assert app.doit("bundle").stdout.count("-- ") >= 3  # nothing to do: every task up to date
    assert app.built_since(mark) == []

    tidy = root / "passes" / "tidy.py"
    tidy.write_text(tidy.read_text().replace("right.name < left.name", "right.name > left.name"))
    mark = len(app.events())
    app.doit("bundle")
    assert app.built_since(mark) == [f"lower:{OWN}", f"verify:{OWN}"]
    assert hash_file(asset) == json.loads((root / "artifacts" / OWN / "manifest.json").read_text())["files"]["model.pte"]
