"""doit wiring only: one task group per stage, `export:<target>` to publish. Imports no torch."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

from doit.exceptions import TaskFailed

from xportbuild.build import Resolver, Workspace, build_node
from xportbuild.errors import RecipeError, XportError
from xportbuild.plan import STAGE_DOCS, Plan, plan_targets
from xportbuild.recipe import load_project

STAGES = ("fetch", "reference", "program", "quantize", "lower", "verify", "sensitivity")
log = logging.getLogger(__name__)


class StageFresh:
    """doit `uptodate` check backed by the content-addressed cache; `doit info` prints its reason."""

    def __init__(self, plan: Plan, workspace: Workspace, task: str):
        self.plan, self.workspace, self.task = plan, workspace, task
        self.reason = f"{task}: not checked yet"

    def __call__(self) -> bool:
        _configure_logging()  # checks may pull from the remote cache or discard damaged entries: say so
        fresh, self.reason = Resolver(self.plan, self.workspace).status(self.task)
        return fresh

    def __str__(self) -> str:
        return self.reason


class PublishedFresh(StageFresh):
    def __call__(self) -> bool:
        from xportbuild.stages.publish import published_state

        _configure_logging()
        fresh, self.reason = published_state(self.plan, self.workspace, self.task)
        return fresh


def _configure_logging() -> None:
    # Emitted thousands of times per lowering by torch's pytree; says nothing about the user's build.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
    root = logging.getLogger("xportbuild")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False


def run_stage(plan: Plan, workspace: Workspace, task: str):
    _configure_logging()
    try:
        entry = build_node(plan, workspace, task)
    except XportError as err:
        message = str(err)
        return TaskFailed(message if message.startswith(task) else f"{task}: {message}")
    table = entry.file("sensitivity.md")
    if table.is_file():  # the sensitivity stage's whole point is this table, built or reused
        print(table.read_text())
    return None


def run_validate(recipes_dir: Path, workspace: Workspace):
    from xportbuild.preflight import validate_project

    try:
        count = validate_project(recipes_dir, workspace.cache_dir / "sources")
    except XportError as err:
        return TaskFailed(str(err))
    print(f"{count} targets valid")
    return None


def run_publish(plan: Plan, workspace: Workspace, target: str):
    from xportbuild.stages.publish import publish

    _configure_logging()
    log.info("export:%s: publishing", target)
    try:
        folder = publish(plan, workspace, target)
    except XportError as err:
        return TaskFailed(str(err))
    print(f"published {folder}")
    return None


def _stage_group(plan: Plan, workspace: Workspace, stage: str):
    def generator():
        yield {"basename": stage, "name": None, "doc": STAGE_DOCS[stage]}
        for node in plan.nodes.values():
            if node.stage == stage:
                yield {
                    "name": node.subject,
                    "doc": STAGE_DOCS[stage],
                    "actions": [(run_stage, [plan, workspace, node.task])],
                    "task_dep": sorted(node.inputs.values()),
                    "uptodate": [StageFresh(plan, workspace, node.task)],
                    "verbosity": 2,
                }

    generator.__name__ = f"task_{stage}"
    return generator


def _export_group(plan: Plan, workspace: Workspace):
    # Each target is its own top-level task so that a plain `doit list` shows every target.
    def task_export():
        yield {"basename": "export", "doc": "build, verify and publish every target", "actions": [],
               "task_dep": [f"export:{name}" for name in plan.targets]}
        for name, target_plan in plan.targets.items():
            target = target_plan.target
            yield {
                "basename": f"export:{name}",
                "doc": f"{target.model.doc} | {target.recipe.doc}",
                "actions": [(run_publish, [plan, workspace, name])],
                "task_dep": [target_plan.verify],
                "uptodate": [PublishedFresh(plan, workspace, name)],
                "verbosity": 2,
            }

    return task_export


def make_tasks(recipes_dir: Path, cache_dir: Path | None = None, artifacts_dir: Path | None = None) -> dict:
    """doit task creators for every target under `recipes_dir`, to merge into a dodo.py's globals.

    Defaults: cache in <project>/.xportbuild/cache (XPORTBUILD_CACHE overrides), artifacts in <project>/artifacts.
    XPORTBUILD_REMOTE_CACHE names a folder shared between machines (CI): entries are pulled from it after a
    content-hash check, and pushed to it when built.
    """
    project = Path(recipes_dir).resolve().parent
    state_dir = project / ".xportbuild"
    state_dir.mkdir(exist_ok=True)  # doit opens its dep file here before any task runs
    workspace = Workspace(
        cache_dir=Path(cache_dir or os.environ.get("XPORTBUILD_CACHE") or state_dir / "cache").resolve(),
        artifacts_dir=Path(artifacts_dir or project / "artifacts").resolve(),
        state_dir=state_dir,
        remote_cache_dir=Path(remote) if (remote := os.environ.get("XPORTBUILD_REMOTE_CACHE")) else None,
    )
    try:
        plan = plan_targets(load_project(Path(recipes_dir)))
    except RecipeError as err:
        # A traceback from inside dodo loading would bury the list of problems.
        print(err, file=sys.stderr)
        raise SystemExit(2) from err
    creators = {f"task_{stage}": _stage_group(plan, workspace, stage) for stage in STAGES}
    creators["task_export"] = _export_group(plan, workspace)

    def task_validate():
        return {"doc": "check every target's recipes and sources (no build): `python -m xportbuild validate`",
                "actions": [(run_validate, [Path(recipes_dir), workspace])], "uptodate": [False], "verbosity": 2}

    creators["task_validate"] = task_validate
    return creators


DOIT_CONFIG = {
    "default_tasks": [],
    "backend": "sqlite3",
    "dep_file": ".xportbuild/doit.sqlite3",
    "verbosity": 2,
}
