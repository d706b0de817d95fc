"""The decoder family sweep: a tiny model of each family, made from the family's own config class, either builds and
verifies with both XNNPACK recipes or is refused by validate, before any work, with the family and the reason."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import DODO, REPO, Project
from tests.families import SWEEP, save_family_model
from tests.integration.models import local, model_toml
from xportbuild.models.kinds import REFUSED_DECODERS

pytestmark = pytest.mark.families
RECIPES = ("xnnpack-fp32", "xnnpack-8da8w")


@pytest.fixture(scope="module")
def app(tmp_path_factory) -> Project:
    root = tmp_path_factory.mktemp("families")
    (root / "app" / "recipes" / "models").mkdir(parents=True)
    shutil.copytree(REPO / "recipes" / "recipes", root / "app" / "recipes" / "recipes")
    (root / "app" / "dodo.py").write_text(DODO)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "XPORTBUILD_CACHE": str(root / "cache")}
    return Project(root / "app", env)


def _add(app: Project, family: str) -> str:
    name = family.replace("_", "-")
    folder = save_family_model(app.root.parent / "weights" / family, family)
    app.write_model(name, model_toml(local(folder), list(RECIPES)))
    return name


@pytest.mark.parametrize("family", SWEEP)
def test_a_decoder_family_builds_and_verifies_or_is_refused_up_front(app, family):
    name = _add(app, family)
    if family in REFUSED_DECODERS:
        result = subprocess.run([sys.executable, "-m", "xportbuild", "validate", str(app.root / "recipes")],
                                cwd=app.root, env=app.env, capture_output=True, text=True, timeout=600)
        assert result.returncode != 0
        assert f"model_type {family!r} cannot be exported" in result.stderr + result.stdout
        assert REFUSED_DECODERS[family] in result.stderr + result.stdout
        (app.root / "recipes" / "models" / f"{name}.toml").unlink()  # refused: out of the app's later validates
        return
    result = app.doit(*(f"export:{name}-{recipe}" for recipe in RECIPES), check=False)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    for recipe in RECIPES:
        assert (app.root / "artifacts" / f"{name}-{recipe}" / "model.pte").is_file()
