"""Paired KL-divergence comparison of quantized files against one base, token by token.

    python tools/paired_kld.py BASE.gguf TEXT A.gguf B.gguf [C.gguf ...] [--chunks N] [-c 512]

Each file's per-token KL divergence from the base (flashlite.quality's chunks and scoring, as `flashlite
perplexity --kl-base`), then for each file after the first its paired difference from the first: the mean of
KLD(file) - KLD(first) over the same tokens with its standard error (sd / sqrt(n)), and the same for top-1
agreement. The absolute figures' ± hides a small gain that the paired difference shows, since both files err on the
same hard tokens. The base's logits are computed once.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flashlite import quality  # noqa: E402
from flashlite.model import load  # noqa: E402


def token_scores(model, chunks, base) -> dict[str, np.ndarray]:
    scores = quality.TokenScores()
    first = chunks[0].size // 2
    for chunk, base_logits in zip(chunks, base):
        scores.add(quality.scored_logits(model, chunk), chunk[first + 1:], base_logits)
    return scores.arrays()


def mean_se(v: np.ndarray) -> tuple[float, float]:
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(v.size))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base")
    ap.add_argument("text")
    ap.add_argument("models", nargs="+")
    ap.add_argument("--chunks", type=int, default=None)
    ap.add_argument("-c", "--ctx", type=int, default=quality.DEFAULT_CTX)
    args = ap.parse_args()
    t0 = time.perf_counter()
    base_model = load(args.base)
    ids = quality.text_tokens(base_model, quality.read_text(args.text))
    bos = base_model.tokenizer.bos_id if quality.add_bos(base_model) else None
    chunks = quality.make_chunks(ids, args.ctx, args.chunks, bos)
    base = quality.base_logits(base_model, chunks)
    del base_model
    print(f"base: {len(chunks)} chunks of {args.ctx} in {time.perf_counter() - t0:.0f} s", flush=True)
    first = None
    for path in args.models:
        t0 = time.perf_counter()
        a = token_scores(load(path), chunks, base)
        kld, top = a["kld"], a["same_top"].astype(np.float64)
        line = (f"{Path(path).name}: mean KLD {kld.mean():.5f} ± {mean_se(kld)[1]:.5f}, top-1 {100 * top.mean():.2f}%"
                f" ({kld.size} tokens, {time.perf_counter() - t0:.0f} s)")
        if first is None:
            first = (Path(path).name, kld, top)
        else:
            dk, sk = mean_se(kld - first[1])
            dt, st = mean_se(top - first[2])
            line += (f"; paired against {first[0]}: KLD {dk:+.5f} ± {sk:.5f} ({100 * dk / first[1].mean():+.2f}%), "
                     f"top-1 {100 * dt:+.2f} ± {100 * st:.2f} points, lower KLD on "
                     f"{100 * float((kld < first[1]).mean()):.1f}% of tokens")
        print(line, flush=True)


if __name__ == "__main__":
    main()
