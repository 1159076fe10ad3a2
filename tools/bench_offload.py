"""Decode with the routed experts read from disk under a RAM budget: every cache policy, with and without prefetch.

    python tools/bench_offload.py [--json] [--repeats N] [--tokens 24] [--slots 16] [--model-dir DIR]

The model is a synthetic GGUF of V4-Flash's real widths (4096 hidden, experts 2048 wide, 13.4 MB each at MXFP4)
with --layers layers of --experts routed experts, built once with tools/make_synthetic.py and `flashlite quantize`
(default recipe mxfp4-q8_0) and kept in --model-dir for reruns. The budget is --slots experts per layer.

One run measures:

- the disk: O_DIRECT sequential reads of large blocks over the expert tensors of the same file, and random reads
  of whole experts (three aligned spans each, as the cache reads them) from --io-threads threads;
- for the routings (a) "model", the model's own router on random weights (close to uniform), (b) "trace", a
  replayed skewed trace (tools/make_routing_trace.py: Zipf popularity, reuse across consecutive tokens, prefetch
  predictions of a chosen accuracy) and (c) "exact", the same trace with every prediction right (only the cached
  configurations with prefetch, the others being the trace's), each configuration: all experts resident (page cache warm; the compute-only ceiling), mmap
  with no budget (the reference: the page cache holds whatever is read), and the cache under the budget with lru,
  lfu and lfu + pinning (pin_fraction of each layer's slots hold the hottest experts of a usage histogram written
  by a separate warm-up run), each with and without prefetch.

--repeats N runs the whole sequence N times and reports the median of every number (JSON: "runs" has each).

Every configuration loads the model afresh with the expert tensors dropped from the page cache (posix_fadvise
DONTNEED; the dense weights stay resident, as they would in use), waits until the cache's background thread has
faulted its slots in (populate_s in --json), decodes --warmup tokens to fill the cache, then
--tokens measured tokens one forward call each. Reported per configuration, over the measured tokens:

- tok/s: measured tokens / their wall time;
- read MB/tok: expert bytes the cache read (for mmap: growth of the expert tensors' page-cache residency over the
  whole run, warm-up included, since the kernel's read-around on faults already reads neighbouring experts then;
  its need is every expert the run used, once);
- need MB/tok: the bytes the policy makes necessary: the same routing replayed through a pure-Python model of the
  same policy (same slot counts, pins, eviction order) without prefetch, misses x each expert's aligned read size.
  Without prefetch (and with exact predictions) the measured and modelled misses agree ("sim" column shows the
  modelled misses); with prefetch, read/need above 1 is what wrong predictions cost;
- hit %: expert_hits / (hits + misses) (an expert a prefetch is still reading counts as a hit);
- pf %: prefetch_hits / prefetches, the share of prefetched experts that were used;
- stall s/tok: seconds the computing thread waited for experts, "of it L0" the first MoE layer's part (its experts
  are known only with the token, so only its attention can hide their reads; JSON: stall per layer);
  hidden %: 1 - stall / disk time, where disk time is read bytes / the disk's measured random whole-expert rate:
  the share of the time the disk needs for these bytes that the computation did not wait for.
  (1 - io_stall_seconds / io_seconds, also in --json as io_hidden_thread_time, overstates it: io_seconds adds up
  the --io-threads readers, which share the disk.);
- ideal tok/s: 1 / max(the resident row's seconds per token, disk time per token), what full overlap of reads and
  compute would give at this read volume.

Under lfu the modelled misses can differ from the measured ones by a few: an expert the current call has computed
and released can be evicted for one of the same call's later reads, depending on how the I/O threads and the
computation interleave; the model keeps every expert of the call until the call ends.
"""
from __future__ import annotations

import argparse
import gc
import json
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS.parent))
sys.path.insert(0, str(TOOLS))

import flashlite  # noqa: E402
from flashlite._native import ffi, lib  # noqa: E402
from flashlite.gguf_file import GGUFFile  # noqa: E402
from flashlite.backends import cpu as cpu_backend  # noqa: E402
from make_routing_trace import load_trace, make_trace  # noqa: E402

IO_ALIGN = 4096
MATRICES = ("gate", "up", "down")
DEFAULT_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flashlite" / "bench"


# ---------------------------------------------------------------- the synthetic model

def ensure_model(model_dir: Path, layers: int, experts: int, log) -> Path:
    """The synthetic GGUF for (layers, experts), built on first use: checkpoint, quantize, delete checkpoint."""
    path = model_dir / f"flash-L{layers}-E{experts}.gguf"
    if path.is_file():
        return path
    model_dir.mkdir(parents=True, exist_ok=True)
    need = (0.6 + 0.16 * layers + 0.0134 * layers * experts) * 2.2e9
    free = shutil.disk_usage(model_dir).free
    if free < need:
        raise SystemExit(f"--model-dir {model_dir}: {free / 1e9:.1f} GB free, building the model needs about "
                         f"{need / 1e9:.1f} GB (checkpoint + GGUF)")
    with tempfile.TemporaryDirectory(dir=model_dir, prefix="ckpt-") as ckpt:
        log(f"building {path} (synthetic checkpoint, then flashlite quantize; a few minutes)")
        subprocess.run([sys.executable, str(TOOLS / "make_synthetic.py"), ckpt, "--preset", "flash", "--layers",
                        str(layers), "--experts", str(experts)], check=True, stdout=subprocess.DEVNULL)
        subprocess.run([sys.executable, "-m", "flashlite.cli", "quantize", ckpt, str(path), "--quiet"], check=True,
                       cwd=TOOLS.parent)
    return path


class ExpertLayout:
    """Where the stacked expert tensors lie in the file and what reading one expert costs."""

    def __init__(self, path: Path):
        f = GGUFFile(path)
        self.n_layer = int(f.get("deepseek4.block_count")) - int(f.get("deepseek4.nextn_predict_layers", 0))
        views = [[f.tensors[f"blk.{i}.ffn_{m}_exps.weight"] for m in MATRICES] for i in range(self.n_layer)]
        self.n_expert = views[0][0].ne[2]
        self.ranges = [(v.offset, v.data.nbytes) for layer in views for v in layer]
        self.expert_bytes = sum(v.data.strides[0] for v in views[0])
        self.dense_ranges = _complement(self.ranges, os.path.getsize(path))
        # The cache reads each matrix as whole 4 KiB blocks around it: exact per-expert read sizes.
        self.read_bytes = np.zeros((self.n_layer, self.n_expert), np.int64)
        for i, layer in enumerate(views):
            for v in layer:
                stride = v.data.strides[0]
                start = v.offset + stride * np.arange(self.n_expert, dtype=np.int64)
                self.read_bytes[i] += _align_up(start + stride) - start // IO_ALIGN * IO_ALIGN
        spec = ffi.new("struct fl_expert_layer[]", self.n_layer)
        for i, layer in enumerate(views):
            for m, v in enumerate(layer):
                spec[i].offset[m], spec[i].bytes[m], spec[i].type[m] = v.offset, v.data.strides[0], int(v.type)
        self.slot_bytes = int(lib.fl_expert_cache_slot_bytes(self.n_layer, spec))
        self.spans = [[(v.offset, v.data.strides[0]) for v in layer] for layer in views]
        self.vocab = int(f.tensors["token_embd.weight"].ne[1])
        self.k = int(f.get("deepseek4.expert_used_count"))

    def expert_spans(self, layer: int, expert: int) -> list[tuple[int, int]]:
        """The aligned (start, length) reads of one expert's three matrices."""
        out = []
        for offset, stride in self.spans[layer]:
            lo = offset + expert * stride
            start = lo // IO_ALIGN * IO_ALIGN
            out.append((start, int(_align_up(lo + stride)) - start))
        return out


def _align_up(v):
    return (v + IO_ALIGN - 1) // IO_ALIGN * IO_ALIGN


def _complement(ranges, size):
    out, pos = [], 0
    for off, n in sorted(ranges):
        if off > pos:
            out.append((pos, off - pos))
        pos = max(pos, off + n)
    if pos < size:
        out.append((pos, size - pos))
    return out


def drop_page_cache(path: Path, ranges) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        for off, n in ranges:
            os.posix_fadvise(fd, off, n, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_through_page_cache(path: Path, ranges, block: int = 16 << 20) -> None:
    with open(path, "rb", buffering=0) as fh:
        buf = bytearray(block)
        for off, n in ranges:
            for pos in range(off, off + n, block):
                fh.seek(pos)
                fh.readinto(memoryview(buf)[:min(block, off + n - pos)])


def cached_bytes(path: Path, ranges) -> int:
    return sum(int(lib.fl_file_cached_bytes(os.fsencode(path), off, n)) for off, n in ranges)


# ---------------------------------------------------------------- the disk's own speed

def _open_direct(path: Path) -> tuple[int, bool]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        probe = mmap.mmap(-1, IO_ALIGN)
        os.preadv(fd, [probe], 0)
        return fd, True
    except OSError:
        return os.open(path, os.O_RDONLY), False


def disk_speed(path: Path, layout: ExpertLayout, mib: int, threads: int, repeats: int, seed: int) -> dict:
    """Sequential GB/s (one reader, 16 MiB blocks) and random whole-expert GB/s (`threads` readers), medians."""
    drop_page_cache(path, layout.ranges)
    fd, direct = _open_direct(path)
    block = 16 << 20
    buf = mmap.mmap(-1, block)
    first = min(off for off, _ in layout.ranges) // IO_ALIGN * IO_ALIGN
    size = os.path.getsize(path)
    seq = []
    try:
        for r in range(repeats):
            start = first + r * (mib << 20)
            start = start if start + (mib << 20) <= size else first
            t0 = time.perf_counter()
            done = 0
            while done < mib << 20:
                n = os.preadv(fd, [buf], start + done)
                if n <= 0:
                    break
                done += n
            seq.append(done / (time.perf_counter() - t0) / 1e9)
            if not direct:
                os.posix_fadvise(fd, start, done, os.POSIX_FADV_DONTNEED)
        rng = np.random.default_rng(seed)
        per_run = max(8, (mib << 20) // layout.expert_bytes)
        rand = []
        for _ in range(repeats):
            keys = [(int(rng.integers(layout.n_layer)), int(rng.integers(layout.n_expert))) for _ in range(per_run)]
            rand.append(_random_expert_reads(fd, layout, keys, threads, direct) / 1e9)
    finally:
        os.close(fd)
    return {"direct_io": direct, "sequential_gbps": statistics.median(seq), "sequential_runs": seq,
            "random_expert_gbps": statistics.median(rand), "random_expert_runs": rand, "threads": threads,
            "mib_per_run": mib}


def _random_expert_reads(fd: int, layout: ExpertLayout, keys, threads: int, direct: bool) -> float:
    todo = list(keys)
    lock = threading.Lock()
    total = [0]

    def reader():
        room = mmap.mmap(-1, int(layout.slot_bytes))
        while True:
            with lock:
                if not todo:
                    return
                layer, expert = todo.pop()
            for start, n in layout.expert_spans(layer, expert):
                done = 0
                while done < n:
                    got = os.preadv(fd, [memoryview(room)[done:n]], start + done)
                    if got <= 0:
                        break
                    done += got
                if not direct:
                    os.posix_fadvise(fd, start, n, os.POSIX_FADV_DONTNEED)
                with lock:
                    total[0] += done

    workers = [threading.Thread(target=reader) for _ in range(threads)]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return total[0] / (time.perf_counter() - t0)


# ---------------------------------------------------------------- routing: replayed or recorded

class Clock:
    """Which step of the routing the forward call in progress is."""
    t = 0


class ReplayGate:
    """Stands in for a layer's MoEGate: the trace's picks for the current token, and its predicted set."""

    def __init__(self, clock: Clock, idx: np.ndarray, pred: np.ndarray, layer: int, route_scale: float):
        self.clock, self.idx, self.pred, self.layer = clock, idx, pred, layer
        self.weight = np.float32(route_scale / idx.shape[2])

    def __call__(self, x: np.ndarray, token_ids: np.ndarray):
        picks = self.idx[self.clock.t, self.layer][None, :].astype(np.int64)
        return np.full(picks.shape, self.weight, np.float32), picks

    def predict(self, x: np.ndarray, token_ids: np.ndarray) -> np.ndarray:
        return self.pred[self.clock.t, self.layer]


class RecordingGate:
    """The layer's own gate, writing down what it picked and what it predicted."""

    def __init__(self, gate, clock: Clock, idx: np.ndarray, pred: list, layer: int):
        self.gate, self.clock, self.idx, self.pred, self.layer = gate, clock, idx, pred, layer

    def __call__(self, x: np.ndarray, token_ids: np.ndarray):
        weights, picks = self.gate(x, token_ids)
        self.idx[self.clock.t, self.layer] = picks[0]
        return weights, picks

    def predict(self, x: np.ndarray, token_ids: np.ndarray) -> np.ndarray:
        guess = self.gate.predict(x, token_ids)
        self.pred[self.clock.t][self.layer] = np.asarray(guess)
        return guess


# ---------------------------------------------------------------- the policy, modelled in Python

def simulate(idx: np.ndarray, n_expert: int, slots: int | None, policy: str, pinned=None) -> np.ndarray:
    """Replay idx [steps, layers, k] through the cache policy of csrc/expert_cache.c without prefetch: slots per
    layer (None: unlimited), evicting among the layer's slots not pinned and not used by the current call the least
    recently used (lru) or least demanded, then least recent (lfu; demands counted from open), an empty slot first.
    Returns a bool [steps, layers, n_expert] of the experts each call had to read."""
    steps, n_layer, _ = idx.shape
    missed = np.zeros((steps, n_layer, n_expert), bool)
    usage = np.zeros((n_layer, n_expert), np.int64)
    resident: list[dict[int, int]] = [{} for _ in range(n_layer)]  # expert -> last use tick
    pins = [set(pinned[i]) if pinned else set() for i in range(n_layer)]
    tick = 0
    for layer in range(n_layer):
        for e in pins[layer]:
            tick += 1
            resident[layer][e] = tick
    for t in range(steps):
        for layer in range(n_layer):
            res, used = resident[layer], sorted({int(e) for e in idx[t, layer]})
            hits = [e for e in used if e in res]
            misses = [e for e in used if e not in res]
            usage[layer, used] += 1
            for e in misses:
                if slots is not None and len(res) >= slots:
                    free = [s for s in res if s not in pins[layer] and s not in used]
                    if policy == "lfu":
                        victim = min(free, key=lambda s: (usage[layer, s], res[s]))
                    else:
                        victim = min(free, key=res.__getitem__)
                    del res[victim]
                res[e] = 0
                missed[t, layer, e] = True
            for e in hits + misses:  # the computation takes resident experts first, then the read ones
                tick += 1
                res[e] = tick
    return missed


def pinned_sets(counts: np.ndarray, slots_per_layer: int, fraction: float) -> list[list[int]]:
    """What ExpertCache pins from a usage histogram (flashlite/expert_offload.py, _pin_hottest)."""
    n_pin = min(int(slots_per_layer * fraction), slots_per_layer - 1)
    return [[int(e) for e in np.argsort(-row, kind="stable")[:n_pin] if row[e] > 0] for row in counts]


# ---------------------------------------------------------------- one configuration

class StallByLayer:
    """Adds each MoE layer's wait for experts (io_stall_seconds across its fl_moe_experts_cached call) into
    `into[layer]` while active: the first layer's experts are known only when the token is, so its attention
    alone can hide their reads, and its share of the stall is structural."""

    def __init__(self, model, into: np.ndarray):
        self.model, self.into = model, into

    def __enter__(self):
        real = cpu_backend.lib
        self.model.net.use_fused_decode(False)  # every layer's fl_moe_experts_cached call from Python, timed here
        model, into = self.model, self.into

        class Timed:
            def __getattr__(self, name):
                return getattr(real, name)

            @staticmethod
            def fl_moe_experts_cached(handle, layer, *args):
                before = model.stats()["io_stall_seconds"]
                status = real.fl_moe_experts_cached(handle, layer, *args)
                into[layer] += model.stats()["io_stall_seconds"] - before
                return status

        self.real, cpu_backend.lib = real, Timed()
        return self

    def __exit__(self, *exc):
        # the model stays op by op: its gates may be the recording or replaying stand-ins, which a fused plan
        # cannot take, and run_config closes it next
        cpu_backend.lib = self.real


def run_config(path: Path, layout: ExpertLayout, cfg: dict, routing: dict, opts, budget: int) -> dict:
    """Load, decode warmup + tokens steps, and measure the last `tokens` of them."""
    policy = cfg["policy"]
    drop_page_cache(path, layout.ranges)
    if policy == "resident":
        read_through_page_cache(path, layout.ranges)
    cold = cached_bytes(path, layout.ranges)
    kwargs = {}
    if policy in ("lru", "lfu", "lfu+pin"):
        kwargs = {"ram_budget": budget, "expert_policy": "lfu" if policy == "lfu+pin" else policy,
                  "expert_prefetch": cfg["prefetch"], "expert_usage": cfg.get("usage_path") or False,
                  "pin_fraction": opts.pin_fraction if policy == "lfu+pin" else 0.0, "io_threads": opts.io_threads}
    t0 = time.perf_counter()
    model = flashlite.load(path, threads=opts.threads, **kwargs)
    load_s = time.perf_counter() - t0
    # steady state: the slots faulted in (the cache does it in the background; here a first read would pay for it)
    t0 = time.perf_counter()
    while kwargs and time.perf_counter() - t0 < 300:
        st = model.stats()
        if st["populated_bytes"] >= st["slots"] * st["slot_bytes"]:
            break
        time.sleep(0.05)
    populate_s = time.perf_counter() - t0 if kwargs else 0.0
    clock = Clock()
    steps = opts.warmup + opts.tokens
    recorded_idx = recorded_pred = None
    k = model.args.n_activated_experts
    for layer, block in enumerate(model.net.layers):
        if routing["kind"] == "trace":
            block.ffn.gate = ReplayGate(clock, routing["idx"], routing["pred"], layer, model.args.route_scale)
        else:
            if recorded_idx is None:
                recorded_idx = np.full((steps, layout.n_layer, k), -1, np.int32)
                recorded_pred = [[None] * layout.n_layer for _ in range(steps)]
            block.ffn.gate = RecordingGate(block.ffn.gate, clock, recorded_idx, recorded_pred, layer)
    times = []
    stall_by_layer = np.zeros(layout.n_layer)
    with np.errstate(over="ignore"), StallByLayer(model, stall_by_layer):
        for step in range(steps):
            if step == opts.warmup:
                model.reset_stats()
                stall_by_layer[:] = 0
            clock.t = step
            t0 = time.perf_counter()
            model.forward([int(routing["tokens"][step])])
            times.append(time.perf_counter() - t0)
    stats = model.stats()
    page_cache_after = cached_bytes(path, layout.ranges)
    model.close()
    del model
    gc.collect()
    window = times[opts.warmup:]
    out = {"routing": routing["name"], "policy": policy, "prefetch": cfg["prefetch"], "load_s": load_s,
           "populate_s": populate_s,
           "tokens": opts.tokens, "tok_s": len(window) / sum(window), "median_token_s": statistics.median(window),
           "cold_expert_page_cache_bytes": cold}
    if policy in ("lru", "lfu", "lfu+pin"):
        demands = stats["expert_hits"] + stats["expert_misses"]
        out.update({k: stats[k] for k in ("expert_hits", "expert_misses", "expert_bytes_read", "io_seconds",
                                          "io_stall_seconds", "prefetches", "prefetch_hits", "prefetch_dropped",
                                          "slots", "slot_bytes", "direct_io")})
        out["read_bytes_per_token"] = stats["expert_bytes_read"] / opts.tokens
        out["hit_rate"] = stats["expert_hits"] / demands if demands else None
        out["prefetch_precision"] = stats["prefetch_hits"] / stats["prefetches"] if stats["prefetches"] else None
        out["io_s_per_token"] = stats["io_seconds"] / opts.tokens
        out["stall_s_per_token"] = stats["io_stall_seconds"] / opts.tokens
        out["stall_s_per_token_by_layer"] = (stall_by_layer / opts.tokens).tolist()
        out["stall_s_per_token_layer0"] = out["stall_s_per_token_by_layer"][0]
        out["io_hidden_thread_time"] = 1 - stats["io_stall_seconds"] / stats["io_seconds"] \
            if stats["io_seconds"] else None
    else:
        # The kernel's read-ahead around mmap faults (read_ahead_kb) pulls in neighbouring experts during the
        # warm-up already, so only the whole run compares with what the routing needs.
        out["measured_over"] = "run"
        out["read_bytes_per_token"] = (page_cache_after - cold) / steps
    out["_idx"] = recorded_idx if recorded_idx is not None else routing["idx"][:steps]
    out["_pred"] = recorded_pred
    return out


def add_model_of_policy(res: dict, layout: ExpertLayout, slots: int, pinned) -> None:
    """The bytes per token the policy makes necessary on the routing this configuration saw."""
    if res["policy"] == "resident":
        res["need_bytes_per_token"] = 0.0
        return
    idx = res["_idx"]
    policy = {"lfu+pin": "lfu"}.get(res["policy"], res["policy"])
    limit = slots if res["policy"] in ("lru", "lfu", "lfu+pin") else None
    missed = simulate(idx, layout.n_expert, limit, policy, pinned if res["policy"] == "lfu+pin" else None)
    window = missed if res.get("measured_over") == "run" else missed[-res["tokens"]:]
    demands = sum(len(set(r)) for r in idx[-len(window):].reshape(-1, idx.shape[2]))
    res["sim_misses"] = int(window.sum())
    res["sim_hit_rate"] = 1 - window.sum() / demands
    res["sim_layer0_miss_share"] = float(window[:, 0].sum() / window.sum()) if window.sum() else None
    res["need_bytes_per_token"] = float((window * layout.read_bytes[None]).sum() / len(window))
    res["read_over_need"] = res["read_bytes_per_token"] / res["need_bytes_per_token"] \
        if res["need_bytes_per_token"] else None


def prediction_precision(idx: np.ndarray, pred: list) -> float | None:
    """For recorded routing: the share of predicted experts the next layer really picked."""
    right = total = 0
    for t, row in enumerate(pred):
        for layer, guess in enumerate(row):
            if guess is not None:
                right += len({int(e) for e in guess} & {int(e) for e in idx[t, layer]})
                total += len(guess)
    return right / total if total else None


def plan(routings: list[str], policies: list[str], repeats: int):
    """(repeat, routing, policy, prefetch) in run order; the exact-prediction routing only runs what differs from
    the trace (the cache with prefetch)."""
    for repeat in range(repeats):
        for name in routings:
            for policy in policies:
                budgeted = policy in ("lru", "lfu", "lfu+pin")
                if name == "exact" and not budgeted:
                    continue
                for prefetch in ((True,) if name == "exact" else (False, True)) if budgeted else (False,):
                    yield repeat, name, policy, prefetch


def median_of(same: tuple[dict, ...]) -> dict:
    """One configuration over its repeats: the median of every number, the first repeat's other fields."""
    out = dict(same[0])
    for key, v in same[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and all(r.get(key) is not None for r in same):
            out[key] = statistics.median(r[key] for r in same)
    return out


def add_overlap(results: list[dict], disk_bytes_per_s: float) -> None:
    """Disk time per token, the share of it hidden behind compute, and the tok/s of perfect overlap."""
    for r in results:
        if "expert_bytes_read" not in r:
            continue
        r["disk_s_per_token"] = r["read_bytes_per_token"] / disk_bytes_per_s
        r["io_hidden"] = 1 - r["stall_s_per_token"] / r["disk_s_per_token"] if r["disk_s_per_token"] else None
        same_experts = {"exact": "trace"}.get(r["routing"], r["routing"])
        resident = next((x for x in results if x["routing"] == same_experts and x["policy"] == "resident"), None)
        if resident is not None:
            r["ideal_tok_s"] = 1 / max(1 / resident["tok_s"], r["disk_s_per_token"])


def write_histogram(path: Path, routing: dict, opts, budget: int, usage_path: Path) -> np.ndarray:
    """A separate warm-up run under the budget that leaves its usage histogram at usage_path."""
    usage_path.unlink(missing_ok=True)
    model = flashlite.load(path, threads=opts.threads, ram_budget=budget, expert_policy="lru",
                           expert_prefetch=False, expert_usage=usage_path, pin_fraction=0.0,
                           io_threads=opts.io_threads)
    clock = Clock()
    if routing["kind"] == "trace":
        for layer, block in enumerate(model.net.layers):
            block.ffn.gate = ReplayGate(clock, routing["hist_idx"], routing["hist_idx"], layer,
                                        model.args.route_scale)
    with np.errstate(over="ignore"):
        for step, token in enumerate(routing["hist_tokens"]):
            clock.t = step
            model.forward([int(token)])
    model.close()
    del model
    gc.collect()
    return np.load(usage_path)


# ---------------------------------------------------------------- report

COLUMNS = (("routing", "routing", "{}"), ("policy", "policy", "{}"), ("prefetch", "pf", "{}"),
           ("tok_s", "tok/s", "{:.2f}"), ("read_bytes_per_token", "read MB/tok", "{:.0f}"),
           ("need_bytes_per_token", "need MB/tok", "{:.0f}"), ("read_over_need", "read/need", "{:.3f}"),
           ("expert_misses", "misses", "{:.0f}"), ("sim_misses", "sim", "{:.0f}"), ("hit_rate", "hit %", "{:.1%}"),
           ("prefetch_precision", "pf %", "{:.0%}"), ("disk_s_per_token", "disk s/tok", "{:.3f}"),
           ("stall_s_per_token", "stall s/tok", "{:.3f}"), ("stall_s_per_token_layer0", "of it L0", "{:.3f}"),
           ("io_hidden", "hidden %", "{:.0%}"),
           ("ideal_tok_s", "ideal tok/s", "{:.2f}"))


def _cell(res: dict, key: str, fmt: str) -> str:
    v = res.get(key)
    if v is None:
        return "-"
    if key == "prefetch":
        return "on" if v else "off" if res["policy"] in ("lru", "lfu", "lfu+pin") else "-"
    if key.endswith("bytes_per_token"):
        v = v / 1e6
    return fmt.format(v).replace("%", "") if fmt.endswith("%}") else fmt.format(v)


def print_table(results: list[dict]) -> None:
    rows = [[head for _, head, _ in COLUMNS]] + [[_cell(r, key, fmt) for key, _, fmt in COLUMNS] for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    for row in rows:
        print("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))


# ---------------------------------------------------------------- main

def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--model-dir", type=Path, default=DEFAULT_DIR, help="where the synthetic GGUF is kept")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--experts", type=int, default=64, help="routed experts per layer")
    ap.add_argument("--slots", type=int, default=16, help="budget: expert slots per layer")
    ap.add_argument("--tokens", type=int, default=24, help="measured decode tokens per configuration")
    ap.add_argument("--warmup", type=int, default=8, help="decode tokens before measuring (cache filling)")
    ap.add_argument("--hist-tokens", type=int, default=16, help="tokens of the run that writes the histogram")
    ap.add_argument("--pin-fraction", type=float, default=0.5)
    ap.add_argument("--io-threads", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="compute threads (default: all cores)")
    ap.add_argument("--trace", type=Path, default=None,
                    help="replay this .npz (tools/make_routing_trace.py) instead of generating one")
    ap.add_argument("--zipf", type=float, default=1.0)
    ap.add_argument("--reuse", type=float, default=0.3)
    ap.add_argument("--accuracy", type=float, default=0.8, help="prefetch prediction accuracy of the trace")
    ap.add_argument("--routings", default="model,trace,exact",
                    help="comma-separated subset of model (its own router), trace (the replayed trace), exact (the "
                         "trace with every prefetch prediction right)")
    ap.add_argument("--repeats", type=int, default=1, help="run every configuration this often (medians)")
    ap.add_argument("--policies", default="resident,mmap,lru,lfu,lfu+pin")
    ap.add_argument("--disk-mib", type=int, default=512, help="MiB per disk-speed run (3 runs, median)")
    ap.add_argument("--seed", type=int, default=0)
    opts = ap.parse_args(argv)
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if opts.json else \
        (lambda msg: print(msg, flush=True))
    routings = [r for r in opts.routings.split(",") if r]
    policies = [p for p in opts.policies.split(",") if p]
    if set(routings) - {"model", "trace", "exact"} or set(policies) - {"resident", "mmap", "lru", "lfu", "lfu+pin"}:
        ap.error(f"unknown routing or policy in {opts.routings!r} / {opts.policies!r}")
    if opts.tokens < 1 or opts.warmup < 0 or opts.hist_tokens < 1 or opts.repeats < 1:
        ap.error("--tokens, --hist-tokens and --repeats must be >= 1, --warmup >= 0")

    path = ensure_model(opts.model_dir, opts.layers, opts.experts, log)
    layout = ExpertLayout(path)
    k = layout.k
    if not k <= opts.slots <= layout.n_expert // 2:
        ap.error(f"--slots must lie in {k}..{layout.n_expert // 2}: room for one token's {k} experts, and the "
                 "experts at least twice the budget")
    n_pin = min(int(opts.slots * opts.pin_fraction), opts.slots - 1)
    if "lfu+pin" in policies and opts.slots - n_pin < k:
        ap.error(f"--slots {opts.slots} with --pin-fraction {opts.pin_fraction} pins {n_pin} slots per layer, "
                 f"leaving fewer than one token's {k} experts for the rest")
    budget = opts.slots * layout.n_layer * layout.slot_bytes
    experts_total = int(layout.read_bytes.sum())
    log(f"model {path}: {layout.n_layer} layers x {layout.n_expert} experts of {layout.expert_bytes / 1e6:.1f} MB "
        f"= {experts_total / 1e9:.2f} GB of routed experts; budget {opts.slots} slots/layer = {budget / 1e9:.2f} GB "
        f"({experts_total / budget:.1f}x below the experts)")
    read_through_page_cache(path, layout.dense_ranges)
    disk = disk_speed(path, layout, opts.disk_mib, opts.io_threads, 3, opts.seed)
    log(f"disk ({'O_DIRECT' if disk['direct_io'] else 'buffered'}): sequential {disk['sequential_gbps']:.2f} GB/s "
        f"(16 MiB blocks), random whole experts {disk['random_expert_gbps']:.2f} GB/s ({opts.io_threads} threads)")

    steps = opts.warmup + opts.tokens
    vocab = layout.vocab
    rng = np.random.default_rng(opts.seed)
    n_hash = min(3, layout.n_layer)
    if opts.trace:
        trace = load_trace(opts.trace)
        if trace["idx"].shape[0] < opts.hist_tokens + steps or trace["idx"].shape[1] != layout.n_layer \
                or int(trace["n_expert"]) != layout.n_expert:
            ap.error(f"--trace {opts.trace}: needs >= {opts.hist_tokens + steps} tokens, {layout.n_layer} layers, "
                     f"{layout.n_expert} experts; has {trace['idx'].shape} of {int(trace['n_expert'])}")
    else:
        trace = make_trace(opts.hist_tokens + steps, layout.n_layer, layout.n_expert,
                           k, opts.zipf, opts.reuse,
                           opts.accuracy, n_hash, opts.seed)
    tokens = rng.integers(1000, vocab, size=steps)
    hist_tokens = rng.integers(1000, vocab, size=opts.hist_tokens)
    all_routings = {
        "model": {"name": "model", "kind": "model", "tokens": tokens, "hist_tokens": hist_tokens},
        "trace": {"name": "trace", "kind": "trace", "tokens": tokens, "hist_tokens": hist_tokens,
                  "idx": trace["idx"][opts.hist_tokens:], "pred": trace["pred"][opts.hist_tokens:],
                  "hist_idx": trace["idx"][:opts.hist_tokens]},
        # The same trace with every prediction right: what prefetch costs when the predictor is perfect.
        "exact": {"name": "exact", "kind": "trace", "tokens": tokens, "hist_tokens": hist_tokens,
                  "idx": trace["idx"][opts.hist_tokens:], "pred": trace["idx"][opts.hist_tokens:],
                  "hist_idx": trace["idx"][:opts.hist_tokens]},
    }

    runs: list[list[dict]] = [[] for _ in range(opts.repeats)]
    histograms = {}
    with tempfile.TemporaryDirectory(prefix="fl-bench-offload-") as tmp:
        for repeat, name, policy, prefetch in plan(routings, policies, opts.repeats):
            source = {"exact": "trace"}.get(name, name)
            if policy == "lfu+pin" and source not in histograms:
                log(f"[{source}] warm-up run of {opts.hist_tokens} tokens for the usage histogram")
                counts = write_histogram(path, all_routings[source], opts, budget, Path(tmp) / f"{source}.npy")
                histograms[source] = counts, pinned_sets(counts, opts.slots, opts.pin_fraction)
            counts, pins = histograms.get(source, (None, None))
            cfg = {"policy": policy, "prefetch": prefetch}
            if policy == "lfu+pin":
                cfg["usage_path"] = Path(tmp) / "pin-usage.npy"
                np.save(cfg["usage_path"], counts)  # afresh each time: closing the model adds its own usage
            res = run_config(path, layout, cfg, all_routings[name], opts, budget)
            add_model_of_policy(res, layout, opts.slots, pins)
            if res["_pred"] is not None:
                res["prediction_precision"] = prediction_precision(res["_idx"], res["_pred"])
            if name == "model":
                first = next((r for run in runs for r in run if r["routing"] == "model"), None)
                res["same_routing_as_first"] = first is None or bool(np.array_equal(first["_idx"], res["_idx"]))
                if not res["same_routing_as_first"]:
                    log(f"[model] {policy}: the model routed differently than under {first['policy']}")
            runs[repeat].append(res)
            log(f"[{name} #{repeat + 1}] {policy:8s} prefetch {'on ' if prefetch else 'off'}: {res['tok_s']:.2f} "
                f"tok/s, read {res['read_bytes_per_token'] / 1e6:.0f} MB/tok, need "
                f"{res['need_bytes_per_token'] / 1e6:.0f} MB/tok")
    for run in runs:
        add_overlap(run, disk["random_expert_gbps"] * 1e9)
        for r in run:
            r.pop("_idx")
            r.pop("_pred")
    results = [median_of(same) for same in zip(*runs)]
    summary = {
        "model": {"path": str(path), "layers": layout.n_layer, "experts": layout.n_expert,
                  "expert_bytes": layout.expert_bytes, "routed_expert_bytes": experts_total,
                  "file_bytes": os.path.getsize(path)},
        "budget": {"bytes": budget, "slots_per_layer": opts.slots, "slot_bytes": layout.slot_bytes,
                   "experts_over_budget": experts_total / budget, "pin_fraction": opts.pin_fraction},
        "disk": disk,
        "trace": {"zipf": float(trace["zipf"]), "reuse": float(trace["reuse"]),
                  "accuracy": float(trace["accuracy"]), "n_hash_layers": int(trace["n_hash_layers"]),
                  "seed": int(trace["seed"])},
        "tokens": opts.tokens, "warmup": opts.warmup, "threads": opts.threads, "io_threads": opts.io_threads,
        "repeats": opts.repeats, "configs": results, "runs": runs if opts.repeats > 1 else None,
    }
    if opts.json:
        print(json.dumps(summary, default=_jsonable))
    else:
        print()
        print_table(results)


def _jsonable(v):
    if isinstance(v, (np.integer, np.floating, np.bool_)):
        return v.item()
    if isinstance(v, Path):
        return str(v)
    raise TypeError(f"{type(v).__name__} is not JSON serialisable")


if __name__ == "__main__":
    main()
