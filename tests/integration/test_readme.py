"""The README's model file, recipe and dodo.py, written out exactly as the README has them, make a project that
lists its targets, validates, and builds and publishes one."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

from tests import tiny
from tests.conftest import REPO

BLOCK = re.compile(r"^```(toml|python)\n# (\S+)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)


def test_the_readme_blocks_run_as_written(project, weights):
    blocks = BLOCK.findall((REPO / "README.md").read_text())
    written = {path for _, path, _ in blocks}
    assert written == {"recipes/models/mymodel.toml", "recipes/recipes/my-xnnpack-8da4w.toml", "dodo.py"}, written
    shutil.rmtree(project.root / "recipes" / "recipes")  # the README's own recipe only, beside the shipped ones
    for _, path, body in blocks:
        file = project.root / path
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(f"# {path}\n{body}")
    tiny.copy_model(weights / "tiny-llama", project.root / "models" / "mymodel")

    listed = project.doit("list").stdout
    for recipe in ("xnnpack-fp32", "xnnpack-8da8w-shared", "my-xnnpack-8da4w"):
        assert f"export:mymodel-{recipe}" in listed
    validate = subprocess.run([sys.executable, "-m", "xportbuild", "validate"], cwd=project.root, env=project.env,
                              capture_output=True, text=True, timeout=600)
    assert validate.returncode == 0 and "3 targets valid" in validate.stdout, validate.stdout + validate.stderr
    project.doit("export:mymodel-xnnpack-fp32")
    assert (project.root / "artifacts" / "mymodel-xnnpack-fp32" / "model.pte").is_file()
