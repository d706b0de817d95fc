"""`python -m doit ARGS` for the tests, forked from a waiting interpreter that has already imported what every build
imports first, instead of started from nothing.

A `doit` run that builds anything first imports torch, transformers, torchao and ExecuTorch (`isolation.preload`,
3.6 s here); the test suite runs about a hundred of them. Each pytest worker keeps one such interpreter (a zygote)
per environment: it imports exactly what a build preloads, computes nothing (so forking it is as safe as the build's
own forking of stages), and forks one child per `doit` run. The child takes the run's working folder, environment and
arguments, runs doit's own entry point with stdout and stderr in files, and exits with doit's code, so a test sees
what `subprocess.run([python, "-m", "doit", ...])` would give it.

Only `XPORTBUILD_*` and `PYTEST_*` variables may differ between the runs of one zygote: they are read when used,
where huggingface_hub and transformers read theirs (HF_HUB_OFFLINE, HF_HUB_CACHE) when imported; another environment
gets a zygote of its own, and the oldest of them ends. Tests of the command line itself (kills, Ctrl-C, what `doit list` imports) start real processes.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

# Read when they are used, not when a library is imported: they may differ between the runs of one zygote.
_RUNTIME_VARIABLES = ("XPORTBUILD_", "PYTEST_")  # pytest names the current test in PYTEST_CURRENT_TEST
_KEPT = 2  # zygotes alive per worker (about 350 MB each): the projects' environment and the family sweep's
_ZYGOTES: dict[tuple, subprocess.Popen] = {}


REPO = Path(__file__).resolve().parents[1]


def run_doit(args: list[str], cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
    if env.get("PYTHONPATH") != str(REPO):  # another xportbuild than the one a zygote has imported
        return subprocess.run([sys.executable, "-m", "doit", *args], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)
    zygote = _zygote(env)
    with tempfile.TemporaryDirectory() as scratch:
        out, err = Path(scratch) / "stdout", Path(scratch) / "stderr"
        request = {"args": args, "cwd": str(cwd), "env": env, "stdout": str(out), "stderr": str(err)}
        zygote.stdin.write(json.dumps(request) + "\n")
        zygote.stdin.flush()
        child = json.loads(zygote.stdout.readline())["pid"]
        code = _wait(zygote, child, timeout)
        return subprocess.CompletedProcess([sys.executable, "-m", "doit", *args], code, out.read_text(),
                                           err.read_text())


def _wait(zygote: subprocess.Popen, child: int, timeout: float) -> int:
    """The run's exit code; the run is killed after `timeout` seconds, as subprocess.run would kill it."""
    killed = []

    def kill() -> None:
        killed.append(child)
        os.kill(child, signal.SIGKILL)

    timer = threading.Timer(timeout, kill)
    timer.start()
    try:
        line = zygote.stdout.readline()
    finally:
        timer.cancel()
    if not line:
        raise RuntimeError("the doit zygote ended")
    if killed:
        raise subprocess.TimeoutExpired(["doit"], timeout)
    return json.loads(line)["code"]


def _zygote(env: dict) -> subprocess.Popen:
    key = tuple(sorted((name, value) for name, value in env.items() if not name.startswith(_RUNTIME_VARIABLES)))
    if key in _ZYGOTES and _ZYGOTES[key].poll() is not None:
        del _ZYGOTES[key]
    if key not in _ZYGOTES:
        while len(_ZYGOTES) >= _KEPT:
            _end(_ZYGOTES.pop(next(iter(_ZYGOTES))))
        _ZYGOTES[key] = subprocess.Popen([sys.executable, "-c", "from tests.forked_doit import serve; serve()"],
                                         cwd=REPO, env=env, text=True,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    return _ZYGOTES[key]


def _end(zygote: subprocess.Popen) -> None:
    zygote.kill()
    zygote.wait()


@atexit.register
def _stop_zygotes() -> None:
    for zygote in _ZYGOTES.values():
        _end(zygote)


def serve() -> None:
    """The zygote: import what a build preloads, then fork one `doit` run per request line on stdin."""
    import doit.doit_cmd  # noqa: F401

    from xportbuild import isolation

    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever an import prints goes to stderr, not into the replies
    isolation.preload()
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            replies.close()
            _run(request)
        print(json.dumps({"pid": pid}), file=replies, flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), file=replies, flush=True)


def _run(request: dict) -> None:
    """In the forked child: become `python -m doit ARGS` in the request's folder and environment, then exit."""
    code = 1
    try:
        for fd, path, mode in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], os.O_WRONLY | os.O_CREAT),
                               (2, request["stderr"], os.O_WRONLY | os.O_CREAT)):
            os.dup2(os.open(path, mode, 0o644), fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.path[0] = request["cwd"]  # as `python -m` puts the working folder first
        sys.argv = ["doit", *request["args"]]
        from doit.doit_cmd import DoitMain

        code = DoitMain().run(request["args"])
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:  # noqa: BLE001  printed as the interpreter would, and the run fails
        import traceback

        traceback.print_exc()
    finally:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
