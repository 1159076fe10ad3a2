"""A synthetic DSpark draft GGUF for a V4 target, in the layout llama.cpp's converter writes for DeepSeek V4's DSpark
(conversion/deepseek.py DeepseekV4DSparkModel: architecture "dflash", the V4 hyperparameters under `dflash.`,
dflash.block_size, dflash.target_layers, tokenizer.ggml.mask_token_id; fc, enc.output_norm, blk.{s}.* V4 stages,
output_hc_*, output_norm, markov_w1/w2, conf_proj), with random float32 values; and a float64 numpy DSpark written
from llama.cpp's graph (src/models/dflash.cpp graph_dsv4, build_dspark_markov_head) to check flashlite's against."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from flashlite.gguf_file import GGUFFile
from flashlite.models import deepseek_v4 as v4
from flashlite.models.v4_spec import HPARAM_KEYS, SQRT_SOFTPLUS, dspark_tensors, layer_tensors


def write_dspark(target: str, out: str, stages: int = 3, block_size: int = 7, rank: int = 8,
                 target_layers=None, mask_id: int = 1, seed: int = 0, bigrams: dict | None = None) -> str:
    """A DSpark draft for the deepseek4 GGUF `target`. bigrams {prev: next}: the Markov head's bias puts next far
    above every other token after prev (a draft that knows an answer), else random."""
    f = GGUFFile(target)
    a = v4.ModelArgs.from_gguf(f)
    f.close()
    layers = list(target_layers) if target_layers is not None else [1, a.n_layers // 2, a.n_layers]
    rng = np.random.default_rng(seed)
    w = GGUFWriter(out, "dflash")
    # the stages: V4 blocks of the target's shapes, window-only and score-routed, their keys under `dflash.`
    draft = v4.ModelArgs(**{**a.__dict__, "n_layers": stages, "compress_ratios": (0,) * stages, "n_hash_layers": 0,
                            "swiglu_limits": a.swiglu_limits[:1] * stages,
                            "swiglu_limits_shared": a.swiglu_limits_shared[:1] * stages})
    values = {**draft.__dict__, "block_count": stages, "head_count_kv": 1, "value_length": a.head_dim,
              "expert_gating_func": SQRT_SOFTPLUS, "compress_ratios": list(draft.compress_ratios),
              "swiglu_limits": list(draft.swiglu_limits), "swiglu_limits_shared": list(draft.swiglu_limits_shared)}
    for k in HPARAM_KEYS:
        if k.kind is None or k.field == "n_mtp_layers":  # keys llama.cpp's, or an MTP draft's, only
            continue
        value, vtype = values[k.field], GGUFValueType[k.gguf_type]
        if isinstance(value, list):
            w.add_key_value(f"dflash.{k.key}", value, GGUFValueType.ARRAY, sub_type=vtype)
        else:
            w.add_key_value(f"dflash.{k.key}", value, vtype)
    w.add_uint32("dflash.block_size", block_size)
    w.add_array("dflash.target_layers", layers)
    w.add_uint32("tokenizer.ggml.mask_token_id", mask_id)

    def add(name, ne, scale, center=0.0):
        w.add_tensor(name, (center + scale * rng.standard_normal(tuple(reversed(ne)))).astype(np.float32))

    d = a.dim
    for s in range(stages):
        for name, (ne, _) in layer_tensors(draft, s).items():
            if name.endswith("norm.weight"):
                add(f"blk.{s}.{name}", ne, 0.1, 1.0)
            elif name.startswith("hc_") and not name.endswith("fn.weight"):
                add(f"blk.{s}.{name}", ne, 0.5)
            elif name.startswith("hc_"):
                add(f"blk.{s}.{name}", ne, 0.5 / np.sqrt(ne[0]))
            elif name in ("attn_sinks.weight", "exp_probs_b.bias"):
                add(f"blk.{s}.{name}", ne, 0.5)
            else:
                add(f"blk.{s}.{name}", ne, 1.0 / np.sqrt(ne[0]))
    rank = max(rank, len(bigrams or ()))
    own = {name: ne for name, (ne, _) in dspark_tensors(draft, len(layers), rank).items()}
    add("fc.weight", own["fc.weight"], 1.0 / np.sqrt(len(layers) * d))
    add("enc.output_norm.weight", own["enc.output_norm.weight"], 0.1, 1.0)
    add("output_norm.weight", own["output_norm.weight"], 0.1, 1.0)
    add("output_hc_fn.weight", own["output_hc_fn.weight"], 0.5 / np.sqrt(a.hc_mult * d))
    add("output_hc_base.weight", own["output_hc_base.weight"], 0.5)
    add("output_hc_scale.weight", own["output_hc_scale.weight"], 0.5)
    w1 = rng.standard_normal(own["markov_w1.weight"][::-1]).astype(np.float32)
    w2 = (0.3 * rng.standard_normal(own["markov_w2.weight"][::-1])).astype(np.float32)
    if bigrams:
        # prev's code is one-hot in the rank's dimensions; w2 sends code r to its next token, far above the rest
        w1[:] = 0.0
        w2[:] = 0.0
        for r, (prev, nxt) in enumerate(sorted(bigrams.items())):
            w1[prev, r] = 1.0
            w2[nxt, r] = 1e4
    w.add_tensor("markov_w1.weight", w1)
    w.add_tensor("markov_w2.weight", w2)
    add("conf_proj.weight", own["conf_proj.weight"], 0.1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


class NumpyDSpark:
    """The DSpark draft in float64 numpy, from the GGUF files' arrays (gguf-py's reader) and llama.cpp's graph."""

    def __init__(self, draft: str, target: str):
        self.w = {t.name: np.array(t.data, np.float64) for t in GGUFReader(draft).tensors}
        r = GGUFReader(target)
        self.embed = np.array(r.get_tensor(self._index(r, "token_embd.weight")).data, np.float64)
        self.head = np.array(r.get_tensor(self._index(r, "output.weight")).data, np.float64)
        f = GGUFFile(draft)
        self.field = {k: f.get(k) for k in ("dflash.target_layers", "dflash.attention.sliding_window",
                                            "dflash.hyper_connection.count", "dflash.block_count",
                                            "dflash.attention.key_length", "dflash.rope.dimension_count",
                                            "dflash.rope.freq_base", "dflash.attention.layer_norm_rms_epsilon",
                                            "dflash.hyper_connection.epsilon", "dflash.expert_used_count",
                                            "dflash.expert_weights_scale", "dflash.swiglu_clamp_exp",
                                            "dflash.swiglu_clamp_shexp", "dflash.attention.output_group_count",
                                            "dflash.hyper_connection.sinkhorn_iterations",
                                            "tokenizer.ggml.mask_token_id")}
        f.close()

    @staticmethod
    def _index(reader, name):
        return [t.name for t in reader.tensors].index(name)

    def get(self, key):
        return self.field[key if key.startswith("tokenizer") else "dflash." + key]

    def rms(self, x, weight=None):
        y = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + self.get("attention.layer_norm_rms_epsilon"))
        return y if weight is None else y * weight

    def rope(self, x, pos, inverse=False):
        rd = self.get("rope.dimension_count")
        inv = (1 / np.float32(self.get("rope.freq_base")) ** (np.arange(0, rd, 2, dtype=np.float32) / rd))
        angle = (pos.astype(np.float32)[:, None] * inv.astype(np.float32)).astype(np.float32).astype(np.float64)
        cos, sin = np.cos(angle), np.sin(angle) * (-1 if inverse else 1)
        if x.ndim == 3:
            cos, sin = cos[:, None], sin[:, None]
        y, even, odd = x.copy(), x[..., -rd::2], x[..., -rd + 1::2]
        y[..., -rd::2], y[..., -rd + 1::2] = even * cos - odd * sin, odd * cos + even * sin
        return y

    def sigmoid(self, x):
        return 1 / (1 + np.exp(-x))

    def hc_pre(self, h, p):
        hc, eps = self.get("hyper_connection.count"), self.get("hyper_connection.epsilon")
        fn, base, scale = self.w[p + "_fn.weight"], self.w[p + "_base.weight"], self.w[p + "_scale.weight"]
        m = self.rms(h.reshape(len(h), -1)) @ fn.T
        pre = self.sigmoid(m[:, :hc] * scale[0] + base[:hc]) + eps
        post = 2 * self.sigmoid(m[:, hc:2 * hc] * scale[1] + base[hc:2 * hc])
        comb = (m[:, 2 * hc:] * scale[2] + base[2 * hc:]).reshape(-1, hc, hc)
        comb = np.exp(comb - comb.max(-1, keepdims=True))
        comb = comb / comb.sum(-1, keepdims=True) + eps
        comb = comb / (comb.sum(1, keepdims=True) + eps)
        for _ in range(self.get("hyper_connection.sinkhorn_iterations") - 1):
            comb = comb / (comb.sum(2, keepdims=True) + eps)
            comb = comb / (comb.sum(1, keepdims=True) + eps)
        return np.einsum("ts,tsd->td", pre, h), post, comb

    def context_kv(self, s, features, positions):
        g = self.rms(features @ self.w["fc.weight"].T, self.w["enc.output_norm.weight"])
        return self.rope(self.rms(g @ self.w[f"blk.{s}.attn_kv.weight"].T, self.w[f"blk.{s}.attn_kv_a_norm.weight"]),
                         positions)

    def attention(self, s, x, pos, ctx_kv, ctx_pos):
        p, hd, window = f"blk.{s}.", self.get("attention.key_length"), self.get("attention.sliding_window")
        qr = self.rms(x @ self.w[p + "attn_q_a.weight"].T, self.w[p + "attn_q_a_norm.weight"])
        q = self.rope(self.rms((qr @ self.w[p + "attn_q_b.weight"].T).reshape(len(x), -1, hd)), pos)
        kv = self.rope(self.rms(x @ self.w[p + "attn_kv.weight"].T, self.w[p + "attn_kv_a_norm.weight"]), pos)
        keys, key_pos = np.concatenate([ctx_kv, kv]), np.concatenate([ctx_pos, pos])
        visible = key_pos[None] > pos[:, None] - window  # no causal limit: the block sees all of itself
        z = np.where(visible[None], np.einsum("thd,sd->hts", q, keys) * hd ** -0.5, -np.inf)
        sink = self.w[p + "attn_sinks.weight"][:, None, None]
        top = np.maximum(z.max(-1, keepdims=True), sink)
        e = np.exp(z - top)
        o = np.einsum("hts,sd->thd", e / (e.sum(-1, keepdims=True) + np.exp(sink - top)), keys)
        groups = self.get("attention.output_group_count")
        o = self.rope(o, pos, inverse=True).reshape(len(x), groups, -1)
        wo_a = self.w[p + "attn_output_a.weight"]
        r = wo_a.shape[0] // groups
        u = np.concatenate([o[:, g] @ wo_a[g * r:(g + 1) * r].T for g in range(groups)], -1)
        return u @ self.w[p + "attn_output_b.weight"].T

    def moe(self, s, x):
        p = f"blk.{s}."
        score = np.sqrt(np.logaddexp(0, x @ self.w[p + "ffn_gate_inp.weight"].T))
        k = self.get("expert_used_count")
        chosen = np.argsort(-(score + self.w[p + "exp_probs_b.bias"]), 1, kind="stable")[:, :k]
        weight = np.take_along_axis(score, chosen, 1)
        weight = weight / weight.sum(1, keepdims=True) * self.get("expert_weights_scale")

        def swiglu(rows, w1, w3, w2, limit):
            g = np.minimum(rows @ w1.T, limit)
            u = np.clip(rows @ w3.T, -limit, limit)
            return (g / (1 + np.exp(-g)) * u) @ w2.T

        out = swiglu(x, self.w[p + "ffn_gate_shexp.weight"], self.w[p + "ffn_up_shexp.weight"],
                     self.w[p + "ffn_down_shexp.weight"], self.get("swiglu_clamp_shexp")[s])
        gate, up, down = (self.w[p + f"ffn_{m}_exps.weight"] for m in ("gate", "up", "down"))
        for t in range(len(x)):
            for j, e in enumerate(chosen[t]):
                out[t] += weight[t, j] * swiglu(x[t:t + 1], gate[e], up[e], down[e],
                                                self.get("swiglu_clamp_exp")[s])[0]
        return out

    def draft(self, features: np.ndarray, anchor: int, k: int) -> tuple[np.ndarray, list[int]]:
        """(logits [k, vocab] before the Markov bias, drafts) of k tokens after anchor, which sits at position
        len(features) (features [P, n_layers * dim]: the target's, of positions 0..P-1)."""
        p0, window = len(features), self.get("attention.sliding_window")
        ctx_pos = np.arange(max(0, p0 - window + 1), p0)
        pos = np.arange(p0, p0 + k)
        ids = np.array([anchor] + [self.get("tokenizer.ggml.mask_token_id")] * (k - 1))
        h = np.repeat(self.embed[ids][:, None], self.get("hyper_connection.count"), 1)
        for s in range(self.get("block_count")):
            p = f"blk.{s}."
            ctx = self.context_kv(s, features[ctx_pos], ctx_pos)
            x, post, comb = self.hc_pre(h, p + "hc_attn")
            f = self.attention(s, self.rms(x, self.w[p + "attn_norm.weight"]), pos, ctx, ctx_pos)
            h = post[:, :, None] * f[:, None] + np.einsum("tab,tad->tbd", comb, h)
            x, post, comb = self.hc_pre(h, p + "hc_ffn")
            f = self.moe(s, self.rms(x, self.w[p + "ffn_norm.weight"]))
            h = post[:, :, None] * f[:, None] + np.einsum("tab,tad->tbd", comb, h)
        hc, eps = self.get("hyper_connection.count"), self.get("hyper_connection.epsilon")
        m = self.rms(h.reshape(k, -1)) @ self.w["output_hc_fn.weight"].T
        pre = self.sigmoid(m * self.w["output_hc_scale.weight"][0] + self.w["output_hc_base.weight"]) + eps
        z = np.einsum("ts,tsd->td", pre[:, :hc], h)
        logits = self.rms(z, self.w["output_norm.weight"]) @ self.head.T
        drafts, prev = [], anchor
        for row in logits:
            prev = int(np.argmax(row + self.w["markov_w2.weight"] @ self.w["markov_w1.weight"][prev]))
            drafts.append(prev)
        return logits, drafts


def _entries(path: Path) -> dict[str, tuple[str, list, bytes]]:
    """name -> (dtype, shape, bytes) of a safetensors file."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    return {k: (v["dtype"], v["shape"], raw[8 + n + v["data_offsets"][0]:8 + n + v["data_offsets"][1]])
            for k, v in header.items()}


def _write(path: Path, entries: dict[str, tuple[str, list, bytes]]) -> None:
    header, offset = {}, 0
    for name, (dtype, shape, data) in entries.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(e[2] for e in entries.values()))


def write_dspark_checkpoint(src: Path, out: Path, stages: int = 3, block_size: int = 7, rank: int = 16,
                            target_ids=(0, 2, 5), mask_id: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """A DSpark checkpoint in DeepSeek's release layout: the release folder src's model (its `mtp.*` left out) plus
    `mtp.{s}.*` DSpark stages (the draft's own tensors under the last stage, as the release's MTP keeps its
    norm and hc_head), config.json's dspark_* keys; random values, BF16 matrices (each stage's gate gets the
    `bias_vl` llama.cpp drops). Returns the DSpark tensors' float32 values by release name."""
    from quant.gguf_meta import read_hparams
    from quant.layout import _DSPARK_ROOT, _layer_shapes

    rng = np.random.default_rng(seed)
    out.mkdir()
    config = json.loads((src / "config.json").read_text())
    config.update({"num_nextn_predict_layers": stages, "dspark_block_size": block_size,
                   "dspark_target_layer_ids": list(target_ids), "dspark_noise_token_id": mask_id})
    (out / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, out / name)
    h = read_hparams(out)
    entries = {}
    for shard in sorted(src.glob("*.safetensors")):
        entries.update({k: v for k, v in _entries(shard).items() if not k.startswith("mtp.")})
    values = {}
    stage_h = replace(h, n_hash_layers=0)
    for s in range(stages):
        for name, shape in _layer_shapes(stage_h, s, 0).items():
            center = 1.0 if name.endswith("norm.weight") else 0.0
            values[f"mtp.{s}.{name}"] = center + 0.1 * rng.standard_normal(shape)
        values[f"mtp.{s}.ffn.gate.bias_vl"] = rng.standard_normal(h.n_routed_experts)
    last = f"mtp.{stages - 1}."
    own_ne = dspark_tensors(h, len(target_ids), rank)
    own = {release: tuple(reversed(own_ne[gguf][0])) for release, (gguf, _) in _DSPARK_ROOT.items()}
    for name, shape in own.items():
        values[last + name] = (1.0 if name.endswith("norm.weight") else 0.0) + 0.1 * rng.standard_normal(shape)
    for name, v in values.items():
        if v.ndim == 2 and not name.endswith(("hc_head_fn", "_fn")):  # matrices in BF16, the rest F32
            bits = (np.asarray(v, np.float32).view(np.uint32) >> 16).astype(np.uint16)
            values[name] = (bits.astype(np.uint32) << 16).view(np.float32)
            entries[name] = ("BF16", list(v.shape), bits.tobytes())
        else:
            values[name] = np.asarray(v, np.float32)
            entries[name] = ("F32", list(v.shape), values[name].tobytes())
    _write(out / "model.safetensors", entries)
    return values
