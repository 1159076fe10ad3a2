"""Prefill and decode speed of the DeepSeek V4 forward pass, and the share of decode time spent outside the C core.

    python tools/bench_forward.py MODEL.gguf [--prompt 64] [--decode 16] [--threads N]

Use a synthetic full-width model (tools/make_synthetic.py, then `flashlite quantize`) with a few layers: the
orchestration share measured there is what a 43-layer V4-Flash sees per layer.
"""
import argparse
import time

import numpy as np

from flashlite import model as model_module
from flashlite.models import deepseek_v4


class CoreTimer:
    """Wraps the C entry points the forward pass calls and adds up the seconds spent inside them."""

    NAMES = ("fl_attn_sink", "fl_compress_pool", "fl_moe_experts")

    def __init__(self):
        self.seconds = 0.0
        self._matmul = deepseek_v4.matmul
        self._lib = deepseek_v4.lib

    def _timed(self, fn):
        def call(*args):
            t0 = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.seconds += time.perf_counter() - t0
        return call

    def __enter__(self):
        timed_lib = type("TimedLib", (), {})()
        for name in dir(self._lib):
            setattr(timed_lib, name, getattr(self._lib, name))
        for name in self.NAMES:
            setattr(timed_lib, name, self._timed(getattr(self._lib, name)))
        deepseek_v4.lib = timed_lib
        deepseek_v4.matmul = self._timed(self._matmul)
        return self

    def __exit__(self, *exc):
        deepseek_v4.lib, deepseek_v4.matmul = self._lib, self._matmul


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    ap.add_argument("--decode", type=int, default=16, help="decode steps")
    ap.add_argument("--threads", type=int, default=None)
    opts = ap.parse_args()

    t0 = time.perf_counter()
    m = model_module.load(opts.model, threads=opts.threads)
    print(f"load: {time.perf_counter() - t0:.2f} s ({m.args.n_layers} layers, dim {m.args.dim})")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, m.vocab_size, opts.prompt)
    m.reset()
    t0 = time.perf_counter()
    row = m.forward(ids)[-1]
    prefill = time.perf_counter() - t0
    print(f"prefill: {opts.prompt} tokens, {opts.prompt / prefill:.2f} tok/s")
    with CoreTimer() as core:
        t0 = time.perf_counter()
        for _ in range(opts.decode):
            row = m.forward([int(np.argmax(row))])[-1]
        decode = time.perf_counter() - t0
    outside = decode - core.seconds
    print(f"decode: {opts.decode} tokens, {opts.decode / decode:.2f} tok/s; outside the C core "
          f"{outside / opts.decode * 1e3:.2f} ms/token = {100 * outside / decode:.1f}% of decode time")
    print(f"compressed KV rows as stored now: {m.cache.row_bytes_per_token():.0f} B/token")


if __name__ == "__main__":
    main()
