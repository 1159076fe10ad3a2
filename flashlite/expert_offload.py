"""Routed experts read from the GGUF file on demand into a RAM budget (csrc/expert_cache.c does the reading).

The dense weights stay memory-mapped; the stacked ffn_{gate,up,down}_exps tensors are never touched through the
map, so their pages stay out of the process. Which experts were used is saved as a histogram [layer, expert] when
the model closes, and the next load pins the hottest of them.
"""
from __future__ import annotations

import os
import re
import warnings
import weakref
from pathlib import Path

import numpy as np

from flashlite._native import check, ffi, lib
from flashlite.atomic import atomic_write
from flashlite.gguf_file import WeightView

POLICIES = {"lru": lib.FL_EXPERT_LRU, "lfu": lib.FL_EXPERT_LFU}
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(text: str | int, option: str = "ram_budget") -> int:
    """'24G', '512MiB', '1.5g', '1000000' -> bytes (binary units); an error names `option`."""
    if isinstance(text, int) and not isinstance(text, bool):
        size = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kmgt]?)(?:i?b)?\s*", str(text), re.IGNORECASE)
        if not m:
            raise ValueError(f"{option}: cannot read {text!r} as a size (examples: 24G, 512M, 1073741824)")
        size = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if not 0 < size < 1 << 62:
        raise ValueError(f"{option}: {text!r} is not a size between 1 byte and 4 EiB")
    return size


def default_usage_path(model_path: str) -> Path:
    """Where the expert-usage histogram of a model file lives between runs."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flashlite"
    name = Path(model_path).name
    return base / f"{name}-{os.path.getsize(model_path)}.expert-usage.npy"


def read_usage(path: str | os.PathLike | None, n_layer: int, n_expert: int) -> np.ndarray | None:
    """The saved expert-usage histogram [layer, expert] at path, or None when there is none of that shape (a
    damaged one only costs what it would have chosen: the pinned experts, the device's hottest)."""
    if path is None or not Path(path).is_file():
        return None
    try:
        counts = np.load(path)
    except (OSError, ValueError):
        return None
    return counts if counts.shape == (n_layer, n_expert) and counts.dtype == np.int64 else None


class ExpertCache:
    """The experts of every MoE layer behind one C cache of ram_budget bytes."""

    def __init__(self, path: str, layers: list[tuple[WeightView, WeightView, WeightView]], n_expert: int,
                 ram_budget: int, policy: str = "lru", io_threads: int = 2, usage_path: str | os.PathLike | None =
                 None, pin_fraction: float = 0.5, direct_io: bool = True, elsewhere: list | None = None):
        """elsewhere: per layer the ids of experts a device holds (hybrid placement), never asked of this cache and
        so never pinned."""
        if policy not in POLICIES:
            raise ValueError(f"expert_policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        if not 0.0 <= pin_fraction < 1.0:
            raise ValueError(f"pin_fraction must lie in [0, 1), got {pin_fraction}")
        self.path, self.n_layer, self.n_expert = path, len(layers), n_expert
        files = sorted({w.path for mats in layers for w in mats})  # the shards holding experts, for a split model
        spec = ffi.new("struct fl_expert_layer[]", self.n_layer)
        for i, mats in enumerate(layers):
            for m, w in enumerate(mats):
                spec[i].offset[m] = w.offset
                spec[i].bytes[m] = w.data.strides[0]
                spec[i].type[m] = int(w.type)
                spec[i].file[m] = files.index(w.path)
        self.slot_bytes = int(lib.fl_expert_cache_slot_bytes(self.n_layer, spec))
        least = self.slot_bytes * self.n_layer
        if ram_budget < least:
            raise ValueError(f"ram_budget {ram_budget} bytes is below one expert per MoE layer: at least {least} "
                             f"bytes ({self.n_layer} layers x {self.slot_bytes} bytes per expert slot)")
        handle = ffi.new("fl_expert_cache **")
        names = [ffi.new("char[]", os.fsencode(f)) for f in files]
        check(lib.fl_expert_cache_open(ffi.new("const char *[]", names), len(names), self.n_layer, n_expert, spec,
                                       ram_budget, POLICIES[policy], io_threads, int(direct_io), handle),
              f"{path}: opening the expert cache")
        self._c = handle[0]
        self.usage_path = Path(usage_path) if usage_path else None
        self._saved_usage = self._load_usage()
        # Also at interpreter exit, so that a chat ended by Ctrl-D still leaves its histogram.
        self._finalizer = weakref.finalize(self, _shut_down, self._c, self.n_layer, self.n_expert, self.usage_path,
                                           self._saved_usage)
        if self._saved_usage is not None and pin_fraction > 0:
            counts = self._saved_usage.copy()
            for layer, ids in enumerate(elsewhere or []):
                counts[layer, ids] = 0
            self._pin_hottest(counts, pin_fraction)
        lib.fl_expert_cache_reset_stats(self._c)

    @property
    def handle(self):
        return self._c

    def _load_usage(self) -> np.ndarray | None:
        return read_usage(self.usage_path, self.n_layer, self.n_expert)

    def _pin_hottest(self, counts: np.ndarray, fraction: float) -> None:
        slots = self.stats()["slots"]
        per_layer = slots // self.n_layer
        n_pin = min(int(per_layer * fraction), per_layer - 1)
        for layer in range(self.n_layer):
            hot = [int(e) for e in np.argsort(-counts[layer], kind="stable")[:n_pin] if counts[layer, e] > 0]
            if hot:
                check(lib.fl_expert_cache_pin(self._c, layer, ffi.new("int32_t[]", hot), len(hot)),
                      f"{self.path}: pinning the hottest experts of MoE layer {layer}")

    def stats(self) -> dict:
        st = ffi.new("struct fl_expert_stats *")
        check(lib.fl_expert_cache_stats(self._c, st), "fl_expert_cache_stats")
        return {
            "expert_hits": st.hits, "expert_misses": st.misses, "expert_bytes_read": st.bytes_read,
            "io_seconds": st.io_seconds, "io_stall_seconds": st.stall_seconds,
            "prefetches": st.prefetches, "prefetch_hits": st.prefetch_hits,
            "prefetch_dropped": st.prefetch_dropped, "slots": st.slots, "slot_bytes": st.slot_bytes,
            "direct_io": bool(st.direct_io), "populated_bytes": st.populated_bytes,
        }

    def reset_stats(self) -> None:
        lib.fl_expert_cache_reset_stats(self._c)

    def prefetch(self, layer: int, experts: np.ndarray) -> None:
        ids = np.ascontiguousarray(experts, np.int32)
        check(lib.fl_expert_cache_prefetch(self._c, layer, ffi.from_buffer("int32_t[]", ids), ids.size),
              f"fl_expert_cache_prefetch (layer {layer})")

    def close(self) -> None:
        """Add this run's usage to the saved histogram and stop the I/O threads; the cache is unusable after."""
        self._finalizer()


def _usage(handle, n_layer: int, n_expert: int) -> np.ndarray:
    counts = np.zeros((n_layer, n_expert), np.int64)
    check(lib.fl_expert_cache_usage(handle, ffi.from_buffer("int64_t[]", counts)), "fl_expert_cache_usage")
    return counts


def _shut_down(handle, n_layer: int, n_expert: int, usage_path: Path | None, saved: np.ndarray | None) -> None:
    """Write saved + this run's usage (whole or not at all), then close the C cache."""
    try:
        if usage_path is not None:
            counts = _usage(handle, n_layer, n_expert) + (saved if saved is not None else 0)
            try:
                usage_path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_write(usage_path) as f:
                    np.save(f, counts)
            except OSError as exc:
                warnings.warn(f"{usage_path}: expert-usage histogram not saved ({exc})", stacklevel=2)
    finally:
        lib.fl_expert_cache_close(handle)
