"""The torch backend of the model's operations (see flashlite/backends/__init__.py): the names of
flashlite/backends/cpu.py, on torch tensors on one torch device: a CUDA GPU, an Ascend NPU (torch_npu), or the CPU.

Weights are uploaded once, at load (TorchDevice.upload). A matrix of a type the Triton kernels multiply
(flashlite.device.triton_kernels.TYPES) goes up as its GGUF block bytes, a uint8 tensor the kernels dequantize tile
by tile; F32 and F16 matrices as float32; a matrix of any other block type is decoded to float32 once by the C core
(a fallback, counted in TorchDevice.decoded). With kernels="dequantized" (the default on a CPU torch device, where
Triton only interprets) every matrix is decoded once and multiplied by torch.

Activations are float32 and are not rounded to Q8 as the C core's integer dots round them, so on a quantized file
this backend differs from the CPU one by that rounding (and agrees with it on an f32 file to float32 rounding).
The small operations are torch ops in the C core's order where it shows (normalise then scale, softmaxes less
their max, the sink in the denominator, ties of a top-k to the lower index). The KV cache's logs live on the device
(DeviceRowLog); its checkpoints and saved files are host bytes, as the CPU backend's.

What comes back to the host during a forward of a model whose weights are all on the device: the logits, and
nothing else (tests/test_device_sync.py counts it). The indexer's picks stay on the device and the attention
gathers its compressed rows by them there; a MoE layer's routed experts are grouped products over the pairs sorted
by expert on the device; a checkpoint of the KV cache is a copy to host memory queued behind the step (HostCopy).
What only the positions decide (RoPE tables, window ranges, the picks before the indexer scores) is uploaded.

Hybrid placement (flashlite/backends/placement.py) leaves some weights in host memory: a HostWeight (a matrix the
C core multiplies: its input comes to the host, its product goes back) or, for a stack of routed experts of which
the device holds the hottest, a SplitExperts; split_experts is where a MoE layer divides its tokens between the two,
and the C core's share runs on a worker thread of the device's own (HostExperts) while the device computes its own.
"""
from __future__ import annotations

import contextlib
import functools
import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from flashlite._native import lib
from flashlite.backends import cpu
from flashlite.device import kv_rows
from flashlite.gguf_file import MatrixShape, WeightView
from flashlite.kv_cache import RowFormat, RowLog

KERNELS = ("triton", "dequantized")
_FLOAT_TYPES = (0, 1)  # F32, F16: uploaded as float32 values
TOKEN_CHUNK = 64  # queries per attention / indexer step: bounds the [tokens, heads, rows] score tensors


@dataclass(frozen=True)
class DeviceWeight(MatrixShape):
    """A weight on the device: `data` holds GGUF block bytes (blocks=True: uint8, [..., rows, row_bytes], multiplied
    by the Triton kernels at `precision`) or float32 values ([..., rows, k], multiplied by torch); name, type and ne
    as in the file (gguf_file.WeightView)."""

    name: str
    type: int
    ne: tuple[int, ...]
    data: torch.Tensor
    blocks: bool
    precision: str = "tf32"


@dataclass(frozen=True)
class HostWeight(MatrixShape):
    """A weight of a device model that the placement left in host memory (`view`, the file's): its products run
    on the CPU backend, the C core."""

    view: WeightView
    device: torch.device  # where its products go

    @property
    def name(self) -> str:
        return self.view.name

    @property
    def ne(self) -> tuple[int, ...]:
        return self.view.ne


class HostExperts:
    """The worker thread on which a split MoE layer's host experts run through the C core while the calling thread
    queues (on torch-cpu: runs) the device's share (split_experts). One thread, started at the first split layer's
    call and stopped by close() (a later call starts it again). The C core releases the GIL for the call (cffi API
    mode) and runs it on its own pool, so the worker takes the core's threads and torch keeps its own setting.
    overlap=False runs a split layer as before the worker (for comparisons and benchmarks): the C call on the
    calling thread once the device's routed experts are queued, its sum added, then the shared expert."""

    def __init__(self, device: torch.device):
        self.device = device
        self.overlap = True
        self._executor: ThreadPoolExecutor | None = None
        self._stream = None  # CUDA: the stream the host's sums go up on

    def submit(self, fn, *args) -> Future:
        """fn(*args) on the worker (overlap) or, when its result is asked for, on the caller."""
        if not self.overlap:
            return _Deferred(fn, args)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flashlite-host-experts")
        return self._executor.submit(fn, *args)

    def upload_stream(self):
        """On CUDA, the stream of the host sums' uploads (None elsewhere: the upload is a plain copy)."""
        if self.device.type == "cuda" and self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        return self._stream

    def close(self) -> None:
        """Stop the worker thread, after the call it runs (if any)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


class _Deferred:
    """A call made when its result is first asked for, on the thread that asks (HostExperts without overlap)."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def result(self):
        return self.fn(*self.args)


@dataclass(frozen=True)
class SplitExperts(MatrixShape):
    """One matrix of a MoE layer's routed experts, split by the placement: `device` stacks the experts the device
    holds (ascending id), `host` is the file's whole stack, `slot` [experts] int64 on the device maps an expert id
    to its index in `device`, -1 for one on the host; `worker` runs the host's share."""

    device: DeviceWeight
    host: WeightView
    slot: torch.Tensor
    worker: HostExperts

    @property
    def name(self) -> str:
        return self.host.name

    @property
    def ne(self) -> tuple[int, ...]:
        return self.host.ne


class TorchDevice:
    """One torch device the model runs on, and how its matmuls run: kernels "triton" (the Triton kernels over the
    GGUF blocks: CUDA and Ascend; on a CPU device only under TRITON_INTERPRET=1, slowly) or "dequantized"
    (matrices decoded once to float32 at load, torch matmuls). precision: the tensor-core inputs of the Triton
    prefill kernel (triton_kernels.PRECISIONS)."""

    def __init__(self, device: str | torch.device, kernels: str | None = None, precision: str = "tf32"):
        self.device = torch.device(device)
        self.kernels = kernels or ("dequantized" if self.device.type == "cpu" else "triton")
        if self.kernels not in KERNELS:
            raise ValueError(f"kernels: expected one of {', '.join(KERNELS)}, got {self.kernels!r}")
        self.tk = None
        if self.kernels == "triton":
            from flashlite.device import triton_kernels
            if precision not in triton_kernels.PRECISIONS:
                raise ValueError(f"precision: expected one of {', '.join(triton_kernels.PRECISIONS)}, got "
                                 f"{precision!r}")
            self.tk = triton_kernels
        self.precision = precision
        self.decoded: list[str] = []  # block-type matrices decoded to float32 for want of a kernel
        self.placement = None  # what load placed where (placement.Placement) when it was given a budget
        self.host_experts = HostExperts(self.device)  # the split MoE layers' worker thread

    def close(self) -> None:
        """Stop the split layers' worker thread (Model.close)."""
        self.host_experts.close()

    def __str__(self) -> str:
        return f"{self.device} ({self.kernels} matmuls)"

    @classmethod
    def open(cls, key: str) -> TorchDevice:
        """The device of load's option `key` ("cuda", "cuda:N", "npu", "npu:N", "torch-cpu"), checked to exist."""
        if key == "torch-cpu":
            return cls("cpu")
        kind, _, number = key.partition(":")
        index = int(number) if number else 0
        if kind == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError(f"device {key!r}: torch {torch.__version__} sees no CUDA device (a CPU-only "
                                   f"build of torch, no NVIDIA driver, or CUDA_VISIBLE_DEVICES empty)")
            count = torch.cuda.device_count()
        else:
            try:
                import torch_npu  # noqa: F401  (registers the "npu" device with torch)
            except ImportError:
                raise RuntimeError(f"device {key!r} needs torch_npu and triton-ascend (Ascend's CANN toolkit): "
                                   f"pip install torch_npu triton-ascend") from None
            if not torch.npu.is_available():
                raise RuntimeError(f"device {key!r}: torch_npu sees no Ascend NPU")
            count = torch.npu.device_count()
        if index >= count:
            raise RuntimeError(f"device {key!r}: there {'is' if count == 1 else 'are'} {count} {kind} device"
                               f"{'' if count == 1 else 's'} (0..{count - 1})")
        try:
            import triton  # noqa: F401
        except ImportError:
            raise RuntimeError(f"device {key!r} needs triton for its matmul kernels: pip install "
                               f"'flashlite[cuda]' (triton-ascend for an NPU)") from None
        return cls(f"{kind}:{index}")

    def set_threads(self, n: int) -> None:
        """Threads of torch's CPU operations, for a CPU device (process-wide, as torch has it); nothing on an
        accelerator, where the host only launches kernels."""
        if self.device.type == "cpu":
            torch.set_num_threads(n)

    def free_bytes(self) -> int | None:
        """Memory the accelerator has free now; None on a CPU device (no budget of its own)."""
        if self.device.type == "cpu":
            return None
        return int(getattr(torch, self.device.type).mem_get_info(self.device)[0])

    def _holds_blocks(self, view: WeightView) -> bool:
        return view.type not in _FLOAT_TYPES and self.tk is not None and view.type in self.tk.TYPES.values()

    def nbytes(self, value) -> int:
        """The device bytes of a tensor of the model once uploaded (upload), for the placement."""
        if isinstance(value, WeightView):
            return value.data.nbytes if self._holds_blocks(value) else 4 * int(np.prod(value.ne))
        return value.size * (8 if value.dtype.kind in "iu" else 4)

    def upload(self, value, keep: np.ndarray | None = None):
        """A tensor of the model as this backend holds it: a WeightView as a DeviceWeight, float32 values as a
        float32 tensor, an integer table (tid2eid) as int64. keep (placement.Placement.resident): None uploads it
        whole; an empty array leaves a matrix on the host (HostWeight); expert ids keep those experts of a stack
        on the device and the rest on the host (SplitExperts)."""
        if keep is not None:
            if not isinstance(value, WeightView):
                raise TypeError(f"only a matrix stays on the host, not an array of shape {value.shape}")
            if keep.size == 0:
                return HostWeight(value, self.device)
            slot = np.full(value.ne[2], -1, np.int64)
            slot[keep] = np.arange(keep.size)
            return SplitExperts(self.weight(value, keep), value, torch.from_numpy(slot).to(self.device),
                                self.host_experts)
        if isinstance(value, WeightView):
            return self.weight(value)
        if value.dtype.kind in "iu":
            return torch.from_numpy(value.astype(np.int64)).to(self.device)
        return torch.from_numpy(np.array(value, np.float32)).to(self.device)

    def weight(self, view: WeightView, experts: np.ndarray | None = None) -> DeviceWeight:
        """view on the device; experts: only those slices of a stack, in that order (ne[2] is then their count)."""
        if experts is not None:
            view = WeightView(view.name, view.type, view.ne[:2] + (experts.size,), view.data[experts])
        if self._holds_blocks(view):
            data = torch.from_numpy(np.array(view.data, np.uint8)).to(self.device)  # [..., rows, row_bytes]
            return DeviceWeight(view.name, view.type, view.ne, data, True, self.precision)
        if view.type not in _FLOAT_TYPES and self.kernels == "triton":
            self.decoded.append(f"{view.name} ({view.type_name})")
        values = np.array(view.to_f32(), np.float32).reshape(tuple(reversed(view.ne)))
        return DeviceWeight(view.name, view.type, view.ne, torch.from_numpy(values).to(self.device), False)

    def row_log(self, kv_format: str):
        """The class of the KV cache's logs on this device (kv_cache.LayerCache's row_log), for either format."""
        return functools.partial(DeviceRowLog, device=self.device)


# ---------------------------------------------------------------- the KV cache on the device

class DeviceRowLog(RowLog):
    """kv_cache.RowLog with its rows in a device tensor: float32 [capacity, dim], or a packed format's bytes
    [capacity, nbytes], the C core's layout packed and unpacked by torch (flashlite/device/kv_rows.py), so that an
    fp8 cache takes the CPU's 3.5 KB a token on the device too. What leaves it as bytes (checkpoints, saved caches)
    is host memory in the CPU's layout, so a cache saved from one backend loads in the other.

    The buffer is a ring: position p lives at slot p % capacity, a power of two, so that appending and trimming
    never move the rows, and a window's rows (a trimmed log) stay in one buffer at fixed slots for the life of the
    cache. The capacity doubles (the rows laid out again) only when a log holds more positions than it: a captured
    decode step (step_graphs) reads and writes these buffers in place, and is captured again at each doubling,
    log2 of the longest log's length times in all. The buffer starts zeroed, so that a fixed-capacity read of
    slots no position has written yet (masked out of every softmax) multiplies finite values."""

    MIN_CAPACITY = 16

    def __init__(self, fmt: RowFormat, device: torch.device):
        self.device = device
        self._buf = None
        super().__init__(fmt)

    @property
    def buffer(self) -> torch.Tensor:
        """The ring of stored rows, [capacity, dim] float32 or [capacity, nbytes] uint8."""
        return self._buf

    @property
    def capacity(self) -> int:
        return self._buf.shape[0]

    def slots(self, positions) -> np.ndarray:
        """The ring slots of positions (any, negative ones too: a fixed-capacity read masks what is not held)."""
        return np.asarray(positions, np.int64) % self.capacity

    def stored(self, rows) -> torch.Tensor:
        """float32 rows [n, dim] as the buffer holds them (packed in a packed format)."""
        return store_rows(self.fmt, rows)

    _stored = stored

    def unpacked(self, stored: torch.Tensor) -> torch.Tensor:
        """Stored rows [n, ...] as float32 [n, dim]."""
        return load_rows(self.fmt, stored)

    def _empty(self, capacity: int) -> torch.Tensor:
        if self.fmt.kind is None:
            return torch.zeros((capacity, self.fmt.dim), dtype=torch.float32, device=self.device)
        return torch.zeros((capacity, self.fmt.nbytes), dtype=torch.uint8, device=self.device)

    def _point(self) -> None:
        """A device log has no C pointer: the CPU backend's fused decode does not run on it."""

    def _write(self, lo: int, stored: torch.Tensor) -> None:
        """The stored rows of positions lo.. into their slots (in two pieces where they wrap around)."""
        n, cap = stored.shape[0], self.capacity
        a = lo % cap
        first = min(n, cap - a)
        self._buf[a:a + first] = stored[:first]
        self._buf[:n - first] = stored[first:]

    def append(self, rows) -> None:
        stored = self.stored(rows)
        self.reserve(stored.shape[0])
        self._write(self.end, stored)
        self.end += stored.shape[0]

    def reserve(self, n: int) -> None:
        """Room for n more positions: the capacity doubled (rows laid out again) until the log's fit."""
        if len(self) + n > self.capacity:
            self._relayout(_power_of_two(len(self) + n, self.capacity))

    def trim(self, keep_from: int) -> None:
        """RowLog.trim; a ring left over four times larger than its rows (a long prefill chunk's, now trimmed to the
        window and the rewind) gives the memory back, down to twice their number."""
        self.start = min(max(keep_from, self.start), self.end)
        if self.capacity > 4 * max(len(self), self.MIN_CAPACITY):
            self._relayout(_power_of_two(2 * max(len(self), self.MIN_CAPACITY), self.MIN_CAPACITY))

    def _relayout(self, capacity: int) -> None:
        held = self._span(self.start, self.end)
        self._buf = self._empty(capacity)
        self._write(self.start, held)

    def _span(self, lo: int, hi: int) -> torch.Tensor:
        """The stored rows of positions [lo, hi): a view where they do not wrap around the ring, else a copy."""
        if lo < self.start or hi > self.end or lo > hi:
            raise IndexError(f"rows [{lo}, {hi}) outside the log's [{self.start}, {self.end})")
        cap = self.capacity
        a = lo % cap
        if a + hi - lo <= cap:
            return self._buf[a:a + hi - lo]
        return torch.cat([self._buf[a:], self._buf[:a + hi - lo - cap]])

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        return self.unpacked(self._span(lo, hi))

    def gather(self, idx) -> tuple[torch.Tensor, np.ndarray | torch.Tensor]:
        """RowLog.gather; for picks on the device (the indexer's) a packed log unpacks each named row where it is,
        once per pick (no unique ids: those would need their count on the host)."""
        if self.fmt.kind is None or not isinstance(idx, torch.Tensor) or len(self) == 0:
            return super().gather(idx)
        named = self._buf[idx.clamp_min(0).reshape(-1) % self.capacity]
        at = torch.arange(idx.numel(), device=idx.device).reshape(idx.shape)
        return self.unpacked(named), torch.where(idx >= 0, at, -1)

    def snapshot(self, lo: int, hi: int) -> "HostCopy":
        return HostCopy(self._span(lo, hi))

    def _unpacked(self, offsets: np.ndarray) -> torch.Tensor:
        return self.unpacked(self._buf[_on(self.slots(self.start + offsets), self.device)])

    def round(self, rows: torch.Tensor) -> torch.Tensor:
        return round_rows(self.fmt, rows)

    def packed(self, lo: int, hi: int) -> np.ndarray:
        return self._span(lo, hi).cpu().numpy().view(np.uint8)

    def restore(self, start: int, packed) -> None:
        """Hold exactly the stored rows `packed` of positions start..: in the ring as it is when they fit (its
        address kept, so a captured step goes on replaying), else in a larger one."""
        if isinstance(packed, HostCopy):  # a live checkpoint: queued behind the copy that filled it
            rows = packed.rows.to(self.device, non_blocking=True)
        else:
            stored = np.array(packed, np.uint8).reshape(-1, self.fmt.nbytes)
            if self.fmt.kind is None:
                stored = stored.view(np.float32)
            rows = torch.from_numpy(stored.copy()).to(self.device)
        n = rows.shape[0]
        if self._buf is None or n > self.capacity:
            self._buf = self._empty(_power_of_two(n, self.MIN_CAPACITY))
        self.start, self.end = start, start + n
        self._write(start, rows)


def _power_of_two(n: int, start: int) -> int:
    """The least start * 2^k >= n."""
    while start < n:
        start *= 2
    return start


def store_rows(fmt: RowFormat, rows: torch.Tensor) -> torch.Tensor:
    """float32 rows [n, dim] (or [..., dim]) as a log of format fmt stores them: themselves, or packed bytes."""
    rows = rows.reshape(-1, fmt.dim)
    if fmt.kind is None:
        return rows
    return kv_rows.pack_fp8(rows, fmt.rope_dim) if fmt.kind == lib.FL_KV_FP8 else kv_rows.pack_fp4(rows)


def load_rows(fmt: RowFormat, stored: torch.Tensor) -> torch.Tensor:
    """Stored rows [n, ...] of format fmt as float32 [n, dim]."""
    if fmt.kind is None:
        return stored
    if fmt.kind == lib.FL_KV_FP8:
        return kv_rows.unpack_fp8(stored, fmt.dim, fmt.rope_dim)
    return kv_rows.unpack_fp4(stored, fmt.dim)


def round_rows(fmt: RowFormat, rows: torch.Tensor) -> torch.Tensor:
    """rows [..., dim] as format fmt would store them (its rounding)."""
    return rows if fmt.kind is None else load_rows(fmt, store_rows(fmt, rows)).reshape(rows.shape)


class HostCopy:
    """A device log's stored rows copied to host memory without waiting for them (a checkpoint): on CUDA into
    pinned memory, queued behind the work that wrote them, so a decode step that checkpoints reads nothing back.
    The host waits only when it reads the bytes (np.asarray: saving a cache); a restore copies them back behind
    the same queue."""

    def __init__(self, rows: torch.Tensor):
        cuda = rows.device.type == "cuda"
        self.rows = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=cuda)
        self.rows.copy_(rows, non_blocking=cuda)
        self.done = None
        if cuda:
            self.done = torch.cuda.Event()
            self.done.record()

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        if self.done is not None:
            self.done.synchronize()
        a = self.rows.numpy().view(np.uint8)
        return a if dtype is None else a.astype(dtype)


# ---------------------------------------------------------------- array glue

_UPLOADS_REFUSED: list[str] = []  # the static segments running now (step_graphs), where no host array may go up


@contextlib.contextmanager
def refuse_uploads(segment: str):
    """Within it, uploading a host array raises: inside a captured CUDA graph an upload would replay the bytes the
    array held at the capture, or fail to capture at all (flashlite/device/step_graphs.py)."""
    _UPLOADS_REFUSED.append(segment)
    try:
        yield
    finally:
        _UPLOADS_REFUSED.pop()


def resident(weights) -> bool:
    """Whether every weight is wholly on the device (none of it left on the host by the placement)."""
    return not any(isinstance(w, (HostWeight, SplitExperts)) for w in weights)


def _on(a, device, dtype=None) -> torch.Tensor:
    """a (a host array or a tensor) as a tensor on device."""
    if isinstance(a, torch.Tensor):
        return a.to(device=device, dtype=dtype, non_blocking=True)
    if _UPLOADS_REFUSED:
        raise RuntimeError(f"{_UPLOADS_REFUSED[-1]}: a host array of shape {np.shape(a)} uploaded inside a static "
                           f"segment (its values must come in through the segment's inputs)")
    return torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dtype, non_blocking=True)


def contiguous(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32).contiguous()


def zeros_like(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(x)


def concat(xs: list, axis: int) -> torch.Tensor:
    return torch.cat(xs, dim=axis)


def put(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """The host array a on like's device (an upload, which reads nothing back)."""
    return _on(a, like.device)


def to_host(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy()


def _host(a, dtype=np.float32) -> np.ndarray:
    """a (a tensor or a host array) as a C-contiguous host array of dtype, for the C core."""
    return np.ascontiguousarray(a if isinstance(a, np.ndarray) else to_host(a), dtype)


def hc_streams(x: torch.Tensor, hc: int) -> torch.Tensor:
    return x[:, None, :].expand(-1, hc, -1).contiguous()


def embed(w: DeviceWeight | HostWeight, token_ids: np.ndarray) -> torch.Tensor:
    if isinstance(w, HostWeight):
        return _on(cpu.embed(w.view, token_ids), w.device)
    ids = _on(token_ids, w.data.device, torch.int64)
    if not w.blocks:
        return w.data[ids]
    from flashlite.device import triton_kernels as tk
    return tk.dequantize_rows(w.data, w.type, w.rows, w.k, ids)


# ---------------------------------------------------------------- matmuls

def _product(w: DeviceWeight | HostWeight, data: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """x @ W^T for W = data (one slice of w's values) or, data None, w itself; x [k] or [n, k]. A HostWeight's
    product is the C core's, its input brought to the host and its result sent back."""
    if isinstance(w, HostWeight):
        return _on(cpu.matmul_batch([(w.view if data is None else (w.view, data), _host(x))])[0], x.device)
    data = w.data if data is None else data
    if not w.blocks:
        return x @ data.T
    from flashlite.device import triton_kernels as tk
    return tk.matmul(data, w.type, data.shape[0], w.k, x, w.precision)


def matmul_batch(products: list) -> list[torch.Tensor]:
    """[x @ W^T for (w, x)]: w a DeviceWeight or HostWeight, or (w, data) for one slice of a stacked tensor."""
    out = []
    for w, x in products:
        w, data = w if isinstance(w, tuple) else (w, None)
        out.append(_product(w, data, x))
    return out


# ---------------------------------------------------------------- the small operations

def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """cpu.rms_norm, into out when given (which may be x)."""
    y = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    y = y if weight is None else weight * y
    return y if out is None else out.copy_(y)


def rope(x: torch.Tensor, cos: np.ndarray, sin: np.ndarray, rope_dim: int, inverse: bool = False) -> torch.Tensor:
    """cpu.rope: x rotated in place, and returned."""
    shape = (cos.shape[0],) + (1,) * (x.ndim - 2) + (cos.shape[1],)
    c, s = _on(cos, x.device).reshape(shape), _on(sin, x.device).reshape(shape)
    if inverse:
        s = -s
    even, odd = x[..., -rope_dim::2].clone(), x[..., -rope_dim + 1::2].clone()
    x[..., -rope_dim::2] = even * c - odd * s
    x[..., -rope_dim + 1::2] = odd * c + even * s
    return x


def hc_pre(h: torch.Tensor, fn: DeviceWeight, base: torch.Tensor, scale: torch.Tensor, sinkhorn_iters: int,
           hc_eps: float, norm_eps: float, head: bool = False):
    """h [T, hc, D] -> (x [T, D], post [T, hc], comb [T, hc, hc]); head: x only (cpu.hc_pre)."""
    t, hc, d = h.shape
    mixes = _product(fn, None, rms_norm(h.reshape(t, hc * d), None, norm_eps))
    pre = torch.sigmoid(mixes[:, :hc] * scale[0] + base[:hc]) + hc_eps
    x = (pre[:, :, None] * h).sum(1)
    if head:
        return x
    post = 2 * torch.sigmoid(mixes[:, hc:2 * hc] * scale[1] + base[hc:2 * hc])
    comb = torch.softmax((mixes[:, 2 * hc:] * scale[2] + base[2 * hc:]).reshape(t, hc, hc), -1) + hc_eps
    comb = comb / (comb.sum(-2, keepdim=True) + hc_eps)
    for _ in range(sinkhorn_iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + hc_eps)
        comb = comb / (comb.sum(-2, keepdim=True) + hc_eps)
    return x, post, comb


def hc_post(out: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """H'_b = post_b * out + sum_a comb[a, b] * residual_a."""
    return torch.einsum("tab,tad->tbd", comb, residual) + post[:, :, None] * out[:, None, :]


def compress_pool(n_rows: int, ratio: int, d: int, overlap: bool, has_prev: bool, kv: torch.Tensor,
                  score: torch.Tensor, what: str) -> torch.Tensor:
    """The pooled rows [n_rows, d] of the logs kv, score (cpu.compress_pool): a softmax per channel over each row's
    slots; with overlap a row's slots are the first d features of the window before it (none before the first
    window) and the last d of its own."""
    if not overlap:
        s, v = score.reshape(n_rows, ratio, d), kv.reshape(n_rows, ratio, d)
    else:
        s, v = score.reshape(-1, ratio, 2 * d), kv.reshape(-1, ratio, 2 * d)
        own_s, own_v = s[int(has_prev):, :, d:], v[int(has_prev):, :, d:]
        prev_s, prev_v = s[:n_rows, :, :d], v[:n_rows, :, :d]
        if not has_prev:  # the first window has no window before it: its slots are left out of the softmax
            prev_s = torch.cat([torch.full_like(s[:1, :, :d], -math.inf), prev_s[:n_rows - 1]])
            prev_v = torch.cat([torch.zeros_like(v[:1, :, :d]), prev_v[:n_rows - 1]])
        s, v = torch.cat([prev_s, own_s], 1), torch.cat([prev_v, own_v], 1)
    return (v * torch.softmax(s, 1)).sum(1)


@functools.lru_cache(maxsize=8)
def _hadamard_matrix(dim: int, device: torch.device) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < dim:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(dim)).to(device)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """The orthogonal Walsh-Hadamard rotation (natural order) of the last dim, a power of two."""
    return x @ _hadamard_matrix(x.shape[-1], x.device)


def indexer_topk(q: torch.Tensor, keys: torch.Tensor, head_weights: torch.Tensor, visible: np.ndarray, topk: int,
                 scale: float) -> torch.Tensor:
    """cpu.indexer_topk: the topk rows of the best sum_h relu(q_h . k) * scale * w_h among each query's first
    visible[i] rows, best first, ties to the lower row, -1 past the visible rows: int64 [t, topk] on the device,
    where the attention gathers its rows by them (nothing comes to the host)."""
    t, n = q.shape[0], keys.shape[0]
    vis = _on(visible, q.device, torch.int64)
    picks = torch.full((t, topk), -1, dtype=torch.int64, device=q.device)
    width = min(topk, n)
    for lo in range(0, t, TOKEN_CHUNK):
        hi = min(t, lo + TOKEN_CHUNK)
        dots = torch.einsum("thd,nd->thn", q[lo:hi], keys).clamp_min(0) * scale
        total = (dots * head_weights[lo:hi, :, None]).sum(1)
        total = total.masked_fill(torch.arange(n, device=q.device)[None, :] >= vis[lo:hi, None], -math.inf)
        best = torch.sort(total, dim=-1, descending=True, stable=True).indices[:, :width]
        picks[lo:hi, :width] = torch.where(torch.arange(width, device=q.device)[None, :] < vis[lo:hi, None],
                                           best, -1)
    return picks


def attention_sink(q: torch.Tensor, window: torch.Tensor, ranges: np.ndarray, rows, idx: np.ndarray,
                   sinks: torch.Tensor, scale: float, what: str, out: torch.Tensor | None = None,
                   groups: int | None = None) -> torch.Tensor:
    """cpu.attention_sink: query t of q [T, H, hd] over window[ranges[t, 0]:ranges[t, 1]] and rows[idx[t]] (-1 =
    none), softmax with the per-head sink in the denominator: [T, H, hd], into out when given (which may be q);
    groups: laid out [groups, T, H / groups, hd] instead."""
    if groups is not None:
        t, n_heads, hd = q.shape
        o = attention_sink(q, window, ranges, rows, idx, sinks, scale, what)
        return o.reshape(t, groups, n_heads // groups, hd).transpose(0, 1).contiguous()
    t, n_heads, _ = q.shape
    ranges = _on(ranges, q.device, torch.int64)
    compressed = idx.shape[1] > 0 and rows.shape[0] > 0
    if compressed:
        idx = _on(idx, q.device, torch.int64)
    at = torch.arange(window.shape[0], device=q.device)
    out = torch.empty_like(q) if out is None else out  # q itself: each chunk of queries is read before it is written
    for lo in range(0, t, TOKEN_CHUNK):
        hi = min(t, lo + TOKEN_CHUNK)
        qc = q[lo:hi]
        seen = (at[None, :] >= ranges[lo:hi, :1]) & (at[None, :] < ranges[lo:hi, 1:])
        scores = [(torch.einsum("thd,wd->thw", qc, window) * scale).masked_fill(~seen[:, None, :], -math.inf)]
        if compressed:
            picked = rows[idx[lo:hi].clamp_min(0)]  # [c, k, hd]
            scores.append((torch.einsum("thd,tkd->thk", qc, picked) * scale)
                          .masked_fill((idx[lo:hi] < 0)[:, None, :], -math.inf))
        scores.append(sinks[None, :, None].expand(hi - lo, n_heads, 1))
        p = torch.softmax(torch.cat(scores, -1), -1)
        o = torch.einsum("thw,wd->thd", p[..., :window.shape[0]], window)
        if compressed:
            o = o + torch.einsum("thk,tkd->thd", p[..., window.shape[0]:-1], picked)
        out[lo:hi] = o
    return out


def moe_route(logits: torch.Tensor, bias: torch.Tensor | None, tid2eid: torch.Tensor | None,
              token_ids: np.ndarray, n_used: int, route_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cpu.moe_route: (weights [T, n_used], expert ids [T, n_used] int64) from the router's logits."""
    scores = torch.sqrt(torch.nn.functional.softplus(logits, beta=1, threshold=20))
    if tid2eid is not None:
        idx = tid2eid[_on(token_ids, logits.device, torch.int64)]
    else:  # best first, ties to the lower id
        idx = torch.sort(scores + bias, dim=-1, descending=True, stable=True).indices[:, :n_used]
    picked = scores.gather(1, idx)
    return picked / (picked.sum(-1, keepdim=True) + 1e-20) * route_scale, idx


def moe(x: torch.Tensor, idx, weights, routed: tuple, limit: float, shared: tuple, shared_limit: float,
        out: torch.Tensor, offload=None, layer: int = 0) -> None:
    """cpu.moe: out += the routed experts idx (weighted), then the shared expert of every token. In a split layer
    the shared expert runs while the host computes its experts, into a buffer of its own that is added after the
    host's sum, so that out sums in the same order as one after the other (which the layer runs when its worker
    does not overlap: HostExperts.overlap)."""
    if not isinstance(routed[0], SplitExperts) or not routed[0].worker.overlap:
        moe_experts(x, idx, weights, *routed, limit, out, offload, layer)
        moe_experts(x, None, None, *shared, shared_limit, out)
        return
    host = split_experts(x, idx, weights, *routed, limit, out, offload, layer)
    own = zeros_like(out)
    try:
        moe_experts(x, None, None, *shared, shared_limit, own)
    finally:  # the worker's call is waited for even when the device's work fails (its error comes first)
        host.add_to(out)
    out += own


def moe_experts(x: torch.Tensor, idx, weights, w1, w3, w2, limit: float, out: torch.Tensor, offload=None,
                layer: int = 0) -> None:
    """out += the experts idx [T, k] (weighted) of stacked (or, for one expert, plain) gate/up/down weights: on the
    device (DeviceWeight: grouped products, nothing comes to the host), on the host through the C core
    (HostWeight; from the expert cache `offload` when given), or divided between them (SplitExperts:
    split_experts). idx and weights None: the one expert of plain weights at weight 1, its ids made where it runs."""
    if idx is None:
        t = x.shape[0]
        if isinstance(w1, HostWeight):
            idx, weights = cpu.one_expert(t)
        else:
            idx = torch.zeros((t, 1), dtype=torch.int64, device=x.device)
            weights = torch.ones((t, 1), device=x.device)
    if isinstance(w1, SplitExperts):
        split_experts(x, idx, weights, w1, w3, w2, limit, out, offload, layer).add_to(out)
    elif isinstance(w1, HostWeight):
        idx_h = _host(idx, np.int32)
        rows = np.arange(idx_h.shape[0])
        y = _host_experts(_host(x), idx_h, _host(weights), (w1.view, w3.view, w2.view), limit, offload, layer)
        out.index_add_(0, _on(rows, out.device, torch.int64), _on(y, out.device))
    else:
        _device_experts(x, _on(idx, x.device, torch.int64).reshape(-1), idx.shape[1],
                        _on(weights, x.device, torch.float32).reshape(-1), (w1, w3, w2), limit, out)


def split_experts(x: torch.Tensor, idx, weights, w1: SplitExperts, w3: SplitExperts, w2: SplitExperts,
                  limit: float, out: torch.Tensor, offload=None, layer: int = 0) -> HostSum:
    """A MoE layer whose routed experts the placement split: the (token, expert) pairs of experts on the device
    run there (by their slot in the device stack), the others on the host through the C core (from the expert
    cache `offload` when given), their tokens' inputs brought over and their weighted sum sent back. The host side
    takes the tokens with at least one host expert, each with its host experts (host_pairs). The ids and inputs
    come over first
    (one synchronisation), the C core's call starts on the worker thread (w1.worker), then the device's products
    are queued (on torch-cpu: run) into out meanwhile; the host's sum is the returned HostSum, which the caller
    adds to out when it needs it (after the device's, as the C core adds a layer's experts)."""
    k = idx.shape[1]
    idx_d = _on(idx, x.device, torch.int64)
    w_d = _on(weights, x.device, torch.float32)
    slot = w1.slot[idx_d]
    rows, ids, wts = host_pairs(_host(idx_d, np.int32), _host(w_d), _host(slot < 0, np.bool_))
    host = None
    if rows.size:
        x_h = _host(x[_on(rows, x.device, torch.int64)])
        worker = w1.worker
        host = worker.submit(_host_experts_up, worker, x_h, ids, wts, (w1.host, w3.host, w2.host), limit, offload,
                             layer)
    _device_experts(x, slot.reshape(-1), k, w_d.reshape(-1), (w1.device, w3.device, w2.device), limit, out)
    return HostSum(host, _on(rows, out.device, torch.int64))


def host_pairs(idx: np.ndarray, weights: np.ndarray, on_host: np.ndarray) -> tuple:
    """(rows, ids, weights) of the host's side of a split layer from the routed ids and weights [T, k] and which
    pairs are on the host: the tokens with a host expert, each with its host experts in slot order, padded to the
    longest such list with a repeat of its first at weight 0."""
    rows = np.nonzero(on_host.any(1))[0]
    if not rows.size:
        return rows, idx[:0], weights[:0]
    first = np.argsort(~on_host[rows], axis=1, kind="stable")  # each row's host pairs first, in slot order
    ids = np.take_along_axis(idx[rows], first, 1)
    wts = np.take_along_axis(weights[rows], first, 1)
    n = on_host[rows].sum(1)
    pad = np.arange(n.max())[None, :] >= n[:, None]
    return rows, np.where(pad, ids[:, :1], ids[:, :n.max()]), np.where(pad, np.float32(0), wts[:, :n.max()])


class HostSum:
    """The host experts' weighted sum of a split layer's tokens `rows` as the worker computes it: add_to waits
    for it (an error of the worker's call is raised here, in the caller) and adds it to the rows of out."""

    def __init__(self, pending: Future | _Deferred | None, rows: torch.Tensor):
        self.pending, self.rows = pending, rows

    def add_to(self, out: torch.Tensor) -> None:
        if self.pending is None:  # every pair was on the device
            return
        y, uploaded = self.pending.result()
        self.pending = None
        if uploaded is not None:  # CUDA: the device waits for the upload's event, not the host
            torch.cuda.current_stream(out.device).wait_event(uploaded)
            y.record_stream(torch.cuda.current_stream(out.device))
        out.index_add_(0, self.rows, _on(y, out.device))


def _host_experts_up(worker: HostExperts, x: np.ndarray, idx: np.ndarray, weights: np.ndarray, views: tuple,
                     limit: float, offload, layer: int):
    """(the C core's experts of x, an event or None) on the worker: on CUDA the sum is computed into pinned memory
    and uploaded on the worker's stream without blocking (the event marks its end), elsewhere returned as is."""
    stream = worker.upload_stream()
    if stream is None:
        return _host_experts(x, idx, weights, views, limit, offload, layer), None
    pinned = torch.zeros(x.shape, dtype=torch.float32, pin_memory=True)
    _host_experts(x, idx, weights, views, limit, offload, layer, pinned.numpy())
    with torch.cuda.stream(stream):
        y = pinned.to(worker.device, non_blocking=True)
        done = torch.cuda.Event()
        done.record(stream)
    return y, done


def _host_experts(x: np.ndarray, idx: np.ndarray, weights: np.ndarray, views: tuple, limit: float, offload,
                  layer: int, out: np.ndarray | None = None) -> np.ndarray:
    """The C core's experts idx [R, k] (weighted) of the file's stacks `views` for the inputs x [R, D], into out
    (zeros) or a new array: from the expert cache `offload` when given."""
    y = np.zeros_like(x) if out is None else out
    cpu.moe_experts(x, np.ascontiguousarray(idx, np.int32), np.ascontiguousarray(weights, np.float32), *views,
                    limit, y, offload, layer)
    return y


def _device_experts(x: torch.Tensor, flat: torch.Tensor, k: int, wflat: torch.Tensor, weights: tuple, limit: float,
                    out: torch.Tensor) -> None:
    """out += the device's experts of the (token, slot) pairs: flat [T * k] the index of each pair's expert in the
    device stack (-1: computed elsewhere), wflat its weights. The pairs are sorted by expert on the device and each
    matrix is one grouped product over them (_grouped), so nothing comes to the host; the sums go into out in
    ascending expert id, tokens ascending within one, as the C core adds them."""
    w1, w3, w2 = weights
    n = w1.ne[2] if len(w1.ne) == 3 else 1
    expert, order = torch.sort(torch.where(flat < 0, n, flat), stable=True)  # the pairs left out last
    tok = order // k
    xs = x[tok]
    g = _grouped(w1, n, xs, expert).clamp(max=limit)
    u = _grouped(w3, n, xs, expert).clamp(-limit, limit)
    y = _grouped(w2, n, g / (1 + torch.exp(-g)) * u, expert)
    out.index_add_(0, tok, torch.where((expert < n)[:, None], y * wflat[order, None], 0))


def _grouped(w: DeviceWeight, n: int, xs: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    """xs[i] @ W[expert[i]]^T in one call, for rows sorted by expert (n or more: left out, their result unset)."""
    if w.blocks:
        from flashlite.device import triton_kernels as tk
        return tk.grouped_gemm(w.data, w.type, n, w.rows, w.k, xs, expert, w.precision)
    stack = w.data if w.data.ndim == 3 else w.data[None]
    # each expert's end in the sorted rows (a bincount would read its largest value back to size its output)
    ends = torch.searchsorted(expert, torch.arange(n, device=expert.device), right=True).to(torch.int32)
    return torch.nn.functional.grouped_mm(xs, stack.transpose(1, 2), offs=ends)


def plan_ffn(*args, **kwargs) -> None:
    """No fused decode plans on this backend: the model runs a decode step op by op."""
    return None


def plan_attn(*args, **kwargs) -> None:
    return None
