#!/usr/bin/env python3
"""How much of a decode step the step graphs cover (flashlite/device/step_graphs.py, docs/gpu.md): the torch
operations (aten calls) of decode steps on a torch device, counted inside the segments (what a CUDA graph
replays with one launch per segment), between them (the attention heads, op by op) and in the segments' own
copies in and out of their static buffers. Runs in the "static" mode, so on torch-cpu too; no timing.

    python tools/count_step_ops.py model.gguf --device torch-cpu --prefill 126 --steps 3
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flashlite.device import step_graphs  # noqa: E402
from flashlite.model import load  # noqa: E402


class Where:
    """Which part of a step runs now: inside a segment's function, in a segment's copies, or neither."""

    def __init__(self):
        self.in_fn = self.in_segment = 0

    def wrap(self, method, counter: str):
        def wrapped(segment, *args, **kwargs):
            setattr(self, counter, getattr(self, counter) + 1)
            try:
                return method(segment, *args, **kwargs)
            finally:
                setattr(self, counter, getattr(self, counter) - 1)
        return wrapped


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="deepseek4 GGUF")
    ap.add_argument("--device", default="torch-cpu", help="load's device (default torch-cpu)")
    ap.add_argument("--prefill", type=int, default=126, help="prompt tokens before the counted steps")
    ap.add_argument("--steps", type=int, default=3, help="decode steps counted, one line each")
    ap.add_argument("--kv-format", default="f32", help="the KV cache's format (f32, fp8)")
    args = ap.parse_args(argv)
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    where = Where()
    step_graphs.Segment._run = where.wrap(step_graphs.Segment._run, "in_fn")
    step_graphs.Segment.__call__ = where.wrap(step_graphs.Segment.__call__, "in_segment")
    counts = {}

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            part = "segments" if where.in_fn else "segment copies" if where.in_segment else "op by op"
            counts[part] = counts.get(part, 0) + 1
            return func(*args, **(kwargs or {}))

    model = load(args.model, device=args.device, threads=1, cuda_graphs=False, kv_format=args.kv_format)
    model.net.use_step_graphs("static")
    ids = np.random.default_rng(0).integers(0, model.args.vocab_size, args.prefill + args.steps)
    model.forward(ids[:args.prefill])
    print(f"{len(model.net.graphs.segments)} segments; torch operations per decode step:")
    for pos in range(args.prefill, args.prefill + args.steps):
        counts.clear()
        replays = model.net.graphs.replays
        with torch.no_grad(), Count():
            model.forward([int(ids[pos])], logits="last")
        total = sum(counts.values())
        print(f"position {pos}: {model.net.graphs.replays - replays} segments run, {total} operations in all, "
              + ", ".join(f"{k} {v} ({v / total:.0%})" for k, v in sorted(counts.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
