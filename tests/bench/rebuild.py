"""Benchmark: cold build, no-op rebuild and lowering-only rebuild of one target, with the stages that ran.

    python tests/bench/rebuild.py gemma3-xnnpack-8da4w [--cache DIR]

Builds in a scratch copy of this repo's recipes/ (so the lowering edit never touches the repo), sharing the
cache folder (default: this repo's .xportbuild/cache, so a warm cache makes the "cold" build a cache hit:
pass an empty --cache for a truly cold build). Prints wall times, ratios, peak RSS and .pte size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DODO = (REPO / "dodo.py").read_text()


def _doit(root: Path, env: dict, *args: str) -> float:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "doit", *args], cwd=root, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"doit {' '.join(args)} failed:\n{result.stdout}\n{result.stderr[-4000:]}")
    return time.perf_counter() - started


def _built(root: Path, since: int) -> list[str]:
    lines = (root / ".xportbuild" / "events.jsonl").read_text().splitlines()
    return [json.loads(line)["task"] for line in lines[since:] if json.loads(line)["event"] == "built"]


def _event_count(root: Path) -> int:
    path = root / ".xportbuild" / "events.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("target")
    parser.add_argument("--cache", default=str(REPO / ".xportbuild" / "cache"))
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="xportbuild-bench-"))
    shutil.copytree(REPO / "recipes", root / "recipes")
    (root / "dodo.py").write_text(DODO)
    env = {**os.environ, "XPORTBUILD_CACHE": str(Path(args.cache).resolve()), "PYTHONPATH": str(REPO)}
    task = f"export:{args.target}"

    first = _doit(root, env, task)
    first_built = _built(root, 0)
    mark = _event_count(root)
    noop = _doit(root, env, task)
    noop_built = _built(root, mark)

    recipe_name = json.loads((root / "artifacts" / args.target / "manifest.json").read_text())["recipe"]
    recipe = root / "recipes" / "recipes" / f"{recipe_name}.toml"
    text = recipe.read_text()
    edited = (text.replace("extract_delegate_segments = true", "extract_delegate_segments = false")
              if "extract_delegate_segments = true" in text else text + "\n[lower]\nextract_delegate_segments = false\n")
    recipe.write_text(edited)
    mark = _event_count(root)
    lowering = _doit(root, env, task)
    lowering_built = _built(root, mark)

    manifest = json.loads((root / "artifacts" / args.target / "manifest.json").read_text())
    peak = max(s["peak_rss_mb"] or 0 for s in manifest["stages"].values())
    print(f"target {args.target}  (scratch project {root})")
    print(f"first build     {first:8.1f} s  stages built: {first_built or 'none (cache hit)'}")
    print(f"no-op rebuild   {noop:8.1f} s  stages built: {noop_built or 'none'}  ratio {noop / first:.4f}")
    print(f"lowering change {lowering:8.1f} s  stages built: {lowering_built}  ratio {lowering / first:.3f}")
    print(f"peak RSS of any stage {peak:.0f} MB; .pte {manifest['stages']['lower']['result']['pte_bytes'] / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
