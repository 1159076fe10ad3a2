"""Prefill and decode speed of the DeepSeek V4 forward pass, and the share of decode time spent outside the C core.

    python tools/bench_forward.py MODEL.gguf [--prompt 64] [--decode 16] [--threads N] [--kv-format f32|fp8]
        [--ram-budget SIZE] [--busy N] [--op-by-op]

Use a synthetic full-width model (tools/make_synthetic.py, then `flashlite quantize`) with a few layers: the
orchestration share measured there is what a 43-layer V4-Flash sees per layer. At tiny width (make_synthetic's
tiny preset, 43 layers) the matmuls cost nothing and decode's ms per layer is the fixed cost of a step. --busy N
keeps N other processes spinning meanwhile, as a desktop's UI thread or another program does to a core.
--op-by-op decodes through the model definition's operations one by one instead of the backend's planned layer
calls (the two are bitwise equal; docs/architecture.md).
"""
import argparse
import subprocess
import sys
import time

import numpy as np

from flashlite import kv_cache, model as model_module
from flashlite.backends import cpu as cpu_backend


class CoreTimer:
    """Wraps the C entry points the forward pass calls and adds up the seconds spent inside them."""

    NAMES = ("fl_attn_sink", "fl_compress_pool", "fl_moe_experts", "fl_moe_experts_cached", "fl_kv_pack",
             "fl_kv_unpack", "fl_matmul_batch", "fl_hc_pre", "fl_hc_post", "fl_rms_norm", "fl_moe_route",
             "fl_v4_ffn", "fl_v4_attn", "fl_v4_layer", "fl_v4_step", "fl_v4_step_short", "fl_hadamard",
             "fl_indexer_topk")
    MODULES = (cpu_backend, kv_cache)

    def __init__(self):
        self.seconds = 0.0
        self._lib = cpu_backend.lib

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
        for module in self.MODULES:
            module.lib = timed_lib
        return self

    def __exit__(self, *exc):
        for module in self.MODULES:
            module.lib = self._lib


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    ap.add_argument("--decode", type=int, default=16, help="decode steps")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--kv-format", choices=("f32", "fp8"), default="f32")
    ap.add_argument("--ram-budget", default=None, help="routed experts from disk with this cache (e.g. 2G)")
    ap.add_argument("--busy", type=int, default=0, help="processes spinning beside the benchmark")
    ap.add_argument("--op-by-op", action="store_true",
                    help="decode without the backend's fused steps (each operation called from Python)")
    opts = ap.parse_args()
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(opts.busy)]
    try:
        run(opts)
    finally:
        for p in spinners:
            p.kill()


def run(opts):
    t0 = time.perf_counter()
    load_opts = {"kv_format": opts.kv_format}
    if opts.ram_budget:
        load_opts.update(ram_budget=opts.ram_budget, expert_usage=False)
    m = model_module.load(opts.model, threads=opts.threads, **load_opts)
    m.net.use_fused_decode(not opts.op_by_op)
    print(f"load: {time.perf_counter() - t0:.2f} s ({m.args.n_layers} layers, dim {m.args.dim})")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, m.vocab_size, opts.prompt)
    m.reset()
    t0 = time.perf_counter()
    row = m.forward(ids)[-1]
    prefill = time.perf_counter() - t0
    print(f"prefill: {opts.prompt} tokens, {opts.prompt / prefill:.2f} tok/s")
    with CoreTimer() as core:
        t0, cpu0 = time.perf_counter(), time.process_time()
        for _ in range(opts.decode):
            row = m.forward([int(np.argmax(row))])[-1]
        decode, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    outside = decode - core.seconds
    print(f"decode: {opts.decode} tokens, {opts.decode / decode:.2f} tok/s, "
          f"{decode / opts.decode / m.args.n_layers * 1e3:.3f} ms per layer (CPU time of all threads "
          f"{cpu / opts.decode / m.args.n_layers * 1e3:.3f}); outside the C core "
          f"{outside / opts.decode * 1e3:.2f} ms/token = {100 * outside / decode:.1f}% of decode time")
    print(f"compressed KV rows as stored now ({opts.kv_format}): {m.cache.row_bytes_per_token():.0f} B/token")
    if opts.ram_budget:
        st = m.stats()
        print(f"experts: {st['expert_hits']} hits, {st['expert_misses']} misses, "
              f"{st['expert_bytes_read'] / 2**20:.0f} MiB read, {st['io_stall_seconds']:.2f} s waiting")


if __name__ == "__main__":
    main()
