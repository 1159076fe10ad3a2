"""A split MoE layer's wall time with its host experts overlapped with the device's work and without, on a CPU
torch device (the only overlap a machine without an accelerator can show: two sides sharing its cores).

    python tools/bench_hybrid_overlap.py -m flash3-Q4_K_M.gguf [--layer 0] [--device-experts 8] [--tokens 1]
        [--torch-threads 1] [--core-threads 1] [--rounds 7] [--calls 20] [--json out.json]

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
    opts = ap.parse_args()
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
    print(json.dumps(result, indent=1))
    if opts.json:
        opts.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
