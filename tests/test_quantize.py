"""`flashlite quantize`: values against an independent float64 decode of the checkpoint, gguf-py's quantizers and
reader, the llama.cpp deepseek4 metadata contract, bad input, interruption and the memory bound."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType as Q, GGUFReader, GGUFValueType
from gguf.quants import dequantize as gguf_dequantize, quantize as gguf_quantize

from flashlite.cli import main

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "tiny_v4"
sys.path.insert(0, str(ROOT / "tools"))
import make_synthetic  # noqa: E402

pytestmark = pytest.mark.skipif(not (FIXTURE / "config.json").is_file(), reason="oracle fixture not generated")


# ---------------------------------------------------------------------------------------------------
# an independent reader: safetensors header by hand, every format decoded by its formula in float64
# ---------------------------------------------------------------------------------------------------

_NP = {"F32": np.float32, "BF16": np.uint16, "F8_E4M3": np.uint8, "F8_E8M0": np.uint8, "I8": np.uint8,
       "I64": np.int64, "F16": np.float16}


def read_safetensors(folder: Path) -> dict[str, tuple[str, np.ndarray]]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        raw = path.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        for name, e in json.loads(raw[8:8 + n]).items():
            if name == "__metadata__":
                continue
            a, b = e["data_offsets"]
            out[name] = (e["dtype"], np.frombuffer(raw[8 + n + a:8 + n + b], _NP[e["dtype"]]).reshape(e["shape"]))
    return out


def e4m3_f64(bits):
    bits = bits.astype(np.int64)
    sign = np.where(bits & 0x80, -1.0, 1.0)
    e, m = (bits >> 3) & 15, bits & 7
    return sign * np.where(e == 0, np.ldexp(m / 8.0, -6), np.ldexp(1 + m / 8.0, e - 7))


def e8m0_f64(bits):
    return np.ldexp(1.0, bits.astype(np.int64) - 127)


def e2m1_f64(codes):
    codes = codes.astype(np.int64)
    e, m = (codes >> 1) & 3, codes & 1
    mag = np.where(e == 0, m * 0.5, np.ldexp(1 + m / 2.0, e - 1))
    return np.where(codes & 8, -mag, mag)


def fp4_codes(packed):
    b = packed.view(np.uint8)
    return np.stack([b & 15, b >> 4], axis=-1).reshape(b.shape[0], -1)


def dequantized(ck, name):
    """float64 values of release tensor `name` (its `.scale` applied)."""
    dtype, w = ck[name]
    scale_name = name.removesuffix(".weight") + ".scale"
    if dtype == "F8_E4M3":
        s = e8m0_f64(ck[scale_name][1])
        full = np.repeat(np.repeat(s, 128, 0), 128, 1)[:w.shape[0], :w.shape[1]]
        return e4m3_f64(w) * full
    if dtype == "I8":
        return e2m1_f64(fp4_codes(w)) * np.repeat(e8m0_f64(ck[scale_name][1]), 32, 1)
    if dtype == "BF16":
        return (w.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return w.astype(np.float64)


GGUF_TO_RELEASE = {
    "token_embd.weight": "embed.weight", "output.weight": "head.weight", "output_norm.weight": "norm.weight",
    "output_hc_fn.weight": "hc_head_fn", "output_hc_base.weight": "hc_head_base",
    "output_hc_scale.weight": "hc_head_scale",
}
BLOCK_TO_RELEASE = {
    "attn_norm.weight": "attn_norm.weight", "ffn_norm.weight": "ffn_norm.weight",
    "hc_attn_fn.weight": "hc_attn_fn", "hc_attn_base.weight": "hc_attn_base", "hc_attn_scale.weight": "hc_attn_scale",
    "hc_ffn_fn.weight": "hc_ffn_fn", "hc_ffn_base.weight": "hc_ffn_base", "hc_ffn_scale.weight": "hc_ffn_scale",
    "attn_sinks.weight": "attn.attn_sink", "attn_q_a.weight": "attn.wq_a.weight",
    "attn_q_a_norm.weight": "attn.q_norm.weight", "attn_q_b.weight": "attn.wq_b.weight",
    "attn_kv.weight": "attn.wkv.weight", "attn_kv_a_norm.weight": "attn.kv_norm.weight",
    "attn_output_a.weight": "attn.wo_a.weight", "attn_output_b.weight": "attn.wo_b.weight",
    "attn_compressor_kv.weight": "attn.compressor.wkv.weight",
    "attn_compressor_gate.weight": "attn.compressor.wgate.weight",
    "attn_compressor_ape.weight": "attn.compressor.ape", "attn_compressor_norm.weight": "attn.compressor.norm.weight",
    "indexer.attn_q_b.weight": "attn.indexer.wq_b.weight", "indexer.proj.weight": "attn.indexer.weights_proj.weight",
    "indexer_compressor_kv.weight": "attn.indexer.compressor.wkv.weight",
    "indexer_compressor_gate.weight": "attn.indexer.compressor.wgate.weight",
    "indexer_compressor_ape.weight": "attn.indexer.compressor.ape",
    "indexer_compressor_norm.weight": "attn.indexer.compressor.norm.weight",
    "ffn_gate_inp.weight": "ffn.gate.weight", "exp_probs_b.bias": "ffn.gate.bias",
    "ffn_gate_tid2eid.weight": "ffn.gate.tid2eid", "ffn_gate_shexp.weight": "ffn.shared_experts.w1.weight",
    "ffn_up_shexp.weight": "ffn.shared_experts.w3.weight", "ffn_down_shexp.weight": "ffn.shared_experts.w2.weight",
}
EXPERT_PROJ = {"ffn_gate_exps.weight": "w1", "ffn_up_exps.weight": "w3", "ffn_down_exps.weight": "w2"}


def reference(ck, gguf_name: str, n_experts: int) -> np.ndarray:
    """float64 values of a GGUF tensor, in numpy order, built from the checkpoint by the names of the spec."""
    if gguf_name in GGUF_TO_RELEASE:
        return dequantized(ck, GGUF_TO_RELEASE[gguf_name])
    _, layer, rest = gguf_name.split(".", 2)
    if rest in EXPERT_PROJ:
        return np.stack([dequantized(ck, f"layers.{layer}.ffn.experts.{e}.{EXPERT_PROJ[rest]}.weight")
                         for e in range(n_experts)])
    return dequantized(ck, f"layers.{layer}.{BLOCK_TO_RELEASE[rest]}")


def quantize(src: Path, out: Path, *args: str):
    return CliRunner().invoke(main, ["quantize", str(src), str(out), "--quiet", *args])


def tensors_of(path: Path) -> dict:
    return {t.name: t for t in GGUFReader(path).tensors}


def values(t) -> np.ndarray:
    shape = tuple(int(n) for n in reversed(t.shape))
    if t.tensor_type in (Q.F32, Q.I32):
        return np.asarray(t.data).reshape(shape)
    return gguf_dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)


@pytest.fixture(scope="module")
def release():
    return read_safetensors(FIXTURE)


@pytest.fixture(scope="module")
def fixture_gguf(tmp_path_factory):
    def make(type_name: str) -> Path:
        out = tmp_path_factory.getbasetemp() / f"tiny_v4-{type_name}.gguf"
        if not out.exists():
            result = quantize(FIXTURE, out, "--type", type_name)
            assert result.exit_code == 0, result.output
        return out
    return make


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A release-layout checkpoint 256 wide (so Q4_K applies to every matrix but the 128-row q_b ones)."""
    folder = tmp_path_factory.mktemp("synthetic")
    make_synthetic.write_checkpoint(folder, "tiny", n_layers=6, n_experts=8, seed=1)
    return folder


# ---------------------------------------------------------------------------------------------------
# values
# ---------------------------------------------------------------------------------------------------

def test_f32_reads_back_equal_to_the_dequantized_checkpoint(release, fixture_gguf):
    got = tensors_of(fixture_gguf("f32"))
    expected = {"token_embd.weight", "output.weight", "output_norm.weight", "output_hc_fn.weight",
                "output_hc_base.weight", "output_hc_scale.weight"}
    assert expected <= got.keys()
    assert not any("nextn" in n or n.startswith("blk.6.") for n in got)  # MTP left out, as llama.cpp does
    for name, t in got.items():
        want = reference(release, name, n_experts=8)
        have = values(t)
        assert t.tensor_type == (Q.I32 if "tid2eid" in name else Q.F32), name
        assert have.shape == want.shape, name
        np.testing.assert_array_equal(have, want.astype(have.dtype), err_msg=name)


def test_f32_router_and_hash_layers_follow_llama_cpp(release, fixture_gguf):
    got = tensors_of(fixture_gguf("f32"))
    assert got["blk.0.ffn_gate_inp.weight"].tensor_type == Q.F32  # a BF16 router costs accuracy in ggml
    assert "blk.0.exp_probs_b.bias" not in got and "blk.1.ffn_gate_tid2eid.weight" in got
    assert "blk.2.ffn_gate_tid2eid.weight" not in got and "blk.2.exp_probs_b.bias" in got
    assert list(got["blk.0.ffn_gate_tid2eid.weight"].shape) == [2, 512]


def test_q8_0_is_gguf_py_quantization_within_the_block_bound(release, fixture_gguf):
    got = tensors_of(fixture_gguf("q8_0"))
    n_q8 = 0
    for name, t in got.items():
        want = reference(release, name, n_experts=8).astype(np.float32)
        if t.tensor_type != Q.Q8_0:
            assert name.endswith(("norm.weight", "_base.weight", "_scale.weight", "sinks.weight", "_fn.weight",
                                  "ape.weight", "bias", "gate_inp.weight", "tid2eid.weight")), name
            continue
        n_q8 += 1
        rows = want.reshape(-1, want.shape[-1])
        np.testing.assert_array_equal(np.asarray(t.data).reshape(-1), gguf_quantize(rows, Q.Q8_0).reshape(-1),
                                      err_msg=name)
        blocks = rows.reshape(-1, 32)
        err = np.abs(values(t).reshape(-1, 32) - blocks)
        d = np.abs(blocks).max(axis=1, keepdims=True) / 127
        # half a step, plus the f16 rounding of d (2^-11 relative) times the largest code 127
        assert (err <= d * (0.5 + 127 * 2.0**-11) * (1 + 1e-6)).all(), name
    assert n_q8 == 84  # token_embd, output, and per layer 8 or 10 attention + 3 shared + 3 expert matrices


def test_q4_k_within_the_format_bound(synthetic, tmp_path):
    out = tmp_path / "q4k.gguf"
    result = quantize(synthetic, out, "--type", "q4_k")
    assert result.exit_code == 0, result.output
    assert "Q4_K needs rows in multiples of 256" in result.output  # the q_b matrices are 128 wide
    ck = read_safetensors(synthetic)
    n_q4 = 0
    for name, t in tensors_of(out).items():
        if t.tensor_type != Q.Q4_K:
            continue
        n_q4 += 1
        want = reference(ck, name, n_experts=8).reshape(-1, 256)
        err = np.abs(values(t).reshape(-1, 256) - want)
        # per 256-superblock: 8 affine 4-bit grids whose step (6-bit scale times the f16 superblock scale) is at
        # most the widest sub-block's range 2*amax over 15; rounding to the grid errs by at most one such step
        amax = np.abs(want).max(axis=1, keepdims=True)
        assert (err <= amax * 2 / 15).all(), name
        rel = np.sqrt((err ** 2).mean() / (want ** 2).mean())
        assert rel < 0.1, (name, rel)
    assert n_q4 >= 6 * 9


def test_mxfp4_experts_are_the_checkpoint_codes_and_scales(release, fixture_gguf):
    got = tensors_of(fixture_gguf("mxfp4-q8_0"))
    for layer in range(6):
        for gguf_name, proj in EXPERT_PROJ.items():
            t = got[f"blk.{layer}.{gguf_name}"]
            assert t.tensor_type == Q.MXFP4
            data = np.asarray(t.data)
            blocks = data.reshape(8, data.shape[1], -1, 17)
            for e in range(8):
                _, packed = release[f"layers.{layer}.ffn.experts.{e}.{proj}.weight"]
                _, scale = release[f"layers.{layer}.ffn.experts.{e}.{proj}.scale"]
                codes = fp4_codes(packed).reshape(packed.shape[0], -1, 32)
                b = blocks[e]
                np.testing.assert_array_equal(b[:, :, 0], scale)
                np.testing.assert_array_equal(b[:, :, 1:] & 15, codes[:, :, :16])
                np.testing.assert_array_equal(b[:, :, 1:] >> 4, codes[:, :, 16:])
            np.testing.assert_array_equal(values(t), reference(release, t.name, 8).astype(np.float32))
    assert got["blk.0.attn_q_a.weight"].tensor_type == Q.Q8_0


def test_save_pretrained_layout_gives_the_same_tensors(release, fixture_gguf, tmp_path):
    """transformers' names and config keys, float32 tensors, one shard, no index."""
    config = json.loads((FIXTURE / "config.json").read_text())
    ratios = config.pop("compress_ratios")
    n_hash = config.pop("num_hash_layers")
    scaling = config.pop("rope_scaling")
    kinds = {0: "sliding_attention", 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}
    config.update(
        layer_types=[kinds[r] for r in ratios[:config["num_hidden_layers"]]],
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 128},
        mlp_layer_types=["hash_moe" if i < n_hash else "moe" for i in range(config["num_hidden_layers"])],
        rope_parameters={"main": {"rope_theta": config["rope_theta"], "rope_type": "default"},
                         "compress": {**scaling, "rope_theta": config.pop("compress_rope_theta"),
                                      "rope_type": "yarn"}},
    )
    renames = {"embed.weight": "model.embed_tokens.weight", "head.weight": "head.weight",
               "hc_head_fn": "model.hc_head.hc_fn", "hc_head_base": "model.hc_head.hc_base",
               "hc_head_scale": "model.hc_head.hc_scale", "norm.weight": "model.norm.weight"}
    tensors = {}
    for name, (dtype, _) in release.items():
        if name.endswith(".scale") or name.startswith("mtp."):
            continue
        hf = renames.get(name) or "model." + name.replace(".attn.kv_norm.", ".attn.norm.")
        tensors[hf] = dequantized(release, name).astype(np.float32) if dtype != "I64" else release[name][1]
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    shutil.copy(FIXTURE / "tokenizer.json", folder)
    write_safetensors(folder / "model.safetensors", tensors)
    out = tmp_path / "hf.gguf"
    result = quantize(folder, out, "--type", "f32")
    assert result.exit_code == 0, result.output
    assert "save_pretrained layout" in result.output
    a, b = tensors_of(fixture_gguf("f32")), tensors_of(out)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(np.asarray(a[name].data), np.asarray(b[name].data), err_msg=name)
    ra, rb = GGUFReader(fixture_gguf("f32")), GGUFReader(out)
    for key, field in ra.fields.items():
        if key.startswith("deepseek4.") and key != "deepseek4.attention.compress_ratios":
            assert rb.fields[key].contents() == field.contents(), key
    # transformers' config has no MTP entry: the ratios cover the trunk only, which llama.cpp accepts
    assert rb.fields["deepseek4.attention.compress_ratios"].contents() == ratios[:6]


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]):
    names = {np.dtype(np.float32): "F32", np.dtype(np.int64): "I64"}
    _write_entries(path, {n: [names[a.dtype], list(a.shape), np.ascontiguousarray(a).tobytes()]
                          for n, a in tensors.items()})


def _write_entries(path: Path, entries: dict[str, list]):
    """name -> [dtype, shape, bytes], written as a safetensors file."""
    header, offset = {}, 0
    for name, (dtype, shape, data) in entries.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(e[2] for e in entries.values()))


def _read_entries(path: Path) -> dict[str, list]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return {name: [e["dtype"], e["shape"], raw[8 + n + e["data_offsets"][0]:8 + n + e["data_offsets"][1]]]
            for name, e in json.loads(raw[8:8 + n]).items() if name != "__metadata__"}


# ---------------------------------------------------------------------------------------------------
# metadata: the keys, types and values llama.cpp's deepseek4 loader reads
# ---------------------------------------------------------------------------------------------------

U32, F32, BOOL, STR, I32 = (GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.BOOL, GGUFValueType.STRING,
                            GGUFValueType.INT32)
# the tiny fixture's config.json, spelled out; the keys are those of src/models/deepseek4.cpp load_arch_hparams
# and llama_model_base::load_hparams (rope and shape keys)
EXPECTED_KV = {
    "general.architecture": (STR, "deepseek4"),
    "deepseek4.block_count": (U32, 6),
    "deepseek4.context_length": (U32, 1024),
    "deepseek4.embedding_length": (U32, 128),
    "deepseek4.embedding_length_out": (U32, 512),
    "deepseek4.vocab_size": (U32, 512),
    "deepseek4.attention.head_count": (U32, 4),
    "deepseek4.attention.head_count_kv": (U32, 1),
    "deepseek4.attention.key_length": (U32, 128),
    "deepseek4.attention.value_length": (U32, 128),
    "deepseek4.attention.layer_norm_rms_epsilon": (F32, 1e-6),
    "deepseek4.attention.q_lora_rank": (U32, 128),
    "deepseek4.attention.sliding_window": (U32, 16),
    "deepseek4.attention.output_group_count": (U32, 2),
    "deepseek4.attention.output_lora_rank": (U32, 128),
    "deepseek4.attention.compress_rope_freq_base": (F32, 160000.0),
    "deepseek4.attention.compress_ratios": (I32, [0, 128, 4, 128, 4, 0, 0]),
    "deepseek4.attention.indexer.head_count": (U32, 8),
    "deepseek4.attention.indexer.key_length": (U32, 128),
    "deepseek4.attention.indexer.top_k": (U32, 4),
    "deepseek4.rope.dimension_count": (U32, 64),
    "deepseek4.rope.freq_base": (F32, 10000.0),
    "deepseek4.rope.scaling.type": (STR, "yarn"),
    "deepseek4.rope.scaling.factor": (F32, 16.0),
    "deepseek4.rope.scaling.original_context_length": (U32, 64),
    "deepseek4.rope.scaling.yarn_beta_fast": (F32, 32.0),
    "deepseek4.rope.scaling.yarn_beta_slow": (F32, 1.0),
    "deepseek4.expert_count": (U32, 8),
    "deepseek4.expert_used_count": (U32, 2),
    "deepseek4.expert_shared_count": (U32, 1),
    "deepseek4.expert_feed_forward_length": (U32, 128),
    "deepseek4.expert_weights_scale": (F32, 1.5),
    "deepseek4.expert_weights_norm": (BOOL, True),
    "deepseek4.expert_gating_func": (U32, 4),
    "deepseek4.hash_layer_count": (U32, 2),
    "deepseek4.swiglu_clamp_exp": (F32, [10.0] * 6),
    "deepseek4.swiglu_clamp_shexp": (F32, [10.0] * 6),
    "deepseek4.hyper_connection.count": (U32, 4),
    "deepseek4.hyper_connection.sinkhorn_iterations": (U32, 20),
    "deepseek4.hyper_connection.epsilon": (F32, 1e-6),
    "tokenizer.ggml.model": (STR, "gpt2"),
    "tokenizer.ggml.pre": (STR, "joyai-llm"),
    "tokenizer.ggml.bos_token_id": (U32, 0),
    "tokenizer.ggml.eos_token_id": (U32, 1),
}


def test_metadata_keys_types_and_values(fixture_gguf):
    fields = GGUFReader(fixture_gguf("mxfp4-q8_0")).fields
    for key, (vtype, value) in EXPECTED_KV.items():
        assert key in fields, key
        field = fields[key]
        got_type = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else field.types[0]
        assert got_type == vtype, key
        if vtype == F32:
            np.testing.assert_allclose(field.contents(), value, rtol=1e-7, err_msg=key)
        else:
            assert field.contents() == value, key
    assert fields["general.file_type"].contents() == 38  # MOSTLY_MXFP4_MOE, as llama.cpp's converter sets
    vocab = json.loads((FIXTURE / "tokenizer.json").read_text())["model"]
    assert len(fields["tokenizer.ggml.tokens"].contents()) == 512
    assert fields["tokenizer.ggml.token_type"].types == [GGUFValueType.ARRAY, I32]
    assert len(fields["tokenizer.ggml.merges"].contents()) == len(vocab["merges"])
    tokens = fields["tokenizer.ggml.tokens"].contents()
    assert all(tokens[i] == text for text, i in vocab["vocab"].items())
    assert fields["tokenizer.chat_template"].types == [STR] and fields["tokenizer.chat_template"].contents()
    assert not any(k.startswith("deepseek4.nextn") for k in fields)


def test_tensor_shapes_are_the_ones_the_deepseek4_loader_creates(fixture_gguf):
    """ne of a few tensors as src/models/deepseek4.cpp create_tensor asks for them (tiny widths)."""
    got = {n: list(map(int, t.shape)) for n, t in tensors_of(fixture_gguf("mxfp4-q8_0")).items()}
    assert got["token_embd.weight"] == [128, 512]
    assert got["output_hc_fn.weight"] == [512, 4]
    assert got["blk.0.hc_attn_fn.weight"] == [512, 24]
    assert got["blk.0.attn_q_b.weight"] == [128, 4 * 128]
    assert got["blk.0.attn_output_a.weight"] == [4 * 128 // 2, 2 * 128]
    assert got["blk.1.attn_compressor_ape.weight"] == [128, 128]
    assert got["blk.2.attn_compressor_kv.weight"] == [128, 256]
    assert got["blk.2.indexer_compressor_ape.weight"] == [256, 4]
    assert got["blk.2.indexer.attn_q_b.weight"] == [128, 8 * 128]
    assert got["blk.3.ffn_gate_exps.weight"] == [128, 128, 8]
    assert got["blk.3.ffn_down_exps.weight"] == [128, 128, 8]
    assert got["blk.3.exp_probs_b.bias"] == [8]


# ---------------------------------------------------------------------------------------------------
# bad input: a clear message naming the file and tensor, non-zero exit, no output file
# ---------------------------------------------------------------------------------------------------

@pytest.fixture
def broken(synthetic, tmp_path):
    folder = tmp_path / "ck"
    shutil.copytree(synthetic, folder)
    return folder


def _shard_of(folder: Path, name: str) -> Path:
    return folder / json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][name]


def _edit(folder: Path, name: str, change):
    path = _shard_of(folder, name)
    entries = _read_entries(path)
    change(entries)
    _write_entries(path, entries)


def _drop(folder, name):
    _edit(folder, name, lambda entries: entries.pop(name))
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"][name]
    index_path.write_text(json.dumps(index))


def _retype(folder, name):
    def change(entries):
        dtype, shape, data = entries[name]
        entries[name] = ["I8", [len(data)], data]
    _edit(folder, name, change)


def _reshape(folder, name):
    def change(entries):
        dtype, shape, data = entries[name]
        entries[name] = [dtype, [shape[0] // 2, *shape[1:]], data[:len(data) // 2]]
    _edit(folder, name, change)


def _truncate(folder, name):
    path = _shard_of(folder, name)
    os.truncate(path, path.stat().st_size - 1000)


def _missing_shard(folder, name):
    _shard_of(folder, name).unlink()


def _config_disagrees(folder, name):
    config = json.loads((folder / "config.json").read_text())
    config["moe_intermediate_size"] = 128
    (folder / "config.json").write_text(json.dumps(config))


def _extra_layer(folder, name):
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 5
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("damage,tensor,words", [
    (_missing_shard, "layers.2.attn.wkv.weight", ["shard listed in model.safetensors.index.json is missing"]),
    (_truncate, "layers.4.ffn_norm.weight", ["truncated"]),
    (_drop, "layers.3.attn.wo_b.scale", ["without its scale tensor 'layers.3.attn.wo_b.scale'"]),
    (_drop, "layers.1.attn.compressor.ape", ["tensor 'layers.1.attn.compressor.ape' is missing"]),
    (_retype, "layers.2.attn_norm.weight", ["tensor 'layers.2.attn_norm.weight' has dtype I8"]),
    (_reshape, "layers.0.attn.wq_a.weight", ["tensor 'layers.0.attn.wq_a.weight' has shape", "config.json"]),
    (_config_disagrees, "layers.0.ffn.shared_experts.w1.weight",
     ["tensor 'layers.0.ffn.shared_experts.w1.weight' has shape", "moe_intermediate_size=128"]),
    (_extra_layer, "layers.5.attn_norm.weight", ["unexpected tensor 'layers.5.", "num_hidden_layers=5"]),
], ids=["missing-shard", "truncated", "missing-scale", "missing-tensor", "wrong-dtype", "wrong-shape",
        "config-disagrees", "more-layers-than-config"])
def test_bad_checkpoint_fails_naming_file_and_tensor(broken, tmp_path, damage, tensor, words):
    shard = _shard_of(broken, tensor)
    damage(broken, tensor)
    out = tmp_path / "out" / "x.gguf"
    out.parent.mkdir()
    result = quantize(broken, out, "--type", "q8_0")
    assert result.exit_code != 0
    message = result.output
    for word in words:
        assert word in message, message
    if damage is not _drop:
        assert str(shard) in message, message
    assert list(out.parent.iterdir()) == []


def test_existing_output_needs_force(synthetic, tmp_path):
    out = tmp_path / "x.gguf"
    out.write_bytes(b"keep me")
    result = quantize(synthetic, out, "--type", "bf16")
    assert result.exit_code != 0 and "already exists" in result.output and "--force" in result.output
    assert out.read_bytes() == b"keep me"
    result = quantize(synthetic, out, "--type", "bf16", "--force")
    assert result.exit_code == 0, result.output
    assert GGUFReader(out).fields["general.architecture"].contents() == "deepseek4"


@pytest.mark.parametrize("args,words", [
    (["--type", "q3_x"], "unknown type 'q3_x'"),
    (["--type", "mxfp4"], "name the rest too"),
    (["--type", "q8_0", "--tensor-type", "no_such_tensor=q4_k"], "matches no tensor this recipe quantizes"),
    (["--type", "q8_0", "--tensor-type", "attn_kv"], "expected PATTERN=TYPE"),
])
def test_bad_options_fail_before_writing(synthetic, tmp_path, args, words):
    out = tmp_path / "x.gguf"
    result = quantize(synthetic, out, *args)
    assert result.exit_code != 0 and words in result.output, result.output
    assert list(tmp_path.iterdir()) == []


def test_tensor_type_overrides_and_fallback(synthetic, tmp_path):
    out = tmp_path / "x.gguf"
    result = quantize(synthetic, out, "--type", "mxfp4-q8_0", "--tensor-type", "blk\\.0\\.ffn_down_exps=q8_0",
                      "--tensor-type", "ffn_down_exps=q4_k", "--tensor-type", "attn_q_b=q4_k",
                      "--tensor-type", "ffn_gate_inp=bf16")
    assert result.exit_code == 0, result.output
    got = tensors_of(out)
    assert got["blk.0.ffn_down_exps.weight"].tensor_type == Q.Q8_0  # the first matching override wins, as in llama.cpp
    assert got["blk.1.ffn_down_exps.weight"].tensor_type == Q.Q4_K
    assert got["blk.1.ffn_up_exps.weight"].tensor_type == Q.MXFP4
    assert got["blk.1.ffn_gate_inp.weight"].tensor_type == Q.BF16
    # 128-wide rows: Q4_K falls back to Q5_0 (llama.cpp's tensor_type_fallback), and says so
    assert got["blk.1.attn_q_b.weight"].tensor_type == Q.Q5_0
    assert "Q4_K needs rows in multiples of 256" in result.output
    assert got["blk.1.attn_norm.weight"].tensor_type == Q.F32


def test_interrupted_run_leaves_no_file(synthetic, tmp_path, monkeypatch):
    import quant.convert

    calls = {"n": 0}
    real = quant.convert._encode

    def interrupt_late(values, qtype, importance):
        calls["n"] += 1
        if calls["n"] == 40:
            raise KeyboardInterrupt
        return real(values, qtype, importance)

    monkeypatch.setattr(quant.convert, "_encode", interrupt_late)
    out = tmp_path / "x.gguf"
    result = quantize(synthetic, out, "--type", "q8_0")
    assert calls["n"] >= 40
    assert result.exit_code != 0 and "interrupted" in result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("signum", [2, 15], ids=["SIGINT", "SIGTERM"])
def test_signalled_run_leaves_no_file(tmp_path, signum):
    """A real process, stopped mid-write: exit non-zero, no OUT, no temporary file."""
    import time

    folder = tmp_path / "ck"
    make_synthetic.write_checkpoint(folder, "tiny", n_layers=6, n_experts=256, seed=3)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", "from flashlite.cli import main; main()", "quantize",
                             str(folder), str(out_dir / "x.gguf"), "--type", "f32"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not any(out_dir.iterdir()) or next(out_dir.iterdir()).stat().st_size < (8 << 20):
        assert proc.poll() is None and time.monotonic() < deadline, "finished before it could be interrupted"
        time.sleep(0.01)
    proc.send_signal(signum)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode != 0
    assert "was not written" in output or "terminated by signal" in output, output
    assert list(out_dir.iterdir()) == []


def test_killed_run_leaves_a_partial_that_the_next_run_removes(tmp_path, synthetic):
    """SIGKILL cannot be caught: the .partial stays, named with its writer's pid, and the next run of the same
    output removes it (and only the dead writer's)."""
    import time

    folder = tmp_path / "ck"
    make_synthetic.write_checkpoint(folder, "tiny", n_layers=6, n_experts=256, seed=3)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", "from flashlite.cli import main; main()", "quantize",
                             str(folder), str(out_dir / "x.gguf"), "--type", "f32"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not any(out_dir.iterdir()) or next(out_dir.iterdir()).stat().st_size < (8 << 20):
        assert proc.poll() is None and time.monotonic() < deadline, "finished before it could be killed"
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    left = [p.name for p in out_dir.iterdir()]
    assert len(left) == 1 and left[0].startswith(f".x.gguf.{proc.pid}.") and left[0].endswith(".partial")
    live = out_dir / f".x.gguf.{os.getpid()}.keepme.partial"  # a writer still running (this process)
    live.write_bytes(b"")
    result = quantize(synthetic, out_dir / "x.gguf")
    assert result.exit_code == 0, result.output
    assert f"removed 1 unfinished file(s) of earlier runs that were killed: {left[0]}" in result.output
    assert sorted(p.name for p in out_dir.iterdir()) == [live.name, "x.gguf"]


def test_full_disk_leaves_no_partial_even_when_close_fails_again(synthetic, tmp_path, monkeypatch):
    """ENOSPC while writing, and again when the writer is closed in the clean-up: the file still goes."""
    import errno

    import gguf

    real_close = gguf.GGUFWriter.close

    def close_fails(self):
        real_close(self)
        raise OSError(errno.ENOSPC, "No space left on device")

    def write_fails(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "close", close_fails)
    monkeypatch.setattr(gguf.GGUFWriter, "write_ti_data_to_file", write_fails)
    result = quantize(synthetic, tmp_path / "x.gguf")
    assert result.exit_code != 0 and "No space left on device" in result.output
    assert list(tmp_path.iterdir()) == []


def test_progress_line_shows_tensors_rate_and_eta():
    from quant.convert import Progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    bar = Progress(10, 1000, stream=stream)
    bar.last -= 1
    bar.update("blk.0.attn_q_a.weight", 500, tensor_done=True)
    line = stream.getvalue()
    assert "1/10 tensors" in line and "MB/s" in line and "ETA" in line and "blk.0.attn_q_a.weight" in line


# ---------------------------------------------------------------------------------------------------
# memory: peak RSS stays near a fixed bound while the checkpoint grows past it
# ---------------------------------------------------------------------------------------------------

# VmHWM, not getrusage's ru_maxrss: Linux folds the parent's RSS at fork into the child's ru_maxrss at exec
RSS_CHILD = textwrap.dedent("""
    import sys
    from quant.convert import convert
    from quant.recipes import Recipe

    def peak_kb():
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))

    base = peak_kb()
    if sys.argv[1] != "-":
        convert(sys.argv[1], sys.argv[2], Recipe.parse(sys.argv[3]), progress=False, log=lambda m: None,
                slab_bytes=int(sys.argv[4]))
    print(base, peak_kb())
""")


def _peak_rss_kb(*args: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", RSS_CHILD, *args], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    base, peak = map(int, out.split())
    return base, peak


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_peak_rss_is_bounded_whatever_the_checkpoint_size(tmp_path):
    """Peak RSS is the imports plus a few slabs: nearly the same for a checkpoint 8x larger, and under a bound
    (imports + 64 MB, for 4 MB slabs) that the larger checkpoint exceeds several times over. tools/bench_quantize_rss.py
    shows the same at V4-Flash's widths."""
    _, idle = _peak_rss_kb("-")
    peaks, sizes = [], []
    for experts in (32, 256):
        folder = tmp_path / f"ck{experts}"
        make_synthetic.write_checkpoint(folder, "tiny", n_layers=6, n_experts=experts, seed=2)
        sizes.append(sum(p.stat().st_size for p in folder.glob("*.safetensors")))
        out = tmp_path / f"f32-{experts}.gguf"
        peaks.append(_peak_rss_kb(str(folder), str(out), "f32", str(4 << 20))[1])
        sizes.append(out.stat().st_size)
        shutil.rmtree(folder)
        out.unlink()
    bound_kb = idle + 64 * 1024
    print(f"checkpoints {sizes[0] / 1e6:.0f} and {sizes[2] / 1e6:.0f} MB -> f32 GGUFs {sizes[1] / 1e6:.0f} and "
          f"{sizes[3] / 1e6:.0f} MB: peak RSS {peaks[0] / 1024:.0f} and {peaks[1] / 1024:.0f} MB, "
          f"imports {idle / 1024:.0f} MB, bound {bound_kb / 1024:.0f} MB")
    assert sizes[2] > 2 * 64 * 1024 * 1024 and sizes[3] > 4 * sizes[2]
    assert peaks[1] < bound_kb
    assert peaks[1] - peaks[0] < 24 * 1024  # headers and plan of 8x the tensors: ~2 KB each, no data


def test_shard_maps_once_when_workers_ask_at_once():
    """The quantizer's threads read one shard together: they must share one map, and none may see its file
    closed under it (once an intermittent 'Bad file descriptor')."""
    from quant.safetensors_source import Shard

    for _ in range(50):
        shard = Shard(FIXTURE / "model-00001-of-00002.safetensors")
        start, maps = threading.Barrier(8), []

        def take():
            start.wait()
            maps.append(shard.map())

        threads = [threading.Thread(target=take) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(maps) == 8 and len({id(m) for m in maps}) == 1
        shard.close()
