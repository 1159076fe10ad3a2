"""The DeepSeek V4 GGUF specification, written once: the hyperparameter keys (with the ranges a file's values must
lie in) and the tensors a file holds (GGUF names, shapes as functions of the hyperparameters, uses).

The quantizer writes from it (quant/gguf_meta.py, quant/layout.py), the loader checks a file against it
(deepseek_v4.ModelArgs.from_gguf, expected_tensors). Keys and names are llama.cpp's: its converter
(conversion/deepseek.py DeepseekV4Model) writes them and its loader (src/models/deepseek4.cpp) reads them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from flashlite.gguf_file import INDEX, MATMUL, ROWS, WHOLE

ARCH = "deepseek4"
DSPARK_ARCH = "dflash"  # llama.cpp's architecture of DFlash / DSpark drafts
SQRT_SOFTPLUS = 4  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SQRT_SOFTPLUS, the only gating V4 uses


@dataclass(frozen=True)
class HparamKey:
    """One `{arch}.{key}` entry. field: the ModelArgs field it fills (or the writer's name for a key the loader
    does not read); gguf_type: the GGUFValueType member the converter writes it as; kind (int, float, list or None
    when the loader does not read it), lo..hi: the values the architecture and this runtime allow (bounds that keep
    a hostile file from asking for days of work or terabytes of memory); default: the value of an absent key, None
    when the key is required."""

    field: str
    key: str
    gguf_type: str
    kind: type | None = None
    lo: float = 0
    hi: float = 0
    default: object = None


_BIG = 1 << 20
# in the order llama.cpp's converter writes them (nextn_predict_layers only into an MTP draft)
HPARAM_KEYS = (
    HparamKey("n_mtp_layers", "nextn_predict_layers", "UINT32", int, 0, 16, 0),
    HparamKey("block_count", "block_count", "UINT32", int, 1, 4096),
    HparamKey("max_seq_len", "context_length", "UINT32", int, 1, 1 << 31),
    HparamKey("dim", "embedding_length", "UINT32", int, 1, 1 << 16),
    HparamKey("embedding_length_out", "embedding_length_out", "UINT32"),  # dim * hc_mult, deepseek4 only
    HparamKey("vocab_size", "vocab_size", "UINT32", int, 0, 1 << 24, 0),  # 0: absent, token_embd's rows say
    HparamKey("n_heads", "attention.head_count", "UINT32", int, 1, 4096),
    HparamKey("head_count_kv", "attention.head_count_kv", "UINT32", int, 1, 4096, 1),
    HparamKey("head_dim", "attention.key_length", "UINT32", int, 2, 1 << 14),
    HparamKey("value_length", "attention.value_length", "UINT32", int, 0, 1 << 14, 0),  # 0: absent, key_length
    HparamKey("norm_eps", "attention.layer_norm_rms_epsilon", "FLOAT32", float, 0.0, 1.0),
    HparamKey("q_lora_rank", "attention.q_lora_rank", "UINT32", int, 1, 1 << 16),
    HparamKey("o_lora_rank", "attention.output_lora_rank", "UINT32", int, 1, 1 << 16),
    HparamKey("o_groups", "attention.output_group_count", "UINT32", int, 1, 4096),
    HparamKey("window_size", "attention.sliding_window", "UINT32", int, 1, _BIG),
    HparamKey("compress_rope_theta", "attention.compress_rope_freq_base", "FLOAT32", float, 1.0, 1e30),
    HparamKey("compress_ratios", "attention.compress_ratios", "INT32", list, 0, 128),
    HparamKey("index_n_heads", "attention.indexer.head_count", "UINT32", int, 1, 4096),
    HparamKey("index_head_dim", "attention.indexer.key_length", "UINT32", int, 2, 1 << 14),
    HparamKey("index_topk", "attention.indexer.top_k", "UINT32", int, 1, _BIG),
    HparamKey("rope_head_dim", "rope.dimension_count", "UINT32", int, 2, 1 << 14),
    HparamKey("rope_theta", "rope.freq_base", "FLOAT32", float, 1.0, 1e30),
    HparamKey("rope_scaling_type", "rope.scaling.type", "STRING"),  # "yarn"
    HparamKey("rope_factor", "rope.scaling.factor", "FLOAT32", float, 1.0, 1e30, 1.0),
    HparamKey("original_seq_len", "rope.scaling.original_context_length", "UINT32", int, 0, 1 << 31, 0),
    HparamKey("beta_fast", "rope.scaling.yarn_beta_fast", "FLOAT32", float, 1e-30, 1e30, 32.0),
    HparamKey("beta_slow", "rope.scaling.yarn_beta_slow", "FLOAT32", float, 1e-30, 1e30, 1.0),
    HparamKey("n_routed_experts", "expert_count", "UINT32", int, 1, 1 << 16),
    HparamKey("n_activated_experts", "expert_used_count", "UINT32", int, 1, 1 << 16),
    HparamKey("n_shared_experts", "expert_shared_count", "UINT32", int, 1, 1),
    HparamKey("moe_inter_dim", "expert_feed_forward_length", "UINT32", int, 1, _BIG),
    HparamKey("route_scale", "expert_weights_scale", "FLOAT32", float, 1e-30, 1e30),
    HparamKey("expert_weights_norm", "expert_weights_norm", "BOOL"),  # norm_topk_prob
    HparamKey("expert_gating_func", "expert_gating_func", "UINT32", int, 0, 1 << 16),
    HparamKey("n_hash_layers", "hash_layer_count", "UINT32", int, 0, 4096),
    HparamKey("swiglu_limits", "swiglu_clamp_exp", "FLOAT32", list, 1e-30, 1e30),
    HparamKey("swiglu_limits_shared", "swiglu_clamp_shexp", "FLOAT32", list, 1e-30, 1e30, []),
    HparamKey("hc_mult", "hyper_connection.count", "UINT32", int, 1, 64),
    HparamKey("hc_sinkhorn_iters", "hyper_connection.sinkhorn_iterations", "UINT32", int, 1, 1000),
    HparamKey("hc_eps", "hyper_connection.epsilon", "FLOAT32", float, 0.0, 1.0),
)


def checked_value(path: str, key: str, value, kind, lo, hi):
    """value as kind, within [lo, hi] (each element of a list; a float also finite, and above lo where lo is 0);
    an error names the file, the key and the value."""
    if kind is list:
        items = value if isinstance(value, list) else [value]
        if not items or len(items) > 1 << 16:
            raise ValueError(f"{path}: metadata '{key}' has {len(items)} entries")
        return [checked_value(path, f"{key}[{i}]", item, float if isinstance(lo, float) else int, lo, hi)
                for i, item in enumerate(items)] if isinstance(value, list) else \
            checked_value(path, key, value, float if isinstance(lo, float) else int, lo, hi)
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{path}: metadata '{key}' is {value!r}, expected an integer")
        if not lo <= value <= hi:
            raise ValueError(f"{path}: metadata '{key}' is {value}, expected {lo}..{hi}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{path}: metadata '{key}' is {value!r}, expected a number")
    value = float(value)
    if not (math.isfinite(value) and lo <= value <= hi and (lo > 0 or value > 0)):
        raise ValueError(f"{path}: metadata '{key}' is {value}, expected a finite number in ({lo}, {hi}]")
    return value


# ---------------------------------------------------------------------------------------------------
# the tensors: GGUF name -> (ggml shape ne, innermost first; how the forward uses it: gguf_file.MATMUL, WHOLE, ROWS
# or INDEX, which decides the types it may have)
# ---------------------------------------------------------------------------------------------------

def _ne(*dims):
    return tuple(int(d) for d in dims)


def expected_tensors(a) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every tensor of a deepseek4 GGUF of a's n_layers blocks (a: ModelArgs, or anything with its hyperparameter
    names, as the quantizer's Hparams)."""
    spec = root_tensors(a)
    for i in range(a.n_layers):
        spec.update({f"blk.{i}." + k: v for k, v in layer_tensors(a, i).items()})
    return spec


def root_tensors(a) -> dict[str, tuple[tuple[int, ...], str]]:
    """The tensors outside the blocks: the embedding, the head, and the final norm and hyper-connection collapse."""
    d, hc = a.dim, a.hc_mult
    return {
        "token_embd.weight": (_ne(d, a.vocab_size), ROWS),
        "output.weight": (_ne(d, a.vocab_size), MATMUL),
        "output_norm.weight": (_ne(d), WHOLE),
        "output_hc_fn.weight": (_ne(hc * d, hc), MATMUL),
        "output_hc_base.weight": (_ne(hc), WHOLE),
        "output_hc_scale.weight": (_ne(1), WHOLE),
    }


def layer_tensors(a, i: int, ratio: int | None = None) -> dict[str, tuple[tuple[int, ...], str]]:
    """The tensors of block i (names after `blk.{i}.`), by its compress ratio (a.compress_ratios[i] unless given)
    and whether it is hash-routed (i < a.n_hash_layers). Listed in the order of the checkpoint's tensors of a block
    (quant.layout keeps it), but for the stacked routed experts ffn_*_exps: the checkpoint lists its experts last."""
    d, hc = a.dim, a.hc_mult
    mix = (2 + hc) * hc
    r = a.compress_ratios[i] if ratio is None else ratio
    shared = a.moe_inter_dim * a.n_shared_experts
    layer = {
        "attn_norm.weight": (_ne(d), WHOLE), "ffn_norm.weight": (_ne(d), WHOLE),
        "hc_attn_fn.weight": (_ne(hc * d, mix), MATMUL), "hc_attn_base.weight": (_ne(mix), WHOLE),
        "hc_attn_scale.weight": (_ne(3), WHOLE),
        "hc_ffn_fn.weight": (_ne(hc * d, mix), MATMUL), "hc_ffn_base.weight": (_ne(mix), WHOLE),
        "hc_ffn_scale.weight": (_ne(3), WHOLE),
        "attn_sinks.weight": (_ne(a.n_heads), WHOLE),
        "attn_q_a.weight": (_ne(d, a.q_lora_rank), MATMUL),
        "attn_q_a_norm.weight": (_ne(a.q_lora_rank), WHOLE),
        "attn_q_b.weight": (_ne(a.q_lora_rank, a.n_heads * a.head_dim), MATMUL),
        "attn_kv.weight": (_ne(d, a.head_dim), MATMUL),
        "attn_kv_a_norm.weight": (_ne(a.head_dim), WHOLE),
        "attn_output_a.weight": (_ne(a.n_heads * a.head_dim // a.o_groups, a.o_groups * a.o_lora_rank),
                                 MATMUL),
        "attn_output_b.weight": (_ne(a.o_groups * a.o_lora_rank, d), MATMUL),
        "ffn_gate_inp.weight": (_ne(d, a.n_routed_experts), MATMUL),
        "ffn_gate_exps.weight": (_ne(d, a.moe_inter_dim, a.n_routed_experts), MATMUL),
        "ffn_up_exps.weight": (_ne(d, a.moe_inter_dim, a.n_routed_experts), MATMUL),
        "ffn_down_exps.weight": (_ne(a.moe_inter_dim, d, a.n_routed_experts), MATMUL),
        "ffn_gate_shexp.weight": (_ne(d, shared), MATMUL),
        "ffn_up_shexp.weight": (_ne(d, shared), MATMUL),
        "ffn_down_shexp.weight": (_ne(shared, d), MATMUL),
    }
    if i < a.n_hash_layers:
        layer["ffn_gate_tid2eid.weight"] = (_ne(a.n_activated_experts, a.vocab_size), INDEX)
    else:
        layer["exp_probs_b.bias"] = (_ne(a.n_routed_experts), WHOLE)
    if r:
        c = 2 if r == 4 else 1
        layer.update({
            "attn_compressor_kv.weight": (_ne(d, c * a.head_dim), MATMUL),
            "attn_compressor_gate.weight": (_ne(d, c * a.head_dim), MATMUL),
            "attn_compressor_ape.weight": (_ne(c * a.head_dim, r), WHOLE),
            "attn_compressor_norm.weight": (_ne(a.head_dim), WHOLE),
        })
    if r == 4:
        layer.update({
            "indexer.attn_q_b.weight": (_ne(a.q_lora_rank, a.index_n_heads * a.index_head_dim), MATMUL),
            "indexer.proj.weight": (_ne(d, a.index_n_heads), MATMUL),
            "indexer_compressor_kv.weight": (_ne(d, 2 * a.index_head_dim), MATMUL),
            "indexer_compressor_gate.weight": (_ne(d, 2 * a.index_head_dim), MATMUL),
            "indexer_compressor_ape.weight": (_ne(2 * a.index_head_dim, r), WHOLE),
            "indexer_compressor_norm.weight": (_ne(a.index_head_dim), WHOLE),
        })
    return layer


def dspark_tensors(a, n_targets: int, rank: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """A DSpark draft's own tensors beside its stages (blk.{s}.*, layer_tensors with ratio 0, not hash-routed), as
    llama.cpp's converter writes them (DeepseekV4DSparkModel): the projection of the n_targets target layers' rows,
    the norms, the hyper-connection collapse, the Markov head of `rank` and the confidence head."""
    d, hc = a.dim, a.hc_mult
    return {
        "fc.weight": (_ne(n_targets * d, d), MATMUL),
        "enc.output_norm.weight": (_ne(d), WHOLE),
        "output_norm.weight": (_ne(d), WHOLE),
        "output_hc_fn.weight": (_ne(hc * d, hc), MATMUL),
        "output_hc_base.weight": (_ne(hc), WHOLE),
        "output_hc_scale.weight": (_ne(1), WHOLE),
        "markov_w1.weight": (_ne(rank, a.vocab_size), WHOLE),  # read by rows, one per token
        "markov_w2.weight": (_ne(rank, a.vocab_size), MATMUL),
        "conf_proj.weight": (_ne(d + rank, 1), WHOLE),
    }


def mtp_tensors(a, n: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """An MTP draft's tensors beside its block blk.{n}.* (layer_tensors), as llama.cpp's converter writes them with
    --mtp: e_proj and h_proj side by side as one eh_proj, applied to [enorm(embed) ; hnorm(h)], the norms, and the
    draft's own hyper-connection collapse. (shared_head_norm is optional to the loader: the model's output_norm.)"""
    d, hc = a.dim, a.hc_mult
    return {
        f"blk.{n}.nextn.eh_proj.weight": (_ne(2 * d, d), MATMUL),
        f"blk.{n}.nextn.enorm.weight": (_ne(d), WHOLE),
        f"blk.{n}.nextn.hnorm.weight": (_ne(d), WHOLE),
        f"blk.{n}.nextn.shared_head_norm.weight": (_ne(d), WHOLE),
        "output_hc_fn.weight": (_ne(hc * d, hc), MATMUL),
        "output_hc_base.weight": (_ne(hc), WHOLE),
        "output_hc_scale.weight": (_ne(1), WHOLE),
    }
