"""Shared fixtures: tiny weights built once per session, and throwaway projects driven through doit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Two pytest-xdist workers on two cores, each running a build on as many OpenMP threads as there are cores, keep four
# spinning threads on two cores: a GPTQ quantize took 38 s beside another build instead of 7 s alone. Each worker and
# the builds it starts get cores / workers threads, unless the environment already says how many. (Set in the
# workers only: set in the xdist controller, whose environment the workers inherit, it would give each worker all
# the cores.)
def _workers() -> int:
    """pytest-xdist workers in this run (1 without xdist)."""
    return int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))


if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers())))

from tests.forked_doit import run_doit  # noqa: E402  (after the repo is on sys.path)

DODO = 'from pathlib import Path\nfrom xportbuild.tasks import DOIT_CONFIG, make_tasks\n' \
       'globals().update(make_tasks(Path(__file__).parent / "recipes"))\n'


@dataclass
class Project:
    """A user's repo: dodo.py + recipes/, built with `doit` runs (tests/forked_doit.py)."""

    root: Path
    env: dict

    def write_model(self, name: str, text: str) -> None:
        (self.root / "recipes" / "models" / f"{name}.toml").write_text(text)

    def write_recipe(self, name: str, text: str) -> None:
        (self.root / "recipes" / "recipes" / f"{name}.toml").write_text(text)

    def edit_recipe(self, name: str, old: str, new: str) -> None:
        path = self.root / "recipes" / "recipes" / f"{name}.toml"
        text = path.read_text()
        assert old in text, f"{old!r} not in {path}"
        path.write_text(text.replace(old, new))

    def doit(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = run_doit(list(args), self.root, self.env, timeout=1800)
        if check and result.returncode != 0:
            raise AssertionError(f"doit {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr[-6000:]}")
        return result

    def doit_pulling(self, run_cache: Path, *args: str) -> subprocess.CompletedProcess:
        """`doit` with the run's shared cache as the remote: what another test built is pulled into this project's
        own cache (content-checked, as a CI job pulls) instead of built again. Later `doit`s use that cache alone.
        The run's own cache is trusted as a store with a key would be (tests/integration/test_hostile.py covers
        stores that are not)."""
        self.env.update(XPORTBUILD_REMOTE_CACHE=str(run_cache), XPORTBUILD_REMOTE_TRUST="1")
        try:
            return self.doit(*args)
        finally:
            del self.env["XPORTBUILD_REMOTE_CACHE"], self.env["XPORTBUILD_REMOTE_TRUST"]

    def events(self) -> list[dict]:
        path = self.root / ".xportbuild" / "events.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def plan(self):
        from xportbuild.plan import plan_targets
        from xportbuild.recipe import load_project

        return plan_targets(load_project(self.root / "recipes"))

    def entry(self, task: str):
        """The cache entry of a stage task, found the way doit's up-to-date check finds it."""
        from xportbuild.build import Resolver, Workspace

        plan = self.plan()
        workspace = Workspace(Path(self.env["XPORTBUILD_CACHE"]), self.root / "artifacts", self.root / ".xportbuild")
        entry = Resolver(plan, workspace).entry(task)
        assert entry is not None, f"{task} is not built"
        return entry

    def built_since(self, count: int) -> list[str]:
        """Tasks whose stage function ran after the first `count` events."""
        return sorted(e["task"] for e in self.events()[count:] if e["event"] == "built")


def made_once(folder: Path, make) -> Path:
    """`make(folder)` by the first worker that asks; the others wait for it and reuse the folder."""
    from filelock import FileLock

    with FileLock(f"{folder}.lock"):
        if not (folder.parent / f"{folder.name}.complete").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            make(folder)
            (folder.parent / f"{folder.name}.complete").touch()
    return folder


def _save_weights(root: Path) -> None:
    from tests import tiny

    tiny.save_model(root / "tiny-llama", "llama")
    tiny.save_model(root / "tiny-gemma3", "gemma3", tie=True)
    tiny.save_model(root / "tiny-llama-tied", "llama", tie=True)
    qwen = tiny.save_model(root / "qwen3-src", "qwen3")
    commit = tiny.populate_hub_cache(qwen, root / "hf-cache", "tiny-org/tiny-qwen3")
    (root / "hub-commit").write_text(commit)
    tiny.save_gguf(root / "tiny-llama.gguf")
    tiny.save_gguf(root / "tiny-llama-spm.gguf", vocabulary="llama")


@pytest.fixture(scope="session")
def run_folder(tmp_path_factory) -> Path:
    """A folder every pytest-xdist worker of this run shares (the run's base temp folder), so a build one worker
    made is a cache hit for the other, as on CI runners sharing a cache."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def weights(run_folder) -> Path:
    """Tiny random-weight models (llama, llama tied, gemma3 tied, qwen3), a GGUF and an offline HF cache, made once per run."""
    return made_once(run_folder / "weights", _save_weights)


@pytest.fixture(scope="session")
def shared_cache(run_folder) -> Path:
    """One content-addressed cache for the run, shared by its workers: equal keys are built once, as in CI."""
    cache = run_folder / "cache"
    cache.mkdir(exist_ok=True)
    return cache


@pytest.fixture
def project(tmp_path, weights, shared_cache) -> Project:
    root = tmp_path / "app"
    (root / "recipes" / "models").mkdir(parents=True)
    shutil.copytree(REPO / "recipes" / "recipes", root / "recipes" / "recipes")
    (root / "dodo.py").write_text(DODO)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(weights / "hf-cache"),
           "XPORTBUILD_CACHE": str(shared_cache)}
    return Project(root, env)


def _weight(item) -> int:
    """How long a test takes, roughly: a decoder family group (four families, two recipes each) > any other test
    that builds > a unit test."""
    if item.get_closest_marker("families"):
        return 2
    return 1 if "/integration/" in str(item.path) else 0


def pytest_collection_modifyitems(config, items) -> None:
    """Heaviest first, dealt in turn to each pytest-xdist worker's share: the workers start with equal shares of
    the long builds and end with short tests, so neither waits for the other's last family group at the end (one did
    for 68 s of a 16-minute run). Within a weight, collection order."""
    workers = _workers()
    ranked = sorted(items, key=lambda item: -_weight(item))
    items[:] = [item for share in range(workers) for item in ranked[share::workers]]
