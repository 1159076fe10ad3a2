"""DeepSeek V4 hyperparameters from config.json (release or transformers style) and the deepseek4 GGUF keys.

The keys, value types and values are the ones llama.cpp's converter writes (conversion/deepseek.py
DeepseekV4Model over TextModel.set_gguf_parameters) and its loader reads (src/models/deepseek4.cpp plus
llama_model_base::load_hparams), listed once in flashlite.models.v4_spec (gguf 0.19.0 has no DEEPSEEK4 constants).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from gguf import GGUFValueType

from flashlite.models.v4_spec import ARCH, DSPARK_ARCH, HPARAM_KEYS, SQRT_SOFTPLUS
from quant.safetensors_source import CheckpointError

_RATIO_OF_LAYER_TYPE = {"sliding_attention": 0}


@dataclass(frozen=True)
class Hparams:
    """The model's shape and constants, named as REF's ModelArgs names them."""

    vocab_size: int
    dim: int
    n_layers: int
    n_mtp_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope_head_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    window_size: int
    compress_ratios: tuple[int, ...]
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    n_routed_experts: int
    n_activated_experts: int
    n_shared_experts: int
    moe_inter_dim: int
    n_hash_layers: int
    route_scale: float
    norm_topk_prob: bool
    swiglu_limit: float
    hc_mult: int
    hc_sinkhorn_iters: int
    hc_eps: float
    norm_eps: float
    rope_theta: float
    compress_rope_theta: float
    rope_factor: float
    original_seq_len: int
    beta_fast: float
    beta_slow: float
    max_seq_len: int


class _Config:
    """config.json with lookups that fail naming the file and the key."""

    def __init__(self, raw, path: Path):
        self.path = path
        self.raw = raw
        if not isinstance(self.raw, dict):
            raise CheckpointError(f"{path}: not a JSON object")

    def get(self, *keys, default=None, kind=int):
        for key in keys:
            if key in self.raw and self.raw[key] is not None:
                value = self.raw[key]
                try:
                    return kind(value)
                except (TypeError, ValueError) as exc:
                    raise CheckpointError(f"{self.path}: '{key}' is {value!r}, expected {kind.__name__}") from exc
        if default is None:
            raise CheckpointError(f"{self.path}: missing key '{keys[0]}'")
        return default


def _compress_ratios(c: _Config, n_layers: int) -> tuple[int, ...]:
    if "compress_ratios" in c.raw:
        ratios = c.raw["compress_ratios"]
    elif "layer_types" in c.raw:
        rates = {**{"compressed_sparse_attention": 4, "heavily_compressed_attention": 128},
                 **(c.raw.get("compress_rates") or {}), **_RATIO_OF_LAYER_TYPE}
        unknown = sorted({t for t in c.raw["layer_types"] if t not in rates})
        if unknown:
            raise CheckpointError(f"{c.path}: unknown layer_types {unknown}")
        ratios = [rates[t] for t in c.raw["layer_types"]]
    else:
        raise CheckpointError(f"{c.path}: missing key 'compress_ratios' (or transformers' 'layer_types')")
    if not isinstance(ratios, list) or not all(isinstance(r, int) for r in ratios):
        raise CheckpointError(f"{c.path}: compress ratios must be a list of integers, got {ratios!r}")
    if len(ratios) < n_layers:
        raise CheckpointError(f"{c.path}: {len(ratios)} compress ratios for num_hidden_layers={n_layers}")
    bad = sorted({r for r in ratios if r not in (0, 4, 128)})
    if bad:
        raise CheckpointError(f"{c.path}: unsupported compress ratios {bad} (DeepSeek V4 uses 0, 4 and 128)")
    return tuple(ratios)


def _rope(c: _Config) -> tuple[float, float, dict]:
    """(rope_theta, compress_rope_theta, yarn parameters) from release or transformers-5 keys."""
    params = c.raw.get("rope_parameters")
    if isinstance(params, dict) and isinstance(params.get("compress"), dict):
        main, compress = params.get("main") or {}, params["compress"]
        theta = float(main["rope_theta"]) if "rope_theta" in main else c.get("rope_theta", kind=float)
        compress_theta = (float(compress["rope_theta"]) if "rope_theta" in compress
                          else c.get("compress_rope_theta", kind=float))
        return theta, compress_theta, compress
    scaling = c.raw.get("rope_scaling")
    if not isinstance(scaling, dict):
        raise CheckpointError(f"{c.path}: missing key 'rope_scaling' (yarn parameters)")
    return c.get("rope_theta", kind=float), c.get("compress_rope_theta", kind=float), scaling


def read_hparams(folder: str | Path) -> Hparams:
    path = Path(folder) / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: missing (the checkpoint folder needs its config.json)") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable config ({exc})") from exc
    return parse_hparams(raw, path)


def parse_hparams(raw: dict, path: Path) -> Hparams:
    """Hparams from a parsed config.json (`path` names it in errors)."""
    c = _Config(raw, path)
    score = c.get("scoring_func", default="sqrtsoftplus", kind=str)
    if score != "sqrtsoftplus":
        raise CheckpointError(f"{c.path}: scoring_func is {score!r}; deepseek4 GGUF supports only 'sqrtsoftplus'")
    n_layers = c.get("num_hidden_layers")
    ratios = _compress_ratios(c, n_layers)
    if "num_hash_layers" in c.raw:
        n_hash = c.get("num_hash_layers")
    else:
        n_hash = sum(t == "hash_moe" for t in c.raw.get("mlp_layer_types") or [])
    if not 0 <= n_hash <= n_layers:
        raise CheckpointError(f"{c.path}: num_hash_layers={n_hash} for num_hidden_layers={n_layers}")
    theta, compress_theta, yarn = _rope(c)
    head_dim = c.get("head_dim")
    rope_dim = c.get("qk_rope_head_dim", default=int(head_dim * float(c.raw.get("partial_rotary_factor") or 0)))
    if not 0 < rope_dim < head_dim:
        raise CheckpointError(f"{c.path}: missing key 'qk_rope_head_dim'")

    def yarn_value(key, kind):
        if key not in yarn:
            raise CheckpointError(f"{c.path}: rope scaling lacks '{key}'")
        return kind(yarn[key])

    return Hparams(
        vocab_size=c.get("vocab_size"), dim=c.get("hidden_size"), n_layers=n_layers,
        n_mtp_layers=c.get("num_nextn_predict_layers", default=0),
        n_heads=c.get("num_attention_heads"), n_kv_heads=c.get("num_key_value_heads", default=1),
        head_dim=head_dim, rope_head_dim=rope_dim, q_lora_rank=c.get("q_lora_rank"),
        o_groups=c.get("o_groups"), o_lora_rank=c.get("o_lora_rank"), window_size=c.get("sliding_window"),
        compress_ratios=ratios, index_n_heads=c.get("index_n_heads"), index_head_dim=c.get("index_head_dim"),
        index_topk=c.get("index_topk"), n_routed_experts=c.get("n_routed_experts"),
        n_activated_experts=c.get("num_experts_per_tok"), n_shared_experts=c.get("n_shared_experts"),
        moe_inter_dim=c.get("moe_intermediate_size"), n_hash_layers=n_hash,
        route_scale=c.get("routed_scaling_factor", kind=float),
        norm_topk_prob=c.get("norm_topk_prob", default=True, kind=bool),
        swiglu_limit=c.get("swiglu_limit", kind=float), hc_mult=c.get("hc_mult"),
        hc_sinkhorn_iters=c.get("hc_sinkhorn_iters"), hc_eps=c.get("hc_eps", kind=float),
        norm_eps=c.get("rms_norm_eps", kind=float), rope_theta=theta, compress_rope_theta=compress_theta,
        rope_factor=yarn_value("factor", float),
        original_seq_len=yarn_value("original_max_position_embeddings", int),
        beta_fast=yarn_value("beta_fast", float), beta_slow=yarn_value("beta_slow", float),
        max_seq_len=c.get("max_position_embeddings"),
    )


@dataclass(frozen=True)
class DSpark:
    """A DSpark checkpoint's draft (DeepSeek V4 -0731: `mtp.0..` the stages): config.json's dspark_* keys."""

    stages: int
    block_size: int
    target_layers: tuple[int, ...]  # target blocks whose input the draft reads (dspark_target_layer_ids + 1)
    mask_token_id: int


def read_dspark(folder: Path, h: Hparams) -> DSpark:
    """The DSpark draft's parameters from folder/config.json, checked against the model's."""
    path = Path(folder) / "config.json"
    c = _Config(json.loads(path.read_text()), path)
    ids = c.raw.get("dspark_target_layer_ids")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and 0 <= i < h.n_layers for i in ids):
        raise CheckpointError(f"{path}: dspark_target_layer_ids: expected a list of layer indices in "
                              f"0..{h.n_layers - 1}, got {ids!r} (not a DSpark checkpoint?)")
    mask = c.get("dspark_noise_token_id")
    if not 0 <= mask < h.vocab_size:
        raise CheckpointError(f"{path}: dspark_noise_token_id {mask} is not a token id (0..{h.vocab_size - 1})")
    block = c.get("dspark_block_size")
    if block < 1 or h.n_mtp_layers < 1:
        raise CheckpointError(f"{path}: dspark_block_size {block} and num_nextn_predict_layers {h.n_mtp_layers} "
                              "must be at least 1")
    return DSpark(h.n_mtp_layers, block, tuple(i + 1 for i in ids), mask)


def hparam_kv(h: Hparams, mtp: bool = False, dspark: DSpark | None = None) -> list[tuple[str, object, GGUFValueType]]:
    """(key, value, type) of every deepseek4 hyperparameter key, for a GGUF holding the n_layers trunk blocks;
    mtp: for the MTP draft llama.cpp's converter writes with --mtp (block_count n_layers + 1, the last block the
    MTP's, and nextn_predict_layers 1); dspark: for a DSpark draft as its converter writes it (architecture
    "dflash", block_count the stages, compress ratios 0, no hash layers, dflash.block_size and target_layers,
    the mask token)."""
    a = ARCH if dspark is None else DSPARK_ARCH
    blocks = h.n_layers + (1 if mtp else 0) if dspark is None else dspark.stages
    ratios = list(h.compress_ratios) + [0] * max(0, blocks - len(h.compress_ratios))
    extra = []
    if dspark is not None:
        ratios = [0] * blocks
        extra = [(f"{a}.block_size", dspark.block_size, GGUFValueType.UINT32),
                 (f"{a}.target_layers", list(dspark.target_layers), GGUFValueType.INT32),
                 ("tokenizer.ggml.mask_token_id", dspark.mask_token_id, GGUFValueType.UINT32)]
    # the values the Hparams fields do not hold under the spec's field name
    values = {
        "n_mtp_layers": 1, "block_count": blocks, "embedding_length_out": h.dim * h.hc_mult,
        "head_count_kv": h.n_kv_heads, "value_length": h.head_dim, "compress_ratios": ratios,
        "rope_scaling_type": "yarn", "expert_weights_norm": h.norm_topk_prob, "expert_gating_func": SQRT_SOFTPLUS,
        "n_hash_layers": h.n_hash_layers if dspark is None else 0,
        "swiglu_limits": [h.swiglu_limit] * blocks, "swiglu_limits_shared": [h.swiglu_limit] * blocks,
    }
    keys = extra
    for k in HPARAM_KEYS:
        if (k.field == "n_mtp_layers" and not mtp) or (k.field == "embedding_length_out" and dspark is not None):
            continue  # the converter writes nextn_predict_layers into an MTP draft, embedding_length_out for deepseek4
        value = values[k.field] if k.field in values else getattr(h, k.field)
        keys.append((f"{a}.{k.key}", value, GGUFValueType[k.gguf_type]))
    return keys


def parse_kv_override(item: str) -> tuple[str, object, GGUFValueType]:
    """llama.cpp's --override-kv KEY=TYPE:VALUE (common/common.cpp string_parse_kv_override) as the GGUF entry
    llama-quantize writes for it: int as UINT32 (of the absolute value), float as FLOAT32, bool, str (at most 127
    bytes)."""
    key, sep, rest = item.partition("=")
    if not sep or not key or len(key) >= 128:
        raise ValueError(f"--override-kv: expected KEY=TYPE:VALUE (KEY under 128 characters), got {item!r}")
    if key in ("general.architecture", "general.alignment"):
        raise ValueError(f"--override-kv: {key} is the writer's (flashlite writes {ARCH} files, aligned to 32)")
    kind, colon, text = rest.partition(":")
    if not colon or kind not in ("int", "float", "bool", "str"):
        raise ValueError(f"--override-kv: TYPE is one of int, float, bool, str, in {item!r}")
    try:
        if kind == "int":
            return key, abs(int(text)), GGUFValueType.UINT32
        if kind == "float":
            return key, float(text), GGUFValueType.FLOAT32
    except ValueError:
        article = "an" if kind == "int" else "a"
        raise ValueError(f"--override-kv: {text!r} is not {article} {kind}, in {item!r}") from None
    if kind == "bool":
        if text not in ("true", "false"):
            raise ValueError(f"--override-kv: a bool is true or false, got {text!r} in {item!r}")
        return key, text == "true", GGUFValueType.BOOL
    if len(text.encode()) > 127:
        raise ValueError(f"--override-kv: a str value is at most 127 bytes, in {item!r}")
    return key, text, GGUFValueType.STRING
