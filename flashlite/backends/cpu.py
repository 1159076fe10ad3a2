"""The CPU backend of the model's operations (see flashlite/backends/__init__.py): numpy for the glue, the C core
for the arithmetic. Weights were checked at load and the model hands contiguous float32 activations, so nothing
is checked again here (flashlite.matmul is the checked public path): at decode these run hundreds of times a token.

A weight is a gguf_file.WeightView, or (WeightView, data) for one slice of a stacked tensor."""
from __future__ import annotations

import os
import threading
import weakref

import numpy as np

from flashlite import block_formats
from flashlite._native import check, ffi, lib


def avoid_compaction_stalls() -> None:
    """Stop numpy asking the kernel for transparent huge pages on its large arrays (process-wide; numpy's own
    default when the kernel is older than 4.6). Where THP defrag is "madvise" (most distributions' default), each
    such request may compact memory synchronously, and with a memory-mapped model filling the page cache memory is
    fragmented: a prefill's fresh 64 MB activations then stalled up to 0.9 s each, 40% of a 512-token prefill
    (docs/performance.md). The C core's buffers never asked. FLASHLITE_NUMPY_HUGEPAGE=1 keeps numpy's default."""
    if os.environ.get("FLASHLITE_NUMPY_HUGEPAGE") == "1":
        return
    multiarray = getattr(getattr(np, "_core", None), "multiarray", None) or np.core.multiarray
    setter = getattr(multiarray, "_set_madvise_hugepage", None)
    if setter is not None:
        setter(False)


def f32(a: np.ndarray):
    """A C float pointer to a C-contiguous float32 array."""
    return ffi.from_buffer("float[]", a)


def i32(a: np.ndarray):
    return ffi.from_buffer("int32_t[]", a)


def matmul_batch(products: list) -> list[np.ndarray]:
    """y = x @ W^T for each (w, x), in one run of the C core, bitwise as separate products: an x that several
    products share (the same array) is quantized once, and the small matrices of a decode step stream like one
    large one."""
    items = ffi.new("struct fl_matmul_item[]", max(len(products), 1))
    keep, out, seen = [], [], {}
    for i, (w, x) in enumerate(products):
        w, data = w if isinstance(w, tuple) else (w, None)
        rows = w.rows if data is None else data.shape[0]
        x_ptr = seen.get(id(x))
        if x_ptr is None:
            x_ptr = seen[id(x)] = f32(x)
        n_tok = 1 if x.ndim == 1 else x.shape[0]
        y = np.empty((n_tok, rows), np.float32)
        w_ptr = w.pointer if data is None else ffi.from_buffer(data)
        y_ptr = f32(y)
        keep += [x, w_ptr, y_ptr]
        items[i] = {"wtype": int(w.type), "w": w_ptr, "rows": rows, "k": w.k, "x": x_ptr, "n_tok": n_tok, "y": y_ptr}
        out.append(y[0] if x.ndim == 1 else y)
    if products:
        first = products[0][0]
        check(lib.fl_matmul_batch(len(products), items),
              f"fl_matmul_batch ({(first[0] if isinstance(first, tuple) else first).name}, ...)")
    return out


def contiguous(x: np.ndarray) -> np.ndarray:
    """x as a C-contiguous float32 array: x itself when it is one (a product batched with others of the same x
    then shares its quantized activation)."""
    return x if x.flags.c_contiguous and x.dtype == np.float32 else np.ascontiguousarray(x, np.float32)


zeros_like = np.zeros_like


def concat(xs: list, axis: int) -> np.ndarray:
    return np.concatenate(xs, axis=axis)


def put(a: np.ndarray, like: np.ndarray) -> np.ndarray:
    """The host array a where this backend keeps `like`: here, a itself."""
    return a


def embed(w, token_ids: np.ndarray) -> np.ndarray:
    """The embedding rows of token_ids as float32, each row decoded as it is read."""
    rows = w.data[token_ids]
    if w.data.dtype != np.uint8:  # F32 or F16, held as such
        return rows.astype(np.float32)
    return block_formats.dequantize(rows, w.type)


def hc_streams(x: np.ndarray, hc: int) -> np.ndarray:
    """[T, D] -> [T, hc, D]: every stream starts as the token's embedding."""
    return np.repeat(x[:, None, :], hc, axis=1)


def rms_norm(x: np.ndarray, weight: np.ndarray | None, eps: float, out: np.ndarray | None = None) -> np.ndarray:
    """x * rsqrt(mean(x^2) + eps) over the last axis, then times the weight (after the normalisation, as
    transformers does); into out when given (a C-contiguous float32 array of x's shape, which may be x itself)."""
    x = np.ascontiguousarray(x, np.float32)
    y = np.empty_like(x) if out is None else out
    dim = x.shape[-1]
    check(lib.fl_rms_norm(x.size // dim, dim, f32(x), ffi.NULL if weight is None else f32(weight), eps, f32(y)),
          "fl_rms_norm")
    return y


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, rope_dim: int, inverse: bool = False) -> np.ndarray:
    """Rotate pairs (2i, 2i+1) of the last rope_dim dims of x [T, ..., dim] (C-contiguous float32) by cos/sin
    [T, rope_dim/2], in place; inverse rotates by -angle. Returns x."""
    t, dim = x.shape[0], x.shape[-1]
    cos, sin = np.ascontiguousarray(cos, np.float32), np.ascontiguousarray(sin, np.float32)
    check(lib.fl_rope(t, x.size // (t * dim) if t else 0, dim, rope_dim, f32(cos), f32(sin), int(inverse), f32(x)),
          "fl_rope")
    return x


def hc_pre(h: np.ndarray, fn, base: np.ndarray, scale: np.ndarray, sinkhorn_iters: int, hc_eps: float,
           norm_eps: float, head: bool = False):
    """h [T, hc, D] -> (x [T, D], post [T, hc], comb [T, hc, hc]); head: the model's final collapse, x only."""
    t, hc, d = h.shape
    h = np.ascontiguousarray(h, np.float32)
    x = np.empty((t, d), np.float32)
    post, comb = (None, None) if head else (np.empty((t, hc), np.float32), np.empty((t, hc, hc), np.float32))
    check(lib.fl_hc_pre(t, hc, d, f32(h), int(fn.type), ffi.from_buffer(fn.data), f32(base), f32(scale),
                        1 if head else sinkhorn_iters, hc_eps, norm_eps, f32(x),
                        ffi.NULL if head else f32(post), ffi.NULL if head else f32(comb)), f"fl_hc_pre ({fn.name})")
    return x if head else (x, post, comb)


def hc_post(out: np.ndarray, residual: np.ndarray, post: np.ndarray, comb: np.ndarray) -> np.ndarray:
    """H'_b = post_b * out + sum_a comb[a, b] * residual_a."""
    t, hc, d = residual.shape
    h = np.empty_like(residual)
    out = np.ascontiguousarray(out, np.float32)
    check(lib.fl_hc_post(t, hc, d, f32(out), f32(residual), f32(post), f32(comb), f32(h)), "fl_hc_post")
    return h


def compress_pool(n_rows: int, ratio: int, d: int, overlap: bool, has_prev: bool, kv: np.ndarray,
                  score: np.ndarray, what: str) -> np.ndarray:
    """The pooled rows [n_rows, d] (before their norm) of the token logs kv, score."""
    pooled = np.empty((n_rows, d), np.float32)
    check(lib.fl_compress_pool(n_rows, ratio, d, overlap, has_prev, f32(kv), f32(score), f32(pooled)),
          f"fl_compress_pool ({what})")
    return pooled


def hadamard(x: np.ndarray) -> np.ndarray:
    """The orthogonal Walsh-Hadamard rotation (natural order) of the last dim, a power of two."""
    x = np.ascontiguousarray(x, np.float32)
    y = np.empty_like(x)
    check(lib.fl_hadamard(x.size // x.shape[-1], x.shape[-1], f32(x), f32(y)), f"hadamard of {x.shape[-1]} dims")
    return y


def indexer_topk(q: np.ndarray, keys: np.ndarray, head_weights: np.ndarray, visible: np.ndarray, topk: int,
                 scale: float) -> np.ndarray:
    """For queries q [t, H, d] with head weights [t, H] over compressed rows keys [N, d], of which query i sees
    the first visible[i]: the topk rows of the best sum_h relu(q_h . k) * scale * w_h, best first [t, topk]."""
    t, n_heads, d = q.shape
    q, keys = np.ascontiguousarray(q, np.float32), np.ascontiguousarray(keys, np.float32)
    head_weights = np.ascontiguousarray(head_weights, np.float32)
    visible = np.ascontiguousarray(visible, np.int32)
    picks = np.empty((t, topk), np.int32)
    check(lib.fl_indexer_topk(t, n_heads, d, f32(q), f32(head_weights), f32(keys), keys.shape[0], i32(visible),
                              topk, scale, i32(picks)), "fl_indexer_topk")
    return picks


_scratch = threading.local()


def _grouped_scratch(size: int) -> np.ndarray:
    """size floats of this thread's buffer for attention's grouped output, grown as needed and kept: a prefill's
    output is 64 MB a layer at V4-Flash width, above malloc's mmap threshold, so a fresh array would be mapped anew
    and page-faulted in every layer (more than the copy it replaces); a layer's output is consumed within the layer."""
    buf = getattr(_scratch, "attn_out", None)
    if buf is None or buf.size < size:
        buf = _scratch.attn_out = np.empty(size, np.float32)
    return buf[:size]


def attention_sink(q: np.ndarray, window: np.ndarray, ranges: np.ndarray, rows: np.ndarray, idx: np.ndarray,
                   sinks: np.ndarray, scale: float, what: str, out: np.ndarray | None = None,
                   groups: int | None = None) -> np.ndarray:
    """Softmax with sink per head of q [T, H, hd] over its window rows window[ranges[t, 0]:ranges[t, 1]] and its
    compressed rows rows[idx[t]] (-1 = none): [T, H, hd], into out when given (which may be q itself). groups: the
    output laid out by groups of consecutive heads instead, [groups, T, H / groups, hd] (each group is then the
    contiguous input of its output projection, without a copy), in this thread's scratch, which the next grouped
    call overwrites."""
    t, n_heads, head_dim = q.shape
    if groups is None:
        out = np.empty_like(q) if out is None else out
        check(lib.fl_attn_sink(t, n_heads, head_dim, f32(q), f32(window), window.shape[0], i32(ranges), f32(rows),
                               rows.shape[0], i32(idx), idx.shape[1], f32(sinks), scale, f32(out)), what)
        return out
    out = _grouped_scratch(t * n_heads * head_dim).reshape(groups, t, n_heads // groups, head_dim)
    check(lib.fl_attn_sink_grouped(t, n_heads, head_dim, f32(q), f32(window), window.shape[0], i32(ranges),
                                   f32(rows), rows.shape[0], i32(idx), idx.shape[1], f32(sinks), scale, groups,
                                   f32(out)), what)
    return out


def moe_route(logits: np.ndarray, bias: np.ndarray | None, tid2eid: np.ndarray | None, token_ids: np.ndarray,
              n_used: int, route_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(weights [T, n_used], expert ids [T, n_used]) from the router's logits [T, n_expert]."""
    t, n_expert = logits.shape
    logits = np.ascontiguousarray(logits, np.float32)
    token_ids = np.ascontiguousarray(token_ids, np.int64)
    weights, idx = np.empty((t, n_used), np.float32), np.empty((t, n_used), np.int32)
    check(lib.fl_moe_route(t, n_expert, n_used, f32(logits), ffi.NULL if bias is None else f32(bias),
                           ffi.NULL if tid2eid is None else i32(tid2eid), 0 if tid2eid is None else tid2eid.shape[0],
                           ffi.from_buffer("int64_t[]", token_ids), route_scale, f32(weights), i32(idx)),
          "fl_moe_route")
    return weights, idx


def _stride(w) -> int:
    return w.data.strides[0] if len(w.ne) == 3 else 0


def one_expert(t: int) -> tuple[np.ndarray, np.ndarray]:
    """The ids and weights [t, 1] of the one expert of plain weights at weight 1 (the shared expert), on the host."""
    return np.zeros((t, 1), np.int32), np.ones((t, 1), np.float32)


def moe(x: np.ndarray, idx: np.ndarray, weights: np.ndarray, routed: tuple, limit: float, shared: tuple,
        shared_limit: float, out: np.ndarray, offload=None, layer: int = 0) -> None:
    """out += the routed experts idx [T, k] (weighted) of the stacks routed (gate, up, down; from the expert cache
    `offload` when given), then the shared expert (the plain weights shared) of every token at weight 1."""
    moe_experts(x, idx, weights, *routed, limit, out, offload, layer)
    moe_experts(x, None, None, *shared, shared_limit, out)


def moe_experts(x: np.ndarray, idx: np.ndarray, weights: np.ndarray, w1, w3, w2, limit: float, out: np.ndarray,
                offload=None, layer: int = 0) -> None:
    """out += the experts idx [T, k] (weighted) of stacked (or, for one expert, plain) gate/up/down weights; from
    the expert cache `offload` (an ExpertCache) when given. idx and weights None: the one expert of plain weights
    at weight 1."""
    if idx is None:
        idx, weights = one_expert(x.shape[0])
    if offload is not None:
        check(lib.fl_moe_experts_cached(offload.handle, layer, x.shape[0], x.shape[1], w1.rows, idx.shape[1],
                                        f32(x), i32(idx), f32(weights), limit, f32(out)),
              f"{offload.path}: routed experts of layer {layer}")
        return
    n_expert = w1.ne[2] if len(w1.ne) == 3 else 1
    check(lib.fl_moe_experts(x.shape[0], x.shape[1], w1.rows, idx.shape[1], n_expert, f32(x), i32(idx),
                             f32(weights), int(w1.type), ffi.from_buffer(w1.data), _stride(w1),
                             int(w3.type), ffi.from_buffer(w3.data), _stride(w3),
                             int(w2.type), ffi.from_buffer(w2.data), _stride(w2), limit, f32(out)),
          f"fl_moe_experts ({w1.name})")


class FfnPlan:
    """A layer's MoE sublayer with its hyper-connection, resolved once for fl_v4_ffn: weight pointers, types,
    shapes and hyperparameters in one C struct (the arrays it points into are kept alive here)."""

    def __init__(self, args, hc_fn, hc_base, hc_scale, norm, gate, bias, tid2eid, route_scale, experts, limit,
                 shared, shared_limit, offload=None, layer: int = 0):
        p = self.struct = ffi.new("struct fl_v4_ffn *")
        w1, w3, w2 = experts
        s1, s3, s2 = shared
        self._keep = [ffi.from_buffer(hc_fn.data), f32(hc_base), f32(hc_scale), f32(norm), gate.pointer,
                      ffi.NULL if bias is None else f32(bias), ffi.NULL if tid2eid is None else i32(tid2eid)]
        self._keep += [ffi.from_buffer(w.data) for w in (w1, w3, w2, s1, s3, s2)]
        p.dim, p.hc, p.inter, p.shared_inter = args.dim, args.hc_mult, w1.rows, s1.rows
        p.n_expert, p.n_used = args.n_routed_experts, args.n_activated_experts
        p.vocab = 0 if tid2eid is None else tid2eid.shape[0]
        p.sinkhorn_iters, p.hc_eps, p.norm_eps = args.hc_sinkhorn_iters, args.hc_eps, args.norm_eps
        p.hc_fn_type, p.hc_fn, p.hc_base, p.hc_scale, p.norm = int(hc_fn.type), *self._keep[:4]
        p.gate_type, p.gate_w, p.bias, p.tid2eid = int(gate.type), *self._keep[4:7]
        p.route_scale, p.limit, p.shared_limit = route_scale, limit, shared_limit
        for m, w in enumerate((w1, w3, w2)):
            p.exp_type[m], p.exp_w[m], p.exp_stride[m] = int(w.type), self._keep[7 + m], _stride(w)
        for m, w in enumerate((s1, s3, s2)):
            p.shared_type[m], p.shared_w[m] = int(w.type), self._keep[10 + m]
        self.offload = offload  # the cache outlives no plan of it
        p.cache = ffi.NULL if offload is None else offload.handle
        p.cache_layer = layer


plan_ffn = FfnPlan


def ffn_step(plan: FfnPlan, h: np.ndarray, token_ids: np.ndarray) -> np.ndarray:
    """h [T, hc, D] plus its MoE sublayer, in one C call (fl_v4_ffn)."""
    h = np.ascontiguousarray(h, np.float32)
    token_ids = np.ascontiguousarray(token_ids, np.int64)
    h_out = np.empty_like(h)
    check(lib.fl_v4_ffn(plan.struct, h.shape[0], f32(h), ffi.from_buffer("int64_t[]", token_ids), f32(h_out)),
          "fl_v4_ffn")
    return h_out




class AttnPlan:
    """A layer's attention sublayer with its hyper-connection, resolved once for fl_v4_attn: one C struct per row
    format of the caches it steps (struct_for)."""

    def __init__(self, args, hc, attn_norm, attn, compressor, indexer):
        p = self._base = ffi.new("struct fl_v4_attn *")
        a = args
        keep = self._keep = [ffi.from_buffer(hc.fn.data)]
        p.dim, p.hc, p.n_heads, p.head_dim, p.rope_dim = a.dim, a.hc_mult, a.n_heads, a.head_dim, a.rope_head_dim
        p.q_rank, p.o_groups, p.o_rank, p.window, p.ratio = (a.q_lora_rank, a.o_groups, a.o_lora_rank,
                                                             a.window_size, attn.ratio)
        p.index_heads, p.index_dim, p.index_topk = a.index_n_heads, a.index_head_dim, a.index_topk
        p.sinkhorn_iters, p.hc_eps, p.norm_eps = a.hc_sinkhorn_iters, a.hc_eps, a.norm_eps
        p.hc_fn_type, p.hc_fn = int(hc.fn.type), keep[0]

        def floats(v):
            keep.append(f32(v))
            return keep[-1]

        p.hc_base, p.hc_scale, p.attn_norm = floats(hc.base), floats(hc.scale), floats(attn_norm)
        p.q_norm, p.kv_norm, p.sinks = floats(attn.q_norm), floats(attn.kv_norm), floats(attn.attn_sink)
        def weight(field, w):  # a struct fl_v4_weight
            keep.append(ffi.from_buffer(w.data))
            field.type, field.w = int(w.type), keep[-1]

        for field, w in ((p.wq_a, attn.wq_a), (p.wq_b, attn.wq_b), (p.wkv, attn.wkv), (p.wo_a, attn.wo_a),
                         (p.wo_b, attn.wo_b)):
            weight(field, w)
        p.attn_scale = a.head_dim ** -0.5
        p.index_score_scale = a.index_head_dim ** -0.5
        p.index_weight_scale = np.float32(a.index_n_heads ** -0.5)
        for field, c in (("comp", compressor), ("icomp", indexer.compressor if indexer is not None else None)):
            if c is None:
                continue
            s = getattr(p, field)
            s.head_dim, s.overlap = c.head_dim, int(c.overlap)
            weight(s.wkv, c.wkv)
            weight(s.wgate, c.wgate)
            s.ape, s.norm = floats(c.ape), floats(c.norm)
        if indexer is not None:
            weight(p.iq_b, indexer.wq_b)
            weight(p.iproj, indexer.weights_proj)
        self._by_format = {}

    def struct_for(self, cache):
        """The plan's C struct for the row formats of a LayerCache's logs (made once per kv_format)."""
        p = self._by_format.get(cache.kv_format)
        if p is None:
            p = self._by_format[cache.kv_format] = ffi.new("struct fl_v4_attn *", self._base[0])
            p.kv_kind = cache.kv_row.kind or 0
            p.comp.row_kind, p.comp.row_rope_dim, p.comp.rotated = p.kv_kind, cache.kv_row.rope_dim, 0
            p.icomp.row_kind, p.icomp.row_rope_dim = cache.index_row.kind or 0, 0
            p.icomp.rotated = int(cache.index_row.kind is not None)
        return p


plan_attn = AttnPlan


def attn_step(plan: AttnPlan, cache, pos: int, cs_tok: np.ndarray, cs_row: np.ndarray | None,
              h: np.ndarray) -> np.ndarray:
    """h [T, hc, D] plus the attention sublayer of the T tokens at positions pos.. (a decode step, or a short
    batch such as a verified draft), in one C call (fl_v4_attn) that appends their rows to the layer's cache (a
    kv_cache.LayerCache) in place. cs_tok [T, rope_dim]: RoPE's table at each position; cs_row [T, rope_dim]: at
    each token's closing compressed row (None when no window closes)."""
    cache.reserve(h.shape[0])  # room for the rows the C core appends in place, through cache.c
    h = np.ascontiguousarray(h, np.float32)
    h_out = np.empty_like(h)
    check(lib.fl_v4_attn(plan.struct_for(cache), cache.c, pos, h.shape[0], f32(cs_tok),
                         ffi.NULL if cs_row is None else f32(cs_row), f32(h), f32(h_out)),
          f"fl_v4_attn at positions {pos}..{pos + h.shape[0] - 1}")
    return h_out


def layer_step(attn: AttnPlan, ffn: FfnPlan, cache, pos: int, cs_tok: np.ndarray, cs_row: np.ndarray | None,
               h: np.ndarray, token_ids: np.ndarray) -> np.ndarray:
    """attn_step then ffn_step, in one C call (fl_v4_layer): whole layers for the T tokens of h."""
    cache.reserve(h.shape[0])
    h = np.ascontiguousarray(h, np.float32)
    token_ids = np.ascontiguousarray(token_ids, np.int64)
    h_out = np.empty_like(h)
    check(lib.fl_v4_layer(attn.struct_for(cache), cache.c, ffn.struct, pos, h.shape[0], ffi.from_buffer("int64_t[]", token_ids),
                          f32(cs_tok), ffi.NULL if cs_row is None else f32(cs_row), f32(h), f32(h_out)),
          f"fl_v4_layer at positions {pos}..{pos + h.shape[0] - 1}")
    return h_out


class StepPlan:
    """Every layer of a model, planned (AttnPlan, FfnPlan), for one C call per decode step (fl_v4_step). tables:
    for each layer, the index of the RoPE tables it reads among those model_step is given."""

    def __init__(self, attn: list, ffn: list, tables: list[int]):
        self.attn, self.ffn, self.tables = attn, ffn, tables
        # per ModelCache, its struct fl_v4_step_layer array (the pointers to its logs' C structs never change)
        self._layers = weakref.WeakKeyDictionary()
        self.short = np.zeros(len(attn), np.int8)  # the layers whose logs lack room, as fl_v4_step_short says
        self._short_ptr = ffi.from_buffer("int8_t[]", self.short)

    def layers(self, cache):
        """The struct fl_v4_step_layer array of this plan over a ModelCache's layers (made once per cache)."""
        items = self._layers.get(cache)
        if items is None:
            items = self._layers[cache] = ffi.new("struct fl_v4_step_layer[]", [
                {"attn": a.struct_for(layer), "ffn": f.struct, "cache": layer.c, "table": t}
                for a, f, layer, t in zip(self.attn, self.ffn, cache.layers, self.tables)])
        return items


plan_step = StepPlan


def model_step(plan: StepPlan, cache, pos: int, tables: list, h: np.ndarray, token_ids: np.ndarray) -> np.ndarray:
    """h [T, hc, D] through every layer for the T tokens at positions pos.. (a decode step, or a short batch), in
    one C call (fl_v4_step) that appends their rows to the ModelCache's logs in place. tables: (cs_tok, cs_row)
    pairs as attn_step takes them, indexed by the plan's tables."""
    n = h.shape[0]
    items = plan.layers(cache)
    n_short = lib.fl_v4_step_short(len(plan.attn), items, n, plan._short_ptr)
    check(min(n_short, 0), "fl_v4_step_short")
    if n_short:
        for i in np.flatnonzero(plan.short):  # a log's buffer grows, now and then
            cache.layers[i].reserve(n)
    h = np.ascontiguousarray(h, np.float32)
    token_ids = np.ascontiguousarray(token_ids, np.int64)
    h_out = np.empty_like(h)
    cs_tok = ffi.new("float *[]", [f32(t) for t, _ in tables])
    cs_row = ffi.new("float *[]", [ffi.NULL if r is None else f32(r) for _, r in tables])
    check(lib.fl_v4_step(len(plan.attn), items, pos, n, ffi.from_buffer("int64_t[]", token_ids), cs_tok, cs_row,
                         f32(h), f32(h_out)), f"fl_v4_step at positions {pos}..{pos + n - 1}")
    return h_out
