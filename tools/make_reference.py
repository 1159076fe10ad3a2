"""Build the tiny DeepSeek V4 reference fixture: an official-layout checkpoint plus float32 goldens.

The goldens come from Hugging Face transformers' DeepseekV4ForCausalLM running on the CPU in float32,
loaded with exactly the dequantized values of the checkpoint written next to them.

    python tools/make_reference.py                      # regenerate tests/fixtures/tiny_v4
    python tools/make_reference.py --out DIR --verify   # also reload DIR with transformers' FP8 loader

torch and transformers are development tools only (`pip install -e .[dev]`); the test suite reads the
committed fixture. The output is bit-for-bit reproducible: every random number comes from numpy's
PCG64 with a fixed seed, torch runs deterministic on one thread, and every file is written by code in
this module (safetensors, npz) with no timestamps.
"""

import argparse
import hashlib
import io
import json
import os
import sys
import zipfile
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")

import numpy as np  # noqa: E402

SEED = 20260424
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "tiny_v4"
N_GREEDY = 16
# Positions whose per-sublayer hidden states are stored (all of them would not fit the size budget).
HIDDEN_POSITIONS = (0, 3, 15, 16, 127, 128, 255, 256)

# ---------------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------------

# DeepSeek's inference/config.json keys (REF ModelArgs).
REF_ARGS = {
    "vocab_size": 512,
    "dim": 128,
    "moe_inter_dim": 128,
    "n_layers": 6,
    "n_hash_layers": 2,
    "n_heads": 4,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "n_activated_experts": 2,
    "score_func": "sqrtsoftplus",
    "route_scale": 1.5,
    "swiglu_limit": 10.0,
    "q_lora_rank": 128,
    "head_dim": 128,
    "rope_head_dim": 64,
    "o_groups": 2,
    "o_lora_rank": 128,
    "window_size": 16,
    "original_seq_len": 64,
    "rope_theta": 10000,
    "rope_factor": 16,
    "beta_fast": 32,
    "beta_slow": 1,
    "index_n_heads": 8,
    "index_head_dim": 128,
    "index_topk": 4,
    "hc_mult": 4,
    "hc_sinkhorn_iters": 20,
    "dtype": "fp8",
    "scale_fmt": "ue8m0",
    "expert_dtype": "fp4",
    "compress_rope_theta": 160000,
    "compress_ratios": [0, 128, 4, 128, 4, 0, 0],
}


def root_config(a):
    """The root config.json of the release (the keys transformers and llama.cpp's converter read)."""
    return {
        "architectures": ["DeepseekV4ForCausalLM"],
        "model_type": "deepseek_v4",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "compress_ratios": a["compress_ratios"],
        "compress_rope_theta": a["compress_rope_theta"],
        "expert_dtype": a["expert_dtype"],
        "hc_eps": 1e-6,
        "hc_mult": a["hc_mult"],
        "hc_sinkhorn_iters": a["hc_sinkhorn_iters"],
        "head_dim": a["head_dim"],
        "hidden_act": "silu",
        "hidden_size": a["dim"],
        "index_head_dim": a["index_head_dim"],
        "index_n_heads": a["index_n_heads"],
        "index_topk": a["index_topk"],
        "initializer_range": 0.02,
        "max_position_embeddings": a["original_seq_len"] * a["rope_factor"],
        "moe_intermediate_size": a["moe_inter_dim"],
        "n_routed_experts": a["n_routed_experts"],
        "n_shared_experts": a["n_shared_experts"],
        "norm_topk_prob": True,
        "num_attention_heads": a["n_heads"],
        "num_experts_per_tok": a["n_activated_experts"],
        "num_hash_layers": a["n_hash_layers"],
        "num_hidden_layers": a["n_layers"],
        "num_key_value_heads": 1,
        "num_nextn_predict_layers": len(a["compress_ratios"]) - a["n_layers"],
        "o_groups": a["o_groups"],
        "o_lora_rank": a["o_lora_rank"],
        "q_lora_rank": a["q_lora_rank"],
        "qk_rope_head_dim": a["rope_head_dim"],
        "quantization_config": {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "scale_fmt": a["scale_fmt"],
            "weight_block_size": [128, 128],
        },
        "rms_norm_eps": 1e-6,
        "rope_scaling": {
            "beta_fast": a["beta_fast"],
            "beta_slow": a["beta_slow"],
            "factor": a["rope_factor"],
            "original_max_position_embeddings": a["original_seq_len"],
            "type": "yarn",
        },
        "rope_theta": a["rope_theta"],
        "routed_scaling_factor": a["route_scale"],
        "scoring_func": a["score_func"],
        "sliding_window": a["window_size"],
        "swiglu_limit": a["swiglu_limit"],
        "tie_word_embeddings": False,
        "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": a["vocab_size"],
    }


# ---------------------------------------------------------------------------------------------------
# number formats (stored bytes + the exact float32 values they decode to)
# ---------------------------------------------------------------------------------------------------

E2M1_GRID = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=np.float32)


def bf16_round(x):
    """Round float32 to bfloat16 (nearest even); returns (uint16 bits, float32 values)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return rounded, (rounded.astype(np.uint32) << 16).view(np.float32)


def ue8m0_exponent(amax, fmt_max, floor):
    """REF's scale rule: s = 2^ceil(log2(max(amax, floor) * f32(1/fmt_max))), as the e8m0 byte."""
    t = np.maximum(amax.astype(np.float32), np.float32(floor)) * np.float32(1.0 / fmt_max)
    bits = t.astype(np.float32).view(np.uint32)
    return (((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0)).astype(np.uint8)


def e8m0_value(exponent):
    return np.ldexp(np.float32(1.0), exponent.astype(np.int32) - 127).astype(np.float32)


def quantize_fp8_block(w):
    """e4m3 weight with one ue8m0 scale per 128x128 block; returns (e4m3 bytes, e8m0 bytes, values)."""
    import torch

    rows, cols = w.shape
    br, bc = -(-rows // 128), -(-cols // 128)
    padded = np.zeros((br * 128, bc * 128), dtype=np.float32)
    padded[:rows, :cols] = w
    amax = np.abs(padded.reshape(br, 128, bc, 128)).max(axis=(1, 3))
    exponent = ue8m0_exponent(amax, 448.0, 1e-4)
    scale = np.repeat(np.repeat(e8m0_value(exponent), 128, 0), 128, 1)[:rows, :cols]
    q = torch.from_numpy(np.ascontiguousarray(w / scale)).to(torch.float8_e4m3fn)
    q_bytes = q.view(torch.uint8).numpy().copy()
    values = q.to(torch.float32).numpy() * scale
    return q_bytes, exponent, values.astype(np.float32)


def e2m1_code(x):
    """Round to the e2m1 grid (nearest, ties to the even code) and return 4-bit codes, sign in bit 3."""
    a = np.minimum(np.abs(x), np.float32(6.0))
    mid = (E2M1_GRID[1:] + E2M1_GRID[:-1]) / 2
    code = np.searchsorted(mid, a, side="left").astype(np.uint8)
    tie = (code < 7) & (a == mid[np.minimum(code, 6)])
    code = np.where(tie & (code % 2 == 1), code + 1, code).astype(np.uint8)
    return code | (np.signbit(x) & (code != 0)).astype(np.uint8) << 3


def quantize_fp4_expert(w):
    """MXFP4: e2m1 pairs packed low nibble first into int8, one ue8m0 scale per 32 along the input."""
    rows, cols = w.shape
    groups = w.reshape(rows, cols // 32, 32)
    exponent = ue8m0_exponent(np.abs(groups).max(axis=2), 6.0, 6.0 * 2.0**-126)
    scale = e8m0_value(exponent)[:, :, None]
    code = e2m1_code(groups / scale).reshape(rows, cols)
    packed = (code[:, 0::2] | (code[:, 1::2] << 4)).astype(np.uint8)
    magnitude = E2M1_GRID[code & 7] * np.where(code & 8, -1.0, 1.0).astype(np.float32)
    values = (magnitude.reshape(rows, cols // 32, 32) * scale).reshape(rows, cols)
    return packed.view(np.int8), exponent, values.astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# random weights in the official layout
# ---------------------------------------------------------------------------------------------------


def release_kind(name):
    """How the release stores the official tensor `name`: FP8 (e4m3 + 128x128 ue8m0 scales), FP4 (MXFP4 experts),
    BF16, F32 or I64 (v4-architecture.md section 9)."""
    if name.endswith(".tid2eid"):
        return "I64"
    if ".experts." in name:
        return "FP4"
    if name.endswith(("_fn", "_base", "_scale", ".attn_sink", ".ape", ".gate.bias")):
        return "F32"
    if (name in ("embed.weight", "head.weight") or name.endswith(("norm.weight", ".gate.weight", ".weights_proj.weight"))
            or ".compressor." in name):
        return "BF16"
    return "FP8"


class Checkpoint:
    """Official tensors: name -> (safetensors dtype, stored array); plus the float32 value of each weight."""

    def __init__(self, rng):
        self.rng = rng
        self.stored = {}
        self.values = {}

    def normal(self, shape, std):
        return (self.rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(np.float32)

    def f32(self, name, x):
        self.stored[name] = ("F32", x.astype(np.float32))
        self.values[name] = x.astype(np.float32)

    def bf16(self, name, x):
        bits, values = bf16_round(x)
        self.stored[name] = ("BF16", bits)
        self.values[name] = values

    def norm(self, name, size):
        self.bf16(name, 1.0 + self.normal((size,), 0.2))

    def put_fp8(self, name, w):
        q, exponent, values = quantize_fp8_block(w)
        self.stored[f"{name}.weight"] = ("F8_E4M3", q)
        self.stored[f"{name}.scale"] = ("F8_E8M0", exponent)
        self.values[f"{name}.weight"] = values

    def put_fp4(self, name, w):
        packed, exponent, values = quantize_fp4_expert(w)
        self.stored[f"{name}.weight"] = ("I8", packed)
        self.stored[f"{name}.scale"] = ("F8_E8M0", exponent)
        self.values[f"{name}.weight"] = values

    def put(self, name, x):
        """Store a float32 tensor under its official name in the release's format for that name."""
        kind = release_kind(name)
        if kind == "I64":
            self.stored[name] = ("I64", np.asarray(x, dtype=np.int64))
        elif kind in ("FP8", "FP4"):
            (self.put_fp8 if kind == "FP8" else self.put_fp4)(name[: -len(".weight")], x)
        else:
            (self.f32 if kind == "F32" else self.bf16)(name, np.asarray(x, dtype=np.float32))

    def fp8(self, name, out_dim, in_dim, std):
        self.put_fp8(name, self.normal((out_dim, in_dim), std))

    def fp4(self, name, out_dim, in_dim, std):
        self.put_fp4(name, self.normal((out_dim, in_dim), std))

    def hyper_connection(self, prefix, n_out, a):
        width = a["hc_mult"] * a["dim"]
        # fn@x over the rms-normalised 4-stream input has std ~ std*sqrt(width): keep mixes O(1)
        self.f32(f"{prefix}_fn", self.normal((n_out, width), 1.0 / np.sqrt(width)))
        self.f32(f"{prefix}_base", self.normal((n_out,), 1.0))
        n_scales = 1 if n_out == a["hc_mult"] else 3
        self.f32(f"{prefix}_scale", self.rng.uniform(0.5, 1.5, n_scales).astype(np.float32))

    def compressor(self, prefix, d, ratio, dim):
        width = (2 if ratio == 4 else 1) * d
        self.bf16(f"{prefix}.wkv.weight", self.normal((width, dim), 1.0 / np.sqrt(dim)))
        self.bf16(f"{prefix}.wgate.weight", self.normal((width, dim), 2.0 / np.sqrt(dim)))
        self.f32(f"{prefix}.ape", self.normal((ratio, width), 1.0))
        self.norm(f"{prefix}.norm.weight", d)

    def block(self, p, layer_id, ratio, a):
        dim, hd, nh = a["dim"], a["head_dim"], a["n_heads"]
        inter, n_exp, k = a["moe_inter_dim"], a["n_routed_experts"], a["n_activated_experts"]
        self.norm(f"{p}.attn_norm.weight", dim)
        self.norm(f"{p}.ffn_norm.weight", dim)
        self.hyper_connection(f"{p}.hc_attn", (2 + a["hc_mult"]) * a["hc_mult"], a)
        self.hyper_connection(f"{p}.hc_ffn", (2 + a["hc_mult"]) * a["hc_mult"], a)
        self.f32(f"{p}.attn.attn_sink", self.normal((nh,), 1.0))
        self.fp8(f"{p}.attn.wq_a", a["q_lora_rank"], dim, 1.0 / np.sqrt(dim))
        self.norm(f"{p}.attn.q_norm.weight", a["q_lora_rank"])
        self.fp8(f"{p}.attn.wq_b", nh * hd, a["q_lora_rank"], 1.0 / np.sqrt(a["q_lora_rank"]))
        self.fp8(f"{p}.attn.wkv", hd, dim, 1.0 / np.sqrt(dim))
        self.norm(f"{p}.attn.kv_norm.weight", hd)
        group_in = nh * hd // a["o_groups"]
        self.fp8(f"{p}.attn.wo_a", a["o_groups"] * a["o_lora_rank"], group_in, 1.0 / np.sqrt(group_in))
        o_in = a["o_groups"] * a["o_lora_rank"]
        self.fp8(f"{p}.attn.wo_b", dim, o_in, 1.0 / np.sqrt(o_in))
        if ratio:
            self.compressor(f"{p}.attn.compressor", hd, ratio, dim)
        if ratio == 4:
            ihd, inh = a["index_head_dim"], a["index_n_heads"]
            self.fp8(f"{p}.attn.indexer.wq_b", inh * ihd, a["q_lora_rank"], 1.0 / np.sqrt(a["q_lora_rank"]))
            self.bf16(f"{p}.attn.indexer.weights_proj.weight", self.normal((inh, dim), 1.0 / np.sqrt(dim)))
            self.compressor(f"{p}.attn.indexer.compressor", ihd, ratio, dim)
        self.bf16(f"{p}.ffn.gate.weight", self.normal((n_exp, dim), 1.0 / np.sqrt(dim)))
        if layer_id < a["n_hash_layers"]:
            # k distinct experts per token id, like the release's table
            order = np.argsort(self.rng.random((a["vocab_size"], n_exp)), axis=1, kind="stable")
            self.stored[f"{p}.ffn.gate.tid2eid"] = ("I64", order[:, :k].astype(np.int64))
        else:
            self.f32(f"{p}.ffn.gate.bias", self.normal((n_exp,), 0.3))
        # w1/w3 std 0.6 over a unit-rms input gives pre-activations of std ~7: the +-10 clamps fire
        for e in range(n_exp):
            self.fp4(f"{p}.ffn.experts.{e}.w1", inter, dim, 0.6)
            self.fp4(f"{p}.ffn.experts.{e}.w3", inter, dim, 0.6)
            self.fp4(f"{p}.ffn.experts.{e}.w2", dim, inter, 0.1 / np.sqrt(inter))
        self.fp8(f"{p}.ffn.shared_experts.w1", inter, dim, 0.6)
        self.fp8(f"{p}.ffn.shared_experts.w3", inter, dim, 0.6)
        self.fp8(f"{p}.ffn.shared_experts.w2", dim, inter, 0.1 / np.sqrt(inter))


def build_checkpoint(a, seed):
    ck = Checkpoint(np.random.default_rng(seed))
    dim, vocab = a["dim"], a["vocab_size"]
    ck.bf16("embed.weight", ck.normal((vocab, dim), 1.0))
    for i in range(a["n_layers"]):
        ck.block(f"layers.{i}", i, a["compress_ratios"][i], a)
    ck.norm("norm.weight", dim)
    ck.hyper_connection("hc_head", a["hc_mult"], a)
    ck.bf16("head.weight", ck.normal((vocab, dim), 1.0 / np.sqrt(dim)))
    for m in range(len(a["compress_ratios"]) - a["n_layers"]):
        p = f"mtp.{m}"
        ck.block(p, a["n_layers"] + m, a["compress_ratios"][a["n_layers"] + m], a)
        ck.fp8(f"{p}.e_proj", dim, dim, 1.0 / np.sqrt(dim))
        ck.fp8(f"{p}.h_proj", dim, dim, 1.0 / np.sqrt(dim))
        ck.norm(f"{p}.enorm.weight", dim)
        ck.norm(f"{p}.hnorm.weight", dim)
        ck.norm(f"{p}.norm.weight", dim)
        ck.hyper_connection(f"{p}.hc_head", a["hc_mult"], a)
    kinds = {"F8_E4M3": "FP8", "I8": "FP4", "BF16": "BF16", "F32": "F32", "I64": "I64"}
    wrong = [n for n, (dtype, _) in ck.stored.items() if dtype != "F8_E8M0" and release_kind(n) != kinds[dtype]]
    if wrong:
        raise AssertionError(f"release_kind disagrees with the layout for {wrong}")
    return ck


# ---------------------------------------------------------------------------------------------------
# safetensors writer (own code so that the bytes are fully determined here)
# ---------------------------------------------------------------------------------------------------


def safetensors_bytes(tensors):
    header, chunks, offset = {}, [], 0
    for name in sorted(tensors):
        dtype, array = tensors[name]
        data = np.ascontiguousarray(array).tobytes()
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + b"".join(chunks)


def shard_of(name, n_layers):
    """Two shards, split mid-model as the release splits by layer: multi-shard readers get exercised."""
    if name.startswith("layers."):
        return 0 if int(name.split(".")[1]) < n_layers // 2 else 1
    return 0 if name.startswith("embed.") else 1


def write_atomic(path, data):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def write_checkpoint(out, ck, a):
    files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    shards = [{}, {}]
    for name, entry in ck.stored.items():
        shards[shard_of(name, a["n_layers"])][name] = entry
    weight_map, total = {}, 0
    for fname, tensors in zip(files, shards):
        write_atomic(out / fname, safetensors_bytes(tensors))
        for name, (_, array) in tensors.items():
            weight_map[name] = fname
            total += array.nbytes
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    write_atomic(out / "model.safetensors.index.json", (json.dumps(index, indent=2) + "\n").encode())


# ---------------------------------------------------------------------------------------------------
# tokenizer: small byte-level BPE with V4's pre-tokenizer and special tokens
# ---------------------------------------------------------------------------------------------------

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
CHAT_TOKENS = ("<｜User｜>", "<｜Assistant｜>", "<think>", "</think>")
SPLIT_REGEXES = (
    r"\p{N}{1,3}",
    "[一-龥぀-ゟ゠-ヿ]+",
    r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
)

TRAINING_TEXT = """\
The lighthouse keeper wrote in his log every evening at seven. The wind came from the north-west, the sea
was heavy, and the lamp was lit at 18:42. Three ships passed before midnight: a trawler, a ferry bound for
the islands, and a small sailing boat that kept close to the rocks. He noted their lights, their headings and
the time each one crossed the line between the two buoys. In the morning he cleaned the lens, trimmed the
wick, and carried oil up the one hundred and twelve steps of the tower.

def count_words(text: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for word in text.lower().split():
        word = word.strip(".,;:!?\\"'()[]{}")
        if word:
            counts[word] = counts.get(word, 0) + 1
    return counts

if __name__ == "__main__":
    print(sorted(count_words(open("log.txt").read()).items(), key=lambda kv: -kv[1])[:10])

Prices rose by 3.5% in March, 2.75% in April and 12% over the whole year; the index closed at 1,024.68 on
the 31st. A kilogram of flour cost 1.20, a litre of milk 0.89 and a dozen eggs 3.15. "Will it last?" asked
the reporter. 'Nobody knows,' said the minister, "but we are watching it closely."

Mathematics is the art of giving the same name to different things. Let x = 2y + 3 and y = 4; then x = 11.
The sum of the first n odd numbers is n^2, and the sum 1 + 2 + ... + n equals n(n+1)/2 for every n >= 1.

東京は日本の首都です。ひらがなとカタカナと漢字を使います。今日は天気がいいですね。
我们今天学习中文。这是一个小小的测试，用来训练分词器。山高水长，天下为公。

She opened the window, listened to the rain on the roof, and thought about the letters she had not yet
answered. There were seventeen of them, some from old friends, some from people she had never met. Each one
asked a question she could not answer quickly: what to read, where to travel, whom to trust, how to begin.
"""

PROMPT_TEXT = """\
The keeper, Mr. Olsen, starts each evening by checking the oil, the wick and the lens. At 18:42 the lamp is
lit; at 23:05 the wind turns to the north-west and the sea grows heavy. Three ships pass: a trawler heading
east, a ferry bound for the islands, and a small sailing boat close to the rocks. He writes their lights and
headings in the log, then climbs the 112 steps again at dawn to clean the glass.

def summarize(log: list[str]) -> str:
    ships = [line for line in log if "ship" in line.lower()]
    return f"{len(ships)} ships, first at {ships[0][:5]}" if ships else "no ships"

灯台の守り人。我们看灯塔。
"Is the light still needed?" asked the inspector. 'Every night,' said Mr. Olsen."""


def build_tokenizer(vocab_size, texts=(TRAINING_TEXT, PROMPT_TEXT)):
    """A byte-level BPE of vocab_size ids trained on texts: V4's pre-tokenizer, BOS/EOS/pad first, the four chat
    markers last; returns the tokenizer.json text."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated", invert=False) for r in SPLIT_REGEXES]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    specials = [AddedToken(t, special=True, normalized=False) for t in (BOS, EOS, PAD)]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(CHAT_TOKENS),
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    if tok.get_vocab_size() != vocab_size - len(CHAT_TOKENS):
        raise RuntimeError(f"BPE training gave {tok.get_vocab_size()} ids; the training text is too short")
    tok.add_tokens([AddedToken(t, special=False, normalized=True) for t in CHAT_TOKENS])
    spec = json.loads(tok.to_str())
    # Lay the file out as the release's tokenizer.json does: empty normalizer sequence, string merges,
    # ByteLevel post-processor.
    spec["normalizer"] = {"type": "Sequence", "normalizers": []}
    spec["post_processor"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
    spec["model"]["merges"] = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return json.dumps(spec, ensure_ascii=False, indent=2) + "\n"


def tokenizer_config():
    def token(content):
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
                "rstrip": False, "single_word": False}

    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": token(BOS),
        "clean_up_tokenization_spaces": False,
        "eos_token": token(EOS),
        "legacy": True,
        "model_max_length": 1048576,
        "pad_token": token(EOS),
        "sp_model_kwargs": {},
        "unk_token": None,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def prompt_ids(tokenizer_json):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    text = BOS + CHAT_TOKENS[0] + PROMPT_TEXT + CHAT_TOKENS[1] + CHAT_TOKENS[2]
    ids = tok.encode(text, add_special_tokens=False).ids
    if tok.decode(ids, skip_special_tokens=False) != text:
        raise RuntimeError("tokenizer does not round-trip the prompt")
    return np.array(ids, dtype=np.int32)


# ---------------------------------------------------------------------------------------------------
# the transformers reference model
# ---------------------------------------------------------------------------------------------------

HF_LEAF_NAMES = (
    (".attn_norm.weight", ".input_layernorm.weight"),
    (".ffn_norm.weight", ".post_attention_layernorm.weight"),
    (".hc_attn_fn", ".attn_hc.fn"), (".hc_attn_base", ".attn_hc.base"), (".hc_attn_scale", ".attn_hc.scale"),
    (".hc_ffn_fn", ".ffn_hc.fn"), (".hc_ffn_base", ".ffn_hc.base"), (".hc_ffn_scale", ".ffn_hc.scale"),
    (".attn.attn_sink", ".self_attn.sinks"),
    (".attn.wq_a.weight", ".self_attn.q_a_proj.weight"),
    (".attn.q_norm.weight", ".self_attn.q_a_norm.weight"),
    (".attn.wq_b.weight", ".self_attn.q_b_proj.weight"),
    (".attn.wkv.weight", ".self_attn.kv_proj.weight"),
    (".attn.kv_norm.weight", ".self_attn.kv_norm.weight"),
    (".attn.wo_a.weight", ".self_attn.o_a_proj.weight"),
    (".attn.wo_b.weight", ".self_attn.o_b_proj.weight"),
    (".attn.compressor.wkv.weight", ".self_attn.compressor.kv_proj.weight"),
    (".attn.compressor.wgate.weight", ".self_attn.compressor.gate_proj.weight"),
    (".attn.compressor.ape", ".self_attn.compressor.position_bias"),
    (".attn.compressor.norm.weight", ".self_attn.compressor.kv_norm.weight"),
    (".attn.indexer.wq_b.weight", ".self_attn.compressor.indexer.q_b_proj.weight"),
    (".attn.indexer.weights_proj.weight", ".self_attn.compressor.indexer.scorer.weights_proj.weight"),
    (".attn.indexer.compressor.wkv.weight", ".self_attn.compressor.indexer.kv_proj.weight"),
    (".attn.indexer.compressor.wgate.weight", ".self_attn.compressor.indexer.gate_proj.weight"),
    (".attn.indexer.compressor.ape", ".self_attn.compressor.indexer.position_bias"),
    (".attn.indexer.compressor.norm.weight", ".self_attn.compressor.indexer.kv_norm.weight"),
    (".ffn.gate.weight", ".mlp.gate.weight"),
    (".ffn.gate.bias", ".mlp.gate.e_score_correction_bias"),
    (".ffn.gate.tid2eid", ".mlp.gate.tid2eid"),
    (".ffn.shared_experts.w1.weight", ".mlp.shared_experts.gate_proj.weight"),
    (".ffn.shared_experts.w3.weight", ".mlp.shared_experts.up_proj.weight"),
    (".ffn.shared_experts.w2.weight", ".mlp.shared_experts.down_proj.weight"),
)
HF_ROOT_NAMES = {
    "embed.weight": "model.embed_tokens.weight",
    "head.weight": "lm_head.weight",
    "norm.weight": "model.norm.weight",
    "hc_head_fn": "model.hc_head.hc_fn",
    "hc_head_base": "model.hc_head.hc_base",
    "hc_head_scale": "model.hc_head.hc_scale",
}


def hf_state_dict(ck, a):
    """transformers' parameter names for the dequantized official tensors (MTP has no HF counterpart)."""
    import torch

    values = dict(ck.values)
    for name, (dtype, array) in ck.stored.items():
        if dtype == "I64":
            values[name] = array
    state = {hf: torch.from_numpy(values[off].copy()) for off, hf in HF_ROOT_NAMES.items()}
    for i in range(a["n_layers"]):
        p = f"layers.{i}"
        for off, hf in HF_LEAF_NAMES:
            if p + off in values:
                state[f"model.{p}{hf}"] = torch.from_numpy(values[p + off].copy())
        experts = range(a["n_routed_experts"])
        gate_up = [np.concatenate([values[f"{p}.ffn.experts.{e}.w1.weight"],
                                   values[f"{p}.ffn.experts.{e}.w3.weight"]]) for e in experts]
        state[f"model.{p}.mlp.experts.gate_up_proj"] = torch.from_numpy(np.stack(gate_up))
        state[f"model.{p}.mlp.experts.down_proj"] = torch.from_numpy(
            np.stack([values[f"{p}.ffn.experts.{e}.w2.weight"] for e in experts]))
    return state


def deterministic_torch():
    import torch

    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    return torch


def reference_model(out, ck, a):
    torch = deterministic_torch()
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    config = DeepseekV4Config.from_pretrained(out)
    config._attn_implementation = "eager"
    model = DeepseekV4ForCausalLM(config).to(torch.float32).eval()
    model.load_state_dict(hf_state_dict(ck, a), strict=True)
    return model


class DecisionRecorder:
    """Forward hooks that record every top-k choice and its k-th vs (k+1)-th margin per position."""

    def __init__(self, model, a):
        from transformers.models.deepseek_v4 import modeling_deepseek_v4 as m

        self.a = a
        self.handles = []
        self.experts, self.indexer, self.gaps = {}, {}, []
        for i, layer in enumerate(model.model.layers):
            gate = layer.mlp.gate
            scored = isinstance(gate, m.DeepseekV4TopKRouter)
            self.handles.append(gate.register_forward_hook(self._router_hook(i, scored)))
            compressor = layer.self_attn.compressor
            if isinstance(compressor, m.DeepseekV4CSACompressor):
                self.handles.append(compressor.indexer.scorer.register_forward_hook(self._scorer_hook()))
                self.handles.append(compressor.indexer.register_forward_hook(self._indexer_hook(i)))

    def reset(self, seq_len):
        self.experts, self.indexer = {}, {}
        self.gaps = [np.full(seq_len, np.inf, dtype=np.float64)]

    def _record_gap(self, scores, k):
        """scores [S, n] float64, -inf where not a candidate; gap = (k-th - (k+1)-th) / (max - min)."""
        n_valid = np.isfinite(scores).sum(axis=1)
        ordered = -np.sort(-scores, axis=1)
        gap = np.full(scores.shape[0], np.inf)
        for s in np.nonzero(n_valid > k)[0]:
            row = ordered[s, : n_valid[s]]
            spread = row[0] - row[-1]
            gap[s] = (row[k - 1] - row[k]) / spread if spread > 0 else 0.0
        self.gaps.append(gap)

    def _router_hook(self, layer, scored):
        def hook(module, inputs, output):
            import torch.nn.functional as F

            _, _, indices = output
            self.experts[layer] = np.sort(indices.numpy(), axis=1)
            if scored:
                flat = inputs[0].reshape(-1, module.hidden_dim)
                biased = module.score_fn(F.linear(flat, module.weight)) + module.e_score_correction_bias
                self._record_gap(biased.double().numpy(), module.top_k)

        return hook

    def _scorer_hook(self):
        def hook(module, inputs, output):
            scores = output[0].double().numpy()
            seq_len, n_rows = scores.shape
            visible = (np.arange(seq_len)[:, None] + 1) // 4 > np.arange(n_rows)[None, :]
            self._record_gap(np.where(visible, scores, -np.inf), self.a["index_topk"])

        return hook

    def _indexer_hook(self, layer):
        def hook(module, inputs, output):
            self.indexer[layer] = np.sort(output[0].numpy(), axis=1)

        return hook

    def decision_gap(self):
        return np.min(np.stack(self.gaps), axis=0)


def hidden_recorder(model):
    """Hooks capturing H [T, hc, dim] after every sublayer: the ffn_hc input and each layer's output."""
    captured = []
    handles = []
    for layer in model.model.layers:
        handles.append(layer.ffn_hc.register_forward_pre_hook(lambda mod, args: captured.append(args[0][0].clone())))
        handles.append(layer.register_forward_hook(lambda mod, args, out: captured.append(out[0].clone())))
    return captured, handles


def run_goldens(model, ids, a):
    torch = deterministic_torch()
    recorder = DecisionRecorder(model, a)
    captured, handles = hidden_recorder(model)
    with torch.no_grad():
        recorder.reset(len(ids))
        embed = model.model.embed_tokens(torch.from_numpy(ids.astype(np.int64))[None])[0]
        logits = model(torch.from_numpy(ids.astype(np.int64))[None], use_cache=False).logits[0].numpy()
        positions = np.array([p for p in HIDDEN_POSITIONS if p < len(ids)], dtype=np.int32)
        hidden = np.stack([embed.numpy()[positions][:, None, :].repeat(a["hc_mult"], axis=1)]
                          + [h.numpy()[positions] for h in captured])
        decision_gap = recorder.decision_gap()
        expert_ids = np.stack([recorder.experts[i] for i in range(a["n_layers"])]).astype(np.int32)
        indexer_ids = np.stack([recorder.indexer[i] for i in sorted(recorder.indexer)]).astype(np.int32)
        for h in handles:
            h.remove()

        sequence = list(ids)
        greedy_ids, greedy_logits, greedy_gap = [], [logits[-1]], [decision_gap[-1]]
        for step in range(N_GREEDY):
            token = int(np.argmax(greedy_logits[-1]))
            greedy_ids.append(token)
            if step == N_GREEDY - 1:
                break
            sequence.append(token)
            recorder.reset(len(sequence))
            step_logits = model(torch.tensor([sequence]), use_cache=False).logits[0, -1].numpy()
            greedy_logits.append(step_logits)
            greedy_gap.append(recorder.decision_gap()[-1])
    for h in recorder.handles:
        h.remove()
    return {
        "prompt_ids": ids.astype(np.int32),
        "logits": logits.astype(np.float32),
        "decision_gap": decision_gap.astype(np.float32),
        "greedy_ids": np.array(greedy_ids, dtype=np.int32),
        "greedy_logits": np.stack(greedy_logits).astype(np.float32),
        "greedy_decision_gap": np.array(greedy_gap, dtype=np.float32),
        "expert_ids": expert_ids,
        "indexer_ids": indexer_ids,
        "indexer_layers": np.array(sorted(recorder.indexer), dtype=np.int32),
        "hidden_positions": positions,
        "hidden": hidden.astype(np.float32),
    }


# ---------------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------------


def npz_bytes(arrays):
    """An .npz numpy.load reads, with fixed zip timestamps so that the bytes are reproducible."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            archive.writestr(info, member.getvalue())
    return buffer.getvalue()


def versions():
    import tokenizers
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__, "numpy": np.__version__}


README = """\
# tiny_v4: reference fixture for DeepSeek V4 (generated, do not edit)

Regenerate bit for bit with `python tools/make_reference.py` (needs `pip install -e .[dev]`).
Made with {versions}, seed {seed}. See docs/oracle.md for what the goldens mean.

- `config.json`: root config in the release's format (`compress_ratios` incl. the MTP entry,
  `num_hash_layers`, `qk_rope_head_dim`, yarn `rope_scaling`, `expert_dtype`, `quantization_config`).
- `inference/config.json`: the same model in DeepSeek's inference `ModelArgs` keys.
- `model-0000{{1,2}}-of-00002.safetensors` + `model.safetensors.index.json`: official tensor names; FP8 e4m3
  linears with ue8m0 128x128 `.scale`; routed experts MXFP4 (int8, e2m1 low nibble first, e8m0 per 32);
  BF16 norms/embed/head/compressors/gate/weights_proj; F32 hc_*, attn_sink, ape, gate.bias; I64 tid2eid.
  Includes the MTP block `mtp.0.*` (no golden: transformers does not implement MTP).
- `tokenizer.json`, `tokenizer_config.json`: byte-level BPE, {vocab} ids, V4 pre-tokenizer; ids 0/1/2 are
  BOS/EOS/pad, the last four are <｜User｜> <｜Assistant｜> <think> </think>.
- `goldens.npz` (float32 unless noted; transformers DeepseekV4ForCausalLM, float32, eager, uncached):
  - `prompt_ids` int32 [{T}]: BOS <｜User｜> text <｜Assistant｜> <think>.
  - `logits` [{T}, {vocab}]: every prompt position.
  - `decision_gap` [{T}]: per position the smallest (k-th - (k+1)-th)/(max - min) over every top-k decision
    (score-routed experts, indexer selections); +inf when none. {near} positions are below 1e-2 and {tie} below
    1e-4: judge exactness away from them.
  - `greedy_ids` int32 [{N}], `greedy_logits` [{N}, {vocab}], `greedy_decision_gap` [{N}]: greedy continuation;
    row i of `greedy_logits` produced `greedy_ids[i]` (row 0 is `logits[-1]`), computed over the prompt plus
    `greedy_ids[:i]` with a fresh uncached forward.
  - `expert_ids` int32 [layers, {T}, top-k] (sorted per row), `indexer_ids` int32 [CSA layers, {T}, index_topk]
    (sorted, -1 = no entry) for the layers in `indexer_layers`.
  - `hidden` [2*layers+1, P, hc, dim]: the residual streams H after the embedding and after every sublayer
    (attention, then FFN, per layer) at the prompt positions `hidden_positions` [P].
"""


def generate(out, seed=SEED):
    out.mkdir(parents=True, exist_ok=True)
    (out / "inference").mkdir(exist_ok=True)
    a = REF_ARGS
    write_atomic(out / "config.json", (json.dumps(root_config(a), indent=2) + "\n").encode())
    write_atomic(out / "inference" / "config.json", (json.dumps(a, indent=4) + "\n").encode())
    tokenizer_json = build_tokenizer(a["vocab_size"])
    write_atomic(out / "tokenizer.json", tokenizer_json.encode())
    tok_config = json.dumps(tokenizer_config(), ensure_ascii=False, indent=2) + "\n"
    write_atomic(out / "tokenizer_config.json", tok_config.encode())
    ck = build_checkpoint(a, seed)
    write_checkpoint(out, ck, a)
    model = reference_model(out, ck, a)
    goldens = run_goldens(model, prompt_ids(tokenizer_json), a)
    write_atomic(out / "goldens.npz", npz_bytes(goldens))
    gap = goldens["decision_gap"]
    text = README.format(versions=", ".join(f"{k} {v}" for k, v in versions().items()), seed=seed,
                         vocab=a["vocab_size"], T=len(goldens["prompt_ids"]), N=N_GREEDY,
                         near=int((gap < 1e-2).sum()), tie=int((gap < 1e-4).sum()))
    write_atomic(out / "README.md", text.encode())
    return model, goldens


def verify(out, goldens):
    """Reload the written folder with transformers' own FP8/FP4 loader and require identical logits."""
    torch = deterministic_torch()
    from transformers import DeepseekV4ForCausalLM, FineGrainedFP8Config

    quant = FineGrainedFP8Config(dequantize=True, scale_fmt="ue8m0", expert_dtype="fp4")
    model = DeepseekV4ForCausalLM.from_pretrained(out, quantization_config=quant, dtype=torch.float32,
                                                  attn_implementation="eager").eval()
    ids = torch.from_numpy(goldens["prompt_ids"].astype(np.int64))[None]
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits[0].numpy()
        generated = model.generate(ids, max_new_tokens=N_GREEDY, do_sample=False)[0, ids.shape[1]:].numpy()
    identical = np.array_equal(logits, goldens["logits"])
    print(f"official-layout reload: logits bit-identical {identical}, "
          f"max |diff| {np.abs(logits - goldens['logits']).max():.3g}; "
          f"cached generate == greedy_ids {np.array_equal(generated, goldens['greedy_ids'])}")
    return identical and np.array_equal(generated, goldens["greedy_ids"])


def sha256_tree(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    parser.add_argument("--verify", action="store_true",
                        help="reload the folder with transformers' FineGrainedFP8Config loader and compare")
    args = parser.parse_args(argv)
    _, goldens = generate(args.out)
    for name, digest in sha256_tree(args.out).items():
        print(f"{digest}  {name}")
    if args.verify and not verify(args.out, goldens):
        sys.exit(1)


if __name__ == "__main__":
    main()
