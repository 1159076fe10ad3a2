"""What speculative decoding can gain at DeepSeek V4-Flash's width, from parts measured on a full-width synthetic file
and the routing of the trained small model (docs/speculative.md, "At V4-Flash's width").

    python tools/bench_width.py parts -m flash3-Q4_K_M.gguf -md mtp-flash3-Q4_K_M.gguf [--rounds 7] [--max-k 8]
        --json parts.json
    python tools/bench_width.py routing [--model tests/fixtures/small_v4_general] --json routing.json
    python tools/bench_width.py project parts.json routing.json [--layers 43]

parts (one thread, CPU seconds of the process; every figure the median over rounds in which its variants take turns):
- per layer, the planned layer call over a batch of m = 1..max_k+1 tokens of one repeated token (so its hash-routed
  layers send all m tokens to the token's 6 experts) and of m distinct random tokens (random routing: the union of
  the batch's experts near its worst); the head (hc collapse, norm, vocab x dim product) over m rows; the rest of a
  forward (embedding, streams);
- one routed expert over j = 1..max_k+1 tokens (the core's expert call alone), and a score router at V4-Flash's 256
  experts (the synthetic file's layers are hash-routed, with 16 experts);
- the whole forward of m distinct tokens as decoding runs it (every layer in one call), to check the parts against
  (its wall time too, to see what sharing the core cost);
- one MTP draft step (block input, the block, the head), the head's product over its first --vocab-subset rows (a
  frequency-ranked draft head's cost, FR-Spec) and the KV-only catch-up of r rows a round makes.
Each part starts with its weights out of the cache (1 GB read first), as in a 43-layer model, whose pass reads far
more than a large L3 holds; an expert is timed on a different one each call. A layer's dense part (attention,
hyper-connections, shared expert) over m tokens is its repeated-token time less its 6 experts at m tokens; a
batch's routed part is the sum over the experts it routes to of an expert's time at the number of its (token, slot)
pairs. Every file's layers must be hash-routed (the routing is then known from the token ids).

routing: the routed experts the trained small model (8 experts, top 2) picks on held-out text, in windows of m
consecutive tokens: the mean union, and how often a pick repeats one of the token before's, against chance.

project: a V4-Flash decode (43 layers: 2 of compress ratio 0, the others 4 or 128, taken at the ratio-4 layer's
cost) from the parts: a pass, a verification of k+1 tokens (dense once per layer plus the union's experts: at
random routing over 256 experts, and at the small model's stickiness scaled to 256 experts and 6 picks:
sticky_routing, its one parameter fitted to the small model's unions), an MTP draft, and the speedups of MTP (at
the tokens a pass given with --mtp-tokens) and of prompt lookup (free drafts) at acceptances of 50-90%.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flashlite import backends as backend  # noqa: E402
from flashlite.gguf_file import WeightView  # noqa: E402
from flashlite.model import load  # noqa: E402
from flashlite.models import deepseek_v4 as v4  # noqa: E402
from flashlite.models.deepseek_v4 import linear, rms_norm  # noqa: E402

FLASH_EXPERTS, FLASH_PICKS, FLASH_DIM = 256, 6, 4096
EXPERT_CALLS = 6  # routed expert calls timed per batch size and round (a layer's worth at one token)
EVICT_BYTES = 1 << 30  # read before a part timed alone, so that its weights come from memory as in decoding


def clock() -> float:
    """The process's CPU seconds: on a core shared with other sessions' jobs, wall time would count their slices
    too (one thread computes here, so on a quiet core the two agree)."""
    return time.process_time()


def med(xs) -> float:
    return float(statistics.median(xs))


class LayerClock:
    """Seconds of each block's call and of the head in the forwards run while on (the whole-model step call off, so
    that each layer runs its own planned call)."""

    def __init__(self, model):
        self.model, self.net = model, model.net
        self.layers: list[float] = []
        self.head = 0.0

    def __enter__(self):
        block_call, timer = v4.Block.__call__, self

        def timed_block(block, *args, **kwargs):
            t0 = clock()
            out = block_call(block, *args, **kwargs)
            timer.layers[block.layer] += clock() - t0
            return out

        head_call = self.net.head_logits

        def timed_head(h):
            t0 = clock()
            out = head_call(h)
            timer.head += clock() - t0
            return out

        self._saved = (block_call, self.net.step_plan)
        v4.Block.__call__ = timed_block
        self.net.head_logits = timed_head
        self.net.step_plan = None
        return self

    def reset(self):
        self.layers = [0.0] * len(self.net.layers)
        self.head = 0.0

    def __exit__(self, *exc):
        v4.Block.__call__, self.net.step_plan = self._saved
        del self.net.head_logits


def expert_pairs(net, token_ids) -> list[dict[int, int]]:
    """Per layer, expert -> the number of (token, slot) pairs the batch routes to it (hash-routed layers)."""
    out = []
    for b in net.layers:
        tid2eid = b.ffn.gate.tid2eid
        if tid2eid is None:
            raise SystemExit(f"layer {b.layer} is score-routed: parts needs a file whose layers are all hash-routed")
        ids, counts = np.unique(np.asarray(tid2eid)[np.asarray(token_ids)].reshape(-1), return_counts=True)
        out.append(dict(zip(ids.tolist(), counts.tolist())))
    return out


def parts(args) -> None:
    model = load(args.model, threads=1)
    net, a = model.net, model.net.args
    rng = np.random.default_rng(args.seed)
    prompt = rng.integers(3, a.vocab_size, args.prompt).tolist()
    cache = model.new_cache()
    hidden: list = []
    model.forward(prompt, cache=cache, logits="none", hidden=hidden)
    base = cache.pos
    ms = list(range(1, args.max_k + 2))
    # a token whose 6 hash picks are distinct in every layer, repeated: each of its experts gets all m tokens
    tid2eids = [np.asarray(b.ffn.gate.tid2eid) for b in net.layers]
    same = next(t for t in range(3, a.vocab_size)
                if all(len(set(x[t].tolist())) == x.shape[1] for x in tid2eids))
    distinct = {m: rng.integers(3, a.vocab_size, m).tolist() for m in ms}
    batches = {("same", m): [same] * m for m in ms} | {("distinct", m): distinct[m] for m in ms}
    direct, direct_wall = {m: [] for m in ms}, {m: [] for m in ms}
    layer_t = {key: [] for key in batches}
    head_t = {m: [] for m in ms}
    rest_t = {m: [] for m in ms}
    timer = LayerClock(model)

    evict = np.ones(EVICT_BYTES // 8)

    def run(ids, wall=None):
        evict.sum()
        t0, w0 = clock(), time.perf_counter()
        model.forward(ids, cache=cache, logits="all")
        seconds = clock() - t0
        if wall is not None:
            wall.append(time.perf_counter() - w0)
        model.truncate(base, cache=cache)
        return seconds

    # one routed expert over j tokens, a different one each call, all the file's in turn: one expert (14 MB at
    # Q4_K_M) would stay in a large L3 from call to call, as it does not in decoding; and a score router's product
    # at 256 experts (the synthetic layers are hash-routed, 16 experts)
    f0 = net.layers[0].ffn
    experts = itertools.cycle([(b.ffn, e) for e in range(a.n_routed_experts) for b in net.layers])
    x_all = rng.standard_normal((max(ms), a.dim)).astype(np.float32)
    router = WeightView("router", f0.gate.weight.type, (a.dim, FLASH_EXPERTS),
                        np.tile(np.asarray(f0.gate.weight.data), (FLASH_EXPERTS // f0.gate.weight.rows, 1)))
    expert_t = {j: [] for j in ms}
    router_t = {j: [] for j in ms}
    # every part starts with its weights out of the cache (EVICT_BYTES read first), as in a 43-layer model, whose
    # pass reads far more than the L3 holds; the 3-layer file's would otherwise stay partly there between passes
    for r in range(args.rounds + 1):  # the first round warms up and is dropped
        for m in ms:
            direct[m].append(run(distinct[m], direct_wall[m]))
            with timer:
                for kind in ("same", "distinct"):
                    timer.reset()
                    total = run(batches[kind, m])
                    layer_t[kind, m].append(list(timer.layers))
                    if kind == "same":
                        head_t[m].append(timer.head)
                        rest_t[m].append(total - sum(timer.layers) - timer.head)
            x = x_all[:m]
            out = np.zeros_like(x)
            w = np.ones((m, 1), np.float32)
            evict.sum()
            t0 = clock()
            for _ in range(EXPERT_CALLS):
                f, e = next(experts)
                backend.moe_experts(x, np.full((m, 1), e, np.int32), w, f.w1, f.w3, f.w2, f.limit, out)
            expert_t[m].append((clock() - t0) / EXPERT_CALLS)
            evict.sum()
            t0 = clock()
            linear(router, x)
            router_t[m].append(clock() - t0)
        print(f"round {r}: one token {direct[1][-1] * 1e3:.1f} ms", file=sys.stderr)
    drop = slice(1, None)
    layers = {f"{kind}:{m}": [med([t[i] for t in layer_t[kind, m][drop]]) for i in range(len(net.layers))]
              for kind, m in batches}
    report = {
        "model": args.model, "draft": args.model_draft, "prompt": base, "rounds": args.rounds, "ms": ms,
        "ratios": list(a.compress_ratios[:len(net.layers)]), "picks": int(tid2eids[0].shape[1]),
        "vocab": a.vocab_size,
        "direct": {m: med(direct[m][drop]) for m in ms},
        "direct_wall": {m: med(direct_wall[m][drop]) for m in ms},  # beside the CPU seconds: the core's sharing
        "layers": layers,
        "head": {m: med(head_t[m][drop]) for m in ms},
        "rest": {m: med(rest_t[m][drop]) for m in ms},
        "expert": {m: med(expert_t[m][drop]) for m in ms},
        "router256": {m: med(router_t[m][drop]) for m in ms},
        "pairs": {m: [{str(e): c for e, c in p.items()} for p in expert_pairs(net, distinct[m])] for m in ms},
        "expert_bytes": sum(w.data[0].nbytes for w in (f0.w1, f0.w3, f0.w2)),
        "head_bytes": int(net.head.data.nbytes),
        "layer_bytes": [int(sum(t.data.nbytes for n, t in model.file.tensors.items() if n.startswith(f"blk.{i}.")
                                and "_exps" not in n)) for i in range(len(net.layers))],
    }
    if args.model_draft:
        report["mtp"] = mtp_parts(model, args, hidden[0], prompt)
    Path(args.json).write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ("direct", "head", "rest", "expert", "router256")}, indent=1))
    model.close()


def mtp_parts(model, args, h, prompt) -> dict:
    """Seconds of one MTP draft step (1 row: block input, block, head) and of the KV-only catch-up of r rows."""
    head = model.draft_head(args.model_draft)
    a = head.args
    n = len(prompt) - 1
    cache = head.make_cache()
    ids = np.asarray(prompt[1:], np.int64)
    head(h[:n - 1], ids[:n - 1], np.arange(n - 1), cache, logits="none")  # the window's rows, as decoding left them
    base = n - 1
    rs = list(range(1, args.max_k + 2))
    step, block_in, head_t, subset_t, catch = [], [], [], [], {r: [] for r in rs}
    # a draft head over the vocab_subset most frequent tokens (FR-Spec): the head's rows of those tokens, whichever
    # they are (the cost is the rows'); the full head verifies, so the output stays exact
    w = head.main.head
    subset = WeightView(f"{w.name}[:{args.vocab_subset}]", w.type, (w.k, args.vocab_subset),
                        w.data[:args.vocab_subset])
    y = h[n - 1:n]
    evict = np.ones(EVICT_BYTES // 8)
    for _ in range(args.rounds + 1):
        evict.sum()
        t0 = clock()
        _, hm = head(y, ids[n - 1:n], np.arange(base, base + 1), cache, logits="last")
        step.append(clock() - t0)
        cache.truncate(base)
        evict.sum()
        t0 = clock()
        head.block_input(y, ids[n - 1:n])
        block_in.append(clock() - t0)
        evict.sum()
        t0 = clock()
        backend.to_host(linear(head.main.head, rms_norm(head.hc_head(hm[-1:]), head.norm, a.norm_eps)))
        head_t.append(clock() - t0)
        x = rms_norm(head.hc_head(hm[-1:]), head.norm, a.norm_eps)
        evict.sum()
        t0 = clock()
        backend.to_host(linear(subset, x))
        subset_t.append(clock() - t0)
        for r in rs:
            evict.sum()
            t0 = clock()
            head.catch_up(h[base - r:base], ids[base - r:base], np.arange(base, base + r), cache)
            catch[r].append(clock() - t0)
            cache.truncate(base)
    drop = slice(1, None)
    return {"step": med(step[drop]), "block_input": med(block_in[drop]), "head": med(head_t[drop]),
            "vocab_subset": args.vocab_subset, "head_subset": med(subset_t[drop]),
            "catch_up": {r: med(catch[r][drop]) for r in rs}}


def routing(args) -> None:
    """The small model's routed picks on held-out text (score-routed layers), windows of m consecutive tokens."""
    import subprocess

    gguf = Path(args.work) / "small_v4_general-f32.gguf"
    if not gguf.exists():
        subprocess.run([sys.executable, "-c", "from flashlite.cli import main; main()", "quantize", str(args.model),
                        str(gguf), "--type", "f32", "--quiet"], check=True)
    model = load(gguf, threads=1)
    net = model.net
    ids = model.tokenizer.encode(Path(args.text).read_text())[:args.tokens]
    picks: dict[int, list[np.ndarray]] = {}
    gate_call = v4.MoEGate.__call__
    layer_of = {id(b.ffn.gate): b.layer for b in net.layers if b.ffn.gate.tid2eid is None}

    def recording_gate(gate, x, token_ids):
        w, idx = gate_call(gate, x, token_ids)
        if id(gate) in layer_of:
            picks.setdefault(layer_of[id(gate)], []).append(np.asarray(idx))
        return w, idx

    v4.MoEGate.__call__ = recording_gate
    net.use_fused_decode(False)
    try:
        for s in range(0, len(ids), args.chunk):  # each chunk a fresh sequence, as routing_small.py runs the text
            model.forward(ids[s:s + args.chunk], cache=model.new_cache(), logits="none")
    finally:
        v4.MoEGate.__call__ = gate_call
    n_exp, k = net.args.n_routed_experts, net.args.n_activated_experts
    per_layer = {}
    for layer, chunks in sorted(picks.items()):
        idx = np.concatenate(chunks)
        sets = [set(r.tolist()) for r in idx]
        repeat = float(np.mean([len(p & q) / k for p, q in zip(sets[1:], sets)]))
        unions = {m: float(np.mean([len(set().union(*sets[i:i + m])) for i in range(0, len(sets) - m + 1)]))
                  for m in range(1, args.max_k + 2)}
        per_layer[layer] = {"repeat_prev": repeat, "union": unions}
    report = {"model": str(args.model), "text": args.text, "tokens": len(ids), "experts": n_exp, "picks": k,
              "layers": per_layer}
    Path(args.json).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


def sticky_routing(n_exp: int, k: int, stick: float, m: int, trials: int, rng) -> list[list[int]]:
    """Per trial, the (token, slot) pairs per expert of m consecutive tokens' k distinct picks of n_exp experts,
    when each pick, with probability stick, repeats one of the token before's picks not yet taken, else is uniform
    over the experts not yet taken (stick 0: independent tokens, random routing)."""
    out = []
    for _ in range(trials):
        prev = rng.choice(n_exp, k, replace=False).tolist()
        counts = dict.fromkeys(prev, 1)
        for _ in range(m - 1):
            cur: list[int] = []
            for _ in range(k):
                left = [e for e in prev if e not in cur]
                if left and rng.random() < stick:
                    cur.append(left[int(rng.integers(len(left)))])
                else:
                    while (e := int(rng.integers(n_exp))) in cur:
                        pass
                    cur.append(e)
            for e in cur:
                counts[e] = counts.get(e, 0) + 1
            prev = cur
        out.append(list(counts.values()))
    return out


def project(args) -> None:
    p = json.loads(Path(args.parts).read_text())
    r = json.loads(Path(args.routing).read_text())
    ms = [int(m) for m in p["ms"]]
    k_picks = p["picks"]
    expert = {int(m): t for m, t in p["expert"].items()}
    slope = (expert[ms[-1]] - expert[1]) / (ms[-1] - 1)
    ratios = p["ratios"]
    n_file = len(ratios)

    def expert_seconds(pairs: int) -> float:
        """One routed expert at `pairs` (token, slot) pairs: measured up to max_k + 1, then its per-token slope."""
        return expert[min(pairs, ms[-1])] + slope * max(0, pairs - ms[-1])

    # a layer's dense part over m tokens: its repeated-token time less its experts at m tokens each
    dense = {m: [t - k_picks * expert[m] for t in p["layers"][f"same:{m}"]] for m in ms}
    print(f"parts ({p['model']}, {p['prompt']} prompt tokens, one thread, median of {p['rounds']} rounds; ms)\n")
    print(f"| m | direct forward (wall) | predicted from parts | error | head | dense per layer | one expert "
          f"({p['expert_bytes'] / 1e6:.1f} MB) at m tokens | routed experts per layer (their union) |")
    print("|---|---|---|---|---|---|---|---|")
    for m in ms:
        pairs = p["pairs"][str(m)]
        routed = [sum(expert_seconds(c) for c in q.values()) for q in pairs]
        pred = sum(dense[m]) + sum(routed) + p["head"][str(m)] + p["rest"][str(m)]
        d = p["direct"][str(m)]
        print(f"| {m} | {d * 1e3:.1f} ({p['direct_wall'][str(m)] * 1e3:.1f}) | {pred * 1e3:.1f} | "
              f"{pred / d - 1:+.1%} | {p['head'][str(m)] * 1e3:.1f} | "
              f"{', '.join(f'{x * 1e3:.1f}' for x in dense[m])} | {expert[m] * 1e3:.2f} | "
              f"{', '.join(f'{t * 1e3:.1f} ({len(q)})' for t, q in zip(routed, pairs))} |")

    # the routing: the small model's stickiness, checked against its own unions, then at V4-Flash's 256 experts
    rng = np.random.default_rng(0)
    small = r["layers"]
    chance = r["picks"] / r["experts"]
    rep = statistics.mean(v["repeat_prev"] for v in small.values())
    stick_pairs = (rep - chance) / (1 - chance)  # from consecutive tokens alone
    measured = {m: statistics.mean(v["union"][str(m)] for v in small.values()) for m in ms}

    def simulate(n_exp, k, st, m, trials=args.trials):
        runs = sticky_routing(n_exp, k, st, m, trials, rng)
        return statistics.mean(map(len, runs)), statistics.mean(sum(map(expert_seconds, q)) for q in runs)

    # the stickiness whose unions at the small model's widths fit the measured ones (least squares over m): real
    # routing also repeats experts of tokens further back, which consecutive pairs alone do not capture
    stick = min(np.arange(0.0, 0.96, 0.02), key=lambda st: sum(
        (simulate(r["experts"], r["picks"], st, m, args.trials // 4)[0] - measured[m]) ** 2 for m in ms[1:]))
    sim = {(kind, m): simulate(FLASH_EXPERTS, FLASH_PICKS, st, m) for kind, st in (("random", 0.0), ("sticky", stick))
           for m in ms}
    print(f"\nrouting of {r['model']} on {r['text']} ({r['tokens']} tokens, {r['experts']} experts, top "
          f"{r['picks']}, its {len(small)} score-routed layers): a pick repeats one of the token before's "
          f"{rep:.1%} of the time (chance {chance:.1%}): stickiness {stick_pairs:.2f} from consecutive pairs, "
          f"{stick:.2f} fitted to the unions; mean union of m consecutive tokens' experts:\n")
    print("| m | small: measured | small: sticky model (pairs) | small: sticky model (fitted) | small: random "
          "| V4-Flash: random | V4-Flash: sticky (fitted) |")
    print("|---|---|---|---|---|---|---|")
    for m in ms:
        print(f"| {m} | {measured[m]:.2f} | {simulate(r['experts'], r['picks'], stick_pairs, m)[0]:.2f} | "
              f"{simulate(r['experts'], r['picks'], stick, m)[0]:.2f} | "
              f"{simulate(r['experts'], r['picks'], 0.0, m)[0]:.2f} | {sim['random', m][0]:.1f} | "
              f"{sim['sticky', m][0]:.1f} |")

    # V4-Flash: 2 layers of ratio 0, the rest at the ratio-4 layer's cost; the first n_hash layers route by token
    # id (at random), the others by score (a router over 256 experts each, and the sticky union)
    n_layers, n_hash = args.layers, args.hash_layers
    r0 = [i for i in range(n_file) if ratios[i] == 0]
    r4 = [i for i in range(n_file) if ratios[i] == 4]
    router = {m: p["router256"][str(m)] for m in ms}

    def dense_all(m: int) -> float:
        d0 = statistics.mean(dense[m][i] for i in r0)
        d4 = statistics.mean(dense[m][i] for i in r4)
        return 2 * d0 + (n_layers - 2) * d4 + (n_layers - n_hash) * router[m]

    def routed_all(m: int, kind: str) -> float:
        return n_hash * sim["random", m][1] + (n_layers - n_hash) * sim[kind, m][1]

    head = {m: p["head"][str(m)] for m in ms}
    rest = {m: p["rest"][str(m)] for m in ms}
    t_pass = dense_all(1) + routed_all(1, "random") + head[1] + rest[1]
    verify = {kind: {m: dense_all(m) + routed_all(m, kind) + head[m] + rest[m] for m in ms}
              for kind in ("random", "sticky")}
    print(f"\nV4-Flash, {n_layers} layers, projected: a pass {t_pass * 1e3:.0f} ms (dense parts "
          f"{dense_all(1) * 1e3:.0f}, routed experts {routed_all(1, 'random') * 1e3:.0f}, head {head[1] * 1e3:.1f}, "
          f"rest {rest[1] * 1e3:.1f}); a verification of m = k + 1 tokens, ms (x a pass):\n")
    print("| k | random union: experts (MB) a layer | ms (x a pass) | sticky union: experts (MB) a layer "
          "| ms (x a pass) |")
    print("|---|---|---|---|---|")
    mb = p["expert_bytes"] / 1e6
    for m in ms:
        print(f"| {m - 1} | {sim['random', m][0]:.1f} ({sim['random', m][0] * mb:.0f}) | "
              f"{verify['random'][m] * 1e3:.0f} ({verify['random'][m] / t_pass:.2f}) | "
              f"{sim['sticky', m][0]:.1f} ({sim['sticky', m][0] * mb:.0f}) | "
              f"{verify['sticky'][m] * 1e3:.0f} ({verify['sticky'][m] / t_pass:.2f}) |")

    def best_lookup(acc: float, kind: str) -> tuple[float, int]:
        return max(((1 - acc ** (k + 1)) / (1 - acc) * t_pass / verify[kind][k + 1], k) for k in ms[:-1])

    print("\nprompt lookup (free drafts; each passes with probability a when the ones before it did), the best k "
          "in 1..8: speedup (k), random / sticky union\n")
    for acc in (0.5, 0.6, 0.7, 0.8, 0.9):
        (rs, rk), (ss, sk) = best_lookup(acc, "random"), best_lookup(acc, "sticky")
        print(f"| {acc:.0%} | {rs:.2f} ({rk}) | {ss:.2f} ({sk}) |")
    mtp = p.get("mtp")
    if not mtp:
        return
    draft = mtp["step"] + router[1]
    catch = {int(k): t for k, t in mtp["catch_up"].items()}
    # a draft head over the most frequent vocab_subset tokens (FR-Spec): the subset's rows, measured, for the head's
    draft_fr = draft - mtp["head"] + mtp["head_subset"]
    print(f"\nan MTP draft {draft * 1e3:.1f} ms = {draft / t_pass:.1%} of a pass: block input "
          f"{mtp['block_input'] * 1e3:.1f}, head {mtp['head'] * 1e3:.1f} ({mtp['head'] / draft:.0%} of the draft), "
          f"the block and router the rest; with a head over {mtp['vocab_subset']} tokens "
          f"({mtp['head_subset'] * 1e3:.1f} ms) {draft_fr * 1e3:.1f} ms; "
          f"a round's KV-only catch-up of r rows (ms): "
          + ", ".join(f"{k}: {t * 1e3:.1f}" for k, t in catch.items()))

    def speedup(tokens: float, k: int, kind: str, cost: float) -> float:
        rows = max(0, min(round(tokens - 1), ms[-1]))
        return tokens * t_pass / (verify[kind][k + 1] + k * cost + (catch[rows] if rows else 0.0))

    print("\nMTP, tokens a pass as measured on small_v4_general: speedup random / sticky union; with the "
          "frequency-ranked head\n")
    print("| prompt | k | tokens a pass | speedup | with the smaller head |")
    print("|---|---|---|---|---|")
    for name, per_k in args.mtp_tokens.items():
        for k, t in ((int(k), t) for k, t in per_k.items()):
            print(f"| {name} | {k} | {t:.2f} | {speedup(t, k, 'random', draft):.2f} / "
                  f"{speedup(t, k, 'sticky', draft):.2f} | {speedup(t, k, 'random', draft_fr):.2f} / "
                  f"{speedup(t, k, 'sticky', draft_fr):.2f} |")

    # where memory alone sets the time (cores that outrun it: many threads), seconds go as the bytes read
    from flashlite.gguf_file import GGUFFile

    lb, eb, hb = p["layer_bytes"], p["expert_bytes"], p["head_bytes"]
    router_b = FLASH_EXPERTS * FLASH_DIM * 2  # BF16
    dense_b = (2 * statistics.mean(lb[i] for i in r0) + (n_layers - 2) * statistics.mean(lb[i] for i in r4)
               + (n_layers - n_hash) * router_b)
    pass_b = dense_b + n_layers * FLASH_PICKS * eb + hb
    verify_b = {kind: {m: dense_b + hb + eb * (n_hash * sim["random", m][0] + (n_layers - n_hash) * sim[kind, m][0])
                       for m in ms} for kind in ("random", "sticky")}
    f = GGUFFile(p["draft"])
    n = f.get("deepseek4.block_count") - 1
    draft_b = (sum(t.data.nbytes for name, t in f.tensors.items()
                   if name.startswith(f"blk.{n}.") and "_exps" not in name)
               + FLASH_PICKS * eb + router_b + hb)
    f.close()
    print(f"\nbound by memory alone (seconds as bytes read): a pass {pass_b / 1e9:.2f} GB, a draft "
          f"{draft_b / 1e6:.0f} MB ({draft_b / pass_b:.1%}, the head {hb / draft_b:.0%} of it); verification of k+1 "
          "tokens (x a pass) random / sticky: "
          + ", ".join(f"{m - 1}: {verify_b['random'][m] / pass_b:.2f} / {verify_b['sticky'][m] / pass_b:.2f}"
                      for m in ms[1:]))
    for name, per_k in args.mtp_tokens.items():
        print(f"MTP {name}: " + ", ".join(
            f"k={k} {t * pass_b / (verify_b['random'][int(k) + 1] + int(k) * draft_b):.2f} / "
            f"{t * pass_b / (verify_b['sticky'][int(k) + 1] + int(k) * draft_b):.2f}" for k, t in per_k.items()))
    print("prompt lookup, best k: " + ", ".join(
        f"{acc:.0%}: " + " / ".join(
            f"{max((1 - acc ** (k + 1)) / (1 - acc) * pass_b / verify_b[kind][k + 1] for k in ms[:-1]):.2f}"
            for kind in ("random", "sticky"))
        for acc in (0.5, 0.6, 0.7, 0.8, 0.9)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    pp = sub.add_parser("parts")
    pp.add_argument("-m", "--model", required=True)
    pp.add_argument("-md", "--model-draft", default=None)
    pp.add_argument("--rounds", type=int, default=7)
    pp.add_argument("--max-k", type=int, default=8)
    pp.add_argument("--prompt", type=int, default=64)
    pp.add_argument("--seed", type=int, default=0)
    pp.add_argument("--vocab-subset", type=int, default=32768, help="the frequency-ranked draft head's tokens")
    pp.add_argument("--json", required=True)
    rp = sub.add_parser("routing")
    rp.add_argument("--model", default=str(REPO / "tests/fixtures/small_v4_general"))
    rp.add_argument("--text", default=str(REPO / "tests/fixtures/small_v4_general/heldout.txt"))
    rp.add_argument("--tokens", type=int, default=4096)
    rp.add_argument("--chunk", type=int, default=512)
    rp.add_argument("--max-k", type=int, default=8)
    rp.add_argument("--work", default="/tmp")
    rp.add_argument("--json", required=True)
    jp = sub.add_parser("project")
    jp.add_argument("parts")
    jp.add_argument("routing")
    jp.add_argument("--layers", type=int, default=43)
    jp.add_argument("--hash-layers", type=int, default=3)
    jp.add_argument("--trials", type=int, default=2000)
    jp.add_argument("--mtp-tokens", type=json.loads, default={},
                    help='tokens a pass per draft length, e.g. \'{"chat": {"1": 1.89, "2": 2.40}}\'')
    args = ap.parse_args(argv)
    {"parts": parts, "routing": routing, "project": project}[args.mode](args)


if __name__ == "__main__":
    main()
