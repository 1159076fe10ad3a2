"""The expert prefetch of docs/offload.md on real routing: the trained default model (tests/fixtures/small_v4, 6 layers
of 8 routed experts, top-2, the first 2 layers hash-routed) on real text.

    python tools/routing_small.py [--work DIR] [--tokens 2048] [--decode 192] [--json OUT]

1. Predictability: the text is run in chunks of 512 tokens (each a fresh sequence) with every layer's hidden state
   kept; per token and score-routed layer, the experts the runtime's prefetch predicts (this layer's norm and router
   applied to the previous layer's MoE input, as Block.prefetch_experts does) against the experts the router picks.
   Reported per layer: recall (the share of the picked experts that were predicted; the prefetch's hit rate when
   everything predicted is read in time), the share of tokens whose whole set was predicted, and three baselines:
   a random guess (k / n), the token before's experts in the same layer, and the layer's k most used experts (counted
   on the other text).
2. Offload at the budgets of docs/offload.md's measurements, as shares of the experts: 16 of 64 slots per layer
   (a quarter) and 32 of 64 (a half) are 2 and 4 of 8 here. tools/bench_offload.py's configuration runner decodes
   --decode tokens of the text one forward call each (after 8 warm-up tokens) with the expert cache under each
   budget, lru and lfu, prefetch off and on, the expert tensors dropped from the page cache before each load;
   read bytes per token against what the policy makes necessary (its Python model without prefetch), hit rate,
   prefetch precision and stall.

Texts: the held-out text (tests/fixtures/small_v4/heldout.txt, documentation the model never saw) and the
training-like calibration text of tools/quality_table.py (in --work, made there if missing).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tools")]

from flashlite import quality  # noqa: E402
from flashlite.model import load  # noqa: E402
from flashlite.models.deepseek_v4 import rms_norm  # noqa: E402

CHUNK = 512


def routes(model, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(picked [T, layers, k], predicted [T, layers, k]) for every token of ids, run in fresh chunks of CHUNK; the
    prediction of a hash layer is its tid2eid row (exact), of layer 0 from the embedding, of any other layer from
    the layer before's MoE input."""
    net, a = model.net, model.args
    k = a.n_activated_experts
    picked, predicted = [], []
    for s in range(0, ids.size, CHUNK):
        chunk = ids[s:s + CHUNK]
        dump = {}
        model.reset()
        model.forward(chunk, dump=dump, logits="none")
        ys = []
        for i, block in enumerate(net.layers):
            x, _, _ = block.ffn_hc(dump[f"blk.{i}.attn"])
            ys.append(rms_norm(x, None, a.norm_eps))
        e = net.embed_tokens(chunk)
        p_rows, q_rows = np.empty((chunk.size, a.n_layers, k), np.int64), np.empty((chunk.size, a.n_layers, k),
                                                                                  np.int64)
        for i, block in enumerate(net.layers):
            gate = block.ffn.gate
            if gate.tid2eid is not None:
                p_rows[:, i] = q_rows[:, i] = gate.tid2eid[chunk]
                continue
            p_rows[:, i] = gate(block.ffn_norm * ys[i], chunk)[1]
            before = rms_norm(e, None, a.norm_eps) if i == 0 else ys[i - 1]
            q_rows[:, i] = gate(block.ffn_norm * before, chunk)[1]
        picked.append(p_rows)
        predicted.append(q_rows)
    return np.concatenate(picked), np.concatenate(predicted)


def overlap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a_t & b_t| per row of two [T, k] sets."""
    return (a[:, :, None] == b[:, None, :]).any(axis=2).sum(axis=1)


def predictability(picked: np.ndarray, predicted: np.ndarray, popular: np.ndarray, n_expert: int,
                   hash_layers: int) -> list[dict]:
    t, n_layers, k = picked.shape
    rows = []
    for i in range(n_layers):
        p, q = picked[:, i], predicted[:, i]
        prev = overlap(p[1:], p[:-1])
        top = overlap(p, np.broadcast_to(popular[i], p.shape))
        rows.append({"layer": i, "hash": i < hash_layers, "recall": float(overlap(p, q).mean() / k),
                     "all": float((overlap(p, q) == k).mean()), "random": k / n_expert,
                     "previous_token": float(prev.mean() / k), "most_used": float(top.mean() / k)})
    return rows


def most_used(picked: np.ndarray, n_expert: int) -> np.ndarray:
    """[layers, k]: each layer's k most picked experts."""
    k = picked.shape[2]
    counts = np.stack([np.bincount(picked[:, i].ravel(), minlength=n_expert) for i in range(picked.shape[1])])
    return np.argsort(-counts, axis=1, kind="stable")[:, :k]


def offload(path: Path, ids: np.ndarray, decode: int, log) -> list[dict]:
    import bench_offload as bo

    layout = bo.ExpertLayout(path)
    opts = argparse.Namespace(warmup=8, tokens=decode, threads=None, io_threads=2, pin_fraction=0.5)
    routing = {"name": "text", "kind": "model", "tokens": ids[:8 + decode]}
    out = []
    for slots in (2, 4):
        budget = slots * layout.n_layer * layout.slot_bytes
        for policy in ("lru", "lfu"):
            for prefetch in (False, True):
                res = bo.run_config(path, layout, {"policy": policy, "prefetch": prefetch}, routing, opts, budget)
                bo.add_model_of_policy(res, layout, slots, None)
                res["prediction_precision"] = bo.prediction_precision(res["_idx"], res["_pred"]) \
                    if res["_pred"] is not None and prefetch else None
                res.pop("_idx")
                res.pop("_pred")
                res["slots"], res["expert_bytes"] = slots, int(layout.read_bytes[0, 0])
                out.append(res)
                log(f"{slots} slots {policy} prefetch {'on ' if prefetch else 'off'}: read "
                    f"{res['read_bytes_per_token'] / 1e3:.1f} kB/tok, need {res['need_bytes_per_token'] / 1e3:.1f} "
                    f"kB/tok, hit {res['hit_rate']:.1%}, stall {1e3 * res['stall_s_per_token']:.3f} ms/tok, "
                    f"{res['tok_s']:.1f} tok/s")
        res = bo.run_config(path, layout, {"policy": "resident", "prefetch": False}, routing, opts, budget)
        res.pop("_idx")
        res.pop("_pred")
        res["slots"] = "all"
        out.append(res)
        log(f"resident: {res['tok_s']:.1f} tok/s")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/flashlite-quality"))
    p.add_argument("--tokens", type=int, default=4096, help="tokens of each text for the predictability")
    p.add_argument("--decode", type=int, default=192, help="decoded tokens per offload configuration")
    p.add_argument("--model", type=Path, help="the GGUF to measure (default: WORK/ours/mxfp4-q8_0.gguf)")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    import quality_table

    quality_table.prepare(a.work)
    path = a.model or a.work / "ours" / "mxfp4-q8_0.gguf"
    if not path.exists():
        from quant.convert import convert
        from quant.recipes import Recipe

        path.parent.mkdir(exist_ok=True)
        convert(quality_table.FIXTURE, path, Recipe.parse("mxfp4-q8_0"), progress=False, log=lambda m: None)
    model = load(path)
    n_expert, hash_layers = model.args.n_routed_experts, model.args.n_hash_layers
    texts = {"held-out": quality_table.HELDOUT.read_text(), "training-like": (a.work / "calibration.txt").read_text()}
    got = {name: routes(model, quality.text_tokens(model, text)[:a.tokens]) for name, text in texts.items()}
    report = {"model": str(path), "n_expert": n_expert, "k": model.args.n_activated_experts, "texts": {}}
    names = list(got)
    for name, other in zip(names, names[::-1]):
        picked, predicted = got[name]
        rows = predictability(picked, predicted, most_used(got[other][0], n_expert), n_expert, hash_layers)
        report["texts"][name] = {"tokens": int(picked.shape[0]), "layers": rows}
        log(f"{name} ({picked.shape[0]} tokens):")
        for r in rows:
            log(f"  layer {r['layer']}{' (hash)' if r['hash'] else ''}: recall {r['recall']:.3f}, whole set "
                f"{r['all']:.3f}; random {r['random']:.3f}, previous token {r['previous_token']:.3f}, most used "
                f"{r['most_used']:.3f}")
    ids = quality.text_tokens(model, texts["held-out"])
    model.close()
    report["offload"] = offload(path, ids, a.decode, log)
    if a.json:
        a.json.write_text(json.dumps(report, indent=1, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


if __name__ == "__main__":
    main()
