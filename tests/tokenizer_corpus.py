"""A deterministic multilingual test corpus for the tokenizer (no network, no data files).

Real English and code come from the Python standard library's own source; Chinese, Japanese, other scripts,
numbers, emoji, whitespace runs and added tokens are generated from seeded draws over fixed alphabets."""
from __future__ import annotations

import inspect
import random

_STDLIB_MODULES = ("argparse", "collections", "dataclasses", "functools", "json.decoder", "pathlib", "shutil",
                   "string", "textwrap", "typing", "unittest.case")

_HANZI = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总次品式活设及管特件长求老头基资边流路级少图山统接知较将组见计别她手角期根论运农指几九区强放决西被干做必战先回则任取据处理府研质质族"
_KANA = "あいうえおかきくけこさしすせそたちつてとなにぬねのはひふへほまみむめもやゆよらりるれろわをんがぎぐげござじずぜぞだぢづでどばびぶべぼぱぴぷぺぽゃゅょっアイウエオカキクケコサシスセソタチツテトナニヌネノハヒフヘホマミムメモヤユヨラリルレロワヲンガギグゲゴザジズゼゾダヂヅデドバビブベボパピプペポャュョッー・ヽヾゝゞ゛゜"
_CJK_PUNCT = "。，、「」『』（）！？：；～…　【】《》〇"
_OTHER_SCRIPTS = ["Привет, как дела? Всё хорошо.", "Καλημέρα κόσμε", "مرحبا بالعالم ١٢٣", "नमस्ते दुनिया किताब",
                  "안녕하세요 세계 123", "สวัสดีชาวโลก", "Ça va très bien, naïve café façade", "Zoë Ångström Øre ß ẞ",
                  "e\u0301 a\u0308 n\u0303 combining", "שלום עולם", "ქართული ენა", "Tiếng Việt có dấu"]
_EMOJI = ["😀", "🚀", "🦙", "✅", "❤️", "👍🏽", "👨\u200d👩\u200d👧\u200d👦", "🏳️\u200d🌈", "🇯🇵", "🇺🇸", "😶\u200d🌫️",
          "☕", "🔥🔥", "✨", "🤖", "1️⃣", "©", "™"]
_WHITESPACE = [" ", "  ", "   ", "\t", "\t\t", "\n", "\n\n", "\n\n\n", "\r\n", " \n", "\n ", " \t\n  ", "\u00a0",
               "\u3000", "        ", "\r", "\x0b", "\x0c"]
_SPECIAL = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>",
            "｜DSML｜", "<｜latest_reminder｜>", "<｜action｜>", "<｜title｜>", "<|EOT|>", "<｜fim▁hole｜>", "<dsml:",
            "<｜▁pad▁｜>", "<tool_result>", "<｜User", "think>", "<｜DSML｜invoke name=\"f\">"]


def _stdlib_lines() -> list[str]:
    lines = []
    for name in _STDLIB_MODULES:
        module = __import__(name, fromlist=["_"])
        lines += inspect.getsource(module).splitlines()
    return lines


def _number(rng: random.Random) -> str:
    kind = rng.randrange(9)
    if kind == 0:
        return str(rng.randrange(10 ** rng.randrange(1, 16)))
    if kind == 1:
        return f"{rng.uniform(-1e6, 1e6):.{rng.randrange(7)}f}"
    if kind == 2:
        return f"{rng.randrange(1, 10 ** 7):,}"
    if kind == 3:
        return f"{rng.uniform(0, 10):.3e}"
    if kind == 4:
        return f"{rng.randrange(1900, 2100)}-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}"
    if kind == 5:
        return f"+1 ({rng.randrange(200, 999)}) {rng.randrange(100, 999)}-{rng.randrange(1000, 9999)}"
    if kind == 6:
        return "".join(chr(0xFF10 + rng.randrange(10)) for _ in range(rng.randrange(1, 8)))  # fullwidth digits
    if kind == 7:
        return f"{rng.randrange(100)}%"
    return "0x" + "".join(rng.choice("0123456789abcdef") for _ in range(rng.randrange(1, 17)))


def _chinese(rng: random.Random) -> str:
    out = []
    for _ in range(rng.randrange(3, 40)):
        r = rng.random()
        out.append(rng.choice(_CJK_PUNCT) if r < 0.12 else rng.choice(["AI", "GPU", "Python", "3.14", "2024年", " "])
                   if r < 0.18 else rng.choice(_HANZI))
    return "".join(out)


def _japanese(rng: random.Random) -> str:
    out = []
    for _ in range(rng.randrange(3, 40)):
        r = rng.random()
        out.append(rng.choice(_HANZI) if r < 0.3 else rng.choice(_CJK_PUNCT) if r < 0.38 else rng.choice(_KANA))
    return "".join(out)


def _mixed(rng: random.Random, english: list[str]) -> str:
    pieces = []
    for _ in range(rng.randrange(2, 9)):
        kind = rng.randrange(8)
        if kind == 0:
            pieces.append(rng.choice(english).strip())
        elif kind == 1:
            pieces.append(_number(rng))
        elif kind == 2:
            pieces.append(rng.choice(_EMOJI))
        elif kind == 3:
            pieces.append(rng.choice(_WHITESPACE))
        elif kind == 4:
            pieces.append(rng.choice(_SPECIAL))
        elif kind == 5:
            pieces.append(_chinese(rng)[:8])
        elif kind == 6:
            pieces.append(rng.choice(_OTHER_SCRIPTS))
        else:
            pieces.append(rng.choice(["'s", "'ll", "--", "...", "!!", "?!", "«»", "“quoted”", "—", "->", "=>", "::"]))
    return rng.choice(["", " ", ""]).join(pieces)


def corpus(n_lines: int = 12000, seed: int = 1234) -> list[str]:
    """`n_lines` lines mixing English, code, Chinese, Japanese, other scripts, numbers, emoji, whitespace runs,
    newlines and added tokens; the same for a given seed."""
    rng = random.Random(seed)
    english = [line for line in _stdlib_lines() if line.strip()]
    makers = [
        lambda: rng.choice(english),                                                  # code and English docstrings
        lambda: rng.choice(english) + rng.choice(_WHITESPACE) + rng.choice(english),  # runs across lines
        lambda: _chinese(rng),
        lambda: _japanese(rng),
        lambda: " ".join(_number(rng) for _ in range(rng.randrange(1, 6))),
        lambda: "".join(rng.choice(_EMOJI) + rng.choice(["", " ", ""]) for _ in range(rng.randrange(1, 6))),
        lambda: rng.choice(_OTHER_SCRIPTS),
        lambda: "".join(rng.choice(_WHITESPACE) for _ in range(rng.randrange(1, 6))) + rng.choice(english),
        lambda: _mixed(rng, english),
        lambda: _mixed(rng, english),
    ]
    return [rng.choice(makers)() for _ in range(n_lines)]


_FUZZ_ALPHABET = ("abcXYZ aé'\"-_.,!?<>/\\|{}[]()#@$%^&*+=~`:; \t\n\r\x00\x1f\x7f0123456789\u00a0\u2003\u3000"
                  "中文字あいアイ・ー゛゜ヽ\u3099\u309a\u3040々〆〇" "\u0301\u0308\u200d\u200b\ufe0f" "١٢٣٤٥０１２"
                  "½²³ⅣⅫ" "ßΩжשع한ไ" "😀🦙✅©™€£¥" "｜▁" "\U00010000\U0010fffd\ue000")


# Pairs across the boundaries of the three fused splits: CJK punctuation / marks next to ASCII punctuation,
# letters, digits and spaces.
_BOUNDARIES = ["!・", "a・b", " ・x", "x゛", "1・", "・1", "abcカタ", " カ", "\u3099a", "a\u3099", "ー!", "?゜",
               "a 中", "a  中", "。 a", "、\n", "\u3040a", "中\u3040", "1 ", "1  a", " 1", "\t1", "x\n中"]


def fuzz_strings(n: int = 4000, seed: int = 99) -> list[str]:
    """Boundary pairs, then short random strings over an alphabet chosen to sit on every pre-tokenizer class
    boundary."""
    rng = random.Random(seed)
    return _BOUNDARIES + ["".join(rng.choice(_FUZZ_ALPHABET) for _ in range(rng.randrange(0, 24))) for _ in range(n)]
