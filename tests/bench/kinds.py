"""Build every task kind on its tiny test architectures and print methods, sizes and verification numbers.

    python tests/bench/kinds.py [--recipes xnnpack-fp32 xnnpack-8da8w] [--all] [--workdir DIR]

The architectures of tests/integration/test_model_kinds.py, built offline from configs: as the test does (the first
with the first recipe, the second with the second), or with --all every architecture with every recipe.
Random tiny weights: the numbers show that each kind's chain runs and agrees, not how a trained model quantizes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def main() -> None:
    from tests import tiny
    from tests.integration.test_model_kinds import KINDS, kind_model_toml

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=["xnnpack-fp32", "xnnpack-8da8w"])
    parser.add_argument("--all", action="store_true", help="every architecture with every recipe")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="xportbuild-kinds-"))
    (root / "recipes" / "models").mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO / "recipes" / "recipes", root / "recipes" / "recipes", dirs_exist_ok=True)
    (root / "dodo.py").write_text((REPO / "dodo.py").read_text())
    targets = []
    for task, (builder, *archs) in KINDS.items():
        for index, arch in enumerate(archs):
            folder = root / "weights" / arch
            if not folder.exists():
                getattr(tiny, builder)(folder, arch)
            recipes = args.recipes if args.all else [args.recipes[min(index, len(args.recipes) - 1)]]
            (root / "recipes" / "models" / f"tiny-{arch}.toml").write_text(kind_model_toml(task, folder, recipes))
            targets += [(task, f"tiny-{arch}-{recipe}") for recipe in recipes]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "XPORTBUILD_CACHE": str(root / "cache")}
    subprocess.run([sys.executable, "-m", "doit", "--continue", *(f"export:{t}" for _, t in targets)], cwd=root,
                   env=env, check=False)
    print("| task | target | methods | .pte KiB | per method: cosine vs float (top-1) | outcome = program | "
          "= float |\n|---|---|---|---|---|---|---|")
    for task, target in targets:
        print(_row(root, task, target))


def _row(root: Path, task: str, target: str) -> str:
    path = root / "artifacts" / target / "manifest.json"
    if not path.is_file():
        return f"| {task} | {target} | not published (see the build log) | | | | |"
    stages = json.loads(path.read_text())["stages"]
    verify, lower = stages["verify"]["result"], stages["lower"]["result"]
    methods = ", ".join(verify["methods"])
    per_method = "; ".join(
        f"{method} {n['vs_reference']['cosine_mean']:.4f}"
        + (f" ({n['vs_reference']['top1']:.2f})" if "top1" in n["vs_reference"] else "")
        for method, n in verify["methods"].items())
    outcomes = verify["greedy"]
    same_program = sum(o["pte"] == o["program"] for o in outcomes)
    same_float = sum(o["pte"] == o["reference"] for o in outcomes)
    return (f"| {task} | {target} | {methods} | {lower['pte_bytes'] / 1024:.0f} | {per_method} | "
            f"{same_program}/{len(outcomes)} | {same_float}/{len(outcomes)} |")


if __name__ == "__main__":
    main()
