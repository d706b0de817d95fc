"""The remote cache on real S3 servers started here on 127.0.0.1 (moto's server; rclone's `serve s3` over a folder,
which keeps its objects across a restart): two clones that share only a bucket, an object tampered with in the
bucket, and a server killed in the middle of the pushes."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from xportbuild.keys import SCHEMA
from tests.conftest import DODO, REPO, Project
from tests.forked_doit import start_doit
from tests.integration.models import local, model_toml

TARGET = "tiny-llama-xnnpack-fp32"
BUCKET = "xportbuild-ci"
KEYS = {"AWS_ACCESS_KEY_ID": "AKIDXPORTBUILDTEST", "AWS_SECRET_ACCESS_KEY": "SECRETXPORTBUILDTEST",
        "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass
class S3Server:
    command: list[str]
    port: int
    process: subprocess.Popen | None = None

    @property
    def env(self) -> dict:
        return {**KEYS, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}"}

    def start(self) -> "S3Server":
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.1)
        raise AssertionError(f"{self.command[0]} did not listen on {self.port}")

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    def client(self):
        import s3fs

        return s3fs.S3FileSystem(key=KEYS["AWS_ACCESS_KEY_ID"], secret=KEYS["AWS_SECRET_ACCESS_KEY"],
                                 endpoint_url=self.env["AWS_ENDPOINT_URL"], skip_instance_cache=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tool(name: str) -> str:
    """A command the test extras installed into this environment's scripts folder."""
    return str(Path(sysconfig.get_path("scripts")) / name) if (Path(sysconfig.get_path("scripts")) / name).exists() \
        else shutil.which(name)


@pytest.fixture
def moto():
    port = _free_port()
    server = S3Server([_tool("moto_server"), "-H", "127.0.0.1", "-p", str(port)], port).start()
    server.client().mkdir(BUCKET)
    yield server
    server.kill()


@pytest.fixture
def rclone(tmp_path):
    (tmp_path / "served" / BUCKET).mkdir(parents=True)
    port = _free_port()
    key = f"{KEYS['AWS_ACCESS_KEY_ID']},{KEYS['AWS_SECRET_ACCESS_KEY']}"
    server = S3Server([_tool("rclone"), "serve", "s3", "--addr", f"127.0.0.1:{port}", "--auth-key", key,
                       str(tmp_path / "served")], port).start()
    yield server, tmp_path / "served" / BUCKET
    if server.process.poll() is None:
        server.kill()


def _clone(tmp_path: Path, weights: Path, name: str, server: S3Server) -> Project:
    """A repo of its own with an empty cache of its own; the bucket is all it shares with the others."""
    root = tmp_path / name
    (root / "recipes" / "models").mkdir(parents=True)
    shutil.copytree(REPO / "recipes" / "recipes", root / "recipes" / "recipes")
    (root / "dodo.py").write_text(DODO)
    env = {**os.environ, **server.env, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
           "XPORTBUILD_CACHE": str(tmp_path / f"{name}-cache"), "XPORTBUILD_REMOTE_CACHE": f"s3://{BUCKET}/cache",
           "XPORTBUILD_REMOTE_KEY": "ci-secret"}
    project = Project(root, env)
    project.write_model("tiny-llama", model_toml(local(weights / "tiny-llama"), ["xnnpack-fp32"]))
    return project


def _published(project: Project) -> dict[str, bytes]:
    folder = project.root / "artifacts" / TARGET
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.suffix in (".pte", ".ptd")}


def _lowered_object(project: Project) -> str:
    """The bucket key of the lowered .pte, from the lower stage's entry."""
    entry = project.entry(f"lower:{TARGET}")
    return f"{BUCKET}/cache/{entry.path.relative_to(Path(project.env['XPORTBUILD_CACHE']))}/model.pte"


def test_clones_sharing_a_bucket_build_once_and_a_tampered_object_is_rebuilt_and_repaired(moto, tmp_path, weights):
    first = _clone(tmp_path, weights, "first", moto)
    first.doit(f"export:{TARGET}")
    assert f"lower:{TARGET}" in first.built_since(0)

    second = _clone(tmp_path, weights, "second", moto)
    result = second.doit(f"export:{TARGET}")
    assert second.built_since(0) == [], result.stderr[-3000:]  # no stage function ran: every entry was pulled
    assert "pulled" in result.stderr
    assert _published(second) == _published(first)

    bucket = moto.client()
    lowered = _lowered_object(first)
    intact = bucket.cat_file(lowered)
    damaged = bytearray(intact)
    damaged[len(damaged) // 2] ^= 0xFF  # same size: only the content hash can tell
    bucket.pipe_file(lowered, bytes(damaged))

    third = _clone(tmp_path, weights, "third", moto)
    result = third.doit(f"export:{TARGET}")
    assert "rejected" in result.stderr and "does not match its content hash" in result.stderr, result.stderr[-3000:]
    assert third.built_since(0) == [f"lower:{TARGET}"]  # the stage whose object was damaged, nothing else
    assert _published(third) == _published(first)
    assert moto.client().cat_file(lowered) == intact  # the push replaced the damaged object

    fourth = _clone(tmp_path, weights, "fourth", moto)
    fourth.doit(f"export:{TARGET}")
    assert fourth.built_since(0) == []


def _records(folder: Path) -> set[str]:
    return {path.parent.name for path in folder.glob(f"cache/{SCHEMA}/xxh3_128/*/*/entry.json")}


def test_a_server_killed_mid_push_warns_once_and_a_later_build_completes_the_push(rclone, tmp_path, weights):
    server, bucket_folder = rclone
    project = _clone(tmp_path, weights, "killed", server)
    run = start_doit([f"export:{TARGET}"], project.root, project.env, merged=True)
    deadline = time.monotonic() + 600
    while not _records(bucket_folder) and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    server.kill()  # after the first entry landed, before the others
    assert run.wait(timeout=900) == 0, run.stdout.read_text()[-3000:]
    output = run.stdout.read_text()
    warnings = [line for line in output.splitlines() if line.startswith("WARNING") and "remote cache" in line]
    assert len(warnings) == 1, output[-3000:]  # one warning, however many pushes failed
    # whichever came first after the kill, a read of the next stage's entry or a push
    assert "could not " in warnings[0] and "a later build pushes what is missing" in warnings[0]
    assert (project.root / "artifacts" / TARGET / "model.pte").is_file()
    pushed_before = _records(bucket_folder)
    built = {event["key"] for event in project.events() if event["event"] == "built"}
    assert pushed_before < built

    server.start()  # the same folder: what landed before the kill is still there
    project.doit(f"export:{TARGET}")  # nothing to build; the pushes the killed server missed are made now
    assert _records(bucket_folder) == built
    fresh = _clone(tmp_path, weights, "fresh", server)
    fresh.doit(f"export:{TARGET}")
    assert fresh.built_since(0) == []
    assert _published(fresh) == _published(project)
