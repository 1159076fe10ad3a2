"""Which ggml type each GGUF tensor gets.

`--type` is one type for every weight matrix (f32, f16, bf16, q8_0, q4_k, ...) or a recipe `EXPERTS-REST` that
sets the routed experts and everything else apart, e.g. `mxfp4-q8_0`: experts as a lossless MXFP4 repack of the
checkpoint's FP4, the rest Q8_0. 1-D tensors, norms, sinks, biases and the compressors' position biases are
always F32, tid2eid always I32; the router and the hyper-connection matrices are F32 unless a `--tensor-type
PATTERN=TYPE` override (a regex searched in the GGUF name; the last matching override wins) says otherwise.
A type whose block does not divide a tensor's rows falls back to the next finer one and says so.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q, LlamaFileType

from quant.layout import EXPERT, HC, INDEX, MATRIX, PINNED, ROUTER, GGUFTensor

TYPES = {  # the weight types flashlite's core multiplies with
    "f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q6_k": Q.Q6_K, "q5_k": Q.Q5_K, "q4_k": Q.Q4_K,
    "q2_k": Q.Q2_K, "iq4_xs": Q.IQ4_XS, "iq2_xxs": Q.IQ2_XXS, "mxfp4": Q.MXFP4,
}
# recipes worth naming in help; any EXPERTS-REST pair of TYPES parses
NAMED_RECIPES = ("mxfp4-q8_0", "mxfp4-bf16", "q4_k-q8_0", "q8_0-bf16")
# the next finer type when a block does not divide the rows; BF16 and F32 divide everything
_FALLBACK = {Q.Q2_K: Q.Q8_0, Q.Q4_K: Q.Q8_0, Q.Q5_K: Q.Q8_0, Q.Q6_K: Q.Q8_0, Q.IQ4_XS: Q.Q8_0,
             Q.IQ2_XXS: Q.Q8_0, Q.MXFP4: Q.Q8_0, Q.Q8_0: Q.BF16, Q.F16: Q.F32, Q.BF16: Q.F32}
_FILE_TYPE = {Q.F32: LlamaFileType.ALL_F32, Q.F16: LlamaFileType.MOSTLY_F16, Q.BF16: LlamaFileType.MOSTLY_BF16,
              Q.Q8_0: LlamaFileType.MOSTLY_Q8_0, Q.Q6_K: LlamaFileType.MOSTLY_Q6_K,
              Q.Q5_K: LlamaFileType.MOSTLY_Q5_K_S, Q.Q4_K: LlamaFileType.MOSTLY_Q4_K_S,
              Q.Q2_K: LlamaFileType.MOSTLY_Q2_K, Q.IQ4_XS: LlamaFileType.MOSTLY_IQ4_XS,
              Q.IQ2_XXS: LlamaFileType.MOSTLY_IQ2_XXS, Q.MXFP4: LlamaFileType.MOSTLY_MXFP4_MOE}


def _type(text: str, what: str) -> Q:
    qtype = TYPES.get(text.strip().lower())
    if qtype is None:
        raise ValueError(f"{what}: unknown type {text!r} (one of {', '.join(TYPES)})")
    return qtype


@dataclass
class Recipe:
    experts: Q
    rest: Q
    overrides: list[tuple[str, re.Pattern, Q]] = field(default_factory=list)

    @classmethod
    def parse(cls, type_name: str, tensor_types=()) -> "Recipe":
        """`--type` and the `--tensor-type PATTERN=TYPE` values."""
        text = type_name.strip().lower()
        if "-" in text:
            experts, rest = text.split("-", 1)
            recipe = cls(_type(experts, "--type (experts)"), _type(rest, "--type (rest)"))
        else:
            qtype = _type(text, "--type")
            if qtype == Q.MXFP4:
                raise ValueError("--type: mxfp4 is an expert format; name the rest too, e.g. mxfp4-q8_0")
            recipe = cls(qtype, qtype)
        for item in tensor_types:
            pattern, sep, qname = item.rpartition("=")
            if not sep or not pattern:
                raise ValueError(f"--tensor-type: expected PATTERN=TYPE, got {item!r}")
            try:
                regex = re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"--tensor-type: bad pattern {pattern!r}: {exc}") from exc
            recipe.overrides.append((pattern, regex, _type(qname, f"--tensor-type {item!r}")))
        return recipe

    @property
    def file_type(self) -> int:
        return int(_FILE_TYPE[self.experts])

    def assign(self, tensors: list[GGUFTensor]) -> tuple[dict[str, Q], list[str]]:
        """GGUF name -> type for every tensor, and human-readable notes on fallbacks."""
        types, used, fallbacks = {}, set(), {}
        for t in tensors:
            if t.role == INDEX:
                types[t.name] = Q.I32
                continue
            if t.role == PINNED:
                types[t.name] = Q.F32
                continue
            qtype = {EXPERT: self.experts, MATRIX: self.rest, ROUTER: Q.F32, HC: Q.F32}[t.role]
            for pattern, regex, override in self.overrides:
                if regex.search(t.name):
                    qtype = override
                    used.add(pattern)
            wanted = qtype
            while t.shape[-1] % GGML_QUANT_SIZES[qtype][0]:
                qtype = _FALLBACK[qtype]
            if qtype != wanted:
                fallbacks.setdefault((wanted, qtype), []).append(t.name)
            types[t.name] = qtype
        unused = [p for p, _, _ in self.overrides if p not in used]
        if unused:
            raise ValueError(f"--tensor-type: pattern {unused[0]!r} matches no weight matrix (1-D tensors, "
                             "compressor position biases and tid2eid keep their types)")
        notes = []
        for (wanted, got), names in fallbacks.items():
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            notes.append(f"{wanted.name} needs rows in multiples of {GGML_QUANT_SIZES[wanted][0]}: "
                         f"{len(names)} tensor(s) use {got.name} instead ({shown})")
        return types, notes


def tensor_nbytes(shape: tuple[int, ...], qtype: Q) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    rows = 1
    for n in shape[:-1]:
        rows *= n
    return rows * (shape[-1] // block) * size
