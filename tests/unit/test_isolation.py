"""Stages run in forked children: results, errors, memory and death cross back to the build as if run in place."""

from __future__ import annotations

import errno
import gc
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from xportbuild.errors import DamagedEntry, StageError, VerifyFailed
from xportbuild.isolation import ChildTraceback, run_in_child

REPO = Path(__file__).resolve().parents[2]
_MB = 2**20


# What a stage leaves behind in its interpreter (caches, module state): kept here, it would stay in the build.
_LEFT_BEHIND: list[bytearray] = []


def _hold_memory(megabytes: int) -> int:
    block = bytearray(megabytes * _MB)
    block[::4096] = b"x" * len(block[::4096])  # touch every page, so it is resident
    _LEFT_BEHIND.append(block)
    return len(block)


def _resident_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / _MB


def test_the_result_comes_back_and_the_memory_stays_with_the_child():
    before = _resident_mb()
    run = run_in_child(_hold_memory, 300)
    assert run.result == 300 * _MB
    assert run.peak_rss_mb >= 300
    assert not _LEFT_BEHIND and _resident_mb() - before < 100  # the 300 MB were the child's, and went with it


def _fail_verification():
    raise VerifyFailed("m-r", ["top-1 0.5 < 0.9"], {"top1": 0.5}, {"min_top1": 0.4}, (Path("/tmp/x.pte"),))


def _fail_unreadable():
    raise DamagedEntry(Path("/cache/ab"), "not a zip file")


def _fail_disk_full():
    raise OSError(errno.ENOSPC, "No space left on device", "/cache/tmp/forward.pt2")


def _collector_view() -> tuple[int, set[int]]:
    """What the child's collector would trace: the number frozen, the ids of every object it still traces."""
    return gc.get_freeze_count(), {id(obj) for obj in gc.get_objects()}


def test_the_childs_collections_leave_the_builds_objects_alone():
    build_objects = [[number] for number in range(50_000)]
    frozen, traced = run_in_child(_collector_view).result
    assert frozen >= len(build_objects)
    assert not traced & {id(obj) for obj in build_objects}
    assert gc.get_freeze_count() == 0  # the build's own collector is as it was


def test_errors_keep_their_type_fields_and_the_childs_traceback():
    with pytest.raises(VerifyFailed) as failed:
        run_in_child(_fail_verification)
    assert (failed.value.target, failed.value.failures, failed.value.numbers, failed.value.accept,
            failed.value.keep) == ("m-r", ["top-1 0.5 < 0.9"], {"top1": 0.5}, {"min_top1": 0.4}, (Path("/tmp/x.pte"),))
    assert isinstance(failed.value.__cause__, ChildTraceback)
    assert "_fail_verification" in str(failed.value.__cause__)

    with pytest.raises(DamagedEntry) as damaged:
        run_in_child(_fail_unreadable)
    assert damaged.value.entry_dir == Path("/cache/ab") and "not a zip file" in str(damaged.value)

    with pytest.raises(OSError) as full:
        run_in_child(_fail_disk_full)
    assert (full.value.errno, full.value.filename) == (errno.ENOSPC, "/cache/tmp/forward.pt2")


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_child_killed_midway_is_a_stage_error_that_says_how_it_ended():
    with pytest.raises(StageError, match="killed by SIGKILL"):
        run_in_child(_die)


_ORPHAN = """
import sys, time
from pathlib import Path
from xportbuild.isolation import run_in_child

def stage(pid_file):
    import os
    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(600)

run_in_child(stage, sys.argv[1])
"""


def test_a_killed_build_leaves_no_stage_running(tmp_path):
    pid_file = tmp_path / "stage.pid"
    build = subprocess.Popen([sys.executable, "-c", _ORPHAN, str(pid_file)], env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline and build.poll() is None, "the stage never started"
        time.sleep(0.05)
    stage = int(pid_file.read_text())
    build.kill()
    build.wait()
    deadline = time.monotonic() + 10
    try:
        while _alive(stage):
            assert time.monotonic() < deadline, f"stage process {stage} outlived its build"
            time.sleep(0.05)
    finally:
        if _alive(stage):
            os.kill(stage, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"  # a zombie has ended; only its parent (init) has not reaped it
    except FileNotFoundError:
        return False
