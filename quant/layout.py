"""Checkpoint tensor names and shapes -> llama.cpp deepseek4 GGUF tensors.

Two checkpoint layouts are read: DeepSeek's release (`layers.N.attn.wq_a.weight` + FP8 `.scale`, FP4 experts) and
transformers' save_pretrained (`model.` prefix, `model.embed_tokens`, `model.hc_head.hc_fn`, the main attention's
kv_norm saved as `attn.norm`, plain float tensors). Both are renamed to the release's names, checked against the
shapes config.json implies, then mapped to GGUF names; the routed experts of a layer are stacked into
ffn_{gate,up,down}_exps. MTP (`mtp.*`) is left out, as llama.cpp's converter does by default.

`plan_tensors(..., dspark=DSpark)` plans a DSpark draft as llama.cpp's converter writes it (DeepseekV4DSparkModel):
the stages `mtp.{s}.*` as blk.{s}.* (their gate's `bias_vl` dropped), and the draft's own tensors, under whichever
stage holds them, as fc (main_proj), enc.output_norm (main_norm), output_norm (norm), output_hc_* (hc_head_*),
markov_w1 / markov_w2 (markov_head.*) and conf_proj (confidence_head.proj); no embedding or head (the target's).

`plan_tensors(..., mtp=True)` plans instead the MTP draft GGUF llama.cpp's converter writes with `--mtp` (its
deepseek4 loader reads it as a model of block_count n_layers + 1 whose trunk blocks are absent; `-md` takes it
as a draft): token_embd, output and output_norm of the model, the MTP block `mtp.0.*` as blk.{n_layers}.*, its
e_proj and h_proj side by side as blk.{n_layers}.nextn.eh_proj ([e_proj | h_proj], applied to
[enorm(embed) ; hnorm(h)]), enorm / hnorm / norm as nextn.enorm / nextn.hnorm / nextn.shared_head_norm, and
its hc_head as output_hc_* (the draft file's own).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import numpy as np

from flashlite.models import v4_spec
from quant import fp8
from quant.gguf_meta import Hparams
from quant.safetensors_source import Checkpoint, CheckpointError, SourceTensor

F32, F16, BF16, Q8_0, MXFP4, I32 = 0, 1, 30, 8, 39, 26  # ggml type ids
FLOAT_DTYPES = ("F32", "F16", "BF16")
INDEX_DTYPES = ("I64", "I32")

# GGUF tensor roles, which recipes give types to
EXPERT = "expert"   # stacked routed experts
MATRIX = "matrix"   # every other weight matrix
ROUTER = "router"   # ffn_gate_inp: F32 unless overridden (ggml rounds a BF16 router's input to BF16)
HC = "hc"           # hyper-connection mixing matrices: F32 unless overridden
PINNED = "pinned"   # 1-D tensors and the compressor position biases: always F32
INDEX = "index"     # tid2eid: always I32

_ROOT = {  # release name -> (GGUF name, role)
    "embed.weight": ("token_embd.weight", MATRIX),
    "norm.weight": ("output_norm.weight", PINNED),
    "hc_head_fn": ("output_hc_fn.weight", HC),
    "hc_head_base": ("output_hc_base.weight", PINNED),
    "hc_head_scale": ("output_hc_scale.weight", PINNED),
    "head.weight": ("output.weight", MATRIX),
}
_LAYER = {  # release name after `layers.N.` -> (GGUF name after `blk.N.`, role)
    "attn_norm.weight": ("attn_norm.weight", PINNED),
    "ffn_norm.weight": ("ffn_norm.weight", PINNED),
    "hc_attn_fn": ("hc_attn_fn.weight", HC),
    "hc_attn_base": ("hc_attn_base.weight", PINNED),
    "hc_attn_scale": ("hc_attn_scale.weight", PINNED),
    "hc_ffn_fn": ("hc_ffn_fn.weight", HC),
    "hc_ffn_base": ("hc_ffn_base.weight", PINNED),
    "hc_ffn_scale": ("hc_ffn_scale.weight", PINNED),
    "attn.attn_sink": ("attn_sinks.weight", PINNED),
    "attn.wq_a.weight": ("attn_q_a.weight", MATRIX),
    "attn.q_norm.weight": ("attn_q_a_norm.weight", PINNED),
    "attn.wq_b.weight": ("attn_q_b.weight", MATRIX),
    "attn.wkv.weight": ("attn_kv.weight", MATRIX),
    "attn.kv_norm.weight": ("attn_kv_a_norm.weight", PINNED),
    "attn.wo_a.weight": ("attn_output_a.weight", MATRIX),
    "attn.wo_b.weight": ("attn_output_b.weight", MATRIX),
    "attn.compressor.wkv.weight": ("attn_compressor_kv.weight", MATRIX),
    "attn.compressor.wgate.weight": ("attn_compressor_gate.weight", MATRIX),
    "attn.compressor.ape": ("attn_compressor_ape.weight", PINNED),
    "attn.compressor.norm.weight": ("attn_compressor_norm.weight", PINNED),
    "attn.indexer.wq_b.weight": ("indexer.attn_q_b.weight", MATRIX),
    "attn.indexer.weights_proj.weight": ("indexer.proj.weight", MATRIX),
    "attn.indexer.compressor.wkv.weight": ("indexer_compressor_kv.weight", MATRIX),
    "attn.indexer.compressor.wgate.weight": ("indexer_compressor_gate.weight", MATRIX),
    "attn.indexer.compressor.ape": ("indexer_compressor_ape.weight", PINNED),
    "attn.indexer.compressor.norm.weight": ("indexer_compressor_norm.weight", PINNED),
    "ffn.gate.weight": ("ffn_gate_inp.weight", ROUTER),
    "ffn.gate.bias": ("exp_probs_b.bias", PINNED),
    "ffn.gate.tid2eid": ("ffn_gate_tid2eid.weight", INDEX),
    "ffn.shared_experts.w1.weight": ("ffn_gate_shexp.weight", MATRIX),
    "ffn.shared_experts.w3.weight": ("ffn_up_shexp.weight", MATRIX),
    "ffn.shared_experts.w2.weight": ("ffn_down_shexp.weight", MATRIX),
}
_EXPERTS = {"w1": "ffn_gate_exps.weight", "w3": "ffn_up_exps.weight", "w2": "ffn_down_exps.weight"}
_MTP = {  # release name after `mtp.0.` -> (GGUF name, role); the block's own tensors follow _LAYER
    "enorm.weight": ("blk.{n}.nextn.enorm.weight", PINNED),
    "hnorm.weight": ("blk.{n}.nextn.hnorm.weight", PINNED),
    "norm.weight": ("blk.{n}.nextn.shared_head_norm.weight", PINNED),
    "hc_head_fn": ("output_hc_fn.weight", HC),
    "hc_head_base": ("output_hc_base.weight", PINNED),
    "hc_head_scale": ("output_hc_scale.weight", PINNED),
}
_DSPARK_ROOT = {  # release name after `mtp.{s}.` -> (GGUF name, role): the draft's own, whichever stage holds them
    "main_proj.weight": ("fc.weight", MATRIX),
    "main_norm.weight": ("enc.output_norm.weight", PINNED),
    "norm.weight": ("output_norm.weight", PINNED),
    "hc_head_fn": ("output_hc_fn.weight", HC),
    "hc_head_base": ("output_hc_base.weight", PINNED),
    "hc_head_scale": ("output_hc_scale.weight", PINNED),
    "markov_head.markov_w1.weight": ("markov_w1.weight", MATRIX),
    "markov_head.markov_w2.weight": ("markov_w2.weight", MATRIX),
    "confidence_head.proj.weight": ("conf_proj.weight", PINNED),
}
_RELEASE_ROOT = {gguf: release for release, (gguf, _) in _ROOT.items()}
_RELEASE_LAYER = {gguf: release for release, (gguf, _) in _LAYER.items()}
_EXPERT_NAME = re.compile(r"layers\.(\d+)\.ffn\.experts\.(\d+)\.(w[123])\.(weight|scale)$")


# ---------------------------------------------------------------------------------------------------
# the release's tensors, as config.json implies them
# ---------------------------------------------------------------------------------------------------

def expected_tensors(h: Hparams, mtp: bool = False) -> dict[str, tuple[int, ...]]:
    """Release name -> PyTorch shape of every tensor of the n_layers trunk (experts listed one by one), from
    flashlite.models.v4_spec's GGUF tensors; with mtp, of the MTP draft instead: the embedding, head and final norm,
    and the MTP block `mtp.0.*`."""
    spec = {_RELEASE_ROOT[name]: _torch_shape(ne) for name, (ne, _) in v4_spec.root_tensors(h).items()}
    if mtp:
        spec = {k: spec[k] for k in ("embed.weight", "head.weight", "norm.weight")}
        block = _layer_shapes(h, h.n_layers, h.compress_ratios[h.n_layers] if len(h.compress_ratios) > h.n_layers
                              else 0)
        own = v4_spec.mtp_tensors(h, h.n_layers)
        rows, columns = _torch_shape(own[f"blk.{h.n_layers}.nextn.eh_proj.weight"][0])
        block.update({"e_proj.weight": (rows, columns // 2), "h_proj.weight": (rows, columns // 2)})
        block.update({release: _torch_shape(own[gguf.format(n=h.n_layers)][0]) for release, (gguf, _) in _MTP.items()})
        spec.update({f"mtp.0.{k}": v for k, v in block.items()})
        return spec
    for i in range(h.n_layers):
        spec.update({f"layers.{i}.{k}": v for k, v in _layer_shapes(h, i, h.compress_ratios[i]).items()})
    return spec


def _torch_shape(ne: tuple[int, ...]) -> tuple[int, ...]:
    """A ggml shape (innermost first) as PyTorch orders it."""
    return tuple(reversed(ne))


def _layer_shapes(h: Hparams, i: int, ratio: int) -> dict[str, tuple[int, ...]]:
    """Names after `layers.{i}.` -> shapes of block i (hash-routed when i < n_hash_layers), its routed experts one
    by one, last."""
    gguf = v4_spec.layer_tensors(h, i, ratio)
    layer = {_RELEASE_LAYER[name]: _torch_shape(ne) for name, (ne, _) in gguf.items() if name in _RELEASE_LAYER}
    for e in range(h.n_routed_experts):
        for proj, name in _EXPERTS.items():
            layer[f"ffn.experts.{e}.{proj}.weight"] = _torch_shape(gguf[name][0][:2])
    return layer


# ---------------------------------------------------------------------------------------------------
# stored tensors: one weight, its scale when quantized, and how to decode it
# ---------------------------------------------------------------------------------------------------

def _release_name(stored: str) -> str:
    """transformers' save_pretrained name -> the release's name (release names pass through)."""
    name = stored[len("model."):] if stored.startswith("model.") else stored
    name = {"embed_tokens.weight": "embed.weight", "lm_head.weight": "head.weight",
            "hc_head.hc_fn": "hc_head_fn", "hc_head.hc_base": "hc_head_base",
            "hc_head.hc_scale": "hc_head_scale"}.get(name, name)
    return re.sub(r"^(layers\.\d+\.attn)\.norm\.weight$", r"\1.kv_norm.weight", name)


@dataclass
class Stored:
    """A weight as the checkpoint stores it: float, FP8 (+ block scales) or packed FP4 (+ per-32 scales)."""

    name: str                # release name
    shape: tuple[int, ...]   # logical PyTorch shape
    weight: SourceTensor
    scale: SourceTensor | None = None

    @property
    def format(self) -> str:
        if self.weight.dtype == "F8_E4M3":
            return "fp8"
        if self.weight.dtype in ("I8", "U8"):
            return "fp4"
        return self.weight.dtype

    def _scale_values(self, rows: slice) -> np.ndarray:
        return self.scale.array()[rows]

    def f32_rows(self, r0: int, r1: int) -> np.ndarray:
        """float32 values of rows r0:r1 (of the flattened leading dims), exact."""
        w = self.weight.array()
        w = w.reshape(-1, w.shape[-1]) if w.ndim != 2 else w
        if self.format == "fp8":
            b0, b1 = r0 // fp8.FP8_BLOCK, -(-r1 // fp8.FP8_BLOCK)
            return fp8.dequant_fp8(w[r0:r1], self._scale_values(slice(b0, b1)), r0 - b0 * fp8.FP8_BLOCK)
        if self.format == "fp4":
            return fp8.dequant_fp4(w[r0:r1], self._scale_values(slice(r0, r1)))
        if self.weight.dtype == "BF16":
            return fp8.bf16_to_f32(w[r0:r1])
        if self.weight.dtype == "F32":
            return w[r0:r1]
        return w[r0:r1].astype(np.float32)

    def encoded_rows(self, r0: int, r1: int, qtype: int) -> np.ndarray | None:
        """Rows r0:r1 already in `qtype` without decoding, or None: a packed FP4 expert is MXFP4's codes and
        scales, reordered (a lossless repack)."""
        if qtype != MXFP4 or self.format != "fp4":
            return None
        data = fp8.fp4_to_mxfp4(self.weight.array()[r0:r1], self._scale_values(slice(r0, r1)))
        if np.any(data.reshape(r1 - r0, -1, 17)[:, :, 0] == 255):
            raise CheckpointError(f"{self.scale.file}: tensor '{self.scale.name}' holds the NaN scale 255")
        return data

    @property
    def source_type(self) -> int:
        """The ggml type llama.cpp's converter gives this tensor: FP8 matrices Q8_0, FP4 experts MXFP4, float
        tensors their own type, index tables I32."""
        return {"fp8": Q8_0, "fp4": MXFP4, "BF16": BF16, "F16": F16, "F32": F32}.get(self.format, I32)

    def where(self) -> str:
        return f"{self.weight.file}: tensor '{self.weight.name}'"

    def shards(self) -> set:
        """The shards holding the weight and its scale (convert drops their pages after each GGUF tensor)."""
        return {s.shard for s in (self.weight, self.scale) if s is not None}

    def index_values(self) -> np.ndarray:
        return self.weight.array()

    def release_rows(self, r0: int, r1: int) -> None:
        """Drop the pages of weight rows r0:r1 (the whole shard is dropped when the GGUF tensor is done)."""
        row_bytes = self.weight.nbytes // max(1, math.prod(self.shape[:-1]))
        self.weight.release(r0 * row_bytes, (r1 - r0) * row_bytes)


def _stored(ck: Checkpoint, names: dict[str, str], name: str, shape: tuple[int, ...], role: str, h: Hparams
            ) -> Stored:
    """The stored form of release tensor `name`, with its dtype and shape (and its scale's) checked."""
    if name not in names:
        raise CheckpointError(f"{ck.folder}: tensor '{name}' is missing (config.json implies shape {list(shape)})")
    weight = ck[names[name]]
    where = f"{weight.file}: tensor '{weight.name}'"
    scale_name = name[: -len(".weight")] + ".scale" if name.endswith(".weight") else None
    scale = ck[names[scale_name]] if scale_name in names else None
    matrix = role in (MATRIX, EXPERT, ROUTER, HC) and len(shape) == 2
    if role == INDEX:
        allowed = INDEX_DTYPES
    elif matrix:
        allowed = FLOAT_DTYPES + ("F8_E4M3",) + (("I8", "U8") if role == EXPERT else ())
    else:
        allowed = FLOAT_DTYPES
    if weight.dtype not in allowed:
        raise CheckpointError(f"{where} has dtype {weight.dtype}, expected one of {', '.join(allowed)}")
    stored = Stored(name, shape, weight, scale if weight.dtype in ("F8_E4M3", "I8", "U8") else None)
    if stored.format == "fp4":
        if shape[-1] % fp8.FP4_BLOCK:
            raise CheckpointError(f"{where}: FP4 rows of {shape[-1]} are not whole blocks of {fp8.FP4_BLOCK}")
        stored_shape, scale_shape = (shape[0], shape[1] // 2), (shape[0], shape[1] // fp8.FP4_BLOCK)
    else:
        stored_shape = shape
        scale_shape = tuple(-(-n // fp8.FP8_BLOCK) for n in shape)
    if weight.shape != stored_shape:
        raise CheckpointError(f"{where} has shape {list(weight.shape)}, but config.json implies "
                              f"{list(stored_shape)}{' (packed FP4)' if stored.format == 'fp4' else ''} "
                              f"(hidden_size={h.dim}, vocab_size={h.vocab_size}, n_routed_experts="
                              f"{h.n_routed_experts}, moe_intermediate_size={h.moe_inter_dim})")
    if stored.format in ("fp8", "fp4"):
        if scale is None:
            raise CheckpointError(f"{where}: {weight.dtype} weight without its scale tensor '{scale_name}'")
        swhere = f"{scale.file}: tensor '{scale.name}'"
        if scale.dtype != "F8_E8M0":
            raise CheckpointError(f"{swhere} has dtype {scale.dtype}, expected F8_E8M0")
        if scale.shape != scale_shape:
            raise CheckpointError(f"{swhere} has shape {list(scale.shape)}, expected {list(scale_shape)} "
                                  f"for weight {list(shape)}")
    return stored


# ---------------------------------------------------------------------------------------------------
# the GGUF tensors
# ---------------------------------------------------------------------------------------------------

@dataclass
class GGUFTensor:
    """One GGUF tensor: its name, numpy-order shape, role, and the stored tensors it is made of (one per expert
    for stacked experts, rows in order; a GGUF source has one, quant.gguf_source.GGUFStored)."""

    name: str
    shape: tuple[int, ...]
    role: str
    parts: list

    @property
    def source_type(self) -> int:
        """The type the source gives it, which recipes keep for the tensors they leave alone: a GGUF source's own
        type, for a checkpoint llama.cpp's converter's (1-D tensors and position biases F32)."""
        return F32 if self.role == PINNED and isinstance(self.parts[0], Stored) else self.parts[0].source_type


@dataclass
class Layout:
    tensors: list[GGUFTensor]
    style: str            # "release" or "save_pretrained"
    skipped: list[str]    # stored names left out (MTP, hash layers' unused gate bias)


@dataclass
class Concat:
    """Stored tensors of the same rows side by side (columns of the first, then of the second...): llama.cpp's
    converter writes the MTP's e_proj and h_proj as one eh_proj = torch.cat((e_proj, h_proj), dim=1)."""

    name: str
    parts: list

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.parts[0].shape[0], sum(p.shape[1] for p in self.parts))

    def f32_rows(self, r0: int, r1: int) -> np.ndarray:
        return np.concatenate([p.f32_rows(r0, r1) for p in self.parts], axis=1)

    def encoded_rows(self, r0: int, r1: int, qtype: int) -> None:
        return None

    @property
    def source_type(self) -> int:
        """Q8_0 when a part is FP8, as llama.cpp's converter forces for eh_proj; else the first part's type."""
        types = [p.source_type for p in self.parts]
        return Q8_0 if Q8_0 in types else types[0]

    def where(self) -> str:
        return " and ".join(p.where() for p in self.parts)

    def shards(self) -> set:
        return set().union(*(p.shards() for p in self.parts))

    def release_rows(self, r0: int, r1: int) -> None:
        for p in self.parts:
            p.release_rows(r0, r1)


def _dspark_names(ck: Checkpoint, names: dict[str, str], h: Hparams, dspark) -> tuple[dict, dict]:
    """(release name -> shape of every DSpark tensor, root name -> the release name holding it): the stages'
    blocks `mtp.{s}.*` (window-only, score-routed), and the draft's own tensors under any one stage, as llama.cpp's
    converter rekeys them. The Markov head's rank is the stored markov_w1's."""
    roots: dict[str, str] = {}
    for name in names:
        m = re.fullmatch(r"mtp\.(\d+)\.(.+)", name)
        if m and m.group(2) in _DSPARK_ROOT:
            if m.group(2) in roots:
                raise CheckpointError(f"{ck[names[name]].file}: tensor '{names[name]}': stages "
                                      f"{roots[m.group(2)].split('.')[1]} and {m.group(1)} both hold the draft's "
                                      f"{m.group(2)}")
            roots[m.group(2)] = name
    w1 = roots.get("markov_head.markov_w1.weight")
    if w1 is None or w1 not in names:
        raise CheckpointError(f"{ck.folder}: no DSpark Markov head (mtp.N.markov_head.markov_w1.weight): not a DSpark "
                              "checkpoint")
    rank = ck[names[w1]].shape[-1]
    own = v4_spec.dspark_tensors(h, len(dspark.target_layers), rank)
    shapes = {release: _torch_shape(own[gguf][0]) for release, (gguf, _) in _DSPARK_ROOT.items()}
    expected = {}
    for root, release in roots.items():
        expected[release] = shapes[root]
    stage = replace(h, n_hash_layers=0)
    for s in range(dspark.stages):
        expected.update({f"mtp.{s}.{k}": v for k, v in _layer_shapes(stage, s, 0).items()})
    return expected, roots


def plan_tensors(ck: Checkpoint, h: Hparams, mtp: bool = False, dspark=None) -> Layout:
    """Map every stored tensor of `ck` to its GGUF tensor, checking that stored and expected tensors agree.
    mtp: the MTP draft GGUF instead (module docstring); the trunk's tensors are then the ones left out."""
    style = "save_pretrained" if any(n.startswith("model.") for n in ck.tensors) else "release"
    names: dict[str, str] = {}
    skipped = []
    for stored in ck.tensors:
        name = _release_name(stored)
        if name in names:
            raise CheckpointError(f"{ck[stored].file}: tensors '{stored}' and '{names[name]}' are the same tensor")
        names[name] = stored
    if mtp and not any(n.startswith("mtp.0.") for n in names):
        raise CheckpointError(f"{ck.folder}: no MTP block (mtp.0.*) to write a draft of (num_nextn_predict_layers="
                              f"{h.n_mtp_layers})")
    if dspark is not None:
        expected, roots = _dspark_names(ck, names, h, dspark)
    else:
        expected = expected_tensors(h, mtp)
    for name, stored in names.items():
        if name in expected or (name.endswith(".scale") and name[: -len(".scale")] + ".weight" in expected):
            continue
        if dspark is not None:
            stage = re.match(r"mtp\.(\d+)\.", name)
            if stage and int(stage.group(1)) >= dspark.stages:
                raise CheckpointError(f"{ck[stored].file}: unexpected tensor '{stored}': stage {stage.group(1)} is "
                                      f"beyond num_nextn_predict_layers={dspark.stages}")
            if not stage or name.endswith(".ffn.gate.bias_vl"):  # the trunk; a gate bias llama.cpp drops
                skipped.append(stored)
                continue
        hash_bias = re.fullmatch(r"layers\.(\d+)\.ffn\.gate\.bias", name)
        if mtp and re.match(r"mtp\.[1-9]", name):
            raise CheckpointError(f"{ck[stored].file}: tensor '{stored}': llama.cpp's deepseek4 MTP draft holds one "
                                  "MTP block (mtp.0)")
        if (name.startswith("mtp.") or (hash_bias and int(hash_bias.group(1)) < h.n_hash_layers)
                or (mtp and (name.startswith("layers.") or name.startswith("hc_head_")))):
            skipped.append(stored)
            continue
        layer = re.match(r"layers\.(\d+)\.", name)
        why = (f"layer {layer.group(1)} is beyond num_hidden_layers={h.n_layers}"
               if layer and int(layer.group(1)) >= h.n_layers else "it is not a DeepSeek V4 tensor of this config")
        raise CheckpointError(f"{ck[stored].file}: unexpected tensor '{stored}': {why} (config.json)")

    def one(release: str, gguf: str, role: str) -> GGUFTensor:
        shape = expected[release]
        return GGUFTensor(gguf, shape, role, [_stored(ck, names, release, shape, role, h)])

    def block(src: str, i: int) -> list[GGUFTensor]:
        """Block `src` (`layers.{i}.` or `mtp.0.`) as blk.{i}.*, its experts stacked."""
        out = []
        for suffix, (gguf, role) in _LAYER.items():
            if f"{src}{suffix}" in expected:
                out.append(one(f"{src}{suffix}", f"blk.{i}.{gguf}", role))
        for proj, gguf in _EXPERTS.items():
            parts = [_stored(ck, names, f"{src}ffn.experts.{e}.{proj}.weight",
                             expected[f"{src}ffn.experts.{e}.{proj}.weight"], EXPERT, h)
                     for e in range(h.n_routed_experts)]
            out.append(GGUFTensor(f"blk.{i}.{gguf}", (h.n_routed_experts, *parts[0].shape), EXPERT, parts))
        return out

    if dspark is not None:
        out = [one(roots[r], *_DSPARK_ROOT[r]) for r in ("main_proj.weight", "main_norm.weight") if r in roots]
        for s in range(dspark.stages):
            out += block(f"mtp.{s}.", s)
        out += [one(roots[r], *_DSPARK_ROOT[r]) for r in _DSPARK_ROOT
                if r in roots and r not in ("main_proj.weight", "main_norm.weight")]
        missing = [f"mtp.N.{r}" for r in _DSPARK_ROOT if r not in roots and r != "confidence_head.proj.weight"]
        if missing:
            raise CheckpointError(f"{ck.folder}: the DSpark draft lacks {', '.join(missing)}")
        return Layout(out, style, skipped)
    out = [one("embed.weight", *_ROOT["embed.weight"])]
    if mtp:
        n = h.n_layers
        out += block("mtp.0.", n)
        e_proj, h_proj = (_stored(ck, names, f"mtp.0.{p}.weight", expected[f"mtp.0.{p}.weight"], MATRIX, h)
                          for p in ("e_proj", "h_proj"))
        eh = Concat("mtp.0.eh_proj", [e_proj, h_proj])
        out.append(GGUFTensor(f"blk.{n}.nextn.eh_proj.weight", eh.shape, MATRIX, [eh]))
        for release, (gguf, role) in _MTP.items():
            out.append(one(f"mtp.0.{release}", gguf.format(n=n), role))
        for release in ("norm.weight", "head.weight"):
            out.append(one(release, *_ROOT[release]))
        return Layout(out, style, skipped)
    for i in range(h.n_layers):
        out += block(f"layers.{i}.", i)
    for release in ("norm.weight", "hc_head_fn", "hc_head_base", "hc_head_scale", "head.weight"):
        out.append(one(release, *_ROOT[release]))
    return Layout(out, style, skipped)


def check_index(stored: Stored, h: Hparams) -> np.ndarray:
    """tid2eid as int32, every entry an expert id."""
    values = stored.index_values()
    bad = (values < 0) | (values >= h.n_routed_experts)
    if bad.any():
        raise CheckpointError(f"{stored.weight.file}: tensor '{stored.weight.name}' holds expert id "
                              f"{int(values[bad][0])} outside 0..{h.n_routed_experts - 1}")
    return values.astype(np.int32)
