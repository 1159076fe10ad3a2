"""The seam between the DeepSeek V4 model definition (flashlite/models/deepseek_v4.py) and the hardware.

The model is written once, in terms of these named operations; a backend implements them for its device:

    matmul_batch   y = x W^T for several (weight, activation) pairs, any block format
    rms_norm       x * rsqrt(mean(x^2) + eps) * weight
    rope           interleaved rotation of the last rope dims by given cos/sin, in place
    hc_streams     the hc streams a chunk starts from: copies of each token's embedding
    hc_pre         hyper-connection collapse: mixing matmul, sigmoids, Sinkhorn, weighted sum of the streams
    hc_post        hyper-connection expansion of a sublayer's output back into the streams
    compress_pool  the compressor's per-channel softmax pooling of closed windows
    hadamard       the Walsh-Hadamard rotation of the last dim (FP4 indexer rows)
    indexer_topk   the lightning indexer's scores of compressed rows and their top-k
    attention_sink sparse attention over window rows and picked compressed rows, with a per-head sink
    moe_route      the router: sqrt-softplus scores, hash or biased top-k, renormalised weights
    moe            a MoE layer's experts: the routed ones (moe_experts), then the shared expert (a split layer on a
                   device runs the shared expert while the host computes its routed experts)
    moe_experts    routed expert dispatch (SwiGLU with clamps), from memory or from the expert cache; ids None:
                   the one expert of plain weights at weight 1 (the shared expert), its ids made where it runs
    plan_ffn / ffn_step, plan_attn / attn_step, layer_step   a decode step's sublayers planned at load, one call
                   each (a backend without plans returns None from plan_*, and the model runs op by op)
    plan_step / model_step   every layer's plans together: one call for a whole decode step
    embed          rows of the embedding as float32
    contiguous, zeros_like, concat, put, to_host   the array glue between the operations (put: a host array where
                   another array lives; to_host: a numpy array)

`cpu` (numpy and the C core) and `torch_device` (torch tensors on a CUDA, Ascend or CPU torch device, matmuls in
Triton) implement them. The functions here pick the backend from the data they are given: numpy arrays and file
weights (gguf_file.WeightView) go to `cpu`, anything else (torch tensors, uploaded weights) to `torch_device`, so
a model on each can be loaded in one process. `open_device` turns load's `device` option into the backend's
device (None for the CPU backend).
"""
from __future__ import annotations

import numpy as np

from flashlite.backends import cpu
from flashlite.gguf_file import WeightView
from flashlite.kv_cache import RowLog

DEVICES = ("auto", "cpu", "cuda", "cuda:N", "npu", "npu:N", "torch-cpu")


def _of(a):
    """The backend module of an activation or a weight."""
    if isinstance(a, (np.ndarray, WeightView)):
        return cpu
    from flashlite.backends import torch_device
    return torch_device


def _weight(w):
    return w[0] if isinstance(w, tuple) else w


def matmul_batch(products: list) -> list:
    return _of(_weight(products[0][0])).matmul_batch(products) if products else []


def rms_norm(x, weight, eps: float, out=None):
    return _of(x).rms_norm(x, weight, eps, out)


def rope(x, cos, sin, rope_dim: int, inverse: bool = False):
    return _of(x).rope(x, cos, sin, rope_dim, inverse)


def hc_streams(x, hc: int):
    return _of(x).hc_streams(x, hc)


def hc_pre(h, fn, base, scale, sinkhorn_iters: int, hc_eps: float, norm_eps: float, head: bool = False):
    return _of(h).hc_pre(h, fn, base, scale, sinkhorn_iters, hc_eps, norm_eps, head)


def hc_post(out, residual, post, comb):
    return _of(out).hc_post(out, residual, post, comb)


def compress_pool(n_rows: int, ratio: int, d: int, overlap: bool, has_prev: bool, kv, score, what: str):
    return _of(kv).compress_pool(n_rows, ratio, d, overlap, has_prev, kv, score, what)


def hadamard(x):
    return _of(x).hadamard(x)


def indexer_topk(q, keys, head_weights, visible: np.ndarray, topk: int, scale: float) -> np.ndarray:
    return _of(q).indexer_topk(q, keys, head_weights, visible, topk, scale)


def attention_sink(q, window, ranges: np.ndarray, rows, idx: np.ndarray, sinks, scale: float, what: str, out=None,
                   groups: int | None = None):
    return _of(q).attention_sink(q, window, ranges, rows, idx, sinks, scale, what, out, groups)


def moe_route(logits, bias, tid2eid, token_ids: np.ndarray, n_used: int, route_scale: float):
    return _of(logits).moe_route(logits, bias, tid2eid, token_ids, n_used, route_scale)


def moe(x, idx, weights, routed: tuple, limit: float, shared: tuple, shared_limit: float, out, offload=None,
        layer: int = 0) -> None:
    _of(x).moe(x, idx, weights, routed, limit, shared, shared_limit, out, offload, layer)


def moe_experts(x, idx, weights, w1, w3, w2, limit: float, out, offload=None, layer: int = 0) -> None:
    _of(x).moe_experts(x, idx, weights, w1, w3, w2, limit, out, offload, layer)


def plan_ffn(args, hc_fn, hc_base, *rest, **kwargs):
    return _of(hc_fn).plan_ffn(args, hc_fn, hc_base, *rest, **kwargs)


def plan_attn(args, hc, attn_norm, attn, compressor, indexer):
    return _of(hc.fn).plan_attn(args, hc, attn_norm, attn, compressor, indexer)


# only a backend with plans gets here: the CPU's
ffn_step, attn_step, layer_step, plan_step, model_step = (cpu.ffn_step, cpu.attn_step, cpu.layer_step, cpu.plan_step,
                                                          cpu.model_step)


def embed(w, token_ids: np.ndarray):
    return _of(w).embed(w, token_ids)


def contiguous(x):
    return _of(x).contiguous(x)


def zeros_like(x):
    return _of(x).zeros_like(x)


def concat(xs: list, axis: int):
    return _of(xs[0]).concat(xs, axis)


def put(a: np.ndarray, like):
    return _of(like).put(a, like)


def to_host(x) -> np.ndarray:
    return x if isinstance(x, np.ndarray) else _of(x).to_host(x)


def uploader(device):
    """A callable that puts a tensor of the model (a file's weight view or array) where `device` (open_device's)
    keeps it: the device's upload, or the tensor itself on the CPU backend, which reads the file in place."""
    return (lambda value: value) if device is None else device.upload


def row_log(device, kv_format: str):
    """The class of a KV cache's logs (kv_cache.LayerCache's row_log) where `device` (open_device's) keeps them:
    kv_cache.RowLog in host memory for the CPU backend, else the device's own."""
    return RowLog if device is None else device.row_log(kv_format)


def open_device(name: str | object = "cpu"):
    """The backend's device for load's `device` option: None for "cpu" (the C core; needs nothing more), else a
    torch_device.TorchDevice: "cuda" or "cuda:N" (Triton kernels on an NVIDIA GPU), "npu" or "npu:N" (an Ascend
    NPU through torch_npu and triton-ascend), "torch-cpu" (the torch backend on the CPU: how it is tested without
    an accelerator), "auto" (CUDA when torch sees a GPU, else the CPU). A TorchDevice is taken as it is. A device
    that is asked for and not available raises a RuntimeError naming what is missing."""
    if not isinstance(name, str):
        return name
    key = name.strip().lower()
    if key == "cpu":
        return None
    if key == "auto":
        try:
            import torch
        except ImportError:
            return None
        return open_device("cuda") if torch.cuda.is_available() else None
    kind = key.split(":", 1)[0]
    if kind not in ("cuda", "npu", "torch-cpu") or (":" in key and (kind == "torch-cpu" or
                                                                     not key.split(":", 1)[1].isdigit())):
        raise ValueError(f"device: unknown device {name!r}; expected one of {', '.join(DEVICES)}")
    try:
        import torch  # noqa: F401
    except ImportError:
        raise RuntimeError(f"device {name!r} needs torch and triton, which are not installed: pip install "
                           f"'flashlite[cuda]' (or torch and triton for your accelerator)") from None
    from flashlite.backends import torch_device
    return torch_device.TorchDevice.open(key)
