"""Crash safety, observed: kill -9 `doit` at random moments in every stage, many times, and check that no
partial output is ever taken as built and every stage finished before a kill is reused. Ctrl-C likewise."""

from __future__ import annotations

import json
import random
import shutil
import signal
import threading
import time
from collections import Counter
from pathlib import Path

from xportbuild.keys import SCHEMA
from xportbuild.cache import ENTRY_FILE, Store
from xportbuild.keys import hash_file
from xportbuild.pipeline import STAGES

from tests.forked_doit import start_doit
from tests.integration.models import local, model_toml

TARGETS = ("tiny-gguf-xnnpack-fp32", "tiny-gguf-xnnpack-8da8w-shared")
MIN_KILLS = 12  # a round kills once inside every stage of both targets (12 stages); a round that missed one repeats
ALL_STAGES = {stage.name for stage in STAGES if stage.name != "sensitivity"} | {"publish"}  # what export runs


class WatchedBuild:
    """A `doit` run (its own process group, as from a terminal: tests/forked_doit.py) whose log is followed line by
    line, to kill it while a chosen stage runs."""

    def __init__(self, project, args: list[str]):
        self.run = start_doit(args, project.root, project.env, merged=True)
        self.running: str | None = None  # the stage task currently between "building" and "built"
        self.started: list[str] = []
        self.seconds: dict[str, float] = {}  # each stage this build finished: its own "built in" time
        self.lines: list[str] = []
        self._new_stage = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def returncode(self) -> int | None:
        return self.run.poll()

    def _read(self) -> None:
        while not self.run.stdout.exists():
            time.sleep(0.01)
        with self.run.stdout.open() as log:
            while True:
                ended = self.run.poll() is not None  # read before the line: a run that ended has written it all
                line = log.readline()
                if line:
                    self._take(line)
                elif ended:
                    return
                else:
                    time.sleep(0.01)

    def _take(self, line: str) -> None:
        self.lines.append(line)
        words = line.split()  # a stage's own lines: "<task>: building …", "<task>: built in <s> s, …"
        if len(words) >= 2 and words[0].endswith(":") and words[1] in ("building", "publishing"):
            with self._new_stage:
                self.running = words[0].rstrip(":")
                self.started.append(self.running)
                self._new_stage.notify_all()
        elif len(words) >= 4 and words[0].endswith(":") and words[1:3] == ["built", "in"]:
            self.seconds[words[0].rstrip(":")] = float(words[3])
            self.running = None
        elif words[:1] == ["published"]:
            self.running = None

    def wait_for_stage(self, skip: set[str], only: set[str] | None = None, timeout: float = 300) -> str | None:
        """The first stage that starts, is not in `skip` and is of a kind in `only`; None if the build ends first."""
        deadline = time.monotonic() + timeout
        with self._new_stage:
            while time.monotonic() < deadline:
                fresh = [task for task in self.started
                         if task not in skip and (only is None or _stage_of(task) in only)]
                if fresh:
                    return fresh[0]
                if self.run.poll() is not None:
                    return None
                self._new_stage.wait(0.05)
        raise AssertionError("no stage started in time:\n" + "".join(self.lines[-30:]))

    def finish(self) -> int:
        code = self.run.wait(timeout=1200)
        self._reader.join(timeout=10)
        return code

    def signal(self, signum: int) -> str | None:
        """Send `signum` to the whole process group; returns the stage that was running."""
        running = self.running
        self.run.kill(signum)
        self.run.wait(timeout=120)
        self._reader.join(timeout=10)
        return running


def _stage_of(task: str) -> str:
    return task.split(":")[0] if not task.startswith("export:") else "publish"


def _check_cache(cache: Path) -> tuple[int, int]:
    """(intact entries, corrupt entries) after a kill; entries are re-hashed from scratch, no stat cache."""
    intact = corrupt = 0
    for record_file in cache.glob(f"{SCHEMA}/xxh3_128/*/*/{ENTRY_FILE}"):
        record = json.loads(record_file.read_text())
        files_ok = all(hash_file(record_file.parent / name) == f["digest"] for name, f in record["files"].items())
        if files_ok and Store(cache).lookup(record["key"]) is not None:
            intact += 1
        else:
            corrupt += 1
    for folder in cache.glob(f"{SCHEMA}/xxh3_128/*/*"):
        if not (folder / ENTRY_FILE).is_file():
            corrupt += 1  # an entry folder without its record would be a half-committed entry
    return intact, corrupt


def _check_published(artifacts: Path) -> int:
    """Published folders that are incomplete or do not match their manifest (must be 0)."""
    broken = 0
    for folder in artifacts.glob("*"):
        if folder.name.startswith("."):
            continue  # staging folders: never read as published
        try:
            manifest = json.loads((folder / "manifest.json").read_text())
            broken += any(hash_file(folder / name) != digest for name, digest in manifest["files"].items())
        except (OSError, ValueError, KeyError):
            broken += 1
    return broken


def test_kill_9_in_every_stage_never_corrupts_and_reuses_finished_work(project, weights, tmp_path):
    # A GGUF source, so that fetch does real work (conversion) and can be killed midway too.
    gguf = f'kind = "gguf"\npath = "{weights / "tiny-llama.gguf"}"'
    # Enough prompts that the reference stage does real work (it is otherwise done in a blink, once warm).
    prompts = ("the capital of france is", "hello world", "water boils at", "one two three four")
    project.write_model("tiny-gguf", model_toml(gguf, ["xnnpack-fp32", "xnnpack-8da8w-shared"], prompts=prompts,
                                                max_new_tokens=12, max_seq_len=64))
    exports = [f"export:{t}" for t in TARGETS]
    # Calibration: how long each stage takes here. On a loaded machine a stage can take half as long later as it did
    # here, and a kill aimed inside it then lands after it; so each stage keeps the shortest time any build saw.
    calibration = WatchedBuild(project, exports)
    assert calibration.finish() == 0, "".join(calibration.lines[-40:])
    shortest = {}
    for target in TARGETS:  # stages another test already built are cache hits here: their manifest has their time
        manifest = json.loads((project.root / "artifacts" / target / "manifest.json").read_text())
        shortest.update({record["task"]: record["seconds"] for record in manifest["stages"].values()})
    shortest.update(calibration.seconds)
    rng = random.Random(20261128)
    kills, corruptions, broken_artifacts, rebuilt_twice = Counter(), 0, 0, []
    round_index = 0
    while sum(kills.values()) < MIN_KILLS or not ALL_STAGES <= set(kills):
        assert round_index < 3, f"kills never covered every stage: {kills}"
        round_index += 1
        project.env["XPORTBUILD_CACHE"] = str(tmp_path / f"cache-{round_index}")
        # Builds are reproducible, so a fresh cache rebuilds the same keys the published artifacts name: remove
        # them too, or publishing is up to date and never runs (nor is killed).
        shutil.rmtree(project.root / "artifacts", ignore_errors=True)
        events_before = len(project.events())
        killed_in: set[str] = set()
        while True:
            build = WatchedBuild(project, exports)
            # Once there are enough kills, later rounds aim only at stages no kill has landed in yet.
            enough = sum(kills.values()) >= MIN_KILLS
            stage = build.wait_for_stage(skip=killed_in, only=ALL_STAGES - set(kills) if enough else None)
            if stage is None:
                assert build.returncode == 0, "".join(build.lines[-40:])
                break
            killed_in.add(stage)
            # A delay within the stage's shortest calibrated time lands inside it; publishing takes milliseconds, so
            # it is hit right after it starts.
            time.sleep(rng.uniform(0.0, 0.8 * shortest[stage]) if stage in shortest else rng.uniform(0.0, 0.02))
            running = build.signal(signal.SIGKILL)
            for task, seconds in build.seconds.items():
                shortest[task] = min(seconds, shortest.get(task, seconds))
            kills[_stage_of(running) if running else "between stages"] += 1
            intact, corrupt = _check_cache(Path(project.env["XPORTBUILD_CACHE"]))
            corruptions += corrupt
            broken_artifacts += _check_published(project.root / "artifacts")
        built = Counter(e["task"] for e in project.events()[events_before:] if e["event"] == "built")
        rebuilt_twice += [task for task, count in built.items() if count > 1]
        assert project.doit(*exports).stdout.count("-- ") >= len(exports)  # all up to date afterwards
    summary = {"kills": sum(kills.values()), "by_stage": dict(kills), "corruptions": corruptions,
               "broken_artifacts": broken_artifacts, "stages_rebuilt_after_finishing": rebuilt_twice}
    print("crash summary:", json.dumps(summary))
    (project.root / "crash-summary.json").write_text(json.dumps(summary))
    assert corruptions == 0 and broken_artifacts == 0
    assert not rebuilt_twice, f"finished stages were rebuilt: {rebuilt_twice}"


def test_ctrl_c_names_the_interrupted_stage_and_keeps_finished_ones(project, weights, tmp_path):
    project.write_model("tiny-llama", model_toml(local(weights / "tiny-llama"), ["xnnpack-fp32"]))
    project.env["XPORTBUILD_CACHE"] = str(tmp_path / "cache")
    build = WatchedBuild(project, ["export:tiny-llama-xnnpack-fp32"])
    stage = build.wait_for_stage(skip={"fetch:tiny-llama", "reference:tiny-llama", "program:tiny-llama",
                                       "replay:tiny-llama-xnnpack-fp32"})
    assert stage == "lower:tiny-llama-xnnpack-fp32"
    time.sleep(1.0)
    build.signal(signal.SIGINT)
    output = "".join(build.lines)
    assert build.returncode != 0
    assert "lower:tiny-llama-xnnpack-fp32: interrupted; nothing of it was cached, finished stages are kept" in output
    events_before = len(project.events())
    project.doit("export:tiny-llama-xnnpack-fp32")
    assert project.built_since(events_before) == ["lower:tiny-llama-xnnpack-fp32", "verify:tiny-llama-xnnpack-fp32"]
