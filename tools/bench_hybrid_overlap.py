"""A split MoE layer's wall time with its host experts overlapped with the device's work and without, on a CPU
torch device (the only overlap a machine without an accelerator can show: two sides sharing its cores).

    python tools/bench_hybrid_overlap.py -m flash3-Q4_K_M.gguf [--layer 0] [--device-experts 8] [--tokens 1]
        [--torch-threads 1] [--core-threads 1] [--rounds 7] [--calls 20] [--json out.json]
    python tools/bench_hybrid_overlap.py -m flash3-Q4_K_M.gguf --decode 8 [--device-experts 1] ...

One layer of the file is loaded as hybrid placement leaves it when the device holds its first --device-experts
routed experts: those experts and the shared expert on the torch device (decoded to float32, as torch-cpu holds
them), the file's whole stack for the C core. A call is the layer's experts (torch_device.moe, the model's call)
over --tokens tokens of random inputs, each routed to 6 distinct random experts at random weights (a new routing
each call, from a fixed seed). Timed, in turns within each round (the median over rounds of each one's mean call):

- overlap: the host's experts on the worker thread while the caller runs the device's routed experts and the
  shared expert (HostExperts.overlap, the default);
- in turn: the C call on the caller after the device's share (overlap off, as before the worker);
- device side: the device's routed experts and the shared expert alone; host side: the C core's call alone.

The bound of an overlapped call is max(device side, host side), against their sum for a call in turn. Wall time
(perf_counter), as overlap is about it; on a shared machine the figures are noisy.

--decode N: the whole model instead, loaded on torch-cpu with gpu_mem holding everything but the routed experts
plus each layer's first --device-experts (an expert-usage histogram that makes them the hottest), so every layer is
split; each round prefills 4 tokens and decodes N, overlapped and in turn alternately; tok/s from the median step.
On torch-cpu the device's matrices are float32 (the head and embedding of a full-width file alone 4.2 GB).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from flashlite._native import check, lib  # noqa: E402
from flashlite.backends import torch_device as td  # noqa: E402
from flashlite.gguf_file import GGUFFile  # noqa: E402

PICKS = 6  # V4-Flash's routed experts per token
LIMIT = 10.0  # the SwiGLU clamp (its value does not change the time)
MATRICES = ("gate", "up", "down")
CTX = 256  # --decode's context: a small KV cache on the device (its memory, not its time, would change)


def split_layer(path: Path, layer: int, n_device: int):
    """(the device, routed SplitExperts, the shared expert's DeviceWeights, experts in the layer) of one layer."""
    f = GGUFFile(path)
    dev = td.TorchDevice("cpu")
    views = [f.tensors[f"blk.{layer}.ffn_{m}_exps.weight"] for m in MATRICES]
    n_expert = views[0].ne[2]
    if not 0 < n_device < n_expert:
        raise ValueError(f"--device-experts: expected 1..{n_expert - 1} (the layer has {n_expert}), got {n_device}")
    routed = tuple(dev.upload(v, np.arange(n_device)) for v in views)
    shared = tuple(dev.upload(f.tensors[f"blk.{layer}.ffn_{m}_shexp.weight"]) for m in MATRICES)
    return dev, routed, shared, n_expert


def routings(n: int, tokens: int, n_expert: int, dim: int, seed: int = 0) -> list:
    """n calls' (x, idx, weights): random inputs, PICKS distinct random experts a token, weights summing to 1.5."""
    rng = np.random.default_rng(seed)
    calls = []
    for _ in range(n):
        idx = np.stack([rng.permutation(n_expert)[:PICKS] for _ in range(tokens)]).astype(np.int64)
        w = rng.uniform(0.1, 1.0, idx.shape).astype(np.float32)
        x = rng.standard_normal((tokens, dim)).astype(np.float32)
        calls.append((torch.from_numpy(x), torch.from_numpy(idx), torch.from_numpy(w / w.sum(1, keepdims=True) * 1.5)))
    return calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", type=Path, required=True)
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--device-experts", type=int, default=8, help="the layer's routed experts on the device")
    ap.add_argument("--tokens", type=int, default=1, help="tokens a call (1: a decode step)")
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--core-threads", type=int, default=1, help="the C core's pool")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=20, help="calls a variant times in one round")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--decode", type=int, default=0, help="decode steps a round of the whole model (0: one layer)")
    opts = ap.parse_args()
    if opts.decode:
        return decode(opts)
    torch.set_num_threads(opts.torch_threads)
    check(lib.fl_threads_set(opts.core_threads), "fl_threads_set")
    dev, routed, shared, n_expert = split_layer(opts.model, opts.layer, opts.device_experts)
    calls = routings(opts.calls, opts.tokens, n_expert, routed[0].device.k)
    out = torch.zeros(calls[0][0].shape)

    def layer(overlap: bool):
        def run(x, idx, w):
            dev.host_experts.overlap = overlap
            td.moe(x, idx, w, routed, LIMIT, shared, LIMIT, out)
        return run

    def device_side(x, idx, w):
        slot = routed[0].slot[idx]
        td._device_experts(x, slot.reshape(-1), idx.shape[1], w.reshape(-1), tuple(r.device for r in routed), LIMIT,
                           out)
        td.moe_experts(x, None, None, *shared, LIMIT, out)

    def host_side(x, idx, w):  # the C core's call of split_experts alone, on the same pairs
        rows, ids, wts = td.host_pairs(idx.numpy().astype(np.int32), w.numpy(), (routed[0].slot[idx] < 0).numpy())
        td._host_experts(x.numpy()[rows], ids, wts, tuple(r.host for r in routed), LIMIT, None, 0)

    variants = {"overlap": layer(True), "in turn": layer(False), "device side": device_side,
                "host side": host_side}
    for run in variants.values():  # warm-up: the worker started, the weights touched
        run(*calls[0])
    times = {name: [] for name in variants}
    for _ in range(opts.rounds):
        for name, run in variants.items():
            start = time.perf_counter()
            for call in calls:
                run(*call)
            times[name].append((time.perf_counter() - start) / len(calls))
    dev.close()
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    result = dict(model=str(opts.model), layer=opts.layer, device_experts=opts.device_experts, experts=n_expert,
                  tokens=opts.tokens, torch_threads=opts.torch_threads, core_threads=opts.core_threads,
                  rounds=opts.rounds, calls=opts.calls, ms=ms,
                  bound_ms=max(ms["device side"], ms["host side"]), sum_ms=ms["device side"] + ms["host side"],
                  speedup=ms["in turn"] / ms["overlap"])
    report(result, opts.json)


def report(result: dict, path: Path | None) -> None:
    print(json.dumps(result, indent=1))
    if path:
        path.write_text(json.dumps(result, indent=1) + "\n")


def decode(opts) -> None:
    """The whole model's decode steps, overlapped and in turn (--decode)."""
    import tempfile

    from flashlite.model import load

    f = GGUFFile(opts.model)
    n_layers, n_expert = f.metadata["deepseek4.block_count"], f.metadata["deepseek4.expert_count"]
    try:  # the least budget names what the device must hold (KV cache, attention and dense)
        load(opts.model, device="torch-cpu", gpu_mem=1, ctx=CTX)
    except ValueError as e:
        need = int(str(e).split("must hold: ")[1].split(" bytes")[0])
    floats = lambda name: 4 * int(np.prod(f.tensors[name].ne))  # noqa: E731  (what torch-cpu holds)
    rest = sum(floats(n) for n in f.tensors if "_shexp." in n or n in ("output.weight", "token_embd.weight"))
    per_expert = sum(floats(f"blk.0.ffn_{m}_exps.weight") for m in MATRICES) // n_expert
    usage = np.zeros((n_layers, n_expert), np.int64)
    usage[:, :opts.device_experts] = 100
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "usage.npy", usage)
        model = load(opts.model, device="torch-cpu", threads=opts.torch_threads, ctx=CTX,
                     expert_usage=Path(tmp) / "usage.npy",
                     gpu_mem=need + rest + n_layers * opts.device_experts * per_expert + per_expert // 2)
    torch.set_num_threads(opts.torch_threads)
    check(lib.fl_threads_set(opts.core_threads), "fl_threads_set")
    print(model.device.placement, file=sys.stderr)
    rng = np.random.default_rng(0)
    steps = {True: [], False: []}
    for _ in range(opts.rounds):
        for overlap in (True, False):
            model.device.host_experts.overlap = overlap
            ids = rng.integers(1000, 100000, 4 + opts.decode)
            model.reset()
            model.forward(ids[:4], logits="last")
            for t in ids[4:]:
                start = time.perf_counter()
                model.forward([t], logits="last")
                steps[overlap].append(time.perf_counter() - start)
    model.close()
    ms = {name: 1e3 * statistics.median(steps[o]) for name, o in (("overlap", True), ("in turn", False))}
    report(dict(model=str(opts.model), decode=opts.decode, device_experts=opts.device_experts, experts=n_expert,
                torch_threads=opts.torch_threads, core_threads=opts.core_threads, rounds=opts.rounds,
                step_ms=ms, tok_s={k: 1e3 / v for k, v in ms.items()}, speedup=ms["in turn"] / ms["overlap"]),
           opts.json)


if __name__ == "__main__":
    main()
