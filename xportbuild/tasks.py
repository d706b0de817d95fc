"""doit wiring only: one task group per stage, `export:<target>` to publish. Imports no torch."""

from __future__ import annotations

import logging
import os
import sys
import traceback
import warnings
from pathlib import Path

from doit.exceptions import TaskFailed

from xportbuild.build import Resolver, Workspace, build_node, storage_errors
from xportbuild.errors import FsckFound, RecipeError, XportError
from xportbuild.pipeline import STAGE_BY_NAME, STAGES
from xportbuild.plan import Plan, plan_targets
from xportbuild.recipe import load_project

log = logging.getLogger(__name__)


class StageFresh:
    """doit `uptodate` check backed by the content-addressed cache; `doit info` prints its reason."""

    def __init__(self, plan: Plan, workspace: Workspace, task: str):
        self.plan, self.workspace, self.task = plan, workspace, task
        self.reason = f"{task}: not checked yet"

    def __call__(self) -> bool:
        _configure_logging()  # checks may pull from the remote cache or discard damaged entries: say so
        try:
            fresh, self.reason = self.check()
        except XportError as err:  # e.g. a source that is gone: not fresh, and the build reports it in one line
            fresh, self.reason = False, str(err)
        return fresh

    def check(self) -> tuple[bool, str]:
        resolver = Resolver(self.plan, self.workspace)
        fresh, reason = resolver.status(self.task)
        if fresh:  # a cache restored without doit's state (CI) shares what the remote lacks
            self.workspace.store.push(resolver.entry(self.task))
        return fresh, reason

    def __str__(self) -> str:
        return self.reason


class PublishedFresh(StageFresh):
    def check(self) -> tuple[bool, str]:
        from xportbuild.publish import published_state

        # A build with nothing to do still completes the pushes an earlier one could not make.
        self.workspace.store.push_pending()
        return published_state(self.plan, self.workspace, self.task)


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


def _failed(task: str, workspace: Workspace, err: Exception) -> TaskFailed:
    """One line for the user; an unexpected error's traceback goes to a log file that the line names."""
    if isinstance(err, XportError):
        message = str(err)
        return TaskFailed(message if message.startswith(task) else f"{task}: {message}")
    log_path = workspace.state_file("logs", task).with_suffix(".log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text("".join(traceback.format_exception(err)))
    summary = (str(err).strip().splitlines() or [""])[0][:200]
    return TaskFailed(f"{task}: unexpected {type(err).__name__}: {summary} (traceback in {log_path})")


def _guarded(task: str, workspace: Workspace, action):
    """Runs `action()`: its printed result on success, else a TaskFailed of one line."""
    _configure_logging()
    try:
        text = action()
    except Exception as err:  # noqa: BLE001  every failure becomes one line (and a log file when unexpected)
        return _failed(task, workspace, err)
    if text:
        print(text)
    return None


def run_stage(plan: Plan, workspace: Workspace, task: str):
    def build() -> str:
        table = build_node(plan, workspace, task).file("sensitivity.md")
        # the sensitivity stage's whole point is this table, built or reused
        return table.read_text() if table.is_file() else ""

    return _guarded(task, workspace, build)


def run_validate(recipes_dir: Path, workspace: Workspace):
    from xportbuild.preflight import validate_project

    return _guarded("validate", workspace,
                    lambda: f"{validate_project(recipes_dir, workspace.cache_dir / 'sources')} targets valid")


def run_publish(plan: Plan, workspace: Workspace, target: str):
    from xportbuild.publish import publish

    def publish_target() -> str:
        log.info("export:%s: publishing", target)
        with storage_errors(f"export:{target}", workspace.artifacts_dir):
            return f"published {publish(plan, workspace, target)}"

    return _guarded(f"export:{target}", workspace, publish_target)


def run_copy(workspace: Workspace, target: str, destination: Path):
    from xportbuild.publish import copy_published

    def copy() -> str:
        with storage_errors(f"copy:{target}", destination.parent):
            return f"copied to {copy_published(workspace, target, destination)}"

    return _guarded(f"copy:{target}", workspace, copy)


class CopyFresh(StageFresh):
    def __init__(self, plan: Plan, workspace: Workspace, task: str, destination: Path):
        super().__init__(plan, workspace, task)
        self.destination = destination

    def check(self) -> tuple[bool, str]:
        from xportbuild.publish import copy_state

        return copy_state(self.workspace, self.task.removeprefix("copy:"), self.destination)


def run_fsck(workspace: Workspace):
    from xportbuild.publish import fsck

    def check() -> str:
        findings, summary = fsck(workspace)
        if findings:
            raise FsckFound(findings, summary)
        return summary

    return _guarded("fsck", workspace, check)


def _stage_group(plan: Plan, workspace: Workspace, stage: str):
    def generator():
        yield {"basename": stage, "name": None, "doc": STAGE_BY_NAME[stage].doc}
        for node in plan.nodes.values():
            if node.stage == stage:
                yield {
                    "name": node.subject,
                    "doc": STAGE_BY_NAME[stage].doc,
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
                "doc": f"{target.model.doc} | {target.recipe.doc} | {_recipe_origin(target.recipe.file)}",
                "actions": [(run_publish, [plan, workspace, name])],
                "task_dep": [target_plan.verify],
                "uptodate": [PublishedFresh(plan, workspace, name)],
                "verbosity": 2,
            }

    return task_export


def _recipe_origin(recipe_file: str) -> str:
    from xportbuild.recipe.load import SHIPPED_RECIPES

    file = Path(recipe_file)
    return "shipped recipe" if file.parent == SHIPPED_RECIPES else f"own recipe recipes/recipes/{file.name}"


def _copy_group(plan: Plan, workspace: Workspace, copies: dict[str, Path]):
    """`copy:<target>`: the published .pte (and .ptd) copied to a path of the app's; a doit target, so the app's
    own tasks can name that path as a file_dep."""
    def task_copy():
        for target, destination in copies.items():
            yield {
                "basename": f"copy:{target}",
                "doc": f"copy the published {target} program to {destination}",
                "actions": [(run_copy, [workspace, target, destination])],
                "task_dep": [f"export:{target}"],
                "targets": [str(destination)],
                "uptodate": [CopyFresh(plan, workspace, f"copy:{target}", destination)],
                "verbosity": 2,
            }

    return task_copy


def _planned(recipes_dir: Path, shipped_recipes: bool, copies: dict[str, Path]) -> Plan:
    """The plan, or a list of every problem and exit 2: a traceback from inside dodo loading would bury it."""
    try:
        plan = plan_targets(load_project(Path(recipes_dir), shipped_recipes))
        if unknown := sorted(set(copies) - set(plan.targets)):
            raise RecipeError([f"make_tasks: copies: {name!r} is not a target (targets: "
                               f"{', '.join(sorted(plan.targets))})" for name in unknown])
    except RecipeError as err:
        print(err, file=sys.stderr)
        raise SystemExit(2) from err
    return plan


def make_tasks(recipes_dir: Path, cache_dir: Path | None = None, artifacts_dir: Path | None = None,
               shipped_recipes: bool = True, copies: dict[str, str | Path] | None = None) -> dict:
    """doit task creators for every target under `recipes_dir`, to merge into a dodo.py's globals.

    Defaults: cache in <project>/.xportbuild/cache (XPORTBUILD_CACHE overrides), artifacts in <project>/artifacts.
    XPORTBUILD_REMOTE_CACHE names a store shared between machines (CI), as an fsspec URL (remote.py): entries are
    pulled from it after a content-hash check, and pushed to it when built.
    Models may name the recipes xportbuild ships as well as the project's own (its own win); `shipped_recipes=False`
    leaves only the project's. `copies` maps a target to a path of the app's (relative to the project) that
    `copy:<target>` keeps equal to the published .pte.
    """
    workspace = Workspace.for_project(recipes_dir, cache_dir, artifacts_dir)
    workspace.state_dir.mkdir(exist_ok=True)  # doit opens its dep file here before any task runs
    project = Path(recipes_dir).resolve().parent
    destinations = {target: project / path for target, path in (copies or {}).items()}
    plan = _planned(recipes_dir, shipped_recipes, destinations)
    creators = {f"task_{stage.name}": _stage_group(plan, workspace, stage.name) for stage in STAGES}
    creators["task_export"] = _export_group(plan, workspace)
    if destinations:
        creators["task_copy"] = _copy_group(plan, workspace, destinations)

    def task_validate():
        return {"doc": "check every target's recipes and sources (no build): `python -m xportbuild validate`",
                "actions": [(run_validate, [Path(recipes_dir), workspace])], "uptodate": [False], "verbosity": 2}

    creators["task_validate"] = task_validate

    def task_fsck():
        return {"doc": "read every cache entry and published file against its hashes; repair what can be",
                "actions": [(run_fsck, [workspace])], "uptodate": [False], "verbosity": 2}

    creators["task_fsck"] = task_fsck
    return creators


DOIT_CONFIG = {
    "default_tasks": [],
    "backend": "xportbuild",  # doit's sqlite3, its failed writes one warning (doit_state.py)
    "dep_file": ".xportbuild/doit.sqlite3",
    "verbosity": 2,
}
