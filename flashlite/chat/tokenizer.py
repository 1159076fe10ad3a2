"""DeepSeek V4's byte-level BPE tokenizer, built from the GGUF `tokenizer.*` metadata.

Encoding follows HF `tokenizers` on V4's tokenizer.json: added tokens are cut out first (matched atomically,
longest first), each remaining segment is pre-tokenized by three `Split(Isolated)` regexes applied one after the
other, every piece is mapped to byte-level symbols and merged by BPE rank. The three splits are fused into one
`regex` pattern (see `_PIECE`) so a segment is cut by a single C-level scan; pieces are memoized.
"""
from __future__ import annotations

import codecs
import heapq
import os
import re
from functools import cached_property

import regex

_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4

# The piece boundaries of V4's pre-tokenizer, whose three regexes are applied in turn to each piece of the
# previous one:  1. \p{N}{1,3}   2. [一-龥぀-ゟ゠-ヿ]+ (CJK)   3. the GPT-style word regex `W`.
# Digit runs and CJK runs are therefore hard boundaries for `W`. Fused into one scan, `W`'s classes exclude
# digits and CJK, its `\s+(?!\S)` treats a following digit or CJK character as the end of the string, and CJK
# runs get `W` restricted to CJK characters (the runs hold kana/kanji letters, marks and a few P/S signs).
# Characters `W` leaves unmatched ("gaps") are pieces of their own, as Split(Isolated) keeps them.
_CJK = "一-龥぀-ゟ゠-ヿ"
_W_OUTSIDE = (
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+"
    rf"|[^\r\n\p{{L}}\p{{P}}\p{{S}}\p{{N}}{_CJK}]?[[\p{{L}}\p{{M}}]--[{_CJK}]]+"
    rf"| ?[[\p{{P}}\p{{S}}]--[{_CJK}]]+[\r\n]*"
    r"|\s*[\r\n]+"
    rf"|\s+(?![^\s\p{{N}}{_CJK}])"
    r"|\s+"
)
_W_CJK = (
    rf"[[{_CJK}]--[\p{{L}}\p{{P}}\p{{S}}]]?[[{_CJK}]&&[\p{{L}}\p{{M}}]]+"
    rf"|[[{_CJK}]&&[\p{{P}}\p{{S}}]]+"
)
_PIECE = regex.compile(
    r"\p{N}{1,3}"
    rf"|{_W_CJK}|(?:(?!{_W_CJK})[{_CJK}])+"
    rf"|{_W_OUTSIDE}|(?:(?!{_W_OUTSIDE})[^\p{{N}}{_CJK}])+",
    regex.VERSION1,
)

_CACHE_LIMIT = 1 << 20  # memoized pieces; cleared when full so a long-running server stays bounded
_LONG_PIECE = 48  # bytes; longer pieces merge through a heap, O(n log n) instead of a rescan per merge


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable Latin-1 bytes map to themselves, the rest to U+0100 onwards."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_OF_CHAR = {c: b for b, c in _byte_to_unicode().items()}

# The tokenizer.ggml.pre names llama.cpp runs with V4's three regexes and no space clean-up (llama-vocab.cpp):
# converters write "joyai-llm" for V4's tokenizer hash; older conversions wrote "deepseek-v3".
V4_PRE_TOKENIZERS = ("joyai-llm", "deepseek-v3", "hunyuan-dense", "hy_v4")


def _metadata_of(source) -> dict:
    """The metadata dict of a GGUF path, a gguf-py GGUFReader, an object with `.metadata`, or a dict."""
    if isinstance(source, dict):
        return source
    if hasattr(source, "metadata") and isinstance(source.metadata, dict):
        return source.metadata
    if isinstance(source, (str, os.PathLike)):
        from flashlite.gguf_reader import GGUFReader
        with GGUFReader(source) as reader:
            return reader.metadata
    if hasattr(source, "fields"):  # a gguf-py GGUFReader
        return {k: f.contents() for k, f in source.fields.items() if k.startswith("tokenizer.")}
    raise TypeError(f"source: expected a GGUF path, GGUFReader, GGUFFile or metadata dict, got {type(source).__name__}")


def _require(meta: dict, key: str):
    if key not in meta:
        raise ValueError(f"GGUF metadata: missing '{key}' (the file has no embedded tokenizer)")
    return meta[key]


class Tokenizer:
    """Encode text to token ids and decode ids to text, exactly as HF `tokenizers` does for DeepSeek V4."""

    def __init__(self, tokens: list[str], token_types: list[int], merges: list[str],
                 bos_id: int, eos_id: int, pad_id: int | None = None, chat_template: str | None = None):
        if len(tokens) != len(token_types):
            raise ValueError(f"token_type: {len(token_types)} entries for {len(tokens)} tokens")
        self.bos_id, self.eos_id = int(bos_id), int(eos_id)
        self.pad_id = self.eos_id if pad_id is None else int(pad_id)
        self.chat_template = chat_template
        for name, value in (("bos_token_id", self.bos_id), ("eos_token_id", self.eos_id),
                            ("padding_token_id", self.pad_id)):
            if not 0 <= value < len(tokens):
                raise ValueError(f"{name}: {value} is outside the vocabulary of {len(tokens)} tokens")
        self.vocab_size = len(tokens)

        self._bytes: list[bytes] = []
        self._special: dict[str, int] = {}
        vocab: dict[str, int] = {}
        for i, (text, kind) in enumerate(zip(tokens, token_types)):
            if kind == _NORMAL:
                vocab[text] = i
                try:
                    self._bytes.append(bytes(_BYTE_OF_CHAR[c] for c in text))
                except KeyError as exc:
                    raise ValueError(f"tokenizer.ggml.tokens[{i}] {text!r}: not a byte-level BPE token") from exc
            else:
                self._bytes.append(text.encode("utf-8"))
                if kind in (_CONTROL, _USER_DEFINED):
                    self._special[text] = i
        self.special_ids = frozenset(self._special.values())
        self.special_tokens = frozenset(self._special)

        byte_ids = []
        for b, c in _byte_to_unicode().items():
            if c not in vocab:
                raise ValueError(f"tokenizer.ggml.tokens: no token for byte {b:#04x} ({c!r})")
            byte_ids.append(vocab[c])
        self._byte_ids = byte_ids

        self._merge: dict[int, tuple[int, int]] = {}
        for rank, line in enumerate(merges):
            parts = line.split(" ")
            if len(parts) != 2:
                raise ValueError(f"tokenizer.ggml.merges[{rank}] {line!r}: expected two space-separated tokens")
            a, b = parts
            try:
                key = vocab[a] << 18 | vocab[b]
                merged = vocab[a + b]
            except KeyError as exc:
                raise ValueError(f"tokenizer.ggml.merges[{rank}] {line!r}: token {exc} is not in the vocabulary") \
                    from exc
            self._merge.setdefault(key, (rank, merged))
        if len(tokens) >= 1 << 18:
            raise ValueError(f"tokenizer.ggml.tokens: {len(tokens)} tokens exceed the 2^18 this encoder packs")

        ordered = sorted(self._special, key=len, reverse=True)
        self._special_split = re.compile("(" + "|".join(map(re.escape, ordered)) + ")") if ordered else None
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def from_gguf(cls, source) -> Tokenizer:
        """Build from a GGUF file path, a gguf-py GGUFReader, a GGUFFile (`.metadata`) or a metadata dict."""
        meta = _metadata_of(source)
        model = _require(meta, "tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(f"tokenizer.ggml.model: '{model}' is not supported (expected 'gpt2' byte-level BPE)")
        pre = meta.get("tokenizer.ggml.pre", "joyai-llm")
        if pre not in V4_PRE_TOKENIZERS:
            raise ValueError(f"tokenizer.ggml.pre: '{pre}' is not DeepSeek V4's pre-tokenizer (one of "
                             f"{', '.join(V4_PRE_TOKENIZERS)})")
        return cls(list(_require(meta, "tokenizer.ggml.tokens")), list(_require(meta, "tokenizer.ggml.token_type")),
                   list(_require(meta, "tokenizer.ggml.merges")),
                   meta.get("tokenizer.ggml.bos_token_id", 0), meta.get("tokenizer.ggml.eos_token_id", 1),
                   meta.get("tokenizer.ggml.padding_token_id"), meta.get("tokenizer.chat_template"))

    def token_id(self, text: str) -> int:
        """The id of an added (control or user-defined) token such as '<｜User｜>'."""
        if text not in self._special:
            raise KeyError(f"token: {text!r} is not an added token of this vocabulary")
        return self._special[text]

    def _bpe(self, piece: str) -> list[int]:
        word = [self._byte_ids[b] for b in piece.encode("utf-8")]
        if len(word) > _LONG_PIECE:
            return self._bpe_heap(word)
        merge = self._merge
        while len(word) > 1:
            best_rank, best = None, None
            for i in range(len(word) - 1):
                hit = merge.get(word[i] << 18 | word[i + 1])
                if hit is not None and (best_rank is None or hit[0] < best_rank):
                    best_rank, best = hit[0], i
            if best is None:
                break
            left, right = word[best], word[best + 1]
            merged = merge[left << 18 | right][1]
            out, i, n = word[:best], best, len(word)
            while i < n:
                if i + 1 < n and word[i] == left and word[i + 1] == right:
                    out.append(merged)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            word = out
        return word

    def _bpe_heap(self, word: list[int]) -> list[int]:
        """HF's merge loop: lowest rank first, leftmost on ties, over a linked list of symbols."""
        merge = self._merge
        n = len(word)
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prev = list(range(-1, n - 1))
        alive = [True] * n
        heap = []
        for i in range(n - 1):
            hit = merge.get(word[i] << 18 | word[i + 1])
            if hit is not None:
                heap.append((hit[0], i, word[i], word[i + 1]))
        heapq.heapify(heap)
        while heap:
            _, i, left, right = heapq.heappop(heap)
            j = nxt[i]
            if not alive[i] or j < 0 or word[i] != left or word[j] != right:
                continue
            word[i] = merge[left << 18 | right][1]
            alive[j] = False
            nxt[i] = nxt[j]
            if nxt[j] >= 0:
                prev[nxt[j]] = i
            for a, b in ((prev[i], i), (i, nxt[i])):
                if a >= 0 and b >= 0:
                    hit = merge.get(word[a] << 18 | word[b])
                    if hit is not None:
                        heapq.heappush(heap, (hit[0], a, word[a], word[b]))
        return [t for t, live in zip(word, alive) if live]

    @staticmethod
    def pre_tokenize(text: str) -> list[str]:
        """The pieces BPE sees for `text` (no added-token matching), in order; they concatenate to `text`."""
        return _PIECE.findall(text)

    def _encode_plain(self, text: str, out: list[int], limit: int | None = None) -> bool:
        """Append the ids of `text`; False once `out` holds more than `limit` ids (then it stops early)."""
        cache = self._cache
        if limit is None:
            for piece in _PIECE.findall(text):
                ids = cache.get(piece)
                if ids is None:
                    ids = self._bpe(piece)
                    if len(cache) >= _CACHE_LIMIT:
                        cache.clear()
                    cache[piece] = ids
                out += ids
            return True
        for match in _PIECE.finditer(text):
            piece = match.group()
            ids = cache.get(piece)
            if ids is None:
                if len(out) + -(-len(piece.encode("utf-8")) // self.max_token_bytes) > limit:
                    return False  # a piece of n bytes is at least n / max_token_bytes tokens: not worth merging
                ids = self._bpe(piece)
                if len(cache) >= _CACHE_LIMIT:
                    cache.clear()
                cache[piece] = ids
            out += ids
            if len(out) > limit:
                return False
        return True

    def encode(self, text: str, allow_special: bool = True, limit: int | None = None) -> list[int] | None:
        """Token ids of `text`; with `allow_special` every added token in the text becomes its single id.

        `limit`: None instead of the ids as soon as the text is known to take more than `limit` tokens, so that
        checking a text against a context costs about the context's worth of work, not the text's: a text of n
        bytes is at least n / max_token_bytes tokens, which is checked before each piece is merged."""
        if not isinstance(text, str):
            raise TypeError(f"text: expected str, got {type(text).__name__}")
        if limit is not None and -(-len(text) // self.max_token_bytes) > limit:  # len(text) <= its UTF-8 bytes
            return None
        out: list[int] = []
        if not allow_special or self._special_split is None:
            return out if self._encode_plain(text, out, limit) else None
        for i, segment in enumerate(self._special_split.split(text)):
            if i & 1:
                out.append(self._special[segment])
                if limit is not None and len(out) > limit:
                    return None
            elif segment and not self._encode_plain(segment, out, limit):
                return None
        return out

    @cached_property
    def max_token_bytes(self) -> int:
        """The longest text (in UTF-8 bytes) one token stands for: a text of n bytes is >= n / this tokens."""
        return max(1, max(map(len, self._bytes)))

    def token_bytes(self, token_id: int) -> bytes:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary of {self.vocab_size} tokens")
        return self._bytes[token_id]

    def decode(self, ids, skip_special: bool = False) -> str:
        """The text of `ids`; invalid UTF-8 (e.g. a cut multi-byte character) becomes U+FFFD."""
        parts = []
        for t in ids:
            t = int(t)
            if skip_special and t in self.special_ids:
                continue
            parts.append(self.token_bytes(t))
        return b"".join(parts).decode("utf-8", "replace")

    def stream_decoder(self, skip_special: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special)


class StreamDecoder:
    """Decodes ids one at a time; bytes of an incomplete UTF-8 character are held until it completes."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def feed(self, token_id: int) -> str:
        """The text that token `token_id` completes (possibly ''); never a partial character."""
        token_id = int(token_id)
        if self._skip_special and token_id in self._tokenizer.special_ids:
            return ""
        return self._utf8.decode(self._tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """What is still held at the end of the stream, as U+FFFD for a character that never completed."""
        return self._utf8.decode(b"", final=True)
