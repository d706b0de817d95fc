"""An app repo that builds its model with xportbuild: one recipe xportbuild ships, one of its own with its own pass,
and the verified program copied to where the app's build reads it.

    doit list            # the targets, each saying whether its recipe is shipped or the app's own
    doit bundle          # builds, verifies and publishes the model the app ships, then bundles the app
"""

import json
from pathlib import Path

from xportbuild.keys import hash_file
from xportbuild.tasks import DOIT_CONFIG, make_tasks  # noqa: F401  (doit reads DOIT_CONFIG from here)

HERE = Path(__file__).parent
ASSET = "app/src/main/assets/model.pte"

globals().update(make_tasks(HERE / "recipes", copies={"tiny-llama-xnnpack-fp32-tidy": ASSET}))


def _bundle(targets):
    """Stands in for the app's own build: it reads the copied program."""
    asset = HERE / ASSET
    Path(targets[0]).parent.mkdir(parents=True, exist_ok=True)
    Path(targets[0]).write_text(json.dumps({"model.pte": hash_file(asset), "bytes": asset.stat().st_size}))


def task_bundle():
    """the app's build: depends on the copied .pte like on any other source file"""
    return {"actions": [_bundle], "file_dep": [str(HERE / ASSET)], "targets": [str(HERE / "app/build/bundle.json")],
            "verbosity": 2}
