"""`python -m doit ARGS` for the tests, forked from a waiting interpreter that has already imported what every build
imports first, instead of started from nothing.

A `doit` run that builds anything first imports torch, transformers, torchao and ExecuTorch (`isolation.preload`,
3.6 s here); the test suite runs about a hundred of them. Each pytest worker keeps one such interpreter (a zygote)
per environment: it imports exactly what a build preloads, computes nothing (so forking it is as safe as the build's
own forking of stages), and forks one child per `doit` run. The child takes the run's working folder, environment and
arguments, runs doit's own entry point with stdout and stderr in files, and exits with doit's code, so a test sees
what `subprocess.run([python, "-m", "doit", ...])` would give it.

A run can also be started without waiting for it (`start_doit`): it leads a process group of its own, as a build
started from a terminal does, so a test can kill it and every stage process under it at once (kill -9, Ctrl-C), and
several can run at once (two concurrent builds). Each run is its own process with doit's own entry point; only the
imports before its first line are shared.

Only `XPORTBUILD_*` and `PYTEST_*` variables may differ between the runs of one zygote: they are read when used,
where huggingface_hub and transformers read theirs (HF_HUB_OFFLINE, HF_HUB_CACHE) when imported; another environment
gets a zygote of its own, and the oldest of them ends. Tests of what a fresh interpreter imports (`doit list`,
`validate`) start real processes.
"""

from __future__ import annotations

import atexit
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# Read when they are used, not when a library is imported: they may differ between the runs of one zygote.
_RUNTIME_VARIABLES = ("XPORTBUILD_", "PYTEST_")  # pytest names the current test in PYTEST_CURRENT_TEST
_KEPT = 2  # zygotes alive per worker (about 350 MB each): the projects' environment and the family sweep's
_ZYGOTES: dict[tuple, subprocess.Popen] = {}
_CLONE_NEWNS, _CLONE_NEWUSER = 0x00020000, 0x10000000  # <sched.h>


REPO = Path(__file__).resolve().parents[1]


@dataclass
class ForkedRun:
    """A `doit` run started by the zygote: the leader of its own process group, its output in files."""

    pid: int
    args: list[str]
    stdout: Path
    stderr: Path
    exit_file: Path

    def poll(self) -> int | None:
        """The run's exit code, or None while it runs."""
        text = self.exit_file.read_text() if self.exit_file.is_file() else ""
        return int(text) if text.endswith("\n") else None

    def wait(self, timeout: float) -> int:
        """The exit code; after `timeout` seconds the run is killed, as subprocess.run would kill it."""
        deadline = time.monotonic() + timeout
        while (code := self.poll()) is None:
            if time.monotonic() > deadline:
                self.kill(signal.SIGKILL)
                raise subprocess.TimeoutExpired(["doit", *self.args], timeout)
            time.sleep(0.02)
        return code

    def kill(self, signum: int) -> None:
        """`signum` to the run and every stage process it started."""
        try:
            os.killpg(self.pid, signum)
        except ProcessLookupError:
            pass  # already ended


@dataclass(frozen=True)
class Confinement:
    """Limits a run's process takes on before doit starts (and its stage processes inherit)."""

    # A write past this many bytes fails with EFBIG, as on a full disk (Python ignores SIGXFSZ).
    file_size_limit: int | None = None
    # A shell script run as root in a user and mount namespace of the run's own (private mounts, e.g. a small tmpfs
    # filled up), with the run's environment, as `unshare --user --map-root-user --mount sh -c SCRIPT` would.
    private_mounts: str | None = None


def start_doit(args: list[str], cwd: Path, env: dict, output: Path | None = None, merged: bool = False,
               confinement: Confinement = Confinement()) -> ForkedRun:
    """`python -m doit ARGS` in `cwd` with `env`, forked from a zygote; its output goes to files in the folder
    `output` (by default a new folder beside `cwd`), stdout and stderr in one file when `merged`, as
    `stderr=STDOUT` would."""
    output = output or Path(tempfile.mkdtemp(prefix="doit-run-", dir=Path(cwd).parent))
    stdout, stderr, exit_file = output / "stdout", output / ("stdout" if merged else "stderr"), output / "exit-code"
    request = {"args": args, "cwd": str(cwd), "env": env, "stdout": str(stdout), "stderr": str(stderr),
               "exit": str(exit_file), "confinement": asdict(confinement)}
    zygote = _zygote(env)
    zygote.stdin.write(json.dumps(request) + "\n")
    zygote.stdin.flush()
    line = zygote.stdout.readline()
    if not line:
        raise RuntimeError("the doit zygote ended")
    return ForkedRun(json.loads(line)["pid"], args, stdout, stderr, exit_file)


def run_doit(args: list[str], cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
    if env.get("PYTHONPATH") != str(REPO):  # another xportbuild than the one a zygote has imported
        return subprocess.run([sys.executable, "-m", "doit", *args], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)
    with tempfile.TemporaryDirectory() as scratch:
        run = start_doit(args, cwd, env, Path(scratch))
        code = run.wait(timeout)
        return subprocess.CompletedProcess([sys.executable, "-m", "doit", *args], code, run.stdout.read_text(),
                                           run.stderr.read_text())


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
    """The zygote: import what a build preloads, then start one `doit` run per request line on stdin.

    Each run is forked twice: a waiter, which reports the run's pid, waits for it and writes its exit code, and under
    it the run itself. The zygote goes on to the next request at once, so runs may overlap; it reaps ended waiters."""
    import doit.doit_cmd  # noqa: F401

    from xportbuild import isolation

    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever an import prints goes to stderr, not into the replies
    isolation.preload()
    for line in sys.stdin:
        _reap_waiters()
        if os.fork() == 0:
            _wait_for_run(json.loads(line), replies)


def _reap_waiters() -> None:
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass  # none left


def _wait_for_run(request: dict, replies) -> None:
    """In the waiter: fork the run, report its pid, wait for it, write its exit code, exit."""
    pid = os.fork()
    if pid == 0:
        replies.close()
        _run(request)
    print(json.dumps({"pid": pid}), file=replies, flush=True)
    _, status = os.waitpid(pid, 0)
    exit_file = Path(request["exit"])
    partial = exit_file.with_name(exit_file.name + ".partial")
    partial.write_text(f"{os.waitstatus_to_exitcode(status)}\n")
    partial.rename(exit_file)
    os._exit(0)


def _confine(confinement: Confinement) -> None:
    if confinement.private_mounts is not None:
        _enter_private_namespaces()
        subprocess.run(["sh", "-c", "mount --make-rprivate /\n" + confinement.private_mounts], check=True)
    if confinement.file_size_limit is not None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (confinement.file_size_limit,) * 2)


def _enter_private_namespaces() -> None:
    """A user namespace in which this process is root, and a mount namespace of its own (a forked child has one
    thread, as unshare(CLONE_NEWUSER) requires)."""
    import ctypes

    uid, gid = os.getuid(), os.getgid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNS) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"unshare: {os.strerror(error)}")
    Path("/proc/self/setgroups").write_text("deny")
    Path("/proc/self/uid_map").write_text(f"0 {uid} 1")
    Path("/proc/self/gid_map").write_text(f"0 {gid} 1")


def _run(request: dict) -> None:
    """In the forked child: become `python -m doit ARGS`, started from a terminal, in the request's folder and
    environment, then exit."""
    code = 1
    try:
        os.setsid()  # a process group of its own, as a shell gives a command it starts
        # Ctrl-C interrupts, as in a terminal (a zygote started in the background inherits SIGINT ignored).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        output = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        errors = output if request["stderr"] == request["stdout"] else \
            os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        for fd, source in ((0, os.open(os.devnull, os.O_RDONLY)), (1, output), (2, errors)):
            os.dup2(source, fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        _confine(Confinement(**request["confinement"]))
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
