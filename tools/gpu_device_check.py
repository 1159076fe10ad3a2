#!/usr/bin/env python3
"""The device check of the torch backend (issue 15, docs/gpu.md), for a session that has a GPU: one run, under 5
minutes on an H200, printing a summary and writing it as JSON.

1. Correctness on the tiny_v4 fixture (quantized here from tests/fixtures/tiny_v4): the f32 file's logits on the
   device against transformers' goldens (at once and token by token; tests/test_forward.py's 1e-4 at clear
   positions) and its greedy continuation; the quantized files (mxfp4-q8_0, q4_k; the Triton kernels at "ieee" and
   "tf32") against the CPU backend on the same weights decoded to f32, which differs from the device only by
   float32 rounding (measured on a CPU torch device: 8e-6).
   The f32 file in hybrid placement (gpu_mem for 20 of 48 routed experts, the rest on the CPU) against the
   goldens, and its split layer's host experts overlapped (a worker thread, a stream) against in turn; on CUDA,
   a MoE layer's routed experts under torch.cuda.set_sync_debug_mode("error") (nothing read back),
   decode steps under its "warn" mode (one synchronisation a step: the logits), and the decode step replayed as
   captured CUDA graphs (a resident model's whole step one graph, its heads over the KV rings) against op by op
   (cuda_graphs=False), in both KV formats and in hybrid placement, across a rollback: the same greedy tokens,
   logits within 1e-4, every segment used captured, the graphs launched per step and the captures per segment.
2. Speed on a full-width synthetic V4 (tools/make_synthetic.py --preset flash: V4-Flash's widths, --layers layers,
   --experts routed experts, quantized with the default recipe): prefill (--prompt tokens) and greedy decode
   (--gen tokens) in tok/s on the device with the Triton kernels (with CUDA graphs, and without: the decode
   speed-up, the same tokens), on the device with weights decoded to float32
   (torch matmuls: a second implementation, whose logits the kernels' are compared with), in hybrid placement with
   every routed expert on the CPU (the C core), and on the CPU backend;
   decode's weight bytes per token over its time, next to the device's read bandwidth (a float32 sum over 2 GiB).

    python tools/gpu_device_check.py --json $OUT/device_check.json
    python tools/gpu_device_check.py --device torch-cpu --no-speed     # the correctness half, on the CPU
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flashlite.backends import open_device  # noqa: E402
from flashlite.model import load  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "tiny_v4"
CLEAR = 1e-4


def run(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, *args], check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)


def quantize(src: Path, out: Path, *args: str) -> Path:
    if not out.exists():
        run("-m", "flashlite.cli", "quantize", str(src), str(out), "--quiet", *args)
    return out


def device_with(base, **options):
    """The device `base` (a TorchDevice) with other kernels or precision."""
    from flashlite.backends.torch_device import TorchDevice
    return TorchDevice(base.device, **{"kernels": base.kernels, "precision": base.precision, **options})


def correctness(base, work: Path, out: dict) -> None:
    g = np.load(FIXTURE / "goldens.npz")
    ids, clear = g["prompt_ids"], g["decision_gap"] > CLEAR
    model = load(quantize(FIXTURE, work / "f32.gguf", "--type", "f32"), device=base)
    for chunk in (None, 1):
        t0 = time.perf_counter()
        delta = np.abs(model.logits(ids, chunk=chunk) - g["logits"]).max(axis=1)[clear].max()
        out[f"f32 vs goldens, chunk {chunk or 'all'}"] = {"max_delta": float(delta), "ok": bool(delta <= 1e-4),
                                                          "seconds": round(time.perf_counter() - t0, 2)}
    greedy = list(model.generate(ids, len(g["greedy_ids"])))
    out["f32 greedy == goldens"] = {"ok": greedy == g["greedy_ids"].tolist()}
    # the fp8 KV cache packed on the device follows the CPU's (tests/test_device_kv.py: median 5.9e-5 on torch-cpu)
    fp8 = load(work / "f32.gguf", device=base, kv_format="fp8").logits(ids)
    delta = np.median(np.abs(fp8 - load(work / "f32.gguf", kv_format="fp8").logits(ids)).max(axis=1))
    out["f32, fp8 KV cache vs cpu's fp8 cache"] = {"median_delta": float(delta), "ok": bool(delta <= 3e-4)}
    hybrid = device_with(base)
    f32 = work / "f32.gguf"
    budget = all_but_routed(f32, hybrid) + 20 * (expert_bytes(f32, hybrid))  # 20 of 48 routed experts
    model = load(f32, device=hybrid, gpu_mem=budget)
    overlapped = model.logits(ids)
    delta = np.abs(overlapped - g["logits"]).max(axis=1)[clear].max()
    out["f32 hybrid (20/48 routed experts on the device) vs goldens"] = {
        "max_delta": float(delta), "ok": bool(delta <= 1e-4), "placement": str(hybrid.placement)}
    # the split layer's host experts on the worker thread (on CUDA: uploaded on its stream from pinned memory)
    # against the C call on the caller after the device's share; bitwise on torch-cpu, and on CUDA unless the
    # device's index_add (atomic) orders its sums differently from one run to the next
    hybrid.host_experts.overlap = False
    delta = float(np.abs(overlapped - model.logits(ids)).max())
    hybrid.host_experts.overlap = True
    out["f32 hybrid, host experts overlapped vs in turn"] = {"max_delta": delta, "bitwise": delta == 0,
                                                             "ok": delta <= 1e-5}
    model.close()
    if base.device.type == "cuda":  # a MoE layer all on the device queues without waiting for the host
        import torch
        from flashlite.backends.torch_device import moe_experts
        f = load(f32, device=base).net.layers[3].ffn
        x = torch.randn(5, f.args.dim, device=base.device)
        idx = torch.randint(0, 8, (5, 2), device=base.device)
        y = torch.zeros_like(x)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            moe_experts(x, idx, torch.rand(5, 2, device=base.device), f.w1, f.w3, f.w2, f.limit, y)
            out["routed experts without a synchronisation"] = {"ok": True}
        except RuntimeError as exc:
            out["routed experts without a synchronisation"] = {"ok": False, "error": str(exc)[:300]}
        finally:
            torch.cuda.set_sync_debug_mode("default")
    if base.device.type == "cuda":
        for kv_format in ("f32", "fp8"):
            out[f"cuda graphs vs op by op, f32 file, {kv_format} KV"] = graphs_vs_eager(f32, base, g, kv_format)
        out["cuda graphs vs op by op, hybrid"] = graphs_vs_eager(f32, hybrid, g, "f32", gpu_mem=budget)
        for kv_format, graphs in (("f32", True), ("fp8", True), ("f32", False)):
            out[f"decode steps ({kv_format} KV, cuda graphs {'on' if graphs else 'off'}) synchronise once, for the "
                f"logits"] = step_syncs(load(f32, device=base, kv_format=kv_format, cuda_graphs=graphs), ids)
    for recipe in ((), ("--type", "q4_k")):
        name = recipe[-1] if recipe else "mxfp4-q8_0"
        path = quantize(FIXTURE, work / f"{name}.gguf", *recipe)
        reference = load(quantize(path, work / f"{name}-f32.gguf", "--type", "f32", "--allow-requantize")).logits(ids)
        for precision in ("ieee", "tf32") if base.kernels == "triton" else ("ieee",):
            device = device_with(base, precision=precision)
            got = load(path, device=device).logits(ids)
            delta = float(np.abs(got - reference).max())
            out[f"{name} ({device}, {precision}) vs cpu on decoded f32"] = {
                "max_delta": delta, "decoded_on_device": device.decoded,
                "ok": delta <= (1e-3 if precision == "ieee" else 5e-2)}


def graphs_vs_eager(path: Path, base, g, kv_format: str, gpu_mem=None) -> dict:
    """The file at path on CUDA with its decode step captured (load's default: a resident model's whole step is
    one graph, flashlite/device/layer_runs.py; a hybrid one's a graph per run) and op by op (cuda_graphs=False):
    greedy tokens (the goldens' too with an f32 cache), and the last logits of steps 126..139, then, rolled back
    to 131, of steps 131..139 again, against each other (the heads over the KV rings differ from op by op by
    float32 rounding: tests/test_step_graphs.py's ATOL); every segment used captured, none failed; the graphs
    launched per step and how often each segment was captured (again at each doubling of a ring)."""
    ids, n = g["prompt_ids"], len(g["greedy_ids"])
    graphed, eager = (load(path, device=base, kv_format=kv_format, gpu_mem=gpu_mem, cuda_graphs=graphs)
                      for graphs in (True, False))
    tokens = [list(m.generate(ids, n)) for m in (graphed, eager)]
    rows = []
    for m in (graphed, eager):
        m.reset()
        m.forward(ids[:126])
        got = [m.forward([int(t)], logits="last") for t in ids[126:140]]
        m.truncate(131)
        got += [m.forward([int(t)], logits="last") for t in ids[131:140]]
        rows.append(np.concatenate(got))
    graphs = graphed.net.graphs
    used = [s for s in graphs.segments if s.inputs is not None]
    replays = graphs.replays
    graphed.forward([int(ids[140])], logits="last")
    delta = float(np.abs(rows[0] - rows[1]).max())
    return {"same_greedy": tokens[0] == tokens[1], "greedy_is_goldens": tokens[0] == g["greedy_ids"].tolist(),
            "max_delta": delta,
            "graphs": str(graphs), "failures": graphs.failures, "graphs_per_step": graphs.replays - replays,
            "captures": {s.name: s.bindings for s in used},
            "ok": bool(tokens[0] == tokens[1] and delta <= 1e-4 and not graphs.failures
                       and all(s.graph is not None for s in used))}


def step_syncs(model, ids) -> dict:
    """Five decode steps (positions 126..130: past the indexer's top-k, across the checkpoint at 128) of a model
    all on a CUDA device under torch's sync debug mode: every synchronisation torch makes is a warning, and the
    only one a step may make is bringing its logits over (tests/test_device_sync.py counts the reads Python makes
    on torch-cpu; this also sees those inside torch's operations and blocking uploads). A step before them captures
    the step graphs' segments, when the model has them (a capture synchronises), with the KV rings reserved for
    all five."""
    import warnings

    import torch
    model.reset()
    model.forward(ids[:125])
    for layer in model.cache.layers:  # the rings hold the counted steps: no capture among them at a doubling (128)
        layer.reserve(8)
    model.forward(ids[125:126])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for token in ids[126:131]:
                model.forward([int(token)], logits="last")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [f"{w.filename}:{w.lineno}: {w.message}"[:200] for w in caught if "synchroniz" in str(w.message)]
    return {"syncs": len(syncs), "ok": len(syncs) == 5, "first": syncs[:4]}


def _placement(path: Path, device):
    """The hybrid placement of the file at path on device with room for everything (its bytes per class)."""
    from flashlite.backends import placement
    from flashlite.gguf_file import GGUFFile
    from flashlite.models.deepseek_v4 import ModelArgs, expected_tensors

    f = GGUFFile(path)
    args = ModelArgs.from_gguf(f)
    views = {name: f.load(name, ne, use) for name, (ne, use) in expected_tensors(args).items()}  # as load has them
    return placement.plan(args, views, device.nbytes, 1 << 60, placement.kv_cache_bytes(args, args.max_seq_len,
                                                                                         256))


def all_but_routed(path: Path, device) -> int:
    """gpu_mem that holds the KV cache (at the default context), the dense weights, the head and the shared
    experts of the file at path on device, and no routed expert."""
    p = _placement(path, device)
    return sum(p.device_bytes[c] for c in ("kv_cache", "dense", "head_embed", "shared_experts"))


def expert_bytes(path: Path, device) -> int:
    p = _placement(path, device)
    return p.device_bytes["routed_experts"] // (len(p.experts) * p.n_expert)


def read_bandwidth(torch, device) -> float:
    """GB/s of a float32 sum over 2 GiB on the device (what decode's weight reads can reach)."""
    x = torch.ones(1 << 29, device=device)
    x.sum()
    torch.cuda.synchronize() if device.type == "cuda" else None
    t0 = time.perf_counter()
    for _ in range(5):
        x.sum()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 5 * x.numel() * 4 / (time.perf_counter() - t0) / 1e9


def decode_bytes(model) -> int:
    """Weight bytes a decode token reads: every matrix, of each routed expert stack the used share."""
    a, total = model.args, 0
    for name, view in model.file.tensors.items():
        if not name.startswith(("blk.", "output.", "output_hc")):
            continue
        share = a.n_activated_experts / a.n_routed_experts if "_exps." in name else 1.0
        total += int(view.data.nbytes * share)
    return total + a.dim * 4  # one embedding row


def speed(base, work: Path, args, out: dict) -> None:
    import torch

    syn = work / "synthetic"
    if not syn.exists():
        run(str(ROOT / "tools" / "make_synthetic.py"), str(syn), "--preset", "flash", "--layers", str(args.layers),
            "--experts", str(args.experts))
    path = quantize(syn, work / "synthetic.gguf")
    ids = np.random.default_rng(0).integers(0, 129280, args.prompt)  # V4-Flash's vocabulary (--preset flash)
    logits = {}
    runs = [("device", base, None, {}), ("device, decoded f32", device_with(base, kernels="dequantized"), None, {}),
            ("hybrid, routed experts on the cpu", device_with(base), all_but_routed(path, base), {}),
            ("cpu", "cpu", None, {})]
    if base.device.type == "cuda":  # "device" replays its step's captured segments; this one runs op by op
        runs.insert(1, ("device, no cuda graphs", device_with(base), None, {"cuda_graphs": False}))
    for name, device, gpu_mem, options in runs:
        t0 = time.perf_counter()
        model = load(path, device=device, gpu_mem=gpu_mem, **options)
        loaded = time.perf_counter() - t0
        model.forward(ids[:16], logits="last")  # compile the kernels of every shape met below
        for token in ids[:9]:
            model.forward([int(token)], logits="last")
        model.reset()
        t0 = time.perf_counter()
        row = model.forward(ids, logits="last")[-1]
        prefill = time.perf_counter() - t0
        # The KV rings made room for the whole decode, so that its graph is captured once, at its first step (timed
        # apart: first_step_s), and not again at a ring's doubling within the timed steps.
        for layer in model.cache.layers:
            layer.reserve(args.gen + 1)
        tokens = [int(np.argmax(row))]
        t0 = time.perf_counter()
        row = model.forward([tokens[-1]], logits="last")[-1]
        first_step = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(args.gen - 1):
            tokens.append(int(np.argmax(row)))
            row = model.forward([tokens[-1]], logits="last")[-1]
        decode = time.perf_counter() - t0
        logits[name] = row
        out[f"speed {name}"] = {"load_s": round(loaded, 1), "prefill_tok_s": round(args.prompt / prefill, 1),
                                "decode_tok_s": round((args.gen - 1) / decode, 2), "first_step_s": round(first_step, 3),
                                "tokens": tokens[:8]}
        if getattr(model.net, "graphs", None) is not None:  # a resident model's step: one graph launch
            out[f"speed {name}"]["graphs"] = str(model.net.graphs)
            out[f"speed {name}"]["graphs_per_step"] = round(model.net.graphs.replays / (args.gen + 9), 2)
        if name == "device":
            per_token = decode_bytes(model)
            out[f"speed {name}"].update(weight_bytes_per_token=per_token,
                                        decode_weight_gb_s=round(per_token * (args.gen - 1) / decode / 1e9, 1))
            if base.device.type == "cuda":
                out[f"speed {name}"]["device_read_gb_s"] = round(read_bandwidth(torch, base.device), 1)
        del model
        if base.device.type == "cuda":
            torch.cuda.empty_cache()
    if "device, no cuda graphs" in logits:
        a, b = logits["device"], logits["device, no cuda graphs"]
        out["synthetic: cuda graphs vs op by op, last decode logits"] = {
            "max_delta_over_max": float(np.abs(a - b).max() / np.abs(b).max()),
            "same_tokens": out["speed device"]["tokens"] == out["speed device, no cuda graphs"]["tokens"],
            "decode_speedup": round(out["speed device"]["decode_tok_s"]
                                    / out["speed device, no cuda graphs"]["decode_tok_s"], 2)}
    a, b = logits["device"], logits["device, decoded f32"]
    out["synthetic: kernels vs decoded f32, last decode logits"] = {
        "max_delta_over_max": float(np.abs(a - b).max() / np.abs(b).max()), "same_tokens":
            out["speed device"]["tokens"] == out["speed device, decoded f32"]["tokens"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="load's device option (default cuda)")
    ap.add_argument("--work", type=Path, default=None, help="folder for the GGUFs made (default: a temporary one)")
    ap.add_argument("--layers", type=int, default=2, help="layers of the synthetic model")
    ap.add_argument("--experts", type=int, default=16, help="routed experts of the synthetic model")
    ap.add_argument("--prompt", type=int, default=512, help="prefill tokens")
    ap.add_argument("--gen", type=int, default=32, help="decode tokens")
    ap.add_argument("--no-speed", action="store_true", help="the correctness checks only")
    ap.add_argument("--json", type=Path, default=None, help="write the summary here")
    args = ap.parse_args(argv)
    base = open_device(args.device)
    if base is None:
        print(f"device {args.device!r} is the CPU backend: nothing to check")
        return 0
    out: dict = {"device": str(base)}
    if base.device.type == "cuda":
        import torch
        out["gpu"] = torch.cuda.get_device_name(base.device)
        out["torch"], out["triton"] = torch.__version__, __import__("triton").__version__
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        steps = {"correctness": lambda: correctness(base, work, out)}
        if not args.no_speed:
            steps["speed"] = lambda: speed(base, work, args, out)
        for name, step in steps.items():
            t0 = time.perf_counter()
            try:
                step()
            except Exception as exc:  # report what ran, then the failure
                out[f"error in {name}"] = f"{type(exc).__name__}: {exc}"
            out[f"seconds {name}"] = round(time.perf_counter() - t0, 1)
            print(json.dumps(out, indent=1), flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    failed = [k for k, v in out.items() if k.startswith("error") or (isinstance(v, dict) and v.get("ok") is False)]
    print("FAILED: " + ", ".join(failed) if failed else "all checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
