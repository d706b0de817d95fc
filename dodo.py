"""xportbuild targets: `doit list`, `doit export:<model>-<recipe>`, `doit info <task>`."""

from pathlib import Path

from xportbuild.tasks import DOIT_CONFIG, make_tasks  # noqa: F401  doit reads DOIT_CONFIG from here

globals().update(make_tasks(Path(__file__).parent / "recipes"))
