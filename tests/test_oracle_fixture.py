"""The committed transformers oracle (tests/fixtures/tiny_v4) is well formed and self-consistent.

Everything here reads the files with numpy only; the regeneration check needs the dev extra (torch).
"""

import hashlib
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "tiny_v4"
ITEM_SIZE = {"F32": 4, "BF16": 2, "F8_E4M3": 1, "F8_E8M0": 1, "I8": 1, "I64": 8}
NUMPY_DTYPE = {"F32": np.float32, "BF16": np.uint16, "F8_E4M3": np.uint8, "F8_E8M0": np.uint8,
               "I8": np.int8, "I64": np.int64}


def read_safetensors(path):
    """(header, {name: array}) with dtype-faithful raw arrays; checks the layout while reading."""
    blob = path.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    header.pop("__metadata__", None)
    data = memoryview(blob)[8 + n:]
    arrays, end = {}, 0
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        start, stop = info["data_offsets"]
        assert start == end, f"{path.name}: {name} is not contiguous"
        assert stop - start == ITEM_SIZE[info["dtype"]] * int(np.prod(info["shape"], dtype=np.int64)), name
        arrays[name] = np.frombuffer(data[start:stop], dtype=NUMPY_DTYPE[info["dtype"]]).reshape(info["shape"])
        end = stop
    assert end == len(data), f"{path.name}: trailing bytes"
    return header, arrays


@pytest.fixture(scope="module")
def config():
    return json.loads((FIXTURE / "config.json").read_text())


def read_checkpoint(folder):
    """(headers, arrays) of every shard of a safetensors checkpoint folder, each shard checked against the index."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    headers, arrays = {}, {}
    for fname in sorted(set(index["weight_map"].values())):
        header, shard = read_safetensors(folder / fname)
        assert {name: fname for name in header} == {k: v for k, v in index["weight_map"].items() if v == fname}
        headers.update(header)
        arrays.update(shard)
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in arrays.values())
    return headers, arrays


@pytest.fixture(scope="module")
def checkpoint():
    return read_checkpoint(FIXTURE)


@pytest.fixture(scope="module")
def goldens():
    with np.load(FIXTURE / "goldens.npz", allow_pickle=False) as g:
        return {k: g[k] for k in g.files}


def fp8(shape):
    out, inp = shape
    return {".weight": ("F8_E4M3", [out, inp]), ".scale": ("F8_E8M0", [-(-out // 128), -(-inp // 128)])}


def official_layout(c):
    """Name -> (dtype, shape) for the release's layout (v4-architecture.md section 9) at this config's sizes."""
    dim, hd, nh, hc = c["hidden_size"], c["head_dim"], c["num_attention_heads"], c["hc_mult"]
    qr, inter, n_exp = c["q_lora_rank"], c["moe_intermediate_size"], c["n_routed_experts"]
    ihd, inh = c["index_head_dim"], c["index_n_heads"]
    n_mix = (2 + hc) * hc
    layout = {}

    def add(name, dtype, shape):
        layout[name] = (dtype, list(shape))

    def linear(name, out, inp):
        for suffix, (dtype, shape) in fp8((out, inp)).items():
            add(name + suffix, dtype, shape)

    def compressor(p, d, ratio):
        width = (2 if ratio == 4 else 1) * d
        add(f"{p}.wkv.weight", "BF16", [width, dim])
        add(f"{p}.wgate.weight", "BF16", [width, dim])
        add(f"{p}.ape", "F32", [ratio, width])
        add(f"{p}.norm.weight", "BF16", [d])

    def block(p, layer_id, ratio):
        for norm in ("attn_norm", "ffn_norm"):
            add(f"{p}.{norm}.weight", "BF16", [dim])
        for which in ("attn", "ffn"):
            add(f"{p}.hc_{which}_fn", "F32", [n_mix, hc * dim])
            add(f"{p}.hc_{which}_base", "F32", [n_mix])
            add(f"{p}.hc_{which}_scale", "F32", [3])
        add(f"{p}.attn.attn_sink", "F32", [nh])
        linear(f"{p}.attn.wq_a", qr, dim)
        add(f"{p}.attn.q_norm.weight", "BF16", [qr])
        linear(f"{p}.attn.wq_b", nh * hd, qr)
        linear(f"{p}.attn.wkv", hd, dim)
        add(f"{p}.attn.kv_norm.weight", "BF16", [hd])
        linear(f"{p}.attn.wo_a", c["o_groups"] * c["o_lora_rank"], nh * hd // c["o_groups"])
        linear(f"{p}.attn.wo_b", dim, c["o_groups"] * c["o_lora_rank"])
        if ratio:
            compressor(f"{p}.attn.compressor", hd, ratio)
        if ratio == 4:
            linear(f"{p}.attn.indexer.wq_b", inh * ihd, qr)
            add(f"{p}.attn.indexer.weights_proj.weight", "BF16", [inh, dim])
            compressor(f"{p}.attn.indexer.compressor", ihd, ratio)
        add(f"{p}.ffn.gate.weight", "BF16", [n_exp, dim])
        if layer_id < c["num_hash_layers"]:
            add(f"{p}.ffn.gate.tid2eid", "I64", [c["vocab_size"], c["num_experts_per_tok"]])
        else:
            add(f"{p}.ffn.gate.bias", "F32", [n_exp])
        for e in range(n_exp):
            for w, (out, inp) in (("w1", (inter, dim)), ("w3", (inter, dim)), ("w2", (dim, inter))):
                add(f"{p}.ffn.experts.{e}.{w}.weight", "I8", [out, inp // 2])
                add(f"{p}.ffn.experts.{e}.{w}.scale", "F8_E8M0", [out, inp // 32])
        linear(f"{p}.ffn.shared_experts.w1", inter, dim)
        linear(f"{p}.ffn.shared_experts.w3", inter, dim)
        linear(f"{p}.ffn.shared_experts.w2", dim, inter)

    def hc_head(p):
        add(f"{p}hc_head_fn", "F32", [hc, hc * dim])
        add(f"{p}hc_head_base", "F32", [hc])
        add(f"{p}hc_head_scale", "F32", [1])

    add("embed.weight", "BF16", [c["vocab_size"], dim])
    add("head.weight", "BF16", [c["vocab_size"], dim])
    add("norm.weight", "BF16", [dim])
    hc_head("")
    n_layers = c["num_hidden_layers"]
    for i in range(n_layers):
        block(f"layers.{i}", i, c["compress_ratios"][i])
    for m in range(c["num_nextn_predict_layers"]):
        p = f"mtp.{m}"
        block(p, n_layers + m, c["compress_ratios"][n_layers + m])
        linear(f"{p}.e_proj", dim, dim)
        linear(f"{p}.h_proj", dim, dim)
        for norm in ("enorm", "hnorm", "norm"):
            add(f"{p}.{norm}.weight", "BF16", [dim])
        hc_head(f"{p}.")
    return layout


def bf16_to_f32(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


def test_config_exercises_every_feature(config):
    ratios = config["compress_ratios"]
    n_layers = config["num_hidden_layers"]
    assert len(ratios) == n_layers + config["num_nextn_predict_layers"] == 7
    assert {0, 4, 128} <= set(ratios[:n_layers])
    assert 0 < config["num_hash_layers"] < n_layers
    assert config["hc_mult"] == 4 and config["n_shared_experts"] == 1
    assert config["expert_dtype"] == "fp4"
    assert config["quantization_config"]["scale_fmt"] == "ue8m0"
    assert config["rope_scaling"]["type"] == "yarn"


def test_checkpoint_matches_the_official_layout(config, checkpoint):
    headers, _ = checkpoint
    expected = official_layout(config)
    assert set(headers) == set(expected)
    mismatched = {n: (h["dtype"], h["shape"]) for n, h in headers.items() if (h["dtype"], h["shape"]) != expected[n]}
    assert not mismatched


def test_index_splits_the_model_over_two_shards():
    index = json.loads((FIXTURE / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]


def test_quantized_tensors_hold_valid_codes(checkpoint):
    headers, arrays = checkpoint
    for name, info in headers.items():
        if info["dtype"] == "F8_E4M3":
            assert not np.any((arrays[name] & 0x7F) == 0x7F), f"{name} holds e4m3 NaN"
        if info["dtype"] == "F8_E8M0":
            assert np.all((arrays[name] > 0) & (arrays[name] < 255)), f"{name} holds an extreme e8m0 scale"
    tid2eid = [a for n, a in arrays.items() if n.endswith("tid2eid")]
    assert tid2eid and all(np.all((t >= 0) & (t < 8)) and np.all(t[:, 0] != t[:, 1]) for t in tid2eid)


def test_features_are_not_left_inert(checkpoint):
    _, arrays = checkpoint
    for suffix in ("attn_sink", "compressor.ape", "gate.bias", "hc_attn_base", "hc_ffn_base"):
        chosen = [a for n, a in arrays.items() if n.endswith(suffix)]
        assert chosen and all(np.std(a) > 0.05 for a in chosen), suffix
    scales = [a for n, a in arrays.items() if n.endswith("_scale")]
    assert all(np.any(np.abs(a - 1) > 0.05) for a in scales)


def test_goldens_shapes(config, goldens):
    t = goldens["prompt_ids"].shape[0]
    vocab, n_layers = config["vocab_size"], config["num_hidden_layers"]
    assert t >= 300 and goldens["prompt_ids"].dtype == np.int32
    assert goldens["logits"].shape == (t, vocab) and goldens["logits"].dtype == np.float32
    assert goldens["decision_gap"].shape == (t,) and goldens["decision_gap"].dtype == np.float32
    n = goldens["greedy_ids"].shape[0]
    assert n >= 16 and goldens["greedy_logits"].shape == (n, vocab)
    assert goldens["expert_ids"].shape == (n_layers, t, config["num_experts_per_tok"])
    assert goldens["indexer_ids"].shape == (2, t, config["index_topk"])
    assert list(goldens["indexer_layers"]) == [i for i, r in enumerate(config["compress_ratios"][:n_layers]) if r == 4]
    p = goldens["hidden_positions"].shape[0]
    assert goldens["hidden"].shape == (2 * n_layers + 1, p, config["hc_mult"], config["hidden_size"])
    assert np.all(np.isfinite(goldens["logits"])) and np.all(goldens["decision_gap"] >= 0)


def test_greedy_continuation_is_the_argmax_of_its_logits(goldens):
    assert np.array_equal(goldens["greedy_logits"][0], goldens["logits"][-1])
    assert np.array_equal(np.argmax(goldens["greedy_logits"], axis=1), goldens["greedy_ids"])


def test_hash_layers_route_by_tid2eid(config, checkpoint, goldens):
    _, arrays = checkpoint
    for layer in range(config["num_hash_layers"]):
        table = arrays[f"layers.{layer}.ffn.gate.tid2eid"]
        assert np.array_equal(np.sort(table[goldens["prompt_ids"]], axis=1), goldens["expert_ids"][layer])


def test_indexer_picks_only_complete_windows(goldens):
    positions = np.arange(goldens["prompt_ids"].shape[0])[None, :, None]
    picks = goldens["indexer_ids"]
    visible = (positions + 1) // 4
    assert np.all((picks == -1) | (picks < visible))
    assert np.all((picks >= 0).sum(axis=2) == np.minimum(visible[..., 0], picks.shape[2]))


def test_first_hidden_state_is_the_embedding_on_every_stream(checkpoint, goldens):
    _, arrays = checkpoint
    embed = bf16_to_f32(arrays["embed.weight"])
    rows = embed[goldens["prompt_ids"][goldens["hidden_positions"]]]
    assert np.array_equal(goldens["hidden"][0], np.repeat(rows[:, None, :], goldens["hidden"].shape[2], axis=1))


def test_head_of_the_last_hidden_state_gives_the_logits(config, checkpoint, goldens):
    """hc_head, the final RMSNorm and the head in float64 from the stored H reproduce the golden logits."""
    _, arrays = checkpoint
    eps, hc_eps = config["rms_norm_eps"], config["hc_eps"]
    h = goldens["hidden"][-1].astype(np.float64)
    flat = h.reshape(h.shape[0], -1)
    normed = flat / np.sqrt(np.mean(flat**2, axis=1, keepdims=True) + eps)
    mixes = normed @ arrays["hc_head_fn"].astype(np.float64).T
    pre = 1 / (1 + np.exp(-(mixes * arrays["hc_head_scale"][0] + arrays["hc_head_base"]))) + hc_eps
    y = np.einsum("ps,psd->pd", pre, h)
    y = y / np.sqrt(np.mean(y**2, axis=1, keepdims=True) + eps) * bf16_to_f32(arrays["norm.weight"])
    logits = y @ bf16_to_f32(arrays["head.weight"]).astype(np.float64).T
    golden = goldens["logits"][goldens["hidden_positions"]]
    assert np.max(np.abs(logits - golden)) < 1e-4 * np.max(np.abs(golden))


def test_tokenizer_files(config, goldens):
    spec = json.loads((FIXTURE / "tokenizer.json").read_text(encoding="utf-8"))
    added = {t["id"]: t["content"] for t in spec["added_tokens"]}
    vocab = config["vocab_size"]
    assert len(spec["model"]["vocab"]) + sum(i not in spec["model"]["vocab"].values() for i in added) == vocab
    assert [added[0], added[1], added[2]] == ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"]
    assert [added[i] for i in range(vocab - 4, vocab)] == ["<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"]
    splits = [p for p in spec["pre_tokenizer"]["pretokenizers"] if p["type"] == "Split"]
    assert [s["pattern"]["Regex"] for s in splits][0] == r"\p{N}{1,3}" and len(splits) == 3
    assert spec["decoder"]["type"] == "ByteLevel"
    tok_config = json.loads((FIXTURE / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert tok_config["bos_token"]["content"] == added[0] and tok_config["eos_token"]["content"] == added[1]
    ids = goldens["prompt_ids"]
    assert ids[0] == 0 and ids[1] == vocab - 4 and list(ids[-2:]) == [vocab - 3, vocab - 2]


def test_prompt_ids_round_trip_through_the_tokenizer(goldens):
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer.from_file(str(FIXTURE / "tokenizer.json"))
    text = tok.decode(goldens["prompt_ids"].tolist(), skip_special_tokens=False)
    assert tok.encode(text, add_special_tokens=False).ids == goldens["prompt_ids"].tolist()


class NumpyV4:
    """Float64 forward of the tiny model following docs/oracle.md ("What the oracle computes, op by op")."""

    def __init__(self, config, headers, arrays):
        self.c, self.headers, self.arrays = config, headers, arrays
        self.e4m3 = np.array([self._e4m3(b) for b in range(256)])
        self.e2m1 = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6])
        self.expert_ids, self.indexer_ids = [], []

    @staticmethod
    def _e4m3(b):
        sign, exp, man = (-1.0 if b & 0x80 else 1.0), (b >> 3) & 15, b & 7
        return sign * (man / 8 * 2.0**-6 if exp == 0 else (1 + man / 8) * 2.0 ** (exp - 7))

    def w(self, name):
        dtype, a = self.headers[name]["dtype"], self.arrays[name]
        if dtype == "BF16":
            return bf16_to_f32(a).astype(np.float64)
        if dtype in ("F32", "I64"):
            return a.astype(np.float64) if dtype == "F32" else a
        scale = 2.0 ** (self.arrays[name[: -len("weight")] + "scale"].astype(np.float64) - 127)
        if dtype == "F8_E4M3":
            q = self.e4m3[a]
            return q * np.repeat(np.repeat(scale, 128, 0), 128, 1)[: q.shape[0], : q.shape[1]]
        u = a.view(np.uint8)
        q = np.stack([self.e2m1[u & 15], self.e2m1[u >> 4]], -1).reshape(u.shape[0], -1)
        return q * np.repeat(scale, 32, 1)

    def rms(self, x, weight=None):
        y = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + self.c["rms_norm_eps"])
        return y if weight is None else y * weight

    def inv_freq(self, table):
        exponent = np.arange(0, 64, 2, dtype=np.float32) / 64
        if table == "main":
            return (1 / np.float32(self.c["rope_theta"]) ** exponent).astype(np.float32)
        base, yarn = self.c["compress_rope_theta"], self.c["rope_scaling"]
        pf = (np.float32(base) ** exponent).astype(np.float32)

        def dim_of(rotations):  # YaRN's correction range: the dims the ramp runs over (0..7 for tiny_v4)
            return 64 * math.log(yarn["original_max_position_embeddings"] / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = max(math.floor(dim_of(yarn["beta_fast"])), 0), min(math.ceil(dim_of(yarn["beta_slow"])), 63)
        ramp = np.clip((np.arange(32) - low) / (high - low), 0, 1).astype(np.float32)
        factor = yarn["factor"]
        return (1 / (factor * pf) * ramp + 1 / pf * (1 - ramp)).astype(np.float32)

    def rope(self, x, pos, table, inverse=False):
        angle = (pos.astype(np.float32)[:, None] * self.inv_freq(table)).astype(np.float32).astype(np.float64)
        cos, sin = np.cos(angle), np.sin(angle) * (-1 if inverse else 1)
        if x.ndim == 3:
            cos, sin = cos[:, None], sin[:, None]
        y, even, odd = x.copy(), x[..., -64::2], x[..., -63::2]
        y[..., -64::2], y[..., -63::2] = even * cos - odd * sin, odd * cos + even * sin
        return y

    def hc_pre(self, h, p):
        fn, base, scale, eps = self.w(p + "_fn"), self.w(p + "_base"), self.w(p + "_scale"), self.c["hc_eps"]
        m = self.rms(h.reshape(len(h), -1)) @ fn.T
        pre = 1 / (1 + np.exp(-(m[:, :4] * scale[0] + base[:4]))) + eps
        post = 2 / (1 + np.exp(-(m[:, 4:8] * scale[1] + base[4:8])))
        comb = (m[:, 8:] * scale[2] + base[8:]).reshape(-1, 4, 4)
        comb = np.exp(comb - comb.max(-1, keepdims=True))
        comb = comb / comb.sum(-1, keepdims=True) + eps
        comb = comb / (comb.sum(1, keepdims=True) + eps)
        for _ in range(self.c["hc_sinkhorn_iters"] - 1):
            comb = comb / (comb.sum(2, keepdims=True) + eps)
            comb = comb / (comb.sum(1, keepdims=True) + eps)
        return np.einsum("ts,tsd->td", pre, h), post, comb

    def compressor(self, x, p, ratio, d):
        kv, score = x @ self.w(p + ".wkv.weight").T, x @ self.w(p + ".wgate.weight").T
        n = len(x) // ratio
        kv, score = kv[: n * ratio].reshape(n, ratio, -1), score[: n * ratio].reshape(n, ratio, -1) + self.w(p + ".ape")
        if ratio == 4:
            slots_kv, slots_score = np.zeros((n, 8, d)), np.full((n, 8, d), -np.inf)
            slots_kv[:, 4:], slots_score[:, 4:] = kv[..., d:], score[..., d:]
            slots_kv[1:, :4], slots_score[1:, :4] = kv[:-1, :, :d], score[:-1, :, :d]
            kv, score = slots_kv, slots_score
        weight = np.exp(score - score.max(1, keepdims=True))
        rows = self.rms((weight / weight.sum(1, keepdims=True) * kv).sum(1), self.w(p + ".norm.weight"))
        return self.rope(rows, np.arange(n) * ratio, "compress")

    def attention(self, x, p, ratio):
        c, pos = self.c, np.arange(len(x))
        hd, table = c["head_dim"], "main" if ratio == 0 else "compress"
        qr = self.rms(x @ self.w(p + ".wq_a.weight").T, self.w(p + ".q_norm.weight"))
        q = self.rope(self.rms((qr @ self.w(p + ".wq_b.weight").T).reshape(len(x), -1, hd)), pos, table)
        kv = self.rope(self.rms(x @ self.w(p + ".wkv.weight").T, self.w(p + ".kv_norm.weight")), pos, table)
        window = (pos[None] <= pos[:, None]) & (pos[None] > pos[:, None] - c["sliding_window"])
        z, keys = np.where(window[None], np.einsum("thd,sd->hts", q, kv) * hd**-0.5, -np.inf), kv
        if ratio:
            rows = self.compressor(x, p + ".compressor", ratio, hd)
            visible = np.arange(len(rows))[None] < ((pos + 1) // ratio)[:, None]
            if ratio == 4:
                visible &= self.indexer(x, qr, p, visible)
            z = np.concatenate([z, np.where(visible[None], np.einsum("thd,jd->htj", q, rows) * hd**-0.5, -np.inf)], -1)
            keys = np.concatenate([kv, rows])
        sink = self.w(p + ".attn_sink")[:, None, None]
        top = np.maximum(z.max(-1, keepdims=True), sink)
        e = np.exp(z - top)
        o = np.einsum("hts,sd->thd", e / (e.sum(-1, keepdims=True) + np.exp(sink - top)), keys)
        o = self.rope(o, pos, table, inverse=True).reshape(len(x), c["o_groups"], -1)
        wo_a, r = self.w(p + ".wo_a.weight"), c["o_lora_rank"]
        u = np.concatenate([o[:, g] @ wo_a[g * r:(g + 1) * r].T for g in range(c["o_groups"])], -1)
        return u @ self.w(p + ".wo_b.weight").T

    def indexer(self, x, qr, p, visible):
        ihd = self.c["index_head_dim"]
        keys = self.compressor(x, p + ".indexer.compressor", 4, ihd)
        q = (qr @ self.w(p + ".indexer.wq_b.weight").T).reshape(len(x), -1, ihd)
        q = self.rope(q, np.arange(len(x)), "compress")
        weight = (x @ self.w(p + ".indexer.weights_proj.weight").T) * q.shape[1] ** -0.5
        score = (np.maximum(np.einsum("thd,jd->thj", q, keys), 0) * ihd**-0.5 * weight[:, :, None]).sum(1)
        top = np.argsort(-np.where(visible, score, -np.inf), 1, kind="stable")[:, : self.c["index_topk"]]
        chosen = np.zeros_like(visible)
        np.put_along_axis(chosen, top, True, 1)
        self.indexer_ids.append(np.sort(np.where(np.take_along_axis(visible, top, 1), top, -1), 1))
        return chosen

    def moe(self, x, p, layer, ids):
        c = self.c
        score = np.sqrt(np.logaddexp(0, x @ self.w(p + ".gate.weight").T))
        if layer < c["num_hash_layers"]:
            chosen = self.w(p + ".gate.tid2eid")[ids]
        else:
            chosen = np.argsort(-(score + self.w(p + ".gate.bias")), 1, kind="stable")[:, : c["num_experts_per_tok"]]
        self.expert_ids.append(np.sort(chosen, 1))
        weight = np.take_along_axis(score, chosen, 1)
        weight = weight / weight.sum(1, keepdims=True) * c["routed_scaling_factor"]
        limit = c["swiglu_limit"]

        def swiglu(rows, q):
            g = np.minimum(rows @ self.w(q + ".w1.weight").T, limit)
            u = np.clip(rows @ self.w(q + ".w3.weight").T, -limit, limit)
            return (g / (1 + np.exp(-g)) * u) @ self.w(q + ".w2.weight").T

        out = swiglu(x, p + ".shared_experts")
        for k in range(chosen.shape[1]):
            for e in np.unique(chosen[:, k]):
                rows = chosen[:, k] == e
                out[rows] += swiglu(x[rows], f"{p}.experts.{e}") * weight[rows, k, None]
        return out

    def logits(self, ids):
        c = self.c
        h = np.repeat(self.w("embed.weight")[ids][:, None], c["hc_mult"], 1)
        for layer in range(c["num_hidden_layers"]):
            p = f"layers.{layer}"
            x, post, comb = self.hc_pre(h, p + ".hc_attn")
            f = self.attention(self.rms(x, self.w(p + ".attn_norm.weight")), p + ".attn", c["compress_ratios"][layer])
            h = post[:, :, None] * f[:, None] + np.einsum("tab,tad->tbd", comb, h)
            x, post, comb = self.hc_pre(h, p + ".hc_ffn")
            f = self.moe(self.rms(x, self.w(p + ".ffn_norm.weight")), p + ".ffn", layer, ids)
            h = post[:, :, None] * f[:, None] + np.einsum("tab,tad->tbd", comb, h)
        m = self.rms(h.reshape(len(ids), -1)) @ self.w("hc_head_fn").T
        pre = 1 / (1 + np.exp(-(m * self.w("hc_head_scale")[0] + self.w("hc_head_base")))) + c["hc_eps"]
        return self.rms(np.einsum("ts,tsd->td", pre, h), self.w("norm.weight")) @ self.w("head.weight").T


def test_numpy_forward_of_the_documented_ops_reproduces_the_goldens(config, checkpoint, goldens):
    """docs/oracle.md describes what transformers computes: a float64 numpy forward built from it agrees."""
    model = NumpyV4(config, *checkpoint)
    logits = model.logits(goldens["prompt_ids"])
    assert np.array_equal(np.stack(model.expert_ids), goldens["expert_ids"])
    assert np.array_equal(np.stack(model.indexer_ids), goldens["indexer_ids"])
    assert np.max(np.abs(logits - goldens["logits"])) < 1e-4


@pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("torch", "transformers", "tokenizers")),
    reason="regenerating the oracle needs the dev extra (torch, transformers, tokenizers)",
)
def test_make_reference_regenerates_the_fixture_bit_for_bit(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_reference.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)

    def digests(root):
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}

    assert digests(tmp_path) == digests(FIXTURE)
