"""Hybrid placement (issue 15, item 3): which of a model's tensors a device backend holds in its memory budget
(load's gpu_mem, --gpu-mem) and which stay in host memory for the C core.

What fits goes to the device in this order, each class whole except the last:

    kv_cache        the decode cache's rows at the model's context (an estimate: see kv_cache_bytes)
    dense           attention, compressors, indexer, norms, hyper-connections, routers (required)
    head_embed      token_embd and output
    shared_experts  every layer's shared expert
    routed_experts  expert by expert, the hottest first (the expert cache's usage histogram when there is one,
                    else layer by layer in id order)

Placement stops at the first class (or routed expert) that does not fit: what follows stays on the host, so the
order is strict. A budget below kv_cache + dense is an error naming --gpu-mem and the bytes needed. Sizes are the
bytes the device holds (TorchDevice.nbytes: a matrix's block bytes under the Triton kernels, float32 values when
decoded), not the file's.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from flashlite.kv_cache import row_formats

DEFAULT_RESERVE = 1 << 30  # of an accelerator's free memory, kept for activations and kernels when no gpu_mem is given
CLASSES = ("kv_cache", "dense", "head_embed", "shared_experts", "routed_experts")
TITLES = {"kv_cache": "KV cache", "dense": "attention and dense", "head_embed": "head and embeddings",
          "shared_experts": "shared experts", "routed_experts": "routed experts"}
_ROUTED = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight$")
_SHARED = re.compile(r"^blk\.\d+\.ffn_(gate|up|down)_shexp\.weight$")
_HEAD_EMBED = ("token_embd.weight", "output.weight")


def tensor_class(name: str) -> str:
    """The placement class of a tensor of the model (CLASSES, less kv_cache)."""
    if _ROUTED.match(name):
        return "routed_experts"
    if _SHARED.match(name):
        return "shared_experts"
    return "head_embed" if name in _HEAD_EMBED else "dense"


def kv_cache_bytes(args, ctx: int, rewind: int, kv_format: str = "f32") -> int:
    """Bytes of a full decode cache at ctx tokens: per layer the window's rows (window + rewind), and for a
    compressed layer its compressed rows (ctx / ratio) and the compressor's pending window (two windows + rewind)
    of kv and score, for ratio 4 the indexer's as well; rows in the kv_format's sizes (the pending windows are
    float32 in both). Growth slack is not counted; checkpoints live on the host."""
    kv_row, index_row = row_formats(args.head_dim, args.index_head_dim, args.rope_head_dim, kv_format)
    total = 0
    for ratio in args.compress_ratios:
        total += (args.window_size + rewind) * kv_row.nbytes
        if ratio:
            overlap = ratio == 4
            states = [(kv_row, (2 if overlap else 1) * args.head_dim)]
            if overlap:
                states.append((index_row, 2 * args.index_head_dim))
            for row, width in states:
                total += ctx // ratio * row.nbytes + 4 * 2 * (2 * ratio + rewind) * width
    return total


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


@dataclass
class Placement:
    """What a device holds of a model: `device_bytes` and `host_bytes` per class (CLASSES order), `experts` the
    routed expert ids on the device per layer (ascending), `budget` the bytes it was given."""

    budget: int
    device_bytes: dict = field(default_factory=dict)
    host_bytes: dict = field(default_factory=dict)
    on_device: set = field(default_factory=set)  # names of the non-routed tensors the device holds
    experts: list = field(default_factory=list)
    n_expert: int = 0

    def resident(self, name: str) -> np.ndarray | None:
        """For load: None when the tensor `name` goes to the device whole; else the ids of the routed experts of
        its stack the device holds (empty: the tensor stays on the host)."""
        m = _ROUTED.match(name)
        if m:
            ids = self.experts[int(m.group(1))]
            return None if ids.size == self.n_expert else ids
        return None if name in self.on_device else np.empty(0, np.int64)

    def routed_on_device(self) -> int:
        return sum(ids.size for ids in self.experts)

    def __str__(self) -> str:
        routed = self.routed_on_device()
        total = self.n_expert * len(self.experts)
        parts = []
        for c in CLASSES:
            what = f"{routed}/{total} " if c == "routed_experts" else ""
            parts.append(f"{TITLES[c]} {what}{_size(self.device_bytes[c])}")
        host = [f"{TITLES[c]} {_size(n)}" for c, n in self.host_bytes.items() if n]
        return (f"placement in {_size(self.budget)} on the device: {', '.join(parts)}; on the CPU: "
                f"{', '.join(host) if host else 'nothing'}")


def plan(args, views: dict, nbytes, budget: int, kv_bytes: int, usage: np.ndarray | None = None) -> Placement:
    """The placement of the tensors `views` (name -> WeightView or array, as the file holds them) in `budget`
    bytes; nbytes(view) is what the device would hold of one; kv_bytes the cache's (kv_cache_bytes); usage an
    expert histogram [layer, expert] (hottest placed first) or None (layer order)."""
    n_layer, n_expert = args.n_layers, args.n_routed_experts
    sizes = {c: 0 for c in CLASSES}
    sizes["kv_cache"] = kv_bytes
    expert_bytes = np.zeros((n_layer, n_expert), np.int64)
    for name, view in views.items():
        c = tensor_class(name)
        if c == "routed_experts":
            expert_bytes[int(_ROUTED.match(name).group(1))] += nbytes(view) // n_expert
        else:
            sizes[c] += nbytes(view)
    sizes["routed_experts"] = int(expert_bytes.sum())
    need = sizes["kv_cache"] + sizes["dense"]
    if budget < need:
        raise ValueError(f"gpu_mem (--gpu-mem) {budget} bytes ({_size(budget)}) is below what the device must "
                         f"hold: {need} bytes ({_size(need)}) for the KV cache at this context ({sizes['kv_cache']}) "
                         f"and the attention and dense weights ({sizes['dense']}); give more, or a smaller ctx")
    placed = {c: 0 for c in CLASSES}
    placed["kv_cache"], placed["dense"] = sizes["kv_cache"], sizes["dense"]
    left = budget - need
    classes = ["dense"]
    for c in ("head_embed", "shared_experts"):
        if sizes[c] > left:
            break
        placed[c], left = sizes[c], left - sizes[c]
        classes.append(c)
    resident = [[] for _ in range(n_layer)]
    if classes[-1] == "shared_experts":
        if usage is not None and usage.shape == (n_layer, n_expert):
            order = np.argsort(-usage.reshape(-1), kind="stable")  # hottest first, ties in layer order
        else:
            order = np.arange(n_layer * n_expert)
        for flat in order:
            layer, e = divmod(int(flat), n_expert)
            if expert_bytes[layer, e] > left:
                break
            left -= int(expert_bytes[layer, e])
            placed["routed_experts"] += int(expert_bytes[layer, e])
            resident[layer].append(e)
    on_device = {name for name in views if tensor_class(name) in classes}
    return Placement(budget, placed, {c: sizes[c] - placed[c] for c in CLASSES}, on_device,
                     [np.array(sorted(ids), np.int64) for ids in resident], n_expert)
