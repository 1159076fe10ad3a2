"""Write a synthetic DeepSeek V4 checkpoint in the release's layout, fast, from random bytes in the right formats.

`--preset flash` has V4-Flash's real widths (hidden 4096, 64 heads of 512, 129280 vocab, experts 2048 wide) with
the number of layers and routed experts you choose; `--preset tiny` is a few MB for tests. `--mtp` adds the release's
MTP block (`mtp.0.*`, num_nextn_predict_layers 1), which `flashlite quantize --mtp` turns into a draft GGUF. The weights are noise
(e4m3 bytes with e8m0 128x128 scales, packed e2m1 experts with per-32 scales, bf16 norms and embeddings, f32
hyper-connections) and exist to exercise converters: sizes, formats, streaming, memory. Tensors are written one
slab at a time, one shard per layer, so memory stays small whatever the size.

    python tools/make_synthetic.py OUT_DIR --preset flash --layers 2 --experts 64 [--mtp]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quant.gguf_meta import parse_hparams  # noqa: E402
from quant.layout import expected_tensors  # noqa: E402

CHUNK = 64 << 20
BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
SPLIT_REGEXES = (
    r"\p{N}{1,3}",
    "[一-龥぀-ゟ゠-ヿ]+",
    r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
)
FLASH_RATIOS = [0, 0] + [4, 128] * 20 + [4]
TINY_RATIOS = [0, 128, 4, 128, 4, 0]

PRESETS = {
    "flash": dict(vocab_size=129280, hidden_size=4096, num_attention_heads=64, head_dim=512, qk_rope_head_dim=64,
                  q_lora_rank=1024, o_groups=8, o_lora_rank=1024, sliding_window=128, index_n_heads=64,
                  index_head_dim=128, index_topk=512, num_experts_per_tok=6, moe_intermediate_size=2048,
                  num_hash_layers=3, max_position_embeddings=1048576,
                  rope_scaling=dict(type="yarn", factor=16, original_max_position_embeddings=65536,
                                    beta_fast=32, beta_slow=1)),
    "tiny": dict(vocab_size=512, hidden_size=256, num_attention_heads=4, head_dim=128, qk_rope_head_dim=64,
                 q_lora_rank=128, o_groups=2, o_lora_rank=128, sliding_window=16, index_n_heads=4,
                 index_head_dim=128, index_topk=4, num_experts_per_tok=2, moe_intermediate_size=256,
                 num_hash_layers=2, max_position_embeddings=1024,
                 rope_scaling=dict(type="yarn", factor=4, original_max_position_embeddings=64,
                                   beta_fast=32, beta_slow=1)),
}


def make_config(preset: str, n_layers: int, n_experts: int, mtp: bool = False) -> dict:
    p = dict(PRESETS[preset])
    pattern = FLASH_RATIOS if preset == "flash" else TINY_RATIOS
    ratios = [pattern[i % len(pattern)] for i in range(n_layers)] + [0]
    return {
        "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4",
        "bos_token_id": 0, "eos_token_id": 1, "compress_ratios": ratios, "compress_rope_theta": 160000,
        "expert_dtype": "fp4", "hc_eps": 1e-6, "hc_mult": 4, "hc_sinkhorn_iters": 20, "hidden_act": "silu",
        "n_routed_experts": n_experts, "n_shared_experts": 1, "norm_topk_prob": True,
        "num_hidden_layers": n_layers, "num_key_value_heads": 1, "num_nextn_predict_layers": int(mtp),
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "scale_fmt": "ue8m0", "weight_block_size": [128, 128]},
        "rms_norm_eps": 1e-6, "rope_theta": 10000, "routed_scaling_factor": 1.5, "scoring_func": "sqrtsoftplus",
        "swiglu_limit": 10.0, "tie_word_embeddings": False, "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16", **{**p, "num_experts_per_tok": min(p["num_experts_per_tok"], n_experts),
                                      "num_hash_layers": min(p["num_hash_layers"], n_layers)},
    }


def _byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for each byte, as byte-level BPE vocabularies spell them."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def make_tokenizer(vocab_size: int) -> dict:
    """A valid byte-level BPE tokenizer.json with V4's pre-tokenizer and special ids 0/1/2, padded to vocab_size."""
    specials = [BOS, EOS, PAD]
    symbols = _byte_symbols()
    vocab = {tok: i for i, tok in enumerate(specials)}
    for s in symbols:
        vocab[s] = len(vocab)
    letters = [s for s in symbols if s.isalpha() and s.isascii()]
    merges = []
    for a in letters:
        for b in letters:
            if len(vocab) >= vocab_size:
                break
            vocab[a + b] = len(vocab)
            merges.append([a, b])
    filler = 0
    while len(vocab) < vocab_size:
        vocab[f"Ġfiller{filler}"] = len(vocab)
        filler += 1
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for i, t in enumerate(specials)]
    splits = [{"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": False}
              for r in SPLIT_REGEXES]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": splits + [
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }


# ---------------------------------------------------------------------------------------------------
# tensors: (dtype, stored shape, generator of byte chunks)
# ---------------------------------------------------------------------------------------------------

FP8_LINEARS = ("e_proj.weight", "h_proj.weight", "attn.wq_a.weight", "attn.wq_b.weight", "attn.wkv.weight", "attn.wo_a.weight", "attn.wo_b.weight",
               "attn.indexer.wq_b.weight", "shared_experts.w1.weight", "shared_experts.w2.weight",
               "shared_experts.w3.weight")
F32_NAMES = ("hc_", "attn_sink", ".ape", "gate.bias")


def stored_tensors(config: dict) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Release name -> (safetensors dtype, stored shape), FP8 and FP4 scales included; the MTP block's too where
    the config has one (its window-only block after the trunk's, e_proj and h_proj FP8 as the release stores them)."""
    h = parse_hparams(config, Path("config.json"))
    shapes = expected_tensors(h)
    if h.n_mtp_layers:
        shapes.update({k: v for k, v in expected_tensors(h, mtp=True).items() if k.startswith("mtp.0.")})
    out = {}
    for name, shape in shapes.items():
        if ".experts." in name:
            out[name] = ("I8", (shape[0], shape[1] // 2))
            out[name[:-len(".weight")] + ".scale"] = ("F8_E8M0", (shape[0], shape[1] // 32))
        elif name.endswith(FP8_LINEARS):
            out[name] = ("F8_E4M3", shape)
            out[name[:-len(".weight")] + ".scale"] = ("F8_E8M0", tuple(-(-n // 128) for n in shape))
        elif name.endswith("tid2eid"):
            out[name] = ("I64", shape)
        elif any(k in name for k in F32_NAMES):
            out[name] = ("F32", shape)
        else:
            out[name] = ("BF16", shape)
    return out


ITEMSIZE = {"I8": 1, "F8_E8M0": 1, "F8_E4M3": 1, "I64": 8, "F32": 4, "BF16": 2}


def chunks(rng: np.random.Generator, dtype: str, shape: tuple[int, ...], n_experts: int):
    """Random bytes of a valid value of `dtype`, CHUNK bytes at a time."""
    total = math.prod(shape) * ITEMSIZE[dtype]
    for start in range(0, total, CHUNK):
        n = min(CHUNK, total - start)
        if dtype == "F8_E4M3":
            b = np.frombuffer(rng.bytes(n), np.uint8).copy()
            b[(b & 0x7F) == 0x7F] ^= 1  # 0x7F/0xFF are NaN in e4m3fn
            yield b
        elif dtype == "F8_E8M0":
            yield rng.integers(114, 124, n, dtype=np.uint8)
        elif dtype == "BF16":
            r = np.frombuffer(rng.bytes(n), np.uint16)
            yield (r & 0x807F) | ((120 + ((r >> 7) & 7)) << 7).astype(np.uint16)
        elif dtype == "F32":
            yield rng.standard_normal(n // 4, dtype=np.float32)
        elif dtype == "I64":
            yield rng.integers(0, n_experts, n // 8, dtype=np.int64)
        else:
            yield np.frombuffer(rng.bytes(n), np.uint8)


def write_shard(path: Path, tensors: dict, rng, n_experts: int) -> int:
    header, offset = {}, 0
    for name in sorted(tensors):
        dtype, shape = tensors[name]
        nbytes = math.prod(shape) * ITEMSIZE[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(len(text).to_bytes(8, "little") + text)
        for name in sorted(tensors):
            for chunk in chunks(rng, *tensors[name], n_experts):
                fh.write(memoryview(chunk).cast("B"))
    tmp.replace(path)
    return offset


def write_checkpoint(out: Path, preset: str, n_layers: int, n_experts: int, seed: int = 0,
                     log=lambda msg: None, mtp: bool = False) -> int:
    """Write config.json, tokenizer.json, shards and index into `out` (the MTP block in a last shard of its own with
    mtp); returns the tensor bytes written."""
    out.mkdir(parents=True, exist_ok=True)
    config = make_config(preset, n_layers, n_experts, mtp)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "tokenizer.json").write_text(json.dumps(make_tokenizer(config["vocab_size"]), ensure_ascii=False))
    stored = stored_tensors(config)
    groups: dict[str, dict] = {}
    for name, entry in stored.items():
        key = name.split(".")[1] if name.startswith("layers.") else name.split(".")[0] if name.startswith("mtp.") \
            else "globals"
        groups.setdefault(key, {})[name] = entry
    keys = sorted(groups, key=lambda k: -1 if k == "globals" else n_layers if k == "mtp" else int(k))
    rng = np.random.default_rng(seed)
    weight_map, total = {}, 0
    for i, key in enumerate(keys):
        fname = f"model-{i + 1:05d}-of-{len(keys):05d}.safetensors"
        total += write_shard(out / fname, groups[key], rng, n_experts)
        weight_map.update({name: fname for name in groups[key]})
        log(f"{fname}: {len(groups[key])} tensors, {total / 1e9:.2f} GB so far")
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="output folder")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="flash")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--experts", type=int, default=None, help="routed experts (default: 256 flash, 8 tiny)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mtp", action="store_true", help="also the MTP block mtp.0.* (for `flashlite quantize --mtp`)")
    args = ap.parse_args(argv)
    experts = args.experts or (256 if args.preset == "flash" else 8)
    if args.layers < 1 or experts < 1:
        ap.error("--layers and --experts must be positive")
    total = write_checkpoint(args.out, args.preset, args.layers, experts, args.seed, log=print, mtp=args.mtp)
    print(f"wrote {args.out}: {total / 1e9:.2f} GB of tensors")


if __name__ == "__main__":
    main()
