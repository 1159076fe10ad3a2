"""DeepSeek V4 (architecture notes sections 2 to 8), computed in float32 the way transformers' DeepseekV4ForCausalLM
computes it: one class per concept of the paper, attributes named as the checkpoint names them.

Shapes: T tokens of one chunk, D = dim, hc = hyper-connection streams, H heads of head_dim.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from flashlite import backends as backend
from flashlite.backends.cpu import one_expert
from flashlite.expert_offload import ExpertCache
from flashlite.gguf_file import INDEX, GGUFFile, WeightView
from flashlite.kv_cache import CompressorState, LayerCache, ModelCache
from flashlite.models.v4_spec import ARCH, HPARAM_KEYS, SQRT_SOFTPLUS, checked_value, expected_tensors

# While an importance matrix is collected (flashlite.imatrix), a callable observer(w, x, expert) that sees the input
# x of every product of a weight matrix w the forward computes (expert: the slice of a stacked tensor, else None);
# None otherwise. The routed experts then run through linear() with their SwiGLU output visible (MoE.experts_visible).
OBSERVER = None


@dataclass
class ModelArgs:
    """Hyperparameters; defaults are V4-Flash's."""

    vocab_size: int = 129280
    dim: int = 4096
    n_layers: int = 43
    n_heads: int = 64
    head_dim: int = 512
    rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    window_size: int = 128
    compress_ratios: tuple = (0, 0) + (4, 128) * 20 + (4,)
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    n_routed_experts: int = 256
    n_activated_experts: int = 6
    n_shared_experts: int = 1
    moe_inter_dim: int = 2048
    n_hash_layers: int = 3
    route_scale: float = 1.5
    swiglu_limits: tuple = (10.0,) * 43
    swiglu_limits_shared: tuple = (10.0,) * 43
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_factor: float = 16.0
    original_seq_len: int = 65536
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    max_seq_len: int = 1048576
    n_mtp_layers: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.compress_ratios = tuple(int(r) for r in self.compress_ratios[:self.n_layers])
        if len(self.compress_ratios) != self.n_layers:
            raise ValueError(f"compress_ratios has {len(self.compress_ratios)} entries for {self.n_layers} layers")
        bad = [r for r in self.compress_ratios if r not in (0, 4, 128)]
        if bad:
            raise ValueError(f"unsupported DeepSeek-V4 compress ratios: {bad} (0, 4 and 128 only)")
        for name in ("swiglu_limits", "swiglu_limits_shared"):
            limits = tuple(float(v) for v in getattr(self, name))
            if len(limits) < self.n_layers:
                raise ValueError(f"{name} has {len(limits)} entries for {self.n_layers} layers")
            setattr(self, name, limits[:self.n_layers])
        if self.rope_head_dim % 2 or not 0 < self.rope_head_dim < self.head_dim:
            raise ValueError(f"rope_head_dim {self.rope_head_dim} must be even and below head_dim {self.head_dim}")
        if self.index_head_dim < self.rope_head_dim:
            raise ValueError(f"index_head_dim {self.index_head_dim} is below rope_head_dim {self.rope_head_dim}")
        if self.n_heads % self.o_groups:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of o_groups {self.o_groups}")
        if not 0 < self.n_activated_experts <= self.n_routed_experts:
            raise ValueError(f"n_activated_experts {self.n_activated_experts} not in 1..{self.n_routed_experts}")
        if self.n_shared_experts != 1:
            raise ValueError(f"n_shared_experts {self.n_shared_experts}: only one shared expert is supported")

    @classmethod
    def from_gguf(cls, f: GGUFFile, with_mtp: bool = False, arch: str = ARCH,
                  vocab_size: int | None = None) -> "ModelArgs":
        """The hyperparameters of a deepseek4 GGUF, each checked for its type and against the range the
        architecture and this runtime allow (v4_spec.HPARAM_KEYS); an error names the file, the key and the value.
        with_mtp: n_layers counts the MTP blocks too (blk.{n_layers - n_mtp_layers}.. are the MTP's), as an MTP
        draft GGUF needs; else n_layers is the trunk's. arch: the keys' prefix (a DSpark draft's V4 stages are
        written under llama.cpp's "dflash" architecture); vocab_size: the target's, for a draft without an
        embedding of its own."""
        found = f.get("general.architecture")
        if found != arch:
            raise ValueError(f"{f.path}: general.architecture is {found!r}, expected {arch!r}")
        v = {}
        for k in HPARAM_KEYS:
            if k.kind is None:  # written for llama.cpp, implied by the others here
                continue
            full = f"{arch}.{k.key}"
            value = f.get(full, k.default)
            if value is None:
                raise ValueError(f"{f.path}: missing metadata key '{full}'")
            v[k.field] = checked_value(f.path, full, value, k.kind, k.lo, k.hi)
        if v["expert_gating_func"] != SQRT_SOFTPLUS:
            raise ValueError(f"{f.path}: {arch}.expert_gating_func is {v['expert_gating_func']}, expected "
                             f"{SQRT_SOFTPLUS} (sqrtsoftplus)")
        if v["head_count_kv"] != 1 or v["value_length"] not in (0, v["head_dim"]):
            raise ValueError(f"{f.path}: DeepSeek V4 shares one KV head with key_length == value_length")
        blocks = v.pop("block_count")
        n_mtp = v.pop("n_mtp_layers")
        if n_mtp >= blocks:
            raise ValueError(f"{f.path}: {arch}.nextn_predict_layers {n_mtp} leaves no layer of block_count {blocks}")
        vocab = v.pop("vocab_size")
        if vocab_size is not None:
            vocab = vocab_size
        elif not vocab:
            embd = f.tensors.get("token_embd.weight")
            if embd is None:
                raise ValueError(f"{f.path}: missing tensor 'token_embd.weight'")
            vocab = embd.ne[1] if len(embd.ne) == 2 else 0
        for name in ("swiglu_limits", "swiglu_limits_shared"):
            value = v[name] if v[name] != [] else v["swiglu_limits"]
            v[name] = tuple(value) if isinstance(value, list) else (value,) * blocks
        for name in ("expert_gating_func", "head_count_kv", "value_length"):
            del v[name]
        try:
            return cls(vocab_size=vocab, n_layers=blocks if with_mtp else blocks - n_mtp, n_mtp_layers=n_mtp, **v)
        except ValueError as exc:
            raise ValueError(f"{f.path}: {exc}") from None


# ---------------------------------------------------------------- primitives

def linear(w: WeightView, x: np.ndarray, expert: int | None = None) -> np.ndarray:
    """y = x @ W^T through the backend; `expert` picks one slice of a stacked [k, rows, experts] tensor."""
    if OBSERVER is not None:
        OBSERVER(w, x, expert)
    return backend.matmul_batch([(w if expert is None else (w, w.data[expert]), backend.contiguous(x))])[0]


def linear_groups(*groups: list) -> list[list[np.ndarray]]:
    """Each group's products [(w, x), ...] computed as linear(w, x), all in one run of the backend: the results
    come back grouped as the products were."""
    if OBSERVER is not None:
        for group in groups:
            for w, x in group:
                OBSERVER(w, x, None)
    ys = backend.matmul_batch([(w, backend.contiguous(x)) for group in groups for w, x in group])
    out, lo = [], 0
    for group in groups:
        out.append(ys[lo:lo + len(group)])
        lo += len(group)
    return out


def _rows(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """a[idx], or a itself when idx takes every row in order (then a product batched with others of a shares
    their quantized activation)."""
    return a if idx.size == a.shape[0] else a[idx]


rms_norm = backend.rms_norm  # x * rsqrt(mean(x^2) + eps) * weight; the MTP block uses it too


hadamard = backend.hadamard  # the orthogonal Walsh-Hadamard rotation of the last dim (FP4 indexer rows)


# ---------------------------------------------------------------- RoPE

class RoPE:
    """Interleaved (GPT-J) rotary embedding of the last rope_dim dims; YaRN frequencies when `yarn` is given as
    (factor, original_seq_len, beta_fast, beta_slow), without magnitude scaling (transformers forces it to 1)."""

    def __init__(self, rope_dim: int, base: float, yarn: tuple | None = None):
        self.rope_dim = rope_dim
        exps = np.arange(0, rope_dim, 2, dtype=np.float32) / np.float32(rope_dim)
        pos_freqs = np.power(np.float32(base), exps).astype(np.float32)
        inv_freq = (np.float32(1.0) / pos_freqs).astype(np.float32)
        if yarn is not None:
            factor, original, beta_fast, beta_slow = yarn
            low, high = self.correction_range(rope_dim, base, original, beta_fast, beta_slow)
            if low == high:
                high += 0.001
            ramp = np.clip((np.arange(rope_dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low),
                           0, 1).astype(np.float32)
            extrapolation = np.float32(1) - ramp
            interpolated = (np.float32(1.0) / (np.float32(factor) * pos_freqs)).astype(np.float32)
            inv_freq = interpolated * (np.float32(1) - extrapolation) + inv_freq * extrapolation
        self.inv_freq = inv_freq.astype(np.float32)
        self._tables: dict[tuple, tuple] = {}

    @staticmethod
    def correction_range(dim: int, base: float, original: int, beta_fast: float, beta_slow: float):
        """The dims [low, high] over which YaRN ramps from extrapolation to interpolation."""
        def dim_of(rotations):
            return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))
        return max(math.floor(dim_of(beta_fast)), 0), min(math.ceil(dim_of(beta_slow)), dim - 1)

    def cos_sin(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """cos and sin [T, rope_dim/2] of the angles f32(pos) * inv_freq, rounded to float32 like the oracle."""
        angles = positions.astype(np.float32)[:, None] * self.inv_freq[None, :]
        return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)

    def step_tables(self, start: int, t: int, ratio: int) -> tuple[np.ndarray, np.ndarray | None]:
        """A planned step's tables for the t tokens at positions start.. of a layer of compress ratio `ratio`: cos
        then sin at each position [t, rope_dim], and at the first position of the compressed row each token closes
        [t, rope_dim] (None when none closes; the rows of tokens that close none are not read). Made once per step
        for all the layers that share this RoPE and ratio."""
        key = (start, t, ratio)
        tables = self._tables.get(key)
        if tables is None:
            if len(self._tables) >= 8:
                self._tables.clear()
            positions = np.arange(start, start + t)
            at_token = np.concatenate(self.cos_sin(positions), axis=1)
            closing = (positions + 1) % ratio == 0 if ratio else None
            at_row = np.concatenate(self.cos_sin(np.where(closing, positions + 1 - ratio, 0)), axis=1) \
                if ratio and closing.any() else None
            tables = self._tables[key] = (at_token, at_row)
        return tables

    def apply(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray, inverse: bool = False) -> np.ndarray:
        """Rotate pairs (2i, 2i+1) of the last rope_dim dims of x [T, ..., dim] in place (x: C-contiguous
        float32, the caller's own) and return it; inverse rotates by -angle."""
        return backend.rope(x, cos, sin, self.rope_dim, inverse)


# ---------------------------------------------------------------- hyper-connections

def _observe_hc(fn: WeightView, h: np.ndarray, eps: float) -> None:
    """Shows the observer the input of a hyper-connection's mixing matmul, which fl_hc_pre computes inside: the
    flattened streams, rms-normed."""
    x = h.reshape(h.shape[0], -1)
    OBSERVER(fn, x / np.sqrt(np.mean(x * x, axis=1, keepdims=True) + eps), None)


class HyperConnection:
    """mHC around one sublayer: collapse the hc streams into the sublayer input, expand its output back."""

    def __init__(self, args: ModelArgs, fn: WeightView, base: np.ndarray, scale: np.ndarray):
        self.hc, self.args = args.hc_mult, args
        self.fn, self.base, self.scale = fn, base, scale

    def __call__(self, h: np.ndarray):
        """h [T, hc, D] -> (x [T, D], post [T, hc], comb [T, hc, hc] with comb[a, b] from stream a to b): the C
        core's fl_hc_pre (rms norm, the mixing matmul, sigmoids, Sinkhorn, the weighted sum), one call."""
        if OBSERVER is not None:
            _observe_hc(self.fn, h, self.args.norm_eps)
        a = self.args
        return backend.hc_pre(h, self.fn, self.base, self.scale, a.hc_sinkhorn_iters, a.hc_eps, a.norm_eps)

    @staticmethod
    def expand(out: np.ndarray, residual: np.ndarray, post: np.ndarray, comb: np.ndarray) -> np.ndarray:
        """H'_b = post_b * out + sum_a comb[a, b] * residual_a."""
        return backend.hc_post(out, residual, post, comb)


class HyperHead:
    """The final collapse of the hc streams before the output norm."""

    def __init__(self, args: ModelArgs, fn: WeightView, base: np.ndarray, scale: np.ndarray):
        self.args, self.fn, self.base, self.scale = args, fn, base, scale

    def __call__(self, h: np.ndarray) -> np.ndarray:
        if OBSERVER is not None:
            _observe_hc(self.fn, h, self.args.norm_eps)
        a = self.args
        return backend.hc_pre(h, self.fn, self.base, self.scale, 1, a.hc_eps, a.norm_eps, head=True)


# ---------------------------------------------------------------- attention

class Compressor:
    """Pools every `ratio` tokens into one KV row: a per-channel softmax over the window's scores weights its kv.
    With ratio 4 (overlap) a row pools 8 slots: the first half of the previous window's features and the second
    half of its own; ratio 128 pools its own 128 tokens."""

    def __init__(self, args: ModelArgs, ratio: int, head_dim: int, wkv: WeightView, wgate: WeightView,
                 ape: np.ndarray, norm: np.ndarray, rope: RoPE):
        self.args, self.ratio, self.head_dim = args, ratio, head_dim
        self.overlap = ratio == 4
        self.wkv, self.wgate, self.ape, self.norm, self.rope = wkv, wgate, ape, norm, rope

    def projections(self, x: np.ndarray) -> list:
        """The products of the chunk's input x this compressor needs (kv, score), for the caller to batch."""
        return [(self.wkv, x), (self.wgate, x)]

    def __call__(self, projected: list, start: int, state: CompressorState) -> None:
        """Take the results of projections() for the chunk's tokens at positions start.., and append every row
        whose window closed."""
        kv, score = projected
        t, r, d = kv.shape[0], self.ratio, self.head_dim
        positions = np.arange(start, start + t)
        state.kv.append(kv)
        state.score.append(score + self.ape[positions % r])
        first, last = state.rows.end, (start + t) // r
        if last <= first:
            return
        has_prev = self.overlap and first > 0
        lo = (first - 1) * r if has_prev else first * r
        kv, score = state.kv.rows(lo, last * r), state.score.rows(lo, last * r)
        pooled = backend.compress_pool(last - first, r, d, self.overlap, has_prev, kv, score, self.wkv.name)
        state.rows.append(self.finish_rows(pooled, *self.rope.cos_sin(np.arange(first, last) * r), state.rotated))

    def finish_rows(self, pooled, cos, sin, rotated: bool):
        """Pooled rows as the cache takes them: normed, rotated by RoPE at each row's first position (cos, sin), and
        for an FP4 indexer's rows (`rotated`) through the Hadamard rotation."""
        rows = self.rope.apply(rms_norm(pooled, self.norm, self.args.norm_eps), cos, sin)
        return hadamard(rows) if rotated else rows


class Indexer:
    """The lightning indexer of ratio-4 layers: scores each visible compressed row for a query with
    sum_h w_h * relu(q_h . k) (no Hadamard, no FP4, as transformers) and keeps the top index_topk."""

    def __init__(self, args: ModelArgs, wq_b: WeightView, weights_proj: WeightView, compressor: Compressor,
                 rope: RoPE):
        self.args, self.wq_b, self.weights_proj, self.compressor, self.rope = args, wq_b, weights_proj, compressor, rope

    def crowded(self, positions: np.ndarray) -> np.ndarray:
        """The queries of the chunk that see more than index_topk compressed rows: only they are scored."""
        return np.nonzero((positions + 1) // 4 > self.args.index_topk)[0]

    def projections(self, x: np.ndarray, crowded: np.ndarray) -> list:
        """The products of the chunk's input x, for the caller to batch: the compressor's, then the crowded
        queries' head weights."""
        return self.compressor.projections(x) + ([(self.weights_proj, _rows(x, crowded))] if crowded.size else [])

    def query_projections(self, qr: np.ndarray, crowded: np.ndarray) -> list:
        """The products of the query latent qr, for the caller to batch: the crowded queries' indexer queries."""
        return [(self.wq_b, _rows(qr, crowded))] if crowded.size else []

    def __call__(self, projected: list, projected_q: list, positions, cos, sin, state: CompressorState,
                 crowded: np.ndarray):
        """Per query of the chunk, the picked compressed rows [T, k] (-1 pads): all visible rows while no more
        than index_topk are visible, else the index_topk best scores. projected and projected_q: the results of
        projections() and query_projections(). Scored picks are the backend's array (on a device they stay
        there: the attention gathers by them without a read back); picks that follow from the positions alone
        are a host array."""
        a, t = self.args, len(positions)
        self.compressor(projected[:2], int(positions[0]), state)  # projections() lists the compressor's first
        visible = (positions + 1) // 4
        k = int(min(a.index_topk, visible.max()))
        picks = np.where(np.arange(k)[None, :] < visible[:, None], np.arange(k, dtype=np.int32)[None, :], -1)
        if crowded.size == 0:
            return picks.astype(np.int32)
        head_weights, = projected[2:]
        q, = projected_q
        q = self.queries(q.reshape(crowded.size, a.index_n_heads, a.index_head_dim), cos[crowded], sin[crowded],
                         state.rows.round if state.rotated else None)
        keys = state.rows.rows(0, int(visible[crowded].max()))
        scored = backend.indexer_topk(q, keys, head_weights * np.float32(a.index_n_heads ** -0.5), visible[crowded],
                                      a.index_topk, a.index_head_dim ** -0.5)
        if crowded.size == t:
            return scored
        # visibility grows with the position, so the crowded queries are the chunk's last: the ones before them
        # take every visible row (k = index_topk here, the scored width)
        return backend.concat([backend.put(picks[:t - crowded.size], scored), scored], axis=0)

    def queries(self, q, cos, sin, round_rows=None):
        """The indexer's queries [T, heads, index_head_dim] rotated by RoPE (cos, sin); with FP4 rows, through the
        Hadamard rotation and rounded as the rows are (round_rows)."""
        q = self.rope.apply(q, cos, sin)
        return q if round_rows is None else round_rows(hadamard(q))


class Attention:
    """One query path with low-rank q and per-head norm, one shared KV head (K = V), sliding window plus compressed
    rows (all of them with ratio 128, the indexer's top-k with ratio 4), a per-head sink in the softmax, the
    rotation undone on the output, and the grouped low-rank output projection."""

    def __init__(self, args: ModelArgs, layer: int, w: dict, rope: RoPE, compressor: Compressor | None,
                 indexer: Indexer | None):
        self.args, self.layer, self.ratio = args, layer, args.compress_ratios[layer]
        self.wq_a, self.q_norm, self.wq_b = w["attn_q_a"], w["attn_q_a_norm"], w["attn_q_b"]
        self.wkv, self.kv_norm = w["attn_kv"], w["attn_kv_a_norm"]
        self.wo_a, self.wo_b, self.attn_sink = w["attn_output_a"], w["attn_output_b"], w["attn_sinks"]
        self.rope, self.compressor, self.indexer = rope, compressor, indexer
        # On a torch device, heads() for one token: its projections and the rest over the KV cache's fixed-capacity
        # rings, each from static buffers (step_graphs; flashlite/device/step_heads.py): set by
        # Transformer.use_step_graphs; None runs it op by op.
        self.step_heads = None

    def __call__(self, x: np.ndarray, positions: np.ndarray, cache: LayerCache, causal: bool = True) -> np.ndarray:
        """causal=False: every query also sees the chunk's later rows (a DSpark draft's block, which llama.cpp
        runs without the causal mask)."""
        cos, sin = self.rope.cos_sin(positions)
        return self.output(self.heads(x, positions, cos, sin, cache, causal), cos, sin)

    def heads(self, x: np.ndarray, positions: np.ndarray, cos: np.ndarray, sin: np.ndarray, cache: LayerCache,
              causal: bool = True) -> np.ndarray:
        """The attention heads' outputs before the output projection, laid out by wo_a's groups [G, T, H/G, hd]
        (still rotated); the chunk's rows appended to the cache."""
        a, t = self.args, x.shape[0]
        if t == 1 and self.step_heads is not None:  # a decode step: from static buffers (step_graphs)
            return self.step_heads(x, positions, cos, sin, cache)
        start = int(positions[0])
        crowded = self.indexer.crowded(positions) if self.indexer is not None else None
        scored = crowded is not None and crowded.size > 0
        q, kv, *products = self.project(x, cos, sin, crowded)
        n_compressed = 2 if self.compressor is not None else 0
        n_indexed = 2 + scored if self.indexer is not None else 0
        compressed, indexed = products[:n_compressed], products[n_compressed:n_compressed + n_indexed]
        indexed_q = products[n_compressed + n_indexed:]
        cache.kv.append(kv)
        picks = None
        if self.compressor is not None:
            self.compressor(compressed, start, cache.compressor)
        if self.indexer is not None:
            picks = self.indexer(indexed, indexed_q, positions, cos, sin, cache.indexer, crowded)
        # the output comes laid out by wo_a's groups, [G, T, H/G, hd]: each group is its product's input as it is
        return self.attend(q, positions, cache, picks, causal, groups=a.o_groups)

    def project(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray, crowded: np.ndarray | None) -> tuple:
        """The products of the chunk's input x and of its query latent, q [T, H, hd] and the window's rows kv
        [T, head_dim] normed and rotated by cos and sin: (q, kv, the compressor's products, the indexer's of x, the
        indexer's of the latent), the indexer's for the crowded queries only. What the position changes here comes
        in through cos, sin and crowded."""
        a, t = self.args, x.shape[0]
        # The products of x in one run of the core, then those of the query latent qr in another.
        (qa, kv), compressed, indexed = linear_groups(
            [(self.wq_a, x), (self.wkv, x)],
            self.compressor.projections(x) if self.compressor is not None else [],
            self.indexer.projections(x, crowded) if self.indexer is not None else [])
        qr = rms_norm(qa, self.q_norm, a.norm_eps)
        if OBSERVER is not None and self.indexer is not None:
            # the indexer's products run for the crowded queries only (and are observed there); an importance
            # matrix takes their inputs at every token, as a forward that scores every query would see them
            rest = np.setdiff1d(np.arange(t), crowded)
            OBSERVER(self.indexer.weights_proj, x[rest], None)
            OBSERVER(self.indexer.wq_b, qr[rest], None)
        (q,), indexed_q = linear_groups([(self.wq_b, qr)],
                                        self.indexer.query_projections(qr, crowded) if self.indexer is not None else [])
        # q, kv and the attention's output are this call's own: normed, rotated and attended in place (a prefill's
        # q is 64 MB a layer, and each fresh array of that size costs its page faults)
        q = q.reshape(t, a.n_heads, a.head_dim)
        self.rope.apply(rms_norm(q, None, a.norm_eps, out=q), cos, sin)
        return (q, self.rotated_kv(kv, cos, sin), *compressed, *indexed, *indexed_q)

    def output(self, o: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """The output projection of the heads' outputs o [G, T, H/G, hd] (rotated back in place, by cos and sin of
        the chunk's positions): wo_a by groups, then wo_b."""
        for group in o:
            self.rope.apply(group, cos, sin, inverse=True)
        return linear(self.wo_b, self.grouped_output(o))

    def rotated_kv(self, kv: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """The window's rows of T positions from their wkv products kv [T, head_dim]: normed and rotated in place."""
        return self.rope.apply(rms_norm(kv, self.kv_norm, self.args.norm_eps, out=kv), cos, sin)

    def store_kv(self, kv: np.ndarray, cos: np.ndarray, sin: np.ndarray, cache: LayerCache) -> None:
        """The window's rows from their wkv products kv, normed and rotated in place, appended to the cache."""
        cache.kv.append(self.rotated_kv(kv, cos, sin))

    def attend(self, q: np.ndarray, positions: np.ndarray, cache: LayerCache, picks,
               causal: bool = True, out: np.ndarray | None = None, groups: int | None = None) -> np.ndarray:
        """Softmax with sink over each query's window rows and visible compressed rows: [T, H, hd], into out
        when given (which may be q); or with groups, [groups, T, H/groups, hd] (backend.attention_sink)."""
        a, t = self.args, q.shape[0]
        lo, hi = max(0, int(positions[0]) - a.window_size + 1), int(positions[-1]) + 1
        window = cache.kv.rows(lo, hi)
        ends = positions + 1 if causal else np.full_like(positions, hi)
        ranges = np.stack([np.maximum(positions - a.window_size + 1, lo) - lo, ends - lo], axis=1)
        ranges = np.ascontiguousarray(ranges, np.int32)
        rows, idx = np.empty((0, a.head_dim), np.float32), np.empty((t, 0), np.int32)
        if self.ratio:
            if picks is None:
                visible = (positions + 1) // self.ratio
                k = np.arange(int(visible.max()), dtype=np.int32)
                picks = np.where(k[None, :] < visible[:, None], k[None, :], -1).astype(np.int32)
            rows, idx = cache.compressor.rows.gather(picks)
        return backend.attention_sink(q, window, ranges, rows, idx, self.attn_sink, a.head_dim ** -0.5,
                                      f"fl_attn_sink (layer {self.layer})", out, groups)

    def grouped_output(self, o: np.ndarray) -> np.ndarray:
        """Group g (heads g*H/G..) goes through its own o_lora_rank rows of wo_a: [G, T, H/G, hd] -> [T, G*rank]."""
        a, t = self.args, o.shape[1]
        groups = o.reshape(a.o_groups, t, -1)
        w = self.wo_a.data.reshape(a.o_groups, a.o_lora_rank, -1)
        if OBSERVER is not None:  # every group's input is a row of the one [k, G*rank] matrix's input, token-major
            OBSERVER(self.wo_a, groups.transpose(1, 0, 2).reshape(-1, groups.shape[2]), None)
        # one run of the core for all groups: eight small products then stream like one large one
        return backend.concat(backend.matmul_batch([((self.wo_a, w[g]), groups[g]) for g in range(a.o_groups)]),
                              axis=1)


# ---------------------------------------------------------------- MoE

class MoEGate:
    """sqrt(softplus) scores; the top-k of scores + bias (the bias only selects), or on the first n_hash_layers
    the token's fixed tid2eid row; weights are the picked scores renormalised and scaled by route_scale."""

    def __init__(self, args: ModelArgs, weight: WeightView, bias: np.ndarray | None, tid2eid: np.ndarray | None):
        self.args, self.weight, self.bias, self.tid2eid = args, weight, bias, tid2eid

    def __call__(self, x: np.ndarray, token_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(weights [T, k], expert ids [T, k]) for the MoE inputs x [T, D] of the tokens token_ids."""
        return backend.moe_route(linear(self.weight, x), self.bias, self.tid2eid, token_ids,
                                 self.args.n_activated_experts, self.args.route_scale)

    def predict(self, x: np.ndarray, token_ids: np.ndarray) -> np.ndarray:
        """The experts this gate will likely pick, most picked first: exact on hash layers, else the top-k for x
        (another layer's hidden state put through this layer's norm)."""
        idx = self.tid2eid[token_ids] if self.tid2eid is not None else self(x, token_ids)[1]
        experts, counts = np.unique(backend.to_host(idx), return_counts=True)
        return experts[np.argsort(-counts, kind="stable")]


class MoE:
    """Routed experts (SwiGLU with gate clamped above and up clamped both ways; the routing weight scales the
    down projection's output) plus the shared expert."""

    def __init__(self, args: ModelArgs, layer: int, w: dict, gate: MoEGate, offload: ExpertCache | None = None):
        self.args, self.gate, self.layer, self.offload = args, gate, layer, offload
        self.limit, self.shared_limit = args.swiglu_limits[layer], args.swiglu_limits_shared[layer]
        self.w1, self.w3, self.w2 = w["ffn_gate_exps"], w["ffn_up_exps"], w["ffn_down_exps"]
        self.s1, self.s3, self.s2 = w["ffn_gate_shexp"], w["ffn_up_shexp"], w["ffn_down_shexp"]

    @staticmethod
    def experts_visible(x, idx, weights, w1: WeightView, w3: WeightView, w2: WeightView, limit: float, out) -> None:
        """backend.moe_experts computed the way the core's moe_run computes it (each expert's tokens in ascending
        order, the sums into out in ascending expert id), through linear(), so that an observer sees each expert's
        input and its SwiGLU output, the down projection's input."""
        if idx is None:  # the one expert of plain weights, at weight 1
            idx, weights = one_expert(x.shape[0])
        stacked = len(w1.ne) == 3
        t, k = idx.shape
        flat = idx.reshape(-1)
        order = np.argsort(flat, kind="stable")  # the (token, slot) pairs grouped by expert, tokens ascending
        ys = np.empty((order.size, x.shape[1]), np.float32)
        bounds = np.searchsorted(flat[order], np.arange(int(flat.max(initial=0)) + 2))
        for e in range(bounds.size - 1):
            lo, hi = bounds[e], bounds[e + 1]
            if lo == hi:
                continue
            xs = x[order[lo:hi] // k]
            ex = e if stacked else None
            g = np.minimum(linear(w1, xs, ex), np.float32(limit))
            u = np.clip(linear(w3, xs, ex), np.float32(-limit), np.float32(limit))
            with np.errstate(over="ignore"):
                h = (g / (np.float32(1) + np.exp(-g)) * u).astype(np.float32)
            ys[lo:hi] = linear(w2, h, ex)
        np.add.at(out, order // k, ys * weights.reshape(-1)[order][:, None])

    def __call__(self, x: np.ndarray, token_ids: np.ndarray) -> np.ndarray:
        weights, idx = self.gate(x, token_ids)
        x = backend.contiguous(x)
        out = backend.zeros_like(x)
        routed, shared = (self.w1, self.w3, self.w2), (self.s1, self.s3, self.s2)
        if OBSERVER is None:
            backend.moe(x, idx, weights, routed, self.limit, shared, self.shared_limit, out, self.offload, self.layer)
            return out
        if self.offload is None:
            self.experts_visible(x, idx, weights, *routed, self.limit, out)
        else:
            backend.moe_experts(x, idx, weights, *routed, self.limit, out, self.offload, self.layer)
        # the shared expert: the one expert of plain weights for every token at weight 1
        self.experts_visible(x, None, None, *shared, self.shared_limit, out)
        return out


# ---------------------------------------------------------------- model

# A chunk of at most this many tokens (a decode step, the batch that verifies a draft, an MTP catch-up) runs the
# backend's planned layer calls, token by token inside for attention and batched for the products; a longer one is
# a prefill and runs op by op. Either gives a token the same bits.
STEP_MAX_TOKENS = 16


class Block:
    """Attention then MoE, each wrapped in its hyper-connection."""

    def __init__(self, args: ModelArgs, layer: int, w: dict, attn: Attention, ffn: MoE):
        self.layer = layer
        self.attn_hc = HyperConnection(args, w["hc_attn_fn"], w["hc_attn_base"], w["hc_attn_scale"])
        self.ffn_hc = HyperConnection(args, w["hc_ffn_fn"], w["hc_ffn_base"], w["hc_ffn_scale"])
        self.attn_norm, self.ffn_norm, self.eps = w["attn_norm"], w["ffn_norm"], args.norm_eps
        self.attn, self.ffn = attn, ffn
        self.next: Block | None = None  # set when the experts of the next layer are prefetched from disk
        # The backend's plans of this block's sublayers (each with its hyper-connection) for one call each per
        # decode step or short batch; None runs them op by op, as prefill always does. Transformer.use_fused_decode
        # sets them.
        self.attn_plan = self.ffn_plan = None
        # On a torch device, attn_collapse, attn_finish and ffn_sublayer for a batch of one token run from static
        # buffers (captured CUDA graphs): flashlite/device/step_graphs.py's segments, set by
        # Transformer.use_step_graphs; None runs them op by op (or, in a run of resident layers, the run's segment
        # does the layer's whole step: Transformer.step_runs).
        self.attn_segment = self.attn_finish_segment = self.ffn_segment = None

    def plan_attn(self):
        """The backend's one-call plan of the attention sublayer: the same operations as attn_sublayer."""
        at = self.attn
        return backend.plan_attn(at.args, self.attn_hc, self.attn_norm, at, at.compressor, at.indexer)

    def plan_ffn(self):
        """The backend's one-call plan of the MoE sublayer: the same operations as ffn_sublayer, resolved once."""
        f, hc = self.ffn, self.ffn_hc
        return backend.plan_ffn(hc.args, hc.fn, hc.base, hc.scale, self.ffn_norm, f.gate.weight, f.gate.bias,
                                f.gate.tid2eid, f.args.route_scale, (f.w1, f.w3, f.w2), f.limit, (f.s1, f.s3, f.s2),
                                f.shared_limit, f.offload, f.layer)

    def prefetch_experts(self, y: np.ndarray, token_ids: np.ndarray) -> None:
        """Queue disk reads of the experts this block's router is expected to pick for y, an earlier hidden state
        already RMS-normalised (without weight)."""
        self.ffn.offload.prefetch(self.layer, self.ffn.gate.predict(self.ffn_norm * y, token_ids))

    def __call__(self, h, positions, token_ids, cache: LayerCache, dump: dict | None = None, causal: bool = True):
        """causal=False: attention without the causal mask (a DSpark block; one token sees the same rows either
        way, so a planned decode step ignores it)."""
        t = h.shape[0]
        # a decode step or a verified draft: the backend's planned calls, where planned
        step = OBSERVER is None and (t == 1 or causal and t <= STEP_MAX_TOKENS)
        if step and self.attn_plan is not None:
            pos = int(positions[0])
            cs_tok, cs_row = self.attn.rope.step_tables(pos, t, self.attn.ratio)
            if self.ffn_plan is not None and dump is None:
                return backend.layer_step(self.attn_plan, self.ffn_plan, cache, pos, cs_tok, cs_row, h, token_ids)
            h = backend.attn_step(self.attn_plan, cache, pos, cs_tok, cs_row, h)
        else:
            h = self.attn_sublayer(h, positions, cache, causal)
        if dump is not None:
            dump[f"blk.{self.layer}.attn"] = h.copy()
        if step and self.ffn_plan is not None:
            h = backend.ffn_step(self.ffn_plan, h, token_ids)
        else:
            h = (self.ffn_segment or self.ffn_sublayer)(h, token_ids)
        if dump is not None:
            dump[f"blk.{self.layer}.ffn"] = h.copy()
        return h

    def attn_sublayer(self, h: np.ndarray, positions: np.ndarray, cache: LayerCache,
                      causal: bool = True) -> np.ndarray:
        """h plus the attention of its collapse, expanded back into the streams."""
        x, post, comb = (self.attn_segment or self.attn_collapse)(h)
        cos, sin = self.attn.rope.cos_sin(positions)
        o = self.attn.heads(x, positions, cos, sin, cache, causal)
        return (self.attn_finish_segment or self.attn_finish)(h, post, comb, o, cos, sin)

    def attn_collapse(self, h: np.ndarray) -> tuple:
        """The attention's input (h collapsed by its hyper-connection, normed) with the expansion's post and comb:
        the part of the attention sublayer that neither the position nor the cache changes."""
        x, post, comb = self.attn_hc(h)
        return rms_norm(x, self.attn_norm, self.eps), post, comb

    def attn_finish(self, h: np.ndarray, post: np.ndarray, comb: np.ndarray, o: np.ndarray, cos: np.ndarray,
                    sin: np.ndarray) -> np.ndarray:
        """The attention sublayer's end, which the position changes only through cos and sin: the heads' outputs
        o through the output projection, expanded into the streams h by post and comb."""
        return HyperConnection.expand(self.attn.output(o, cos, sin), h, post, comb)

    def ffn_sublayer(self, h: np.ndarray, token_ids: np.ndarray) -> np.ndarray:
        """h plus the MoE of its collapse, expanded back into the streams."""
        x, post, comb = self.ffn_hc(h)
        y = rms_norm(x, None, self.eps)
        if self.next is not None:
            # While this layer computes, the disk reads what the next layer's router would pick for this state.
            self.next.prefetch_experts(y, token_ids)
        y *= self.ffn_norm  # in place (the prefetch is done with y): the same bits as ffn_norm * y
        return HyperConnection.expand(self.ffn(y, token_ids), h, post, comb)


def build_block(a: ModelArgs, i: int, w: dict, rope_main: "RoPE", rope_compress: "RoPE",
                offload: ExpertCache | None = None) -> "Block":
    """Block i from its tensors w (names after `blk.{i}.`, as layer_tensors lists them, loaded)."""
    r = a.compress_ratios[i]
    rope = rope_compress if r else rope_main
    compressor = indexer = None
    if r:
        compressor = Compressor(a, r, a.head_dim, w["attn_compressor_kv.weight"],
                                w["attn_compressor_gate.weight"], w["attn_compressor_ape.weight"],
                                w["attn_compressor_norm.weight"], rope)
    if r == 4:
        index_compressor = Compressor(a, r, a.index_head_dim, w["indexer_compressor_kv.weight"],
                                      w["indexer_compressor_gate.weight"], w["indexer_compressor_ape.weight"],
                                      w["indexer_compressor_norm.weight"], rope)
        indexer = Indexer(a, w["indexer.attn_q_b.weight"], w["indexer.proj.weight"], index_compressor, rope)
    w = {k.rsplit(".", 1)[0]: v for k, v in w.items()}
    attn = Attention(a, i, w, rope, compressor, indexer)
    gate = MoEGate(a, w["ffn_gate_inp"], w.get("exp_probs_b"), w.get("ffn_gate_tid2eid"))
    return Block(a, i, w, attn, MoE(a, i, w, gate, offload))


class Transformer:
    """DeepSeek V4's network over the weights of one GGUF file (flashlite.model.Model holds it as `net`)."""

    def __init__(self, args: ModelArgs, f: GGUFFile, offload: dict | None = None, device=None, placer=None):
        """offload: None keeps every expert memory-mapped; else ExpertCache options (ram_budget, policy,
        io_threads, usage_path, pin_fraction) plus prefetch (bool). device: None runs on the CPU backend (weights
        memory-mapped); else a backend device (backends.open_device) the weights are uploaded to, once, here.
        placer: None uploads every weight; else a callable that takes the file's tensors {name: view} and returns
        the hybrid placement (backends.placement.Placement) of what the device holds; the rest stays in the file,
        for the C core (the routed experts through the expert cache under offload)."""
        self.args, self.device = args, device
        if device is not None and offload is not None and placer is None:
            raise ValueError(f"ram_budget: on device {device} the expert cache holds the routed experts that gpu_mem "
                             f"(--gpu-mem) leaves on the CPU; without gpu_mem every expert is on the device")
        spec = expected_tensors(args)
        t = {}
        for name, (ne, use) in spec.items():
            t[name] = f.load(name, ne, use)
            if use == INDEX and t[name].size and not 0 <= t[name].min() <= t[name].max() < args.n_routed_experts:
                raise ValueError(f"{f.path}: tensor '{name}' names experts outside 0..{args.n_routed_experts - 1}")
        views = dict(t)  # as the file holds them: the expert cache reads its experts from there
        if device is not None:
            placement = placer(views) if placer is not None else None
            for name, view in views.items():
                t[name] = device.upload(view, placement.resident(name) if placement is not None else None)
        self.mtp = {n: v for n, v in f.tensors.items() if n not in spec and n.startswith(f"blk.{args.n_layers}.")}
        self.embed = t["token_embd.weight"]
        self.head = t["output.weight"]
        self.norm = t["output_norm.weight"]
        self.hc_head = HyperHead(args, t["output_hc_fn.weight"], t["output_hc_base.weight"],
                                 t["output_hc_scale.weight"])
        yarn = (args.rope_factor, args.original_seq_len, args.beta_fast, args.beta_slow) \
            if args.original_seq_len and args.rope_factor > 1 else None
        self.rope_main = RoPE(args.rope_head_dim, args.rope_theta)
        self.rope_compress = RoPE(args.rope_head_dim, args.compress_rope_theta, yarn)
        self.offload = None
        if offload is not None:
            offload = dict(offload)
            prefetch = offload.pop("prefetch", True)
            mats = [tuple(views[f"blk.{i}.ffn_{m}_exps.weight"] for m in ("gate", "up", "down"))
                    for i in range(args.n_layers)]
            if device is not None:
                offload["elsewhere"] = placement.experts
            self.offload = ExpertCache(f.path, mats, args.n_routed_experts, **offload)
            f.keep_out([w.name for layer in mats for w in layer])
        self.layers = [self._block(i, {k[len(f"blk.{i}."):]: v for k, v in t.items() if k.startswith(f"blk.{i}.")})
                       for i in range(args.n_layers)]
        # On a device the predicted ids come to the host for it (a few bytes, just before the layer's own routed
        # ids come over for its host experts); the cache never reads the experts the device holds.
        self.prefetch = self.offload is not None and prefetch
        # Prefetch: the disk starts on the first layer's experts, predicted from the embedding, and on those of
        # every hash-routed layer, which the token ids decide, as soon as the ids are known: the later of these
        # get several layers of compute to arrive in. Each other layer's are predicted by the layer before it.
        self.prefetch_at_start = []
        if self.prefetch:
            self.prefetch_at_start = [b for i, b in enumerate(self.layers) if i == 0 or b.ffn.gate.tid2eid is not None]
            for block, following in zip(self.layers, self.layers[1:]):
                block.next = None if following in self.prefetch_at_start else following
        self.use_fused_decode(True)
        self.use_step_graphs("off")

    def use_fused_decode(self, on: bool = True) -> None:
        """Whether a decode step (or a chunk of up to STEP_MAX_TOKENS, such as a verified draft) runs each block's
        attention and MoE sublayers as the backend's planned calls, one for the whole layer (bitwise the same result as op by op; an offloaded layer that prefetches the
        next one's experts runs its MoE op by op)."""
        for block in self.layers:
            block.attn_plan = block.plan_attn() if on else None
            block.ffn_plan = block.plan_ffn() if on and block.next is None else None
        # the whole step in one call where every layer is planned: its RoPE tables, one per RoPE and compress ratio
        self.step_plan, self.step_ropes = None, []
        if on and all(b.attn_plan is not None and b.ffn_plan is not None for b in self.layers):
            ropes = [(b.attn.rope, b.attn.ratio) for b in self.layers]
            self.step_ropes = list(dict.fromkeys(ropes))
            self.step_plan = backend.plan_step([b.attn_plan for b in self.layers], [b.ffn_plan for b in self.layers],
                                               [self.step_ropes.index(r) for r in ropes])

    def _block(self, i: int, w: dict) -> Block:
        return build_block(self.args, i, w, self.rope_main, self.rope_compress, self.offload)

    def make_cache(self, rewind: int = 256, kv_format: str = "f32") -> ModelCache:
        """A decode cache; kv_format "f32" (rows as computed, transformers' semantics) or "fp8" (rows rounded and
        packed as DeepSeek's reference stores them, a quarter of the bytes: see flashlite/kv_cache.py)."""
        a = self.args
        row_log = backend.row_log(self.device, kv_format)
        return ModelCache([LayerCache(a.head_dim, a.window_size, r, a.index_head_dim, a.rope_head_dim, kv_format,
                                      row_log) for r in a.compress_ratios], rewind)

    def embed_tokens(self, token_ids: np.ndarray) -> np.ndarray:
        return backend.embed(self.embed, token_ids)

    def __call__(self, token_ids: np.ndarray, cache: ModelCache, dump: dict | None = None,
                 logits: str = "all", hidden: list | None = None, taps: dict | None = None) -> np.ndarray:
        """Logits of the chunk token_ids that follows the cache's pos tokens; advances the cache. `logits`: "all"
        positions [T, vocab], the "last" one [1, vocab] (generation: the head, vocab x dim, is most of a prefill's
        work when every position gets it), or "none" [0, vocab] (a replay that only fills the cache). `hidden`,
        when a list, receives the last block's streams [T, hc, dim] (what V4's MTP block reads). `taps`, when a
        dict, gets for each of its keys L the mean over the hc streams that enter block L [T, dim] (L = n_layers:
        the last block's output), the target features llama.cpp's DSpark drafts read."""
        token_ids = np.asarray(token_ids, np.int64)
        if token_ids.ndim != 1 or token_ids.size == 0:
            raise ValueError("token_ids must be a non-empty 1-D sequence")
        if token_ids.min() < 0 or token_ids.max() >= self.args.vocab_size:
            raise ValueError(f"token ids must lie in 0..{self.args.vocab_size - 1}")
        positions = np.arange(cache.pos, cache.pos + len(token_ids))
        run_logits = None  # the logits of a run of layers that ends with the head
        e = self.embed_tokens(token_ids)
        if self.prefetch_at_start:
            y = rms_norm(e, None, self.args.norm_eps)
            for block in self.prefetch_at_start:
                block.prefetch_experts(y, token_ids)
        h = backend.hc_streams(e, self.args.hc_mult)
        if self.step_plan is not None and dump is None and taps is None and OBSERVER is None and \
                len(token_ids) <= STEP_MAX_TOKENS:
            # a decode step or a verified draft: every layer in one call, as the blocks' planned calls would run
            pos = int(positions[0])
            tables = [rope.step_tables(pos, len(token_ids), ratio) for rope, ratio in self.step_ropes]
            h = backend.model_step(self.step_plan, cache, pos, tables, h, token_ids)
        else:
            # a decode step on a torch device: runs of resident layers as one segment each (step graphs)
            runs = self.step_runs if len(token_ids) == 1 and dump is None and OBSERVER is None else {}
            i = 0
            while i < len(self.layers):
                run = runs.get(i)
                if run is not None:
                    h, entering, *logits = run(h, positions, token_ids, cache.layers[run.start:run.stop])
                    run_logits = logits[0] if logits else None
                    for j in range(run.start, run.stop):
                        if taps is not None and j in taps:
                            taps[j] = entering[j - run.start]
                    if run.attention_only:  # the last layer's MoE sublayer, op by op
                        h = self.layers[run.stop - 1].ffn_sublayer(h, token_ids)
                    i = run.stop
                    continue
                if taps is not None and i in taps:
                    taps[i] = h.mean(axis=1)
                h = self.layers[i](h, positions, token_ids, cache.layers[i], dump)
                i += 1
        if taps is not None and len(self.layers) in taps:
            taps[len(self.layers)] = h.mean(axis=1)
        if hidden is not None:
            hidden.append(h)
        if logits == "none":
            cache.advance(token_ids)
            return np.empty((0, self.args.vocab_size), np.float32)
        if logits == "last":
            h = h[-1:]
        if dump is not None:
            x = rms_norm(self.hc_head(h), self.norm, self.args.norm_eps)
            dump["output_norm"] = x.copy()
            y = linear(self.head, x)
        elif run_logits is not None:
            y = run_logits
        else:
            y = (self.head_segment or self.head_logits)(h)
        cache.advance(token_ids)
        return backend.to_host(y)

    def head_logits(self, h: np.ndarray) -> np.ndarray:
        """The logits of the last block's streams h [T, hc, dim]: collapsed, normed, through the head."""
        return linear(self.head, rms_norm(self.hc_head(h), self.norm, self.args.norm_eps))

    def use_step_graphs(self, mode: str = "off") -> None:
        """How a decode step of one token runs on a torch device (flashlite/device/step_graphs.py): "cuda" replays
        captured CUDA graphs of its segments, "static" runs the same segments from the same static buffers without a
        capture (how a CPU torch device tests it), "off" runs op by op. The segments: runs of layers, each ending
        after a whole layer, or after the attention sublayer of a layer whose MoE sublayer has a weight the placement
        left on the host or prefetches the next layer's experts from disk (both bring values to the host: it runs
        op by op), the head with the last run when that ends the model (flashlite/device/layer_runs.py: a resident
        model's whole step is one). A layer whose attention has a host weight keeps a segment per part that has
        none (attention collapse, projections, heads over the KV rings: flashlite/device/step_heads.py, output)."""
        for block in self.layers:
            block.attn_segment = block.attn_finish_segment = block.ffn_segment = block.attn.step_heads = None
        self.head_segment = self.graphs = None
        self.step_runs = {}
        if mode == "off":
            return
        if self.device is None:
            raise ValueError(f"step graphs {mode!r}: the CPU backend runs a decode step as one planned call")
        from flashlite.device.step_graphs import StepGraphs
        from flashlite.device.step_heads import StepHeads
        self.graphs = g = StepGraphs(mode, self.device.device)
        for block in self.layers:
            f = block.ffn
            at = block.attn
            block.attn_segment = g.segment(block.attn_collapse, f"blk.{block.layer} attention collapse",
                                           [block.attn_hc.fn])
            block.attn_finish_segment = g.segment(block.attn_finish, f"blk.{block.layer} attention output",
                                                  [at.wo_a, at.wo_b])
            at.step_heads = StepHeads(g, at)
            if block.next is None:
                block.ffn_segment = g.segment(block.ffn_sublayer, f"blk.{block.layer} MoE sublayer",
                                              [block.ffn_hc.fn, f.gate.weight, f.w1, f.w3, f.w2, f.s1, f.s3, f.s2])
        self.head_segment = g.segment(self.head_logits, "head", [self.hc_head.fn, self.head])
        # each run of layers whose parts got segments becomes one: the layers whole, the last one's attention alone
        # when its MoE sublayer has no segment (a weight on the host, the disk prefetch: it runs op by op after the
        # run), the head with it when it ends the model. The parts' segments are left out (their functions still
        # serve a batch of several tokens, op by op).
        run = []
        for block in self.layers + [None]:
            attention = block is not None and all(s is not None for s in (
                block.attn_segment, block.attn.step_heads.project_segment, block.attn_finish_segment))
            if attention:
                run.append(block)
                if block.ffn_segment is not None:
                    continue
            if run:
                self._merge(g, run, attention_only=attention)
            run = []

    def _merge(self, g, run: list, attention_only: bool) -> None:
        """run's blocks as one LayerRun (see use_step_graphs), their parts' segments left out."""
        from flashlite.device.layer_runs import LayerRun
        with_head = not attention_only and run[-1] is self.layers[-1] and self.head_segment is not None
        merged = LayerRun(g, run, self.head_logits if with_head else None, attention_only)
        self.step_runs[merged.start] = merged
        for b in run:
            g.drop([s for s in (b.attn_segment, b.attn.step_heads.project_segment, b.attn_finish_segment,
                                b.ffn_segment, *b.attn.step_heads.segments.values()) if s is not None])
            b.attn_segment = b.attn_finish_segment = b.ffn_segment = b.attn.step_heads = None
        if with_head:
            g.drop([self.head_segment])
            self.head_segment = None
