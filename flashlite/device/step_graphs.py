"""A decode step's segments on a torch device, run from static buffers and, on CUDA, replayed as captured graphs
(issue 15, docs/gpu.md "CUDA graphs").

On a GPU a decode step of one token is a few hundred small kernels a layer (the hyper-connections' Sinkhorn alone is
over a hundred), and launching them, not their work, takes most of the step. A CUDA graph records such a sequence
once and replays it with one launch, on conditions: the same shapes and the same memory at every replay (inputs
copied into static buffers in place before it, outputs read from static buffers after it), no value read back to the
host inside, and no host array uploaded inside (a captured upload would replay the bytes of the capture).

What of V4's step meets them, for a batch of one token: the position-independent parts (each layer's attention
collapse: Block.attn_collapse; its projections: Attention.project, cos and sin among its inputs; its output:
Block.attn_finish; its MoE sublayer: Block.ffn_sublayer; the head: Transformer.head_logits), and the attention
heads once they run over the KV cache's fixed-capacity rings with masks, the position coming in through small
inputs (flashlite/device/step_heads.py). A run of layers whose every part is on the device is one segment, the
head with the last (flashlite/device/layer_runs.py): a resident model's whole step. A part is not made a segment (it
runs op by op) when one of its weights was left on the host by hybrid placement (its product brings the input
over: a split MoE layer ends a run) or when the MoE sublayer prefetches the next layer's experts from disk (the
predicted ids come to the host).

Modes (Transformer.use_step_graphs): "cuda" captures each segment at its first batch of one token and replays it
after; "static" runs the same segments from the same static buffers, the function run again in place of a replay,
with uploads refused as under a capture (on any torch device: how a CPU torch device tests everything but
torch.cuda.graph itself); "off" runs op by op.
"""
from __future__ import annotations

import numpy as np
import torch

from flashlite.backends import torch_device

MODES = ("off", "static", "cuda")


class StepGraphs:
    """The segments of one model on one device and what they share: the mode, the captured graphs' memory pool,
    counts of replays and of segments run op by op, and the reasons a capture failed (then that segment runs op by
    op: a failure is recorded, not raised, so a model still decodes)."""

    def __init__(self, mode: str, device: torch.device):
        if mode not in MODES[1:]:
            raise ValueError(f"step graphs: expected one of {', '.join(MODES)}, got {mode!r}")
        if mode == "cuda" and device.type != "cuda":
            raise ValueError(f"step graphs 'cuda' on device {device}: CUDA graphs need a CUDA device")
        self.mode, self.device = mode, device
        # one pool for every graph: the segments replay one after another in the order they were captured, so
        # their intermediates may share memory (a pool each would hold a block of its own per segment)
        self.pool = torch.cuda.graph_pool_handle() if mode == "cuda" else None
        self.segments: list[Segment] = []
        self.replays = self.eager = 0
        self.failures: dict[str, str] = {}

    def segment(self, fn, name: str, weights: list) -> Segment | None:
        """A segment running fn, or None (the caller runs fn op by op) when a weight of it is on the host."""
        if not torch_device.resident(weights):
            return None
        s = Segment(self, fn, name)
        self.segments.append(s)
        return s

    def drop(self, segments: list) -> None:
        """Leave these segments out (a larger one runs their functions)."""
        for s in segments:
            self.segments.remove(s)

    def __str__(self) -> str:
        captured = sum(s.graph is not None for s in self.segments)
        return (f"{self.mode} step graphs: {len(self.segments)} segments ({captured} captured), {self.replays} "
                f"replays, {self.eager} op-by-op runs" + (f", {len(self.failures)} failed captures"
                                                          if self.failures else ""))


class Segment:
    """fn (tensors and host arrays in, the first one's first dim the tokens; a tensor or a tuple of tensors out; no
    side effects beyond its own inputs and the `state` tensors) for a batch of one token: its arguments copied into
    static buffers, then its captured graph replayed ("cuda") or fn run on the buffers ("static"), its results
    copied out of the static outputs (the next replay overwrites them). Another batch size runs fn as it is.

    state: tensors fn reads and writes in place after its arguments (the KV cache's rings), passed as they are, not
    copied: a graph holds their addresses, so state at other addresses (a ring doubled) is captured again
    (`bindings` counts the captures, or in the "static" mode the states that would be). The graphs of the last
    KEEP_BOUND other states are kept (by their addresses, which their tensors own while they live): sequences whose
    caches take turns (a server's) replay their own graphs instead of capturing at each turn."""

    KEEP_BOUND = 4

    def __init__(self, graphs: StepGraphs, fn, name: str):
        self.graphs, self.fn, self.name = graphs, fn, name
        self.inputs: list[torch.Tensor] | None = None
        self.signature: tuple | None = None  # the arguments' types, dtypes and shapes the inputs were made for
        self.outputs: tuple | None = None
        self.graph = None
        self.single = False  # fn returns one tensor, not a tuple
        self.state: tuple = ()
        self.bound: tuple | None = None  # the state's addresses and shapes the graph was captured with
        self.kept: dict[tuple, tuple] = {}  # other states' (graph, outputs), by their addresses, oldest first
        self.bindings = 0

    def __call__(self, *args, state: tuple = ()):
        if args[0].shape[0] != 1 or self.name in self.graphs.failures:
            self.graphs.eager += 1
            return self.fn(*args, *state)
        signature = tuple((type(a), a.dtype, tuple(a.shape)) for a in args)
        if signature != self.signature:  # the first call, or other arguments (a graph reads fixed addresses)
            self._allocate(args)
            self.signature, self.graph, self.bound, self.kept = signature, None, None, {}
        for i, a in enumerate(args):  # in place: the graph reads these addresses
            if isinstance(a, torch.Tensor):
                self.inputs[i].copy_(a, non_blocking=True)
            else:
                lo, hi = self.host_layout[i]
                self.staging[lo:hi] = np.ascontiguousarray(a).view(np.uint8).reshape(-1)
        if self.host_layout:  # every host array in one copy (pageable memory: the host may write it again at once)
            self.host_inputs.copy_(torch.from_numpy(self.staging), non_blocking=True)
        self._bind(state)
        if self.graphs.mode == "cuda":
            if self.graph is None and not self._capture():
                self.graphs.eager += 1
                return self.fn(*args, *state)
            with torch.cuda.device(self.graphs.device):  # a graph launches on its own device's current stream
                self.graph.replay()
        else:
            self._store(self._run())
        self.graphs.replays += 1
        out = tuple(o.clone() for o in self.outputs)
        return out[0] if self.single else out

    def _bind(self, state: tuple) -> None:
        """Make state the one the graph reads and writes: its kept graph, else one to capture."""
        bound = tuple((t.data_ptr(), tuple(t.shape)) for t in state)
        if bound == self.bound:
            return
        if self.bound is not None:
            self.kept[self.bound] = (self.graph, self.outputs)
            while len(self.kept) > self.KEEP_BOUND:
                del self.kept[next(iter(self.kept))]
        self.state, self.bound = state, bound
        if bound in self.kept:
            self.graph, self.outputs = self.kept.pop(bound)
        else:
            self.graph = None
            self.outputs = None if self.graphs.mode == "cuda" else self.outputs  # a capture makes its own
            self.bindings += 1

    def _allocate(self, args) -> None:
        """The static inputs: a buffer per tensor argument, and the host arrays (RoPE tables, slots, counts) as views
        into one device buffer that one copy fills, at 8-byte aligned offsets."""
        self.inputs, self.host_layout, end = [], {}, 0
        for i, a in enumerate(args):
            if not isinstance(a, torch.Tensor):
                self.host_layout[i] = (end, end + a.nbytes)
                end += -(-a.nbytes // 8) * 8
        self.staging = np.zeros(end, np.uint8)
        self.host_inputs = torch.zeros(end, dtype=torch.uint8, device=self.graphs.device)
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                self.inputs.append(torch.empty(tuple(a.shape), dtype=a.dtype, device=self.graphs.device))
            else:
                lo, hi = self.host_layout[i]
                self.inputs.append(self.host_inputs[lo:hi].view(torch.from_numpy(np.empty(0, a.dtype)).dtype)
                                   .view(a.shape))

    def _run(self) -> tuple:
        with torch_device.refuse_uploads(self.name):
            result = self.fn(*self.inputs, *self.state)
        self.single = isinstance(result, torch.Tensor)
        return (result,) if self.single else tuple(result)

    def _store(self, results: tuple) -> None:
        if self.outputs is None:
            self.outputs = tuple(torch.empty_like(r) for r in results)
        for o, r in zip(self.outputs, results):
            o.copy_(r)

    def _capture(self) -> bool:
        """Warm fn up on a side stream (Triton compiles, cuBLAS and the allocator settle, as torch asks before a
        capture), then capture it into a graph whose outputs are the static outputs. False, with the reason in
        graphs.failures, when torch refuses the capture."""
        try:
            with torch.cuda.device(self.graphs.device):  # torch.cuda.graph captures on the current device
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    self._run()
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.graphs.pool):
                    self.outputs = self._run()
        except RuntimeError as exc:
            self.graphs.failures[self.name] = f"{type(exc).__name__}: {exc}"[:500]
            self.outputs = None
            return False
        self.graph = graph
        return True

