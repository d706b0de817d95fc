"""Benchmark: quantization schemes for one model, side by side (size, agreement with float, decode speed).

    python tests/bench/schemes.py [--model gemma3] [--cache DIR] [scheme ...]

Builds `<model>-<scheme>` for each candidate below in a scratch project that shares the cache folder (default:
this repo's .xportbuild/cache), then prints one row per scheme from the published manifests, with size and
decode speed as ratios to the --base scheme (default "plain": the peers' scheme, linears and head 8da4w,
embeddings 8w). Decode speed is measured twice: by verify's Python loop and by ExecuTorch's C++ LLM runner.
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
TOLERANT = "[verify]\nmin_cosine = 0.0\nmin_top1 = 0.0\nmax_abs = 1000.0\nmin_cosine_vs_program = 0.5\n" \
           "max_abs_vs_program = 100.0\ngreedy_tie_margin = 100.0\n"
SCHEMES = {
    "plain": 'linear = "8da4w"\nlinear_group_size = 32\nembedding = "8w"\nqparams = "hqq"',
    # the previous default
    "lin8-head4-emb4-hqq": 'linear = "8da8w"\nlinear_group_size = 0\nhead = "8da4w"\nhead_group_size = 32\n'
                           'embedding = "4w"\nembedding_group_size = 32\nqparams = "hqq"',
    "lin8-head4-emb4": 'linear = "8da8w"\nlinear_group_size = 0\nhead = "8da4w"\nhead_group_size = 32\n'
                       'embedding = "4w"\nembedding_group_size = 32',
    "lin4-head8-emb4": 'linear = "8da4w"\nlinear_group_size = 32\nhead = "8da8w"\nembedding = "4w"\n'
                       'embedding_group_size = 32',
    "all8": 'linear = "8da8w"\nlinear_group_size = 0\nembedding = "8w"',
    # recipes/recipes/xnnpack-8da8w-shared-plain-ops.toml
    "all8-shared": 'linear = "8da8w"\nlinear_group_size = 0\nembedding = "8w"\ntied_table = "shared"',
}
# the shipped default: all8-shared with ExecuTorch's custom SDPA and KV-cache ops
SCHEMES["all8-shared-custom-ops"] = SCHEMES["all8-shared"] + "\n[export]\ncustom_sdpa = true\ncustom_kv_cache = true"


def _project(model: str, schemes: list[str]) -> Path:
    root = Path(tempfile.mkdtemp(prefix="xportbuild-schemes-"))
    shutil.copytree(REPO / "recipes", root / "recipes")
    shutil.copy(REPO / "dodo.py", root / "dodo.py")
    for name in schemes:
        (root / "recipes" / "recipes" / f"{name}.toml").write_text(
            f'doc = "{name}"\nbackend = "xnnpack"\n[quantize]\n{SCHEMES[name]}\n{TOLERANT}')
    model_file = root / "recipes" / "models" / f"{model}.toml"
    text = model_file.read_text()
    start = text.index("recipes = [")
    end = text.index("]", start) + 1
    model_file.write_text(text[:start] + "recipes = [" + ", ".join(f'"{s}"' for s in schemes) + "]" + text[end:])
    return root


def _row(root: Path, target: str) -> dict:
    manifest = json.loads((root / "artifacts" / target / "manifest.json").read_text())
    verify = manifest["stages"]["verify"]["result"]
    pte = verify["quality_by_stage"][".pte"]
    return {"mib": manifest["stages"]["lower"]["result"]["artifact_bytes"] / 2**20, "top1": pte["top1"],
            "cosine": pte["cosine_mean"], "kl": pte["kl_mean"], "tok_s": verify["generate_tokens_per_s"],
            "eager_top1": verify["quality_by_stage"]["quantized eager"]["top1"],
            "runner_tok_s": verify["runner"].get("decode_tokens_per_s") or 0.0,
            "first_token_ms": 1000 * (verify["runner"].get("first_token_s") or 0.0)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("schemes", nargs="*", default=list(SCHEMES))
    parser.add_argument("--model", default="gemma3")
    parser.add_argument("--cache", default=str(REPO / ".xportbuild" / "cache"))
    parser.add_argument("--base", default="plain", help="the scheme ratios are relative to")
    args = parser.parse_args()
    schemes = [args.base, *[s for s in args.schemes if s != args.base]]
    root = _project(args.model, schemes)
    env = {**os.environ, "XPORTBUILD_CACHE": args.cache, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    rows = {}
    for scheme in schemes:
        target = f"{args.model}-{scheme}"
        result = subprocess.run([sys.executable, "-m", "doit", f"export:{target}"], cwd=root, env=env)
        if result.returncode != 0:
            sys.exit(f"export:{target} failed")
        rows[scheme] = _row(root, target)
    base = rows[args.base]
    print(f"| scheme | .pte + .ptd MiB | size vs {args.base} | top-1 vs float (.pte) | top-1 (quantized eager) | "
          f"mean cosine | mean KL | decode tok/s (Python loop) | speed vs {args.base} | decode tok/s (C++ runner) | "
          f"runner speed vs {args.base} | first token ms (runner) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for scheme, r in rows.items():
        print(f"| {scheme} | {r['mib']:.1f} | {r['mib'] / base['mib']:.3f} | {r['top1']:.3f} | {r['eager_top1']:.3f} | "
              f"{r['cosine']:.4f} | {r['kl']:.4f} | {r['tok_s']:.1f} | {r['tok_s'] / base['tok_s']:.3f} | "
              f"{r['runner_tok_s']:.1f} | {r['runner_tok_s'] / base['runner_tok_s']:.3f} | {r['first_token_ms']:.0f} |")

if __name__ == "__main__":
    main()
