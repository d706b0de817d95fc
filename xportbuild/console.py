"""What a person sees: everything libraries print goes to log files, progress bars go to the terminal, and each
stage is one line when it starts and one when it ends. `XPORTBUILD_VERBOSE=1` shows the logs live as well.

Capture works on file descriptors, not on Python's streams: the ExecuTorch runner, torch's C++ warnings and
libraries that cached `sys.stderr` all write to the descriptors."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from pathlib import Path

VERBOSE = "XPORTBUILD_VERBOSE"
_terminal = None  # in a stage's process: the terminal its output was taken from, for progress and warnings
_tee: threading.Thread | None = None


def verbose() -> bool:
    return os.environ.get(VERBOSE, "") not in ("", "0", "false", "no")


@contextlib.contextmanager
def output_to(log: Path):
    """Inside, this process's stdout and stderr go to `log` (appended), and back to where they were after."""
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    target = _open_log(log, os.O_APPEND)
    try:
        _point_stdio_at(target)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, original in zip((1, 2), saved):
            os.dup2(original, fd)
            os.close(original)


def capture_stage_output(log: Path) -> None:
    """In a stage's own process, for the rest of its life: stdout and stderr into `log` (and to the terminal too
    when verbose). xportbuild's warnings and progress bars still reach the terminal. `end_capture` before exit."""
    global _terminal, _tee
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    _terminal = os.fdopen(os.dup(2), "w", buffering=1)
    target = _open_log(log, os.O_TRUNC)
    if verbose():
        read_end, write_end = os.pipe()
        _tee = threading.Thread(target=_copy_to, args=(read_end, (target, _terminal.fileno())), daemon=True)
        _tee.start()
        target = write_end
    _point_stdio_at(target)
    warnings_to_terminal = logging.StreamHandler(_terminal)
    warnings_to_terminal.setLevel(logging.WARNING)
    warnings_to_terminal.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logging.getLogger("xportbuild").addHandler(warnings_to_terminal)


def end_capture() -> None:
    """Flush what was captured (the verbose copy's last lines included) before the process exits."""
    sys.stdout.flush()
    sys.stderr.flush()
    if _tee is not None:
        os.close(1)
        os.close(2)
        _tee.join(timeout=5)


def progress(iterable=None, total: int | None = None, desc: str = "", unit: str = "it"):
    """A progress bar on the terminal (tqdm), drawn only where one is attached: CI logs get the stage lines only."""
    from tqdm import tqdm

    stream = _progress_stream()
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=stream, leave=False, dynamic_ncols=True,
                disable=not stream.isatty(), mininterval=0.5)


@contextlib.contextmanager
def library_progress():
    """Inside, a library's own progress bars (tqdm writes to `sys.stderr` by default) draw on the terminal, where
    there is one; elsewhere they stay in the log with the rest of its output."""
    stream = _progress_stream()
    if not stream.isatty():
        yield
        return
    with contextlib.redirect_stderr(stream):
        yield


def _progress_stream():
    """The terminal a stage's output was taken from; outside a stage, stderr."""
    return _terminal or sys.stderr


def _open_log(log: Path, mode: int) -> int:
    return os.open(log, os.O_WRONLY | os.O_CREAT | mode, 0o644)


def _point_stdio_at(fd: int) -> None:
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _copy_to(read_end: int, targets: tuple[int, ...]) -> None:
    while chunk := os.read(read_end, 65536):
        for fd in targets:
            os.write(fd, chunk)


# Failures whose cause is known, by exception type or message: what they mean and what to do.
_HINTS = (
    (("no kernel", "Missing operator", "Operator missing", "0x14", "kernel not found"),
     "the program uses an operator the ExecuTorch runtime has no kernel for; decompose it in a lowering pass or "
     "use another backend"),
    (("GuardOnDataDependentSymNode", "Could not guard on data-dependent", "data-dependent", "Dynamo does not know",
      "torch._dynamo.exc", "UserError", "Unsupported"),
     "torch.export cannot trace the model's code (data-dependent control flow, a shape guard or a function Dynamo "
     "skips); the log holds the model source line"),
    (("__torch_dispatch__", "tensor subclass", "AffineQuantizedTensor"),
     "a quantized tensor subclass lacks an operation this model uses; leave that layer float or pick another scheme"),
)


def hint(err: BaseException) -> str:
    """What a failure of a known kind means and what to do, or ""."""
    text = f"{type(err).__module__}.{type(err).__name__}: {err}"
    return next((advice for needles, advice in _HINTS if any(needle in text for needle in needles)), "")
