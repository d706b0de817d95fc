"""The decoder family sweep: a tiny model of each family, made from the family's own config class, either builds and
verifies with both XNNPACK recipes or is refused by validate, before any work, with the family and the reason."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import DODO, REPO, Project
from tests.families import DERIVED_REFUSALS, SWEEP, save_family_model
from tests.integration.models import local, model_toml
from xportbuild.models.kinds import REFUSED_DECODERS

pytestmark = pytest.mark.families
RECIPES = ("xnnpack-fp32", "xnnpack-8da8w")
# Families built by one `doit` run: each run pays for importing torch, transformers and ExecuTorch once.
PER_BUILD = 4
GROUPS = [SWEEP[start:start + PER_BUILD] for start in range(0, len(SWEEP), PER_BUILD)]
REFUSALS = {**REFUSED_DECODERS, **DERIVED_REFUSALS}


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


def _check_refused(app: Project, families: list[str]) -> None:
    result = subprocess.run([sys.executable, "-m", "xportbuild", "validate", str(app.root / "recipes")],
                            cwd=app.root, env=app.env, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    for family in families:
        assert f"model_type {family!r} cannot be exported" in result.stderr + result.stdout
        assert REFUSALS[family] in result.stderr + result.stdout


@pytest.mark.parametrize("families", GROUPS, ids=["-".join(group) for group in GROUPS])
def test_decoder_families_build_and_verify_or_are_refused_up_front(app, families):
    names = {family: _add(app, family) for family in families}
    refused = [family for family in families if family in REFUSALS]
    if refused:
        _check_refused(app, refused)
        for family in refused:  # refused: out of the app's later validates and builds
            (app.root / "recipes" / "models" / f"{names[family]}.toml").unlink()
    built = [names[family] for family in families if family not in refused]
    result = app.doit("--continue", *(f"export:{name}-{recipe}" for name in built for recipe in RECIPES), check=False)
    missing = [f"{name}-{recipe}" for name in built for recipe in RECIPES
               if not (app.root / "artifacts" / f"{name}-{recipe}" / "model.pte").is_file()]
    assert not missing and result.returncode == 0, f"not published: {missing}\n{(result.stdout + result.stderr)[-3000:]}"


# Families the sweep does not build, refused by validate for what their code shows and by the first stage that loads
# one without validate: a state kept outside transformers' cache layers or a scan that cannot start from a carried
# state (tests/unit/test_family_catalogue.py covers every family of each cause), latent attention wider than the cache.
REFUSED_FOR_THEIR_CODE = {
    "mamba": "its sequence scan mamba_selective_scan (modeling_mamba.py) starts from a zero state",
    "minimax": "it keeps its state in a cache class of its own (MiniMaxCache)",
    "rwkv": "RwkvForCausalLM takes no transformers cache",
    "glm4_moe_lite": "its multi-head latent attention caches keys"}


def test_families_that_cannot_carry_their_cache_are_refused_before_any_work(project, tmp_path):
    for family in REFUSED_FOR_THEIR_CODE:
        folder = save_family_model(tmp_path / family, family)
        project.write_model(family.replace("_", "-"), model_toml(local(folder), ["xnnpack-fp32"]))
    result = subprocess.run([sys.executable, "-m", "xportbuild", "validate", str(project.root / "recipes")],
                            cwd=project.root, env=project.env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2
    for family, reason in REFUSED_FOR_THEIR_CODE.items():
        assert f"model_type {family!r} cannot be exported as task \"causal-lm\": {reason}" in result.stderr, family
    assert "Traceback" not in result.stdout + result.stderr

    built = project.doit("export:mamba-xnnpack-fp32", check=False)  # without validate: the same reason, one line
    assert built.returncode == 1
    assert ("mamba: model_type 'mamba' cannot be exported as a causal LM: " + REFUSED_FOR_THEIR_CODE["mamba"]
            in built.stdout), built.stdout[-2000:]
    assert "Traceback" not in built.stdout + built.stderr


def test_an_export_failure_names_the_kind_of_problem_and_the_model_line(project, tmp_path):
    """MPT (refused by validate) built anyway: torch.export fails on its ALiBi slice, and the one line says where."""
    project.write_model("mpt", model_toml(local(save_family_model(tmp_path / "mpt", "mpt")), ["xnnpack-fp32"]))
    result = project.doit("export:mpt-xnnpack-fp32", check=False)
    assert result.returncode == 1
    assert ("mpt: method forward is not exportable: a shape or branch that depends on a tensor's values at "
            "modeling_mpt.py:") in result.stdout, result.stdout[-2000:]
    assert "position_bias[" in result.stdout and "Traceback" not in result.stdout + result.stderr
