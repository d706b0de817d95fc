"""The default recipe's gates, whose margins allow for machine-to-machine spread, still fail a broken lowering and a
harmful quantization; a failure keeps its .pte outside the cache and says how to accept it knowingly."""

from __future__ import annotations

import re

import pytest

from tests.conftest import REPO
from tests.integration.models import SCALE_LOGITS, local, model_toml

DEFAULT = (REPO / "recipes" / "recipes" / "xnnpack-8da8w-shared.toml").read_text()
# Each defect is the default recipe with a few edits: (old text, new text).
DEFECTS = {
    "scaled-logits": [("passes = []", 'passes = ["app_passes:scale_logits"]')],
    "all-4-bit": [('linear = "8da8w"', 'linear = "8da4w"'), ('embedding = "8w"', 'embedding = "4w"'),
                  ('tied_table = "shared"', 'tied_table = "copies"')],
}


def _accept_hint(output: str) -> str:
    """The `[tolerances.<recipe>]` table the failure printed, as TOML."""
    match = re.search(r"^ {4}\[tolerances\.[^\]]+\]\n(?: {4}\w+ = \S+\n?)+", output, re.MULTILINE)
    assert match, output[-3000:]
    return "\n".join(line.strip() for line in match.group(0).splitlines())


@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_default_gates_fail_a_defect_and_say_how_to_accept_it(project, weights, defect):
    recipe = DEFAULT
    for old, new in DEFECTS[defect]:
        assert old in recipe
        recipe = recipe.replace(old, new)
    (project.root / "app_passes.py").write_text(SCALE_LOGITS)
    project.write_recipe(defect, recipe)
    model = model_toml(local(weights / "tiny-llama"), [defect])
    project.write_model("tiny-llama", model)
    target = f"tiny-llama-{defect}"

    result = project.doit(f"export:{target}", check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "verification failed" in output, output[-3000:]
    assert not (project.root / "artifacts" / target).exists()
    kept = project.root / ".xportbuild" / "failed" / target / "model.pte"
    assert kept.stat().st_size > 0
    assert "Traceback" not in output

    # Accepting it knowingly, as the message says, publishes exactly the .pte that failed.
    project.write_model("tiny-llama", model + "\n" + _accept_hint(output) + "\n")
    project.doit(f"export:{target}")
    assert (project.root / "artifacts" / target / "model.pte").read_bytes() == kept.read_bytes()


def test_the_same_gates_pass_the_healthy_default(project, weights):
    """The control: without a defect, the default recipe's tolerances pass the same tiny model."""
    project.write_recipe("healthy", DEFAULT)
    project.write_model("tiny-llama", model_toml(local(weights / "tiny-llama"), ["healthy"]))
    project.doit("export:tiny-llama-healthy")
    assert (project.root / "artifacts" / "tiny-llama-healthy" / "model.pte").is_file()
