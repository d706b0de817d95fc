"""Each stage runs in a child process of its own, forked from the build.

An interpreter keeps most of what it ever allocated: run in one process, a build of several targets grew with every
stage (verify of the third Gemma 3 270M target peaked at 10.3 GB, where the same stage alone takes 2.6 GB). A stage
in a child gives all of its memory back when it ends, so a build peaks at its largest stage. The child dies with
the build (a killed build leaves no stage running), and what it raises is raised here, with its traceback.
"""

from __future__ import annotations

import gc
import os
import pickle
import signal
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

from xportbuild import console
from xportbuild.errors import StageError

# Imported once by the build before its first stage, so that each child starts with them instead of paying for
# the imports again: the libraries every stage's code reaches first (transformers' model code alone takes 0.7 s).
# Importing runs no compute, so forking after it is safe; the worker threads it starts are of pools made to survive
# a fork (OpenMP's and OpenBLAS's, which scipy loads, rebuild theirs in the child).
_SHARED_IMPORTS = ("torch", "transformers", "transformers.modeling_utils", "torchao.quantization", "executorch.exir")
_PR_SET_PDEATHSIG = 1


class ChildTraceback(Exception):
    """The stage's traceback as its child process printed it (the cause of the error raised here)."""


@dataclass(frozen=True)
class ChildRun:
    result: object
    peak_rss_mb: float


def preload() -> None:
    import importlib

    for name in _SHARED_IMPORTS:
        importlib.import_module(name)


def run_in_child(function, *args, log: Path | None = None) -> ChildRun:
    """`function(*args)` in a forked child: its result and the child's peak resident memory, or its exception.
    With `log`, everything the child prints goes there (console.capture_stage_output)."""
    read_end, write_end = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        _child(parent, write_end, function, args, log)
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as pipe:
            message = pipe.read()
    except BaseException:  # interrupted: the stage must not outlive the build
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    _, status, usage = os.wait4(pid, 0)
    # ru_maxrss is in kilobytes on Linux.
    peak_mb = usage.ru_maxrss / 1024
    if not message:
        raise StageError(f"the stage's process ended without a result ({_ending(status)})")
    outcome = pickle.loads(message)
    if outcome[0] == "raised":
        _, error, text = outcome
        raise error from ChildTraceback(text)
    return ChildRun(outcome[1], peak_mb)


def _child(parent: int, write_end: int, function, args, log: Path | None) -> None:
    code = 0
    try:
        _die_with(parent)
        if log is not None:
            console.capture_stage_output(log)
        _leave_inherited_objects_to_the_build()
        try:
            outcome = ("returned", function(*args))
        except BaseException as err:  # noqa: BLE001  every outcome goes back to the build, which decides
            outcome = ("raised", _portable(err), "".join(traceback.format_exception(err)))
        with os.fdopen(write_end, "wb") as pipe:
            pipe.write(pickle.dumps(outcome))
    except BaseException:  # noqa: BLE001  the build reports a child that sent nothing
        code = 1
    finally:
        console.end_capture()
        os._exit(code)


def _leave_inherited_objects_to_the_build() -> None:
    """The build's objects (half a million, from the imports) out of this child's garbage collections: they live as
    long as the child does, so tracing them finds nothing, and it took a tenth to a fifth of a tiny model's stage (0.4
    of its 1.9 s export). Touching their headers would also copy the pages the child shares with the build."""
    gc.freeze()


def _die_with(parent: int) -> None:
    """The kernel kills this child when the build dies (Linux); a build already gone ends it now."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


def _portable(err: BaseException):
    """`err` as it can cross a pipe: itself when it pickles back whole; else the same type and attributes, rebuilt
    without calling its __init__ (whose arguments are not its args), or a StageError saying what it was."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:  # noqa: BLE001  any pickling failure takes the fallback below
        pass
    try:
        rebuilt = _Rebuilt(type(err), err.args, err.__dict__)
        pickle.loads(pickle.dumps(rebuilt))  # the fallback must survive the trip too
        return rebuilt
    except Exception:  # noqa: BLE001
        return StageError(f"{type(err).__name__}: {err}")


class _Rebuilt:
    """Pickles to an exception of `cls` with `args` and `state`, not calling cls.__init__."""

    def __init__(self, cls, args, state):
        self.cls, self.args, self.state = cls, args, state

    def __reduce__(self):
        return _rebuild, (self.cls, self.args, self.state)


def _rebuild(cls, args, state):
    err = cls.__new__(cls, *args)
    err.args = args
    err.__dict__.update(state)
    return err


def _ending(status: int) -> str:
    if not os.WIFSIGNALED(status):
        return f"exit code {os.waitstatus_to_exitcode(status)}"
    number = os.WTERMSIG(status)
    # The kernel's out-of-memory killer sends SIGKILL; so does a user, but memory is the usual cause in a build.
    hint = "; if it was killed for memory, free some or build fewer targets at once" if number == signal.SIGKILL else ""
    return f"killed by {signal.Signals(number).name}{hint}"
