"""Write a synthetic MoE routing trace: which experts every layer picks for every decoded token.

Routing on random weights is close to uniform, which makes every cache policy look alike; real routers are not.
This generator gives each layer a skewed, sticky routing so that expert-cache policies can be compared fairly
(tools/bench_offload.py replays it through the model's MoE layers).

The model, per layer l (independently, all from one seeded generator):

- popularity: expert ranks are a random permutation of the layer's experts; the expert of rank r (0-based) has
  weight 1 / (r + 1) ** zipf (Zipf-like; zipf 0 is uniform, zipf 1 puts about 70% of the weight on the top 17%
  of 256 experts, like the hit rates in the anchors);
- reuse: token t picks k distinct experts one at a time; each pick, with probability `reuse`, repeats an expert
  of token t-1 that is not picked yet (uniformly among them), else draws from the popularity weights among the
  experts not picked yet. Token 0 only draws.
- prediction (what a prefetcher would have guessed before the layer ran): for the first n_hash_layers layers it
  is exact (hash routing: the token decides); elsewhere each of the k true experts stays in the predicted set with
  probability `accuracy`, else is replaced by a uniformly random expert that is neither true nor predicted yet.

`--uniform` is zipf 0 and reuse 0: every token picks k distinct experts uniformly at random.

The .npz holds idx [tokens, layers, k] int32 (true picks, in pick order), pred [tokens, layers, k] int32 (the
predicted sets), popularity [layers, experts] float64 (normalised weights) and the scalars n_expert, k,
n_hash_layers, zipf, reuse, accuracy, seed.

    python tools/make_routing_trace.py trace.npz --tokens 256 --layers 6 --experts 64 --zipf 1.0 --reuse 0.3
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np


def make_trace(tokens: int, layers: int, experts: int, k: int = 6, zipf: float = 1.0, reuse: float = 0.3,
               accuracy: float = 0.8, n_hash_layers: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    """The trace as a dict of arrays (the .npz's contents); see the module docstring for the model."""
    if tokens < 1 or layers < 1 or experts < 1:
        raise ValueError(f"tokens, layers and experts must be positive, got {tokens}, {layers}, {experts}")
    if not 1 <= k <= experts:
        raise ValueError(f"k must lie in 1..experts ({experts}), got {k}")
    if zipf < 0:
        raise ValueError(f"zipf must be >= 0, got {zipf}")
    for name, p in (("reuse", reuse), ("accuracy", accuracy)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {p}")
    if n_hash_layers < 0:
        raise ValueError(f"n_hash_layers must be >= 0, got {n_hash_layers}")
    rng = np.random.default_rng(seed)
    popularity = np.empty((layers, experts))
    for layer in range(layers):
        weights = 1.0 / np.arange(1, experts + 1, dtype=np.float64) ** zipf
        popularity[layer, rng.permutation(experts)] = weights / weights.sum()
    idx = np.empty((tokens, layers, k), np.int32)
    pred = np.empty((tokens, layers, k), np.int32)
    for t in range(tokens):
        for layer in range(layers):
            idx[t, layer] = _pick(rng, popularity[layer], idx[t - 1, layer] if t else (), k, reuse)
            exact = layer < n_hash_layers
            pred[t, layer] = idx[t, layer] if exact else _guess(rng, idx[t, layer], experts, accuracy)
    scalars = {"n_expert": experts, "k": k, "n_hash_layers": n_hash_layers, "zipf": zipf, "reuse": reuse,
               "accuracy": accuracy, "seed": seed}
    return {"idx": idx, "pred": pred, "popularity": popularity, **{n: np.array(v) for n, v in scalars.items()}}


def _pick(rng: np.random.Generator, popularity: np.ndarray, previous, k: int, reuse: float) -> list[int]:
    picked: list[int] = []
    for _ in range(k):
        again = [int(e) for e in previous if e not in picked]
        if again and rng.random() < reuse:
            picked.append(again[rng.integers(len(again))])
            continue
        p = popularity.copy()
        p[picked] = 0.0
        picked.append(int(rng.choice(p.size, p=p / p.sum())))
    return picked


def _guess(rng: np.random.Generator, true: np.ndarray, experts: int, accuracy: float) -> list[int]:
    kept = [int(e) for e in true if rng.random() < accuracy]
    guess = list(kept)
    while len(guess) < len(true):
        others = np.setdiff1d(np.arange(experts), np.concatenate([true, guess]).astype(np.int64))
        if others.size == 0:  # k == experts: nothing is wrong to guess
            return [int(e) for e in true]
        guess.append(int(others[rng.integers(others.size)]))
    return guess


def load_trace(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A trace written by this tool, checked for the arrays the benchmark replays."""
    with np.load(path) as z:
        trace = {name: z[name] for name in z.files}
    for name in ("idx", "pred", "n_expert", "k"):
        if name not in trace:
            raise ValueError(f"{path}: not a routing trace (no {name!r} array)")
    if trace["idx"].ndim != 3 or trace["idx"].shape != trace["pred"].shape:
        raise ValueError(f"{path}: idx and pred must both be [tokens, layers, k], got {trace['idx'].shape} and "
                         f"{trace['pred'].shape}")
    return trace


def save_trace(path: str | os.PathLike, trace: dict[str, np.ndarray]) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.npz")
    np.savez_compressed(tmp, **trace)
    os.replace(tmp, path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="output .npz")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--k", type=int, default=6, help="experts per token and layer")
    ap.add_argument("--zipf", type=float, default=1.0, help="popularity exponent (0: uniform)")
    ap.add_argument("--reuse", type=float, default=0.3, help="probability that a pick repeats one of token t-1's")
    ap.add_argument("--accuracy", type=float, default=0.8, help="probability that a predicted expert is right")
    ap.add_argument("--hash-layers", type=int, default=3, help="leading layers whose prediction is exact")
    ap.add_argument("--uniform", action="store_true", help="zipf 0 and reuse 0")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    zipf, reuse = (0.0, 0.0) if args.uniform else (args.zipf, args.reuse)
    try:
        trace = make_trace(args.tokens, args.layers, args.experts, args.k, zipf, reuse, args.accuracy,
                           args.hash_layers, args.seed)
    except ValueError as exc:
        ap.error(str(exc))
    save_trace(args.out, trace)
    print(f"wrote {args.out}: {args.tokens} tokens x {args.layers} layers x {args.k} of {args.experts} experts "
          f"(zipf {zipf}, reuse {reuse}, accuracy {args.accuracy}, hash layers {args.hash_layers})")


if __name__ == "__main__":
    main()
