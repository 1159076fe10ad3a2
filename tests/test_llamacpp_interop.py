"""llama.cpp interop: the GGUF llama.cpp's own converter made of tiny_v4 (committed; tools/make_llamacpp_gguf.py)
against `flashlite quantize`'s GGUF of the same types. Same tensor bytes, bitwise-equal logits, the checkpoint's
values within each type's rounding, the goldens within Q8_0's reach, the same tokenizer; and llama.cpp's gguf-py
(from the llama-cpp-python sdist, when tools/make_llamacpp_gguf.py has cached it) reads our file as it reads theirs.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q, GGUFReader
from gguf.quants import dequantize
from tokenizer_corpus import corpus

from flashlite.chat.tokenizer import Tokenizer
from flashlite.model import load
from quant.gguf_meta import read_hparams
from quant.layout import INDEX, check_index, plan_tensors
from quant.safetensors_source import Checkpoint

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "tiny_v4"
THEIRS = ROOT / "tests" / "fixtures" / "llamacpp" / "tiny_v4-mxfp4_moe.gguf"
# llama.cpp's converter keeps BF16 matrices BF16, makes FP8 matrices Q8_0 and repacks FP4 experts to MXFP4; in
# tiny_v4 the BF16 matrices are the embedding, the head, the compressors, the indexer's weights_proj and the router
MATCHING_TYPES = ("--type", "mxfp4-q8_0", "--tensor-type",
                  r"^(token_embd|output)\.weight$|compressor_(kv|gate)|indexer\.proj|ffn_gate_inp=bf16")
# metadata that differs on purpose: key -> why
KEY_DIFFERENCES = {
    "general.name": "theirs title-cases the folder name ('Tiny_V4'), ours keeps it ('tiny_v4')",
    "general.size_label": "theirs only: gguf-py's parameter-count label ('8x2.7M')",
    "deepseek4.vocab_size": "ours only: llama.cpp reads it only for tokenizer model 'none' (llama-vocab.cpp)",
    "tokenizer.chat_template": "theirs is llama.cpp's models/templates/deepseek-ai-DeepSeek-V4.jinja, ours flashlite's",
}
CLEAR = 1e-2  # positions whose routing / indexer decisions are clear by 1% of the score spread
_CONVERTER_TOOL = ROOT / "tools" / "make_llamacpp_gguf.py"


@pytest.fixture(scope="module")
def ours(tiny_gguf):
    return tiny_gguf(*MATCHING_TYPES)


def _tensors(path: Path) -> dict:
    return {t.name: t for t in GGUFReader(path).tensors}


def _fields(path: Path) -> dict:
    return {k: f for k, f in GGUFReader(path).fields.items() if not k.startswith("GGUF.")}


def test_committed_file_is_llama_cpp_converter_output():
    fields = _fields(THEIRS)
    assert fields["general.architecture"].contents() == "deepseek4"
    assert fields["general.file_type"].contents() == 38  # MOSTLY_MXFP4_MOE, set by DeepseekV4Model
    assert fields["general.size_label"].contents() == "8x2.7M"  # written by gguf-py's Metadata, not by flashlite
    assert THEIRS.stat().st_size < 8 << 20


def test_every_tensor_has_our_name_type_shape_and_bytes(ours):
    theirs, mine = _tensors(THEIRS), _tensors(ours)
    assert sorted(theirs) == sorted(mine)
    differ = []
    for name, t in theirs.items():
        m = mine[name]
        if (t.tensor_type, list(t.shape)) != (m.tensor_type, list(m.shape)):
            differ.append(f"{name}: theirs {t.tensor_type.name} {[int(n) for n in t.shape]}, "
                          f"ours {m.tensor_type.name} {[int(n) for n in m.shape]}")
        elif np.asarray(t.data).tobytes() != np.asarray(m.data).tobytes():
            differ.append(f"{name}: {t.tensor_type.name} bytes differ")
    assert not differ, "\n".join(differ)
    types = {t.tensor_type for t in theirs.values()}
    assert types == {Q.F32, Q.BF16, Q.Q8_0, Q.MXFP4, Q.I32}


def test_their_tensors_are_the_checkpoint_values_within_each_types_rounding():
    """Decoded with gguf-py: F32, BF16, MXFP4 and I32 are exactly the checkpoint's values; Q8_0 is within half a
    step of each block, plus the f16 rounding of its scale (2^-11 relative) times the largest code 127."""
    theirs = _tensors(THEIRS)
    hparams = read_hparams(FIXTURE)
    ck = Checkpoint(FIXTURE)
    try:
        layout = plan_tensors(ck, hparams)
        assert {t.name for t in layout.tensors} == theirs.keys()
        for planned in layout.tensors:
            t = theirs[planned.name]
            shape = tuple(int(n) for n in reversed(t.shape))
            if planned.role == INDEX:
                np.testing.assert_array_equal(np.asarray(t.data), check_index(planned.parts[0], hparams))
                continue
            want = np.concatenate([p.f32_rows(0, math.prod(p.shape[:-1])) for p in planned.parts]).reshape(shape)
            have = (np.asarray(t.data) if t.tensor_type == Q.F32
                    else dequantize(np.asarray(t.data), t.tensor_type)).reshape(shape)
            if t.tensor_type != Q.Q8_0:
                np.testing.assert_array_equal(have, want, err_msg=planned.name)
                continue
            blocks = want.reshape(-1, 32)
            step = np.abs(blocks).max(axis=1, keepdims=True) / 127
            err = np.abs(have.reshape(-1, 32) - blocks)
            assert (err <= step * (0.5 + 127 * 2.0**-11) * (1 + 1e-6)).all(), planned.name
    finally:
        ck.close()


def test_metadata_keys_types_and_values_match_ours_but_the_documented_ones(ours):
    theirs, mine = _fields(THEIRS), _fields(ours)
    only = sorted(set(theirs) ^ set(mine))
    assert only == sorted(k for k in KEY_DIFFERENCES if (k in theirs) != (k in mine)), only
    differ = [k for k in set(theirs) & set(mine) if k not in KEY_DIFFERENCES
              and (theirs[k].types, theirs[k].contents()) != (mine[k].types, mine[k].contents())]
    assert not differ, differ
    assert theirs["general.name"].contents() != mine["general.name"].contents()
    assert theirs["tokenizer.chat_template"].contents() != mine["tokenizer.chat_template"].contents()


def test_logits_equal_ours_bitwise(ours, goldens):
    theirs = load(THEIRS).logits(goldens["prompt_ids"])
    mine = load(ours).logits(goldens["prompt_ids"])
    assert theirs.dtype == np.float32 and theirs.shape == goldens["logits"].shape
    np.testing.assert_array_equal(theirs, mine)


def test_logits_near_goldens_within_q8_0(goldens):
    """An end-to-end sanity bound (the exact checks are the two above): Q8_0 of FP8 weights, plus the fp8 KV cache
    a quantized model gets by default, move this random tiny model's logits (std 1.06) by a median 0.17 and flip
    near-tie routing; measured top-1 agreement 0.92 at the 143 clear positions (0.99 with an f32 cache). A misread
    tensor or key leaves next to nothing of that (1 in 512 by chance)."""
    logits = load(THEIRS).logits(goldens["prompt_ids"])
    clear = goldens["decision_gap"] > CLEAR
    delta = np.abs(logits - goldens["logits"]).max(axis=1)
    agree = (logits.argmax(1) == goldens["logits"].argmax(1))[clear].mean()
    print(f"llama.cpp GGUF: top-1 {agree:.4f} at {clear.sum()} clear positions, median max-|delta| "
          f"{np.median(delta):.3g}, max at clear {delta[clear].max():.3g}")
    assert agree >= 0.85
    assert np.median(delta) <= 0.3


def test_their_tokenizer_encodes_like_ours_and_hf(ours, goldens):
    hf_tokenizers = pytest.importorskip("tokenizers")
    hf = hf_tokenizers.Tokenizer.from_file(str(FIXTURE / "tokenizer.json"))
    theirs, mine = Tokenizer.from_gguf(str(THEIRS)), Tokenizer.from_gguf(str(ours))
    prompt = goldens["prompt_ids"].tolist()
    text = mine.decode(prompt)
    assert theirs.encode(text) == mine.encode(text) == prompt
    lines = corpus(300)
    want = [e.ids for e in hf.encode_batch(lines, add_special_tokens=False)]
    assert [theirs.encode(line) for line in lines] == want
    assert [mine.encode(line) for line in lines] == want


# ---------------------------------------------------------------- llama.cpp's own gguf-py

_THEIR_READER = r"""
import json, re, sys
gguf_py, paths = sys.argv[1], sys.argv[2:]
sys.path.insert(0, gguf_py)
import gguf
assert gguf.__file__.startswith(gguf_py), gguf.__file__
arch = gguf.MODEL_ARCH.DEEPSEEK4
known = set()
def collect(cls):
    for name, value in vars(cls).items():
        if isinstance(value, str) and not name.startswith("_"):
            known.add(value.replace("{arch}", gguf.MODEL_ARCH_NAMES[arch]))
        elif isinstance(value, type):
            collect(value)
collect(gguf.Keys)
tensor_names = re.compile("|".join(re.escape(gguf.TENSOR_NAMES[t]).replace(re.escape("{bid}"), r"\d+")
                                   for t in gguf.MODEL_TENSORS[arch]) + "$")
out = {}
for path in paths:
    r = gguf.GGUFReader(path)
    keys = {k: [t.name for t in f.types] for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: [t.tensor_type.name, [int(n) for n in t.shape]] for t in r.tensors}
    out[path] = {"keys": keys, "tensors": tensors,
                 "unknown_keys": sorted(k for k in keys if k not in known),
                 "unknown_tensors": sorted(n for n in tensors
                                           if not tensor_names.match(n.rsplit(".", 1)[0]))}
print(json.dumps(out))
"""


@functools.cache
def _converter_tool():
    spec = importlib.util.spec_from_file_location("make_llamacpp_gguf", _CONVERTER_TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def _their_tree() -> Path | None:
    """The llama.cpp tree in LLAMACPP_DIR, else the sdist's that tools/make_llamacpp_gguf.py cached."""
    tool = _converter_tool()
    if os.environ.get("LLAMACPP_DIR"):
        tree = Path(os.environ["LLAMACPP_DIR"])
        return tree if tool.is_converter_tree(tree) else None
    return tool.cached_converter()


def _require_tree() -> Path:
    tree = _their_tree()
    if tree is None:
        pytest.skip("llama.cpp's converter is not cached: run tools/make_llamacpp_gguf.py or set LLAMACPP_DIR")
    return tree


def test_committed_file_is_what_the_converter_makes_now(tmp_path):
    tree = _require_tree()
    for module in ("torch", "transformers"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"llama.cpp's converter needs {module} (pip install -e .[dev])")
    out = tmp_path / THEIRS.name
    _converter_tool().convert(tree, FIXTURE, out)
    assert out.read_bytes() == THEIRS.read_bytes()


def test_llama_cpp_gguf_py_reads_ours_with_their_keys_and_tensors(ours):
    gguf_py = _require_tree() / "gguf-py"
    result = subprocess.run([sys.executable, "-c", _THEIR_READER, str(gguf_py), str(THEIRS), str(ours)],
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""}, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    read = json.loads(result.stdout)
    theirs, mine = read[str(THEIRS)], read[str(ours)]
    assert mine["tensors"] == theirs["tensors"]
    assert mine["unknown_tensors"] == theirs["unknown_tensors"] == []
    assert mine["unknown_keys"] == theirs["unknown_keys"] == []
    shared = set(mine["keys"]) & set(theirs["keys"])
    assert {k: mine["keys"][k] for k in shared} == {k: theirs["keys"][k] for k in shared}
    assert sorted(set(mine["keys"]) ^ set(theirs["keys"])) == ["deepseek4.vocab_size", "general.size_label"]
