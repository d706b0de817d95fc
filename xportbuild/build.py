"""Runs one stage node: resolve its key, reuse a valid cache entry or build one, and explain staleness."""

from __future__ import annotations

import contextlib
import errno
import importlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from xportbuild import console, isolation
from xportbuild.cache import Entry, Store, write_atomic
from xportbuild.remote import RemoteCache
from xportbuild.errors import CacheCorrupt, DamagedEntry, StageError, VerifyFailed
from xportbuild.keys import SCHEMA, canonical_json, code_digests, digest_value, public_versions
from xportbuild.pipeline import STAGE_BY_NAME, code_roots, node_libraries
from xportbuild.plan import Plan, StageNode
from xportbuild.report import stage_facts

log = logging.getLogger(__name__)
STAGE_LOG = "stage.log"  # beside an entry's record: what the stage printed when it was built


@dataclass(frozen=True)
class Workspace:
    """Where a project keeps its cache, published artifacts and local build state."""

    cache_dir: Path
    artifacts_dir: Path
    state_dir: Path
    remote: RemoteCache | None = None  # one per build: it remembers that the remote failed, and warns once

    @classmethod
    def for_project(cls, recipes_dir: Path, cache_dir: Path | None = None,
                    artifacts_dir: Path | None = None) -> "Workspace":
        """Defaults: cache in <project>/.xportbuild/cache (XPORTBUILD_CACHE overrides), artifacts in
        <project>/artifacts; XPORTBUILD_REMOTE_CACHE names a store shared between machines (remote.py)."""
        project = Path(recipes_dir).resolve().parent
        state_dir = project / ".xportbuild"
        cache = Path(cache_dir or os.environ.get("XPORTBUILD_CACHE") or state_dir / "cache").resolve()
        return cls(
            cache_dir=cache,
            artifacts_dir=Path(artifacts_dir or project / "artifacts").resolve(),
            state_dir=state_dir,
            remote=RemoteCache.from_environment(cache),
        )

    @property
    def store(self) -> Store:
        return Store(self.cache_dir, remote=self.remote)

    def record_event(self, **event) -> None:
        """Append one line to the build log; O_APPEND keeps concurrent writers' lines whole."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        line = (json.dumps({"time": time.time(), "pid": os.getpid(), **event}) + "\n").encode()
        path = self.state_dir / "events.jsonl"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        except OSError as err:  # os.write names no file: the message must say which folder to free
            raise OSError(err.errno, err.strerror, str(path)) from err
        finally:
            os.close(fd)

    def stage_log(self, task: str) -> Path:
        """Everything a stage's process printed (libraries, runtimes, tracebacks), kept for its last build here."""
        return self.state_file("logs", task).with_suffix(".log")

    def state_file(self, kind: str, task: str) -> Path:
        """Per-task local state, e.g. state_file("last", "lower:x") for the key of its last build."""
        return self.state_dir / kind / (task.replace(":", "__") + ".json")


class Resolver:
    """Computes stage keys from upstream entries' content digests; memoizes only what cannot change."""

    def __init__(self, plan: Plan, workspace: Workspace, rehash_sources: bool = False):
        self.plan = plan
        self.workspace = workspace
        self.store = workspace.store
        # Deciding what to build reads sources whole; deciding whether anything must be built trusts stamps.
        self.source_digests = self.store.stats.rehashing() if rehash_sources else self.store.stats
        self._entries: dict[str, Entry] = {}
        self._docs: dict[str, dict] = {}

    def key_doc(self, task: str) -> tuple[dict | None, str]:
        """(key document, "") or (None, why it cannot be computed yet); a computed document is kept."""
        if task not in self._docs:
            doc, why = self._compute_key_doc(task)
            if doc is None:
                return None, why
            self._docs[task] = doc
        return self._docs[task], ""

    def _compute_key_doc(self, task: str) -> tuple[dict | None, str]:
        node = self.plan.nodes[task]
        if node.stage == "fetch":
            inputs = {"source": self._source_fingerprint(node)}
        else:
            inputs = {}
            for name, upstream in node.inputs.items():
                entry = self.entry(upstream)
                if entry is None:
                    return None, f"{upstream} must be built first"
                inputs[name] = entry.digest
        return {
            "schema": SCHEMA,
            "stage": node.stage,
            "params": node.params,
            "inputs": inputs,
            "code": code_digests(code_roots(node)),
            "libraries": public_versions(node_libraries(node)),
        }, ""

    def _source_fingerprint(self, node: StageNode) -> dict:
        from xportbuild import sources

        return sources.fingerprint(sources.source_of(node), node.origin, self.source_digests,
                                   self.workspace.cache_dir / "sources")

    def entry(self, task: str) -> Entry | None:
        if task in self._entries:
            return self._entries[task]
        doc, _ = self.key_doc(task)
        entry = self.store.lookup(digest_value(doc)) if doc is not None else None
        if entry is not None:
            self._entries[task] = entry
        return entry

    def status(self, task: str) -> tuple[bool, str]:
        """(fresh, reason): reason says which stage input changed since the last build."""
        doc, why = self.key_doc(task)
        if doc is None:
            return False, f"{task} is stale: {why}"
        if self.entry(task) is not None:
            return True, f"{task} is up to date (key {digest_value(doc)[:12]})"
        last = self.workspace.state_file("last", task)
        return False, f"{task} is stale: {explain_change(last, doc)}"


def _flatten(value, prefix: str = "") -> dict[str, object]:
    if isinstance(value, dict):
        flat: dict[str, object] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def explain_change(last_doc_path: Path, doc: dict) -> str:
    """Human-readable difference between the last built key document and the current one."""
    try:
        last = json.loads(last_doc_path.read_text())
    except (OSError, ValueError):
        return "never built here and not in the cache"
    old, new = _flatten(last), _flatten(json.loads(canonical_json(doc)))  # as stored: a tuple reads back as a list
    changes, code = [], []
    for name in sorted(set(old) | set(new)):
        if old.get(name) == new.get(name):
            continue
        if name.startswith("code."):
            code.append(name.removeprefix("code.").removeprefix("xportbuild."))
        elif name.startswith(("params", "libraries")):
            changes.append(f"{name} {_short(old.get(name))}→{_short(new.get(name))}")
        else:
            changes.append(f"{name} changed")
    if code:
        changes.append(f"its code changed ({', '.join(code)})")
    return "; ".join(changes) if changes else "its cache entry is missing or was damaged"


def _short(value) -> str:
    text = json.dumps(value) if value is not None else "(none)"
    return text if len(text) <= 40 else text[:37] + "..."


def _runner(stage: str):
    module_name, _, attr = STAGE_BY_NAME[stage].runner.partition(":")
    return getattr(importlib.import_module(module_name), attr)


# Disk full, quota, read-only or unwritable cache, file size limit: the user fixes the machine, not the recipe.
_STORAGE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG)
# Libraries written in Rust (safetensors, tokenizers) report an OS error inside their own exception's text.
_FOREIGN_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def _storage_errno(err: BaseException) -> int | None:
    """The errno of a storage failure, whether raised as OSError or wrapped by a library; None for anything else."""
    if isinstance(err, OSError):
        return err.errno if err.errno in _STORAGE_ERRORS else None
    found = _FOREIGN_OS_ERROR.search(str(err))
    return int(found[1]) if found and int(found[1]) in _STORAGE_ERRORS else None


@contextlib.contextmanager
def storage_errors(task: str, where: Path):
    """Turns a failed write anywhere inside into the one line that says what to free or fix."""
    try:
        yield
    except KeyboardInterrupt:
        log.error("%s: interrupted; nothing of it was cached, finished stages are kept", task)
        raise
    except Exception as err:  # noqa: BLE001  only storage failures are translated; the rest propagate unchanged
        code = _storage_errno(err)
        if code is None:
            raise
        place = getattr(err, "filename", None) or where
        raise StageError(f"{task}: cannot write to {place}: {os.strerror(code)}; "
                         "free disk space or fix permissions, then run again (finished stages are kept)") from err


def build_node(plan: Plan, workspace: Workspace, task: str) -> Entry:
    """Reuse or build the entry of `task`; exactly one process builds a key at a time.

    Before a stage runs, each input entry is read whole against its recorded hashes. A damaged one is discarded and
    rebuilt first (so is one the stage finds unreadable), then the key is resolved again from the rebuilt inputs."""
    rebuilt: set[str] = set()
    with storage_errors(task, workspace.cache_dir):
        while True:
            entry, damaged = _reuse_or_build(plan, workspace, task)
            if entry is not None:
                return entry
            if damaged in rebuilt:
                raise StageError(f"{task}: its input {damaged} is damaged again after a rebuild; run "
                                 "`python -m xportbuild fsck` and check the disk")
            rebuilt.add(damaged)
            build_node(plan, workspace, damaged)


def checked_entry(plan: Plan, workspace: Workspace, task: str) -> Entry:
    """The entry of a built `task`, read whole against its hashes; rebuilt first if it is damaged."""
    entry = Resolver(plan, workspace).entry(task)
    if entry is not None:
        try:
            workspace.store.check(entry)
            return entry
        except CacheCorrupt as err:
            log.warning("%s; discarding it and rebuilding %s", err, task)
            workspace.store.discard(entry)
    return build_node(plan, workspace, task)


def _reuse_or_build(plan: Plan, workspace: Workspace, task: str) -> tuple[Entry | None, str]:
    """(entry, "") once `task` is built or reused, or (None, input task) when an input had to be discarded."""
    node = plan.nodes[task]
    resolver = Resolver(plan, workspace, rehash_sources=node.stage == "fetch")
    doc, why = resolver.key_doc(task)
    if doc is None:
        raise StageError(f"{task}: cannot start: {why}")
    key = digest_value(doc)
    store = workspace.store
    with store.lock(key):
        entry = store.lookup(key)
        if entry is not None:
            workspace.record_event(task=task, stage=node.stage, event="hit", key=key)
            store.push(entry)  # a cache restored without doit's state (CI) shares what it holds, unless the remote has it
        else:
            if damaged := _discard_damaged_input(node, resolver, store):
                return None, damaged
            try:
                entry = _run_stage(node, resolver, workspace, doc, key)
            except DamagedEntry as err:
                return None, _discard_unreadable_input(node, resolver, store, err)
            store.push(entry)
    remember_key(workspace, task, doc)
    return entry, ""


def remember_key(workspace: Workspace, task: str, doc: dict) -> None:
    """The key document of the entry `task` now has here: what a later staleness is explained against. Written only
    when it changed, since the no-op path calls this for every stage."""
    path, text = workspace.state_file("last", task), canonical_json(doc)
    try:
        if path.read_text() == text:
            return
    except OSError:
        pass
    write_atomic(path, text.encode())


def _discard_damaged_input(node: StageNode, resolver: Resolver, store: Store) -> str:
    """The first input task whose entry no longer matches its hashes (discarded, with a warning), or ""."""
    for upstream in node.inputs.values():
        entry = resolver.entry(upstream)
        try:
            store.check(entry)
        except CacheCorrupt as err:
            log.warning("%s; discarding it and rebuilding %s before %s", err, upstream, node.task)
            store.discard(entry)
            return upstream
    return ""


def _discard_unreadable_input(node: StageNode, resolver: Resolver, store: Store, err: DamagedEntry) -> str:
    for upstream in node.inputs.values():
        entry = resolver.entry(upstream)
        if entry is not None and Path(err.entry_dir).resolve() == entry.path.resolve():
            log.warning("%s: input %s: %s; discarding it and rebuilding it", node.task, upstream, err)
            store.discard(entry)
            return upstream
    raise StageError(f"{node.task}: {err}") from err


def _keep_failed(workspace: Workspace, node: StageNode, failure: VerifyFailed) -> None:
    """A failed verification is not cached, but its numbers and the files that failed are kept for the user, with
    the model file's override that would accept them knowingly."""
    path = workspace.state_file("failed", node.task)
    write_atomic(path, json.dumps({"failures": failure.failures, "numbers": failure.numbers,
                                   "accept": failure.accept}, indent=1).encode())
    folder = workspace.state_dir / "failed" / node.subject
    for kept in failure.keep:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(kept, folder / f".{kept.name}.tmp")
        os.replace(folder / f".{kept.name}.tmp", folder / kept.name)
    workspace.record_event(task=node.task, stage=node.stage, event="failed", path=str(path))
    log.error("%s: verification numbers kept in %s%s", node.task, path,
              f", the failed {', '.join(kept.name for kept in failure.keep)} in {folder}" if failure.keep else "")
    if failure.accept and node.origin:
        recipe = node.subject.removeprefix(f"{Path(node.origin).stem}-")
        lines = "\n".join(f"    {name} = {value:g}" for name, value in sorted(failure.accept.items()))
        log.error("%s: to accept these numbers knowingly, add to %s:\n    [tolerances.%s]\n%s", node.task,
                  node.origin, recipe, lines)


def _run_stage(node: StageNode, resolver: Resolver, workspace: Workspace, doc: dict, key: str) -> Entry:
    inputs = {name: resolver.entry(upstream).path for name, upstream in node.inputs.items()}
    log_path = workspace.stage_log(node.task)
    log.info("%s: building%s", node.task, _last_took(workspace, node.task))
    with console.output_to(workspace.state_dir / "logs" / "libraries.log"):  # their import-time warnings
        isolation.preload()  # once per build, before the clock starts: not this stage's time
    started = time.perf_counter()
    with workspace.store.building(key) as scratch:
        try:
            run = isolation.run_in_child(_runner(node.stage), node, inputs, scratch, workspace, log=log_path)
        except VerifyFailed as failure:
            _keep_failed(workspace, node, failure)
            raise
        seconds = time.perf_counter() - started
        record = {"stage": node.stage, "task": node.task, "key_doc": doc, "result": run.result,
                  "seconds": round(seconds, 3), "peak_rss_mb": round(run.peak_rss_mb, 1)}
        entry = workspace.store.commit(key, scratch, record)
    _keep_log(log_path, entry)
    workspace.record_event(task=node.task, stage=node.stage, event="built", key=key, seconds=seconds)
    write_atomic(workspace.state_file("seconds", node.task), json.dumps(seconds).encode())
    log.info("%s: built in %.1f s, peak RSS %.0f MB, %s", node.task, seconds, run.peak_rss_mb,
             stage_facts(node.stage, entry.record))
    return entry


def _last_took(workspace: Workspace, task: str) -> str:
    """How long the last build of this stage took here, as a hint of how long to wait."""
    try:
        seconds = float(json.loads(workspace.state_file("seconds", task).read_text()))
    except (OSError, ValueError, TypeError):
        return ""
    return f" (last build here: {seconds:.1f} s)" if seconds < 10 else f" (last build here: {seconds:.0f} s)"


def _keep_log(log_path: Path, entry: Entry) -> None:
    """The stage's log beside its record (not one of the entry's files: it differs run to run)."""
    with contextlib.suppress(OSError):
        shutil.copyfile(log_path, entry.path / STAGE_LOG)
