"""The expert prefetch of docs/offload.md on real routing: the trained default model (tests/fixtures/small_v4, 6 layers
of 8 routed experts, top-2, the first 2 layers hash-routed) on real text.

    python tools/routing_small.py [--work DIR] [--tokens 4096] [--decode 192] [--repeats 3] [--json OUT]

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
   prefetch precision and stall. The whole set runs --repeats times, one configuration after another, and each
   figure is the median of its repeats (stall and speed are timings, noisy on a shared machine; each repeat's
   stall is kept too).

The tables go to stdout (markdown), the progress to stderr.

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


CONFIGS = [(slots, policy, prefetch) for slots in (2, 4) for policy in ("lru", "lfu") for prefetch in (False, True)]
CONFIGS.append(("all", "resident", False))


def offload(path: Path, ids: np.ndarray, decode: int, repeats: int, log) -> list[dict]:
    """Every configuration, repeats times in turn; per configuration the median of each figure over its repeats."""
    import bench_offload as bo

    layout = bo.ExpertLayout(path)
    opts = argparse.Namespace(warmup=8, tokens=decode, threads=None, io_threads=2, pin_fraction=0.5)
    routing = {"name": "text", "kind": "model", "tokens": ids[:8 + decode]}
    runs = {cfg: [] for cfg in CONFIGS}
    for repeat in range(repeats):
        for slots, policy, prefetch in CONFIGS:
            budget = (slots if slots != "all" else 1) * layout.n_layer * layout.slot_bytes
            res = bo.run_config(path, layout, {"policy": policy, "prefetch": prefetch}, routing, opts, budget)
            res["slots"] = slots
            if policy != "resident":
                bo.add_model_of_policy(res, layout, slots, None)
                res["prediction_precision"] = bo.prediction_precision(res["_idx"], res["_pred"]) if prefetch else None
                res["expert_bytes"] = int(layout.read_bytes[0, 0])
            res.pop("_idx")
            res.pop("_pred")
            runs[slots, policy, prefetch].append(res)
            log(f"repeat {repeat + 1}/{repeats}, {describe(res)}")
    out = []
    for same in runs.values():
        res = bo.median_of(tuple(same))
        res["slots"], res["tokens"], res["repeats"] = same[0]["slots"], same[0]["tokens"], len(same)
        if "stall_s_per_token" in res:
            res["stall_s_per_token_runs"] = [r["stall_s_per_token"] for r in same]
            res["stall_s_per_token_by_layer"] = np.median([r["stall_s_per_token_by_layer"] for r in same],
                                                          axis=0).tolist()
        out.append(res)
    return out


def describe(res: dict) -> str:
    if res["policy"] == "resident":
        return f"all experts resident: {res['tok_s']:.1f} tok/s"
    return (f"{res['slots']} slots {res['policy']} prefetch {'on ' if res['prefetch'] else 'off'}: read "
            f"{res['read_bytes_per_token'] / 1e3:.1f} kB/tok, need {res['need_bytes_per_token'] / 1e3:.1f} kB/tok, "
            f"hit {res['hit_rate']:.1%}, stall {1e3 * res['stall_s_per_token']:.3f} ms/tok, {res['tok_s']:.1f} tok/s")


def print_tables(report: dict) -> None:
    """The figures as markdown tables, for docs/offload.md."""
    for name, text in report["texts"].items():
        print(f"\nPredictability, {name} text ({text['tokens']} tokens): share of the picked experts predicted\n")
        print("| layer | routing | prefetch's prediction | whole set predicted | random | token before | most used |")
        print("|---|---|---|---|---|---|---|")
        for r in text["layers"]:
            print(f"| {r['layer']} | {'hash' if r['hash'] else 'score'} | {r['recall']:.3f} | {r['all']:.3f} | "
                  f"{r['random']:.3f} | {r['previous_token']:.3f} | {r['most_used']:.3f} |")
    runs = report["offload"]
    print(f"\nOffload, held-out text, {runs[0]['tokens']} decoded tokens, medians of {runs[0]['repeats']} repeats\n")
    print("| slots per layer | policy | prefetch | read kB/tok | need kB/tok | read/need | hit rate "
          "| prefetch precision (reads / predictions) | I/O ms/tok | stall ms/tok (each repeat) | tok/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        if r["policy"] == "resident":
            print(f"| all (mapped) | - | - | - | - | - | - | - | - | - | {r['tok_s']:.0f} |")
            continue
        precision = "-" if not r["prefetch"] else \
            f"{r['prefetch_precision']:.1%} / {r['prediction_precision']:.1%}"
        each = ", ".join(f"{1e3 * v:.2f}" for v in r["stall_s_per_token_runs"])
        print(f"| {r['slots']} of {report['n_expert']} | {r['policy']} | {'on' if r['prefetch'] else 'off'} | "
              f"{r['read_bytes_per_token'] / 1e3:.1f} | {r['need_bytes_per_token'] / 1e3:.1f} | "
              f"{r['read_over_need']:.3f} | {r['hit_rate']:.1%} | {precision} | {1e3 * r['io_s_per_token']:.2f} | "
              f"{1e3 * r['stall_s_per_token']:.2f} ({each}) | {r['tok_s']:.0f} |")
    budgeted = [r for r in runs if r["policy"] != "resident"]
    n_layer = len(budgeted[0]["stall_s_per_token_by_layer"])
    print(f"\nStall by layer, ms per token (medians of {runs[0]['repeats']} repeats)\n")
    print("| slots per layer | policy | prefetch | " + " | ".join(f"layer {i}" for i in range(n_layer)) + " |")
    print("|---|---|---|" + "---|" * n_layer)
    for r in budgeted:
        print(f"| {r['slots']} of {report['n_expert']} | {r['policy']} | {'on' if r['prefetch'] else 'off'} | "
              + " | ".join(f"{1e3 * v:.3f}" for v in r["stall_s_per_token_by_layer"]) + " |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/flashlite-quality"))
    p.add_argument("--tokens", type=int, default=4096, help="tokens of each text for the predictability")
    p.add_argument("--decode", type=int, default=192, help="decoded tokens per offload configuration")
    p.add_argument("--repeats", type=int, default=3, help="runs of every offload configuration (medians reported)")
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
    report["offload"] = offload(path, ids, a.decode, a.repeats, log)
    print_tables(report)
    if a.json:
        a.json.write_text(json.dumps(report, indent=1, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


if __name__ == "__main__":
    main()
