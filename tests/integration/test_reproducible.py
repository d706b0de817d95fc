"""Same key, same bytes: two cold builds in separate caches, with different thread counts, write identical
programs and artifacts; a rebuilt program entry leaves every downstream key, and so its cached lowering, in place.

One of the two is the run's shared cache: whichever test first asks for the default recipe on tiny Gemma 3 builds it
there from nothing, with the thread count every test build of this run gets; the other is a cache of this test's
own, built with another thread count."""

from __future__ import annotations

import os
import shutil

from tests.conftest import DODO, REPO, Project
from tests.integration.models import local, model_toml

TARGET = "tiny-gemma3-xnnpack-8da8w-shared"  # the default recipe: quantized, shared tied table, custom SDPA + KV cache
STAGES = (f"quantize:{TARGET}", f"replay:{TARGET}", f"lower:{TARGET}")


def _threads_of_the_run() -> int:
    """The threads torch and ExecuTorch get in this run's builds: OMP_NUM_THREADS (tests/conftest.py sets it in
    pytest-xdist workers), else torch's default on this machine."""
    import torch

    return int(os.environ.get("OMP_NUM_THREADS") or torch.get_num_threads())


def _cold_project(tmp_path, weights, name: str, threads: int) -> Project:
    """A repo of its own, with an empty cache of its own, running torch and ExecuTorch on `threads` threads."""
    root = tmp_path / name
    (root / "recipes" / "models").mkdir(parents=True)
    shutil.copytree(REPO / "recipes" / "recipes", root / "recipes" / "recipes")
    (root / "dodo.py").write_text(DODO)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads),
           "XPORTBUILD_CACHE": str(tmp_path / f"{name}-cache")}
    project = Project(root, env)
    project.write_model("tiny-gemma3", model_toml(local(weights / "tiny-gemma3"), ["xnnpack-8da8w-shared"]))
    return project


def _outputs(project: Project, task: str) -> dict[str, bytes]:
    """The programs, their replayed outputs and the artifacts a stage wrote, by file name."""
    folder = project.entry(task).path
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())
            if path.suffix in (".pt2", ".npz", ".pte", ".ptd")}


def test_two_cold_builds_with_different_thread_counts_are_byte_identical(project, tmp_path, weights):
    project.write_model("tiny-gemma3", model_toml(local(weights / "tiny-gemma3"), ["xnnpack-8da8w-shared"]))
    one = project
    two = _cold_project(tmp_path, weights, "two", 1 if _threads_of_the_run() > 1 else 2)
    assert two.env["OMP_NUM_THREADS"] != str(_threads_of_the_run())
    for project in (one, two):
        project.doit(f"export:{TARGET}")
    for task in STAGES:
        files = _outputs(one, task)
        assert files, f"{task} wrote no program or artifact"
        assert files == _outputs(two, task), f"{task}: the two cold builds differ"
    for name in ("model.pte", "model.ptd"):
        published = [(project.root / "artifacts" / TARGET / name).read_bytes() for project in (one, two)]
        assert published[0] == published[1], name

    # A program entry rebuilt from scratch is the same bytes, so lowering and verification are cache hits.
    shutil.rmtree(two.entry(STAGES[0]).path)
    before = len(two.events())
    two.doit(f"export:{TARGET}")
    assert two.built_since(before) == [STAGES[0]]
