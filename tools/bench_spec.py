"""Speculative decoding against plain decoding, in one process: decode tokens/s with and without each drafter at
1..N drafted tokens, the acceptance rate, the weight bytes a verified batch reads (the dense weights once, the
routed experts as the union over its tokens), and the speedup.

    python tools/bench_spec.py -m small_v4.gguf [-md mtp-small_v4.gguf | dspark.gguf] [--prompts chat code repeat]
        [--drafters ngram mtp dspark] [--n 1 2 3 4 5 6 7 8] [--tokens 64] [--rounds 3] [--json OUT]

Variants take turns within each round (every drafter at every length, then each drafter with the adaptive control
at the largest length), each run right after a plain run of its own, so that a load that comes and goes on a
shared machine falls on both alike: the speedup of a variant is the median over rounds of the plain run's decode
time over its own; tok/s is the median of its own runs. Forward passes and weight bytes per token do not depend on
the load. Decoding is
greedy and stops at EOS or --tokens, so every variant yields the same tokens (checked). Prompts:

- chat: "Hello! Who are you?" in V4's chat format (the trained model's own answer; MTP's case)
- code: a code-editing request whose answer should repeat the code (prompt lookup's case, where the model copies)
- edit: a held-out code-editing request in the format of tools/edit_corpus.py's conversations (a function of
  xml.dom.minidom, a module that train_tiny's corpus holds out): what a model fine-tuned on them should copy
- repeat: a question asked again after the model's own answer (the answer repeats: quoting)
- text:FILE: the tokens of FILE as a raw prompt (a random-weight model's output loops: n-gram's only case there)

--batch-cost M: instead, the seconds and weight bytes of one forward pass of m = 1..M tokens after the prompt (rolled
back each time, sizes taking turns), whatever a drafter would accept: what verifying k = m - 1 drafts costs at
this model's widths, from which the speedup at an acceptance rate follows (docs/speculative.md).

Tokens per pass are the last timed run's (an adaptive control's choices follow its timings). The bytes come
from one extra, instrumented run per variant (np.unique over each layer's routing, outside the
timed runs, op by op so that Python sees the routing): dense = every main-model tensor but the routed experts and the embedding (read by rows), experts =
the union of the experts the batch's tokens pick, per layer, times an expert's bytes.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flashlite import speculative as sp  # noqa: E402
from flashlite.chat.completion import prompt_ids  # noqa: E402
from flashlite.model import load  # noqa: E402
from flashlite.models import deepseek_v4 as v4  # noqa: E402

CODE = ("Rename the variable total to count in this function and show the whole function:\n\n"
        "def add_all(items):\n    total = 0\n    for item in items:\n        if item is None:\n"
        "            continue\n        total += item\n    return total\n")

# tools/edit_corpus.py's user turn for a rename in xml.dom.minidom's _append_child (held out of its training)
EDIT = ("Rename the parameter node to item in this function and show the whole function:\n\n```python\n"
        "def _append_child(self, node):\n    # fast path with less checks; usable by DOM builders if careful\n"
        "    childNodes = self.childNodes\n    if childNodes:\n        last = childNodes[-1]\n"
        "        node.previousSibling = last\n        last.nextSibling = node\n    childNodes.append(node)\n"
        "    node.parentNode = self\n```")


def prompts(model, names: list[str]) -> dict[str, list[int]]:
    out = {}
    for name in names:
        if name == "chat":
            out[name] = prompt_ids(model, [{"role": "user", "content": "Hello! Who are you?"}])
        elif name == "code":
            out[name] = prompt_ids(model, [{"role": "user", "content": CODE}])
        elif name == "edit":
            out[name] = prompt_ids(model, [{"role": "user", "content": EDIT}])
        elif name == "repeat":
            q = [{"role": "user", "content": "What does os.path.join do?"}]
            said = "".join(p.text for p in model.chat(q, stream=False, max_tokens=96, temperature=0)
                           if p.kind == "content")
            out[name] = prompt_ids(model, q + [{"role": "assistant", "content": said}, q[0]])
        elif name.startswith("text:"):
            out[name] = model.tokenizer.encode(Path(name[5:]).read_text())
        else:
            raise SystemExit(f"unknown prompt {name!r}: chat, code, edit, repeat or text:FILE")
    return out


class ByteCounter:
    """Per forward of the main model: tokens, and the routed experts' union per layer (while on)."""

    def __init__(self, model):
        self.model = model
        self.layer_of = {id(b.ffn.gate): i for i, b in enumerate(model.net.layers)}
        self.expert_bytes = [sum(w.data[0].nbytes for w in (b.ffn.w1, b.ffn.w3, b.ffn.w2)) for b in model.net.layers]
        skip = {w.name for b in model.net.layers for w in (b.ffn.w1, b.ffn.w3, b.ffn.w2)} | {"token_embd.weight"}
        self.dense = sum(t.data.nbytes for n, t in model.file.tensors.items() if n not in skip)
        self.forwards: list[tuple[int, int]] = []  # (tokens, expert bytes)
        self._current = None
        gate_call, forward = v4.MoEGate.__call__, model.forward
        counter = self

        def counted_gate(gate, x, token_ids):
            w, idx = gate_call(gate, x, token_ids)
            layer = counter.layer_of.get(id(gate))
            if counter._current is not None and layer is not None:
                counter._current += np.unique(idx).size * counter.expert_bytes[layer]
            return w, idx

        def counted_forward(token_ids, *args, **kwargs):
            counter._current = 0
            try:
                return forward(token_ids, *args, **kwargs)
            finally:
                counter.forwards.append((len(token_ids), counter._current))
                counter._current = None

        self._patch = (gate_call, counted_gate, forward, counted_forward)

    def __enter__(self):
        gate_call, counted_gate, forward, counted_forward = self._patch
        v4.MoEGate.__call__ = counted_gate
        self.model.forward = counted_forward
        # the planned layer calls route in C, out of the patched gate's sight: the op-by-op definition routes the
        # same (bitwise the same forward)
        self.model.net.use_fused_decode(False)
        # op by op, rounds take several times as long: what they measure must not reach the costs (DraftCosts, the
        # model's) that the timed runs after this one choose their draft lengths by
        self.costs = sp._COSTS.pop(self.model, None)
        self.forwards = []
        return self

    def __exit__(self, *exc):
        v4.MoEGate.__call__ = self._patch[0]
        del self.model.forward
        sp._COSTS.pop(self.model, None)
        if self.costs is not None:
            sp._COSTS[self.model] = self.costs
        self.model.net.use_fused_decode(True)


def model_draft_kind(path: str) -> str:
    """'dspark' for a DSpark draft GGUF, else 'mtp'."""
    from flashlite.dspark import is_dspark_draft
    from flashlite.gguf_file import GGUFFile

    f = GGUFFile(path)
    try:
        return "dspark" if is_dspark_draft(f) else "mtp"
    finally:
        f.close()


def decode(model, ids, tokens, options, eos):
    """(generated ids, seconds from the first token to the last, stats delta)."""
    model.reset_stats()
    out, t_first = [], None
    gen = model.generate(ids, tokens, stop=(eos,), spec_type=options)
    for t in gen:
        if t_first is None:
            t_first = time.perf_counter()
        out.append(t)
    return out, time.perf_counter() - t_first, model.stats()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-m", "--model", required=True)
    p.add_argument("-md", "--model-draft", default=None, help="draft GGUF (for the mtp or dspark drafter)")
    p.add_argument("--prompts", nargs="+", default=["chat", "code", "repeat"])
    p.add_argument("--drafters", nargs="+", default=None, help="default: ngram, and mtp with -md")
    p.add_argument("--n", nargs="+", type=int, default=list(range(1, 9)))
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--batch-cost", type=int, default=0, metavar="M")
    p.add_argument("--auto-only", action="store_true", help="only the adaptive variants (and plain)")
    args = p.parse_args(argv)
    if args.batch_cost:
        return batch_cost(args)
    drafters = args.drafters or (["ngram", model_draft_kind(args.model_draft)] if args.model_draft else ["ngram"])
    model = load(args.model, threads=args.threads)
    eos = model.tokenizer.eos_id
    variants = [("plain", None)]
    for d in drafters:
        draft = args.model_draft if d in ("mtp", "dspark") else None
        if not args.auto_only:
            variants += [(f"{d}-{n}", sp.SpecOptions(d, n, draft, adaptive=False)) for n in args.n]
        variants.append((f"{d}-auto{max(args.n)}", sp.SpecOptions(d, max(args.n), draft, adaptive=True)))
    counter = ByteCounter(model)
    report = {"model": args.model, "draft": args.model_draft, "tokens": args.tokens, "rounds": args.rounds,
              "dense_bytes": counter.dense, "prompts": {}}
    for pname, ids in prompts(model, args.prompts).items():
        decode(model, ids, 4, None, eos)  # warm the pages and the pool
        times = {name: [] for name, _ in variants}
        ratios = {name: [] for name, _ in variants}
        stats, outs = {}, {}
        for _ in range(args.rounds):
            for name, options in variants:
                out, plain, st = decode(model, ids, args.tokens, None, eos)
                times["plain"].append(plain)
                stats["plain"], outs["plain"] = st, out
                if options is None:
                    ratios[name].append(1.0)
                    continue
                out, seconds, st = decode(model, ids, args.tokens, options, eos)
                times[name].append(seconds)
                ratios[name].append(plain / seconds)
                stats[name], outs[name] = st, out
        rows = {}
        for name, options in variants:
            if outs[name] != outs["plain"]:
                raise SystemExit(f"{pname} {name}: the output differs from plain decoding's")
            with counter:
                decode(model, ids, args.tokens, options, eos)
            batches = counter.forwards[1:]  # after the prefill
            st, n_out = stats[name], len(outs[name])
            rows[name] = {
                "decode_tok_s": (n_out - 1) / statistics.median(times[name]),
                "speedup": statistics.median(ratios[name]),
                "drafted": st["drafted_tokens"], "accepted": st["accepted_tokens"],
                "acceptance": st["accepted_tokens"] / st["drafted_tokens"] if st["drafted_tokens"] else None,
                "batches": len(batches),
                # the last timed run's passes (an adaptive control chooses by its timings, which the counted run's
                # op-by-op passes do not have); plain's from the counted run
                "tokens_per_batch": (n_out - 1) / (st["spec_rounds"] or max(len(batches), 1)),
                "expert_bytes_per_batch": float(np.mean([b for _, b in batches])) if batches else 0.0,
                "weight_bytes_per_token": (counter.dense * len(batches) + sum(b for _, b in batches))
                                          / max(n_out - 1, 1),
            }
        report["prompts"][pname] = {"prompt_tokens": len(ids), "generated": len(outs["plain"]), "variants": rows,
                                    "text": model.tokenizer.decode(outs["plain"])}
        print(f"\n{pname}: {len(ids)} prompt tokens, {len(outs['plain'])} generated, median of {args.rounds} rounds")
        print(f"  {'variant':<12} {'tok/s':>7} {'speedup':>7} {'accept':>7} {'tok/pass':>9} "
              f"{'expert MB/pass':>15} {'weight MB/token':>15}")
        for name, r in rows.items():
            acc = f"{r['acceptance']:.0%}" if r["acceptance"] is not None else "-"
            print(f"  {name:<12} {r['decode_tok_s']:7.1f} {r['speedup']:7.2f} {acc:>7} {r['tokens_per_batch']:9.2f} "
                  f"{r['expert_bytes_per_batch'] / 1e6:15.2f} {r['weight_bytes_per_token'] / 1e6:15.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    model.close()


def batch_cost(args):
    """Seconds and weight bytes of a forward pass of m = 1..M tokens after each prompt."""
    model = load(args.model, threads=args.threads)
    counter = ByteCounter(model)
    report = {"model": args.model, "rounds": args.rounds, "dense_bytes": counter.dense, "prompts": {}}
    for pname, ids in prompts(model, args.prompts).items():
        cache = model.new_cache()
        model.forward(ids, cache=cache, logits="none")
        base = cache.pos
        extra = np.random.default_rng(0).integers(3, model.vocab_size, args.batch_cost).tolist()
        sizes = list(range(1, args.batch_cost + 1))
        times = {m: [] for m in sizes}
        for _ in range(args.rounds + 1):  # the first round warms up and is dropped
            for m in sizes:
                t0 = time.perf_counter()
                model.forward(extra[:m], cache=cache, logits="all")
                times[m].append(time.perf_counter() - t0)
                model.truncate(base, cache=cache)
        rows = {}
        for m in sizes:
            with counter:
                model.forward(extra[:m], cache=cache, logits="all")
            model.truncate(base, cache=cache)
            t = statistics.median(times[m][1:])
            rows[m] = {"seconds": t, "relative": t / statistics.median(times[1][1:]),
                       "expert_bytes": counter.forwards[0][1], "weight_bytes": counter.dense + counter.forwards[0][1]}
        report["prompts"][pname] = rows
        print(f"\n{pname}: forward of m tokens after {base}, median of {args.rounds} rounds")
        print(f"  {'m':>3} {'ms':>9} {'x one':>6} {'expert MB':>10} {'weight MB':>10}")
        for m, r in rows.items():
            print(f"  {m:3d} {r['seconds'] * 1e3:9.1f} {r['relative']:6.2f} {r['expert_bytes'] / 1e6:10.1f} "
                  f"{r['weight_bytes'] / 1e6:10.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    model.close()


if __name__ == "__main__":
    main()
