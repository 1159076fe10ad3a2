"""The GGUF tokenizer fields of a DeepSeek V4 checkpoint folder (tokenizer.json + tokenizer_config.json).

The fields follow llama.cpp's converter (conversion/base.py `get_vocab_base`, `_set_vocab_gpt2`, gguf-py
`SpecialVocab`): byte-level token strings for the BPE vocabulary, added tokens as their raw text, token types
CONTROL for special (or special-looking `<｜…｜>` / `<|…|>`) added tokens and USER_DEFINED for the other added
tokens, merges as "a b" strings. llama.cpp detects V4's pre-tokenizer as "joyai-llm".
"""
from __future__ import annotations

import json
from pathlib import Path

from gguf import GGUFValueType, TokenType

from flashlite.chat.template import JINJA_TEMPLATE

PRE_TOKENIZER = "joyai-llm"
# The three Split regexes of V4's tokenizer.json, in order; llama.cpp's "joyai-llm" uses the same ones.
PRE_TOKENIZER_REGEXES = (
    r"\p{N}{1,3}",
    r"[一-龥぀-ゟ゠-ヿ]+",
    ("[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
     "| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"),
)

_STR, _U32, _I32, _BOOL = GGUFValueType.STRING, GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.BOOL


class TokenizerFileError(ValueError):
    """A tokenizer.json / tokenizer_config.json that is missing or not a V4-style byte-level BPE."""


def _load_json(path: Path, required: bool):
    if not path.is_file():
        if required:
            raise TokenizerFileError(f"{path}: missing")
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerFileError(f"{path}: not readable JSON ({exc})") from exc


def _looks_special(text: str) -> bool:
    """llama.cpp's `does_token_look_special`: added tokens it makes CONTROL even when not marked special."""
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<｜") and text.endswith("｜>"))
            or (text.startswith("<unused") and text.endswith(">")))


def _unescape_line_breaks(regex: str) -> str:
    """The release spells CR/LF as raw characters, other writers as the escapes \\r \\n: the same regex."""
    return regex.replace("\\r", "\r").replace("\\n", "\n")


def _check_pre_tokenizer(pre: dict, path: Path) -> None:
    """Refuse tokenizers whose pre-tokenizer is not V4's: the runtime hard-codes those regexes."""
    steps = pre.get("pretokenizers", []) if isinstance(pre, dict) else []
    regexes = tuple(_unescape_line_breaks(s.get("pattern", {}).get("Regex") or "")
                    for s in steps if s.get("type") == "Split")
    if regexes != PRE_TOKENIZER_REGEXES or not steps or steps[-1].get("type") != "ByteLevel":
        raise TokenizerFileError(f"{path}: pre_tokenizer is not DeepSeek V4's (Split x3 + ByteLevel): {regexes}")


def _special_id(config: dict | None, name: str, ids: dict[str, int], default: int) -> int:
    value = (config or {}).get(name)
    if isinstance(value, dict):
        value = value.get("content")
    if value is None:
        return default
    if value not in ids:
        raise TokenizerFileError(f"tokenizer_config.json: {name} {value!r} is not in the vocabulary")
    return ids[value]


def tokenizer_fields(src_dir: str | Path, vocab_size: int | None = None) -> dict[str, object]:
    """The `tokenizer.*` GGUF fields of the checkpoint folder `src_dir`, as plain Python values.

    `vocab_size` (config.json's) pads the token list with "[PAD<i>]" UNUSED entries as llama.cpp does; the
    default is one past the highest id. The dict is also what `flashlite.chat.tokenizer.Tokenizer.from_gguf` accepts."""
    src = Path(src_dir)
    tj_path = src / "tokenizer.json"
    tj = _load_json(tj_path, required=True)
    config = _load_json(src / "tokenizer_config.json", required=False)
    model = tj.get("model", {}) if isinstance(tj, dict) else {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise TokenizerFileError(f"{tj_path}: model is not a BPE with a vocab")
    _check_pre_tokenizer(tj.get("pre_tokenizer"), tj_path)

    id_to_text: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    added: dict[int, dict] = {}
    for entry in tj.get("added_tokens", []):
        added[int(entry["id"])] = entry
        id_to_text[int(entry["id"])] = entry["content"]
    n = max(id_to_text) + 1 if vocab_size is None else int(vocab_size)
    if n <= max(id_to_text):
        raise TokenizerFileError(f"{tj_path}: token id {max(id_to_text)} is not below vocab_size {n}")

    tokens: list[str] = []
    types: list[int] = []
    for i in range(n):
        text = id_to_text.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(int(TokenType.UNUSED))
        elif i in added:
            tokens.append(text)
            special = added[i].get("special", False) or _looks_special(text)
            types.append(int(TokenType.CONTROL if special else TokenType.USER_DEFINED))
        else:
            tokens.append(text)
            types.append(int(TokenType.NORMAL))

    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    ids = {t: i for i, t in enumerate(tokens)}
    bos = _special_id(config, "bos_token", ids, 0)
    eos = _special_id(config, "eos_token", ids, 1)
    pad = _special_id(config, "pad_token", ids, eos)
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": PRE_TOKENIZER,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": bos,
        "tokenizer.ggml.eos_token_id": eos,
        "tokenizer.ggml.padding_token_id": pad,
        "tokenizer.ggml.add_bos_token": bool((config or {}).get("add_bos_token", False)),
        "tokenizer.ggml.add_eos_token": bool((config or {}).get("add_eos_token", False)),
        "tokenizer.chat_template": (config or {}).get("chat_template") or JINJA_TEMPLATE,
    }


_VALUE_TYPES = {
    "tokenizer.ggml.model": _STR,
    "tokenizer.ggml.pre": _STR,
    "tokenizer.ggml.tokens": _STR,
    "tokenizer.ggml.token_type": _I32,
    "tokenizer.ggml.merges": _STR,
    "tokenizer.ggml.bos_token_id": _U32,
    "tokenizer.ggml.eos_token_id": _U32,
    "tokenizer.ggml.padding_token_id": _U32,
    "tokenizer.ggml.add_bos_token": _BOOL,
    "tokenizer.ggml.add_eos_token": _BOOL,
    "tokenizer.chat_template": _STR,
}


def tokenizer_kv(src_dir: str | Path, vocab_size: int | None = None) -> list[tuple[str, object, GGUFValueType]]:
    """`tokenizer_fields` as (key, value, GGUF type) triples; for a list value the type is its element type."""
    return [(key, value, _VALUE_TYPES[key]) for key, value in tokenizer_fields(src_dir, vocab_size).items()]
