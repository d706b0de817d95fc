"""doit wiring only: one task group per stage, `export:<target>` to publish. Imports no torch."""

from __future__ import annotations

import logging
import sys
import traceback
import warnings
from pathlib import Path

from doit.exceptions import TaskFailed
from doit.reporter import ConsoleReporter

from xportbuild.build import Resolver, Workspace, build_node, remember_key, storage_errors
from xportbuild.console import hint, output_to
from xportbuild.isolation import ChildTraceback
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
            remember_key(self.workspace, self.task, resolver.key_doc(self.task)[0])
        return fresh, reason

    def __str__(self) -> str:
        return self.reason


class PublishedFresh(StageFresh):
    def check(self) -> tuple[bool, str]:
        from xportbuild.publish import published_state

        # A build with nothing to do still completes the pushes an earlier one could not make.
        self.workspace.store.push_pending()
        return published_state(self.plan, self.workspace, self.task)


class _Lines(logging.Formatter):
    """xportbuild's own lines as they are; warnings and errors say so."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno == logging.INFO else f"{record.levelname} {message}"


def _configure_logging() -> None:
    # Emitted thousands of times per lowering by torch's pytree; says nothing about the user's build.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
    root = logging.getLogger("xportbuild")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_Lines())
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False


def _failed(task: str, workspace: Workspace, err: Exception) -> TaskFailed:
    """One line for the user: what failed, where its whole story is (the stage's log, the traceback appended), and,
    for a failure of a known kind, what it means."""
    log_path = workspace.stage_log(task)
    if isinstance(err, XportError):
        message = str(err)
        message = message if message.startswith(task) else f"{task}: {message}"
        if not isinstance(err.__cause__, ChildTraceback):  # found before any stage ran: the message is all there is
            return TaskFailed(message)
        _append(log_path, str(err.__cause__))  # raised in the stage's process: its whole story goes to its log
        return TaskFailed(f"{message} (log: {log_path})")
    _append(log_path, "".join(traceback.format_exception(err)))
    summary = (str(err).strip().splitlines() or [""])[0][:200]
    advice = hint(err) or (hint(err.__cause__) if err.__cause__ is not None else "")  # the child's traceback
    return TaskFailed(f"{task}: {type(err).__name__}: {summary}" + (f"; {advice}" if advice else "")
                      + f" (log: {log_path})")


def _append(log_path: Path, text: str) -> None:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a") as handle:
        handle.write(text)


class Reporter(ConsoleReporter):
    """doit's console output, less the line it prints when a task starts: xportbuild's tasks print their own start
    and end lines (with what they built); a failure is its one line."""

    desc = "xportbuild's console: one line per stage start and end"

    def execute_task(self, task):
        if task.name.partition(":")[0] not in _OWN_GROUPS:
            super().execute_task(task)

    def add_failure(self, task, fail):
        if isinstance(fail, TaskFailed) and task.name.partition(":")[0] in _OWN_GROUPS:
            self.failures.append({"task": task, "exception": fail})
            self.write(f"{fail.message.rstrip()}\n")
        else:
            super().add_failure(task, fail)

    def complete_run(self):
        self.failures = [failure for failure in self.failures
                         if failure["task"].name.partition(":")[0] not in _OWN_GROUPS]
        super().complete_run()


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

    def check() -> str:
        with output_to(workspace.state_dir / "logs" / "validate.log"):
            return validate_project(recipes_dir, workspace.cache_dir / "sources").summary()

    return _guarded("validate", workspace, check)


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


def run_status(plan: Plan, workspace: Workspace):
    from xportbuild.status import status_table

    return _guarded("status", workspace, lambda: status_table(plan, workspace))


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

    def task_status():
        return {"doc": "every target: up to date or why not, size, quality, speed (`python -m xportbuild status`)",
                "actions": [(run_status, [plan, workspace])], "uptodate": [False], "verbosity": 2}

    creators["task_status"] = task_status
    return creators


_OWN_GROUPS = {*(stage.name for stage in STAGES), "export", "copy", "validate", "fsck", "status"}

DOIT_CONFIG = {
    "default_tasks": [],
    "reporter": Reporter,
    "backend": "xportbuild",  # doit's sqlite3, its failed writes one warning (doit_state.py)
    "dep_file": ".xportbuild/doit.sqlite3",
    "verbosity": 2,
}
