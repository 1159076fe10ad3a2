"""Which ggml type each GGUF tensor gets: `--type` names a recipe, `--tensor-type PATTERN=TYPE` overrides it.

Three families of recipes:
- llama.cpp's file types, named as llama-quantize names them (Q4_K_M, Q5_K_S, Q3_K_M, Q2_K, IQ2_XXS, IQ3_M,
  IQ4_XS, Q8_0, F16, MXFP4_MOE, ...; names that are no flashlite recipe, such as q4_k_m, in any case): the
  per-tensor mix llama.cpp's quantizer (`llama-quantize`, src/llama-quant.cpp) writes for deepseek4, rule for
  rule, so that a file made here has the types a published file of that name has. It leaves the router in the
  source's type (BF16 in the release), which llama.cpp then runs on BF16-rounded inputs.
- ds4's recipes (ds4-q2, ds4-q4): antirez's ds4 layout for V4-Flash: routed experts IQ2_XXS with Q2_K down
  projections (q2) or Q4_K (q4), attention projections, shared experts and output Q8_0, every other matrix F16.
- flashlite's own, in lower case: one type for every weight matrix (f32, q8_0, q4_k, iq3_s, ...) or
  EXPERTS-REST for the routed experts and the rest apart, e.g. mxfp4-q8_0 (the default: llama.cpp's converter's
  layout, experts a lossless repack of the checkpoint's FP4). Here the router and the hyper-connection matrices
  stay F32 (exact in llama.cpp too, whose BF16 router rounds its input), 1-D tensors and the compressors'
  position biases F32. `f32` is the exact file; `F32` is llama.cpp's, router BF16.
In every family tid2eid stays I32 and 1-D tensors F32, a type whose block does not divide a tensor's rows falls
back to one that does (as llama.cpp's tensor_type_fallback does) and says so.

llama-quantize's options act on any recipe as they act there (src/llama-quant.cpp, llama_tensor_get_type):
--leave-output-tensor keeps output.weight in its source type; --token-embedding-type and --output-tensor-type give
token_embd.weight and output.weight a type outright (no fallback, no override); --tensor-type PATTERN=TYPE gives a
tensor the recipe quantizes the type of the first pattern (lower-cased, a regex searched in the GGUF name) that
matches, and for llama.cpp's mixes such a tensor skips the mix's rules (and their layer counting), as --pure skips
them for every tensor. For llama.cpp's unquantized file types (F32, F16, BF16) the overrides and --pure do nothing
there, so they are refused here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from flashlite import block_formats
from quant.layout import EXPERT, HC, INDEX, MATRIX, PINNED, ROUTER, GGUFTensor


def T(name: str) -> int:
    """The ggml type id of a type name."""
    return block_formats.type_id(name)


F32, F16, BF16, I32 = T("F32"), T("F16"), T("BF16"), T("I32")

# flashlite's own single types (the weight types the core multiplies)
TYPES = {name.lower(): T(name) for name in (
    "F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "IQ4_XS",
    "IQ4_NL", "IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S", "TQ2_0", "TQ1_0", "MXFP4")}
# recipes worth naming in help
NAMED_RECIPES = ("mxfp4-q8_0", "mxfp4-bf16", "q4_k-q8_0", "q8_0-bf16")

# llama.cpp's file types: name -> (llama_ftype, the default tensor type), as llama_ftype_get_default_type
FTYPES = {
    "F32": (0, "F32"), "F16": (1, "F16"), "Q4_0": (2, "Q4_0"), "Q4_1": (3, "Q4_1"), "Q8_0": (7, "Q8_0"),
    "Q5_0": (8, "Q5_0"), "Q5_1": (9, "Q5_1"), "Q2_K": (10, "Q2_K"), "Q3_K_S": (11, "Q3_K"), "Q3_K_M": (12, "Q3_K"),
    "Q3_K_L": (13, "Q3_K"), "Q4_K_S": (14, "Q4_K"), "Q4_K_M": (15, "Q4_K"), "Q5_K_S": (16, "Q5_K"),
    "Q5_K_M": (17, "Q5_K"), "Q6_K": (18, "Q6_K"), "IQ2_XXS": (19, "IQ2_XXS"), "IQ2_XS": (20, "IQ2_XS"),
    "Q2_K_S": (21, "Q2_K"), "IQ3_XS": (22, "IQ3_S"), "IQ3_XXS": (23, "IQ3_XXS"), "IQ1_S": (24, "IQ1_S"),
    "IQ4_NL": (25, "IQ4_NL"), "IQ3_S": (26, "IQ3_S"), "IQ3_M": (27, "IQ3_S"), "IQ2_S": (28, "IQ2_XS"),
    "IQ2_M": (29, "IQ2_S"), "IQ4_XS": (30, "IQ4_XS"), "IQ1_M": (31, "IQ1_M"), "BF16": (32, "BF16"),
    "TQ1_0": (36, "TQ1_0"), "TQ2_0": (37, "TQ2_0"), "MXFP4_MOE": (38, "MXFP4"), "Q1_0": (40, "Q1_0"),
    "Q2_0": (41, "Q2_0"),
}
# llama-quantize's aliases (upper case: q4_k is flashlite's single type)
FTYPE_ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}
DS4_RECIPES = ("ds4-q2", "ds4-q4")

# the types whose search ggml runs only with importance weights (llama.cpp refuses them without an imatrix, Q2_K
# only inside a Q2_K_S file); without one flashlite weighs each column by its energy, sum of w^2 over the rows
NEEDS_IMPORTANCE = {T(n) for n in ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS")}

# llama.cpp's tensor_type_fallback: the type for rows its block does not divide (then F16 if still not)
_FALLBACK = {T(a): T(b) for a, b in (
    ("IQ1_S", "IQ4_NL"), ("IQ1_M", "IQ4_NL"), ("IQ2_XXS", "IQ4_NL"), ("IQ2_XS", "IQ4_NL"), ("IQ2_S", "IQ4_NL"),
    ("IQ3_XXS", "IQ4_NL"), ("IQ3_S", "IQ4_NL"), ("IQ4_XS", "IQ4_NL"), ("Q2_0", "Q4_0"), ("Q2_K", "Q4_0"),
    ("Q3_K", "Q4_0"), ("TQ1_0", "Q4_0"), ("TQ2_0", "Q4_0"), ("Q4_K", "Q5_0"), ("Q5_K", "Q5_1"), ("Q6_K", "Q8_0"))}


def _block(qtype: int) -> int:
    return block_formats.type_sizes(qtype)[0]


def fallback(qtype: int, row: int) -> int:
    """The type a row of `row` elements gets instead of `qtype`, as llama.cpp's quantizer picks it."""
    if row % _block(qtype) == 0:
        return qtype
    qtype = _FALLBACK.get(qtype, qtype)
    return qtype if row % _block(qtype) == 0 else F16


def _flashlite_type(text: str, what: str) -> int:
    qtype = TYPES.get(text.strip().lower())
    if qtype is None:
        raise ValueError(f"{what}: unknown type {text!r} (one of {', '.join(TYPES)})")
    return qtype


def parse_tensor_type(item: str, what: str = "--tensor-type") -> tuple[str, re.Pattern, int]:
    """llama-quantize's PATTERN=TYPE: split at the first '=', the pattern lower-cased (as its parser does)."""
    pattern, sep, qname = item.partition("=")
    if not sep or not pattern or not qname:
        raise ValueError(f"{what}: expected PATTERN=TYPE, got {item!r}")
    pattern = pattern.lower()
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{what}: bad pattern {pattern!r}: {exc}") from exc
    return pattern, regex, _flashlite_type(qname, f"{what} {item!r}")


def read_tensor_type_file(path: str) -> list[str]:
    """llama-quantize's --tensor-type-file: PATTERN=TYPE items separated by spaces or newlines."""
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read().split()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--tensor-type-file: cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from exc


def _n_dims(shape: tuple[int, ...]) -> int:
    """ggml_n_dims of a numpy-order shape: trailing ggml dims of 1 do not count."""
    ne = list(reversed(shape))
    while len(ne) > 1 and ne[-1] == 1:
        ne.pop()
    return len(ne)


def _layer(name: str) -> int:
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


@dataclass
class Recipe:
    """A recipe's choice of type per tensor, plus the user's overrides and llama-quantize's options."""

    name: str
    file_type: int
    overrides: list[tuple[str, re.Pattern, int]] = field(default_factory=list)
    output_type: int | None = None      # --output-tensor-type
    token_embd_type: int | None = None  # --token-embedding-type
    leave_output: bool = False          # --leave-output-tensor
    pure: bool = False                  # --pure

    @classmethod
    def parse(cls, type_name: str, tensor_types=(), *, output_type: str | None = None,
              token_embd_type: str | None = None, leave_output: bool = False, pure: bool = False) -> "Recipe":
        """`--type`, the `--tensor-type PATTERN=TYPE` values and llama-quantize's other type options."""
        text = type_name.strip()
        text = FTYPE_ALIASES.get(text, text)
        if text in FTYPES or (text.upper() in FTYPES and text.lower() not in TYPES):
            recipe: Recipe = LlamaMix.of(text.upper())
        elif text.lower() in DS4_RECIPES:
            recipe = DS4Recipe(text.lower(), FTYPES["IQ2_XXS" if text.lower() == "ds4-q2" else "Q4_K_S"][0])
        else:
            recipe = SplitRecipe.of(text.lower())
        recipe.overrides = [parse_tensor_type(item) for item in tensor_types]
        if output_type is not None:
            recipe.output_type = _flashlite_type(output_type, "--output-tensor-type")
        if token_embd_type is not None:
            recipe.token_embd_type = _flashlite_type(token_embd_type, "--token-embedding-type")
        recipe.leave_output, recipe.pure = leave_output, pure
        if isinstance(recipe, LlamaMix) and not block_formats.type_sizes(recipe.default)[0] > 1:
            for option, given in (("--tensor-type", recipe.overrides), ("--pure", pure)):
                if given:
                    raise ValueError(f"{option}: llama.cpp's {recipe.ftype} is not a quantized file type, to which "
                                     f"llama-quantize applies no override and no mix (use a flashlite type: "
                                     f"--type {recipe.ftype.lower()})")
        elif pure and not isinstance(recipe, LlamaMix):
            raise ValueError(f"--pure: turns off the mix rules of llama.cpp's file types (Q4_K_M, ...); "
                             f"{recipe.name} is not one")
        return recipe

    def override(self, t: GGUFTensor) -> int | None:
        """The type of the first --tensor-type pattern found in the tensor's name, as llama.cpp picks it."""
        for _, regex, qtype in self.overrides:
            if regex.search(t.name):
                return qtype
        return None

    def fixed(self, t: GGUFTensor) -> int | None:
        """--token-embedding-type and --output-tensor-type, for the tensors they name."""
        if t.name == "token_embd.weight":
            return self.token_embd_type
        if t.name == "output.weight":
            return self.output_type
        return None

    def choose(self, tensors: list[GGUFTensor], block_count: int) -> dict[str, int | None]:
        """GGUF name -> the recipe's type, or None for a tensor it leaves in its source type."""
        raise NotImplementedError

    def quantizes(self, t: GGUFTensor) -> bool:
        """Whether overrides may change the tensor's type."""
        raise NotImplementedError

    def assign(self, tensors: list[GGUFTensor], block_count: int) -> tuple[dict[str, int], list[str]]:
        """GGUF name -> type for every tensor, and human-readable notes on fallbacks."""
        chosen = self.choose(tensors, block_count)
        types, used, fallbacks = {}, set(), {}
        for t in tensors:
            qtype = chosen[t.name]
            if qtype is None or (self.leave_output and t.name == "output.weight"):
                types[t.name] = t.source_type
                continue
            if self.quantizes(t):
                fixed = self.fixed(t)
                if fixed is not None:  # llama.cpp gives it outright: no override, no fallback
                    if t.shape[-1] % _block(fixed):
                        option = "--output-tensor-type" if t.name == "output.weight" else "--token-embedding-type"
                        raise ValueError(f"{option}: {t.name} has rows of {t.shape[-1]}, not a multiple of "
                                         f"{block_formats.type_name(fixed)}'s block of {_block(fixed)}")
                    types[t.name] = fixed
                    continue
                used.update(p for p, regex, _ in self.overrides if regex.search(t.name))
                override = self.override(t)
                qtype = qtype if override is None else override
            wanted = qtype
            qtype = fallback(qtype, t.shape[-1])
            if qtype != wanted:
                fallbacks.setdefault((wanted, qtype), []).append(t.name)
            types[t.name] = qtype
        unused = [p for p, _, _ in self.overrides if p not in used]
        if unused:
            raise ValueError(f"--tensor-type: pattern {unused[0]!r} matches no tensor this recipe quantizes (1-D "
                             "tensors, tid2eid and the tensors the recipe leaves in their source type keep theirs)")
        notes = []
        for (wanted, got), names in fallbacks.items():
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            notes.append(f"{block_formats.type_name(wanted)} needs rows in multiples of {_block(wanted)}: {len(names)} "
                         f"tensor(s) use {block_formats.type_name(got)} instead ({shown})")
        return types, notes


@dataclass
class SplitRecipe(Recipe):
    """flashlite's own: the routed experts in one type, every other weight matrix in another; the router and
    the hyper-connection matrices F32, the other tensors (1-D, position biases) F32, tid2eid I32."""

    experts: int = F32
    rest: int = F32

    @classmethod
    def of(cls, text: str) -> "SplitRecipe":
        if "-" in text:
            experts, rest = text.split("-", 1)
            e, r = _flashlite_type(experts, "--type (experts)"), _flashlite_type(rest, "--type (rest)")
        else:
            e = r = _flashlite_type(text, f"--type (a llama.cpp file type: {', '.join(FTYPES)}; ds4's: "
                                          f"{', '.join(DS4_RECIPES)}; or flashlite's)")
            if e == T("MXFP4"):
                raise ValueError("--type: mxfp4 is an expert format; name the rest too, e.g. mxfp4-q8_0")
        file_type = next((ft for ft, default in FTYPES.values() if T(default) == e), FTYPES["MXFP4_MOE"][0])
        return cls(text, file_type, experts=e, rest=r)

    def choose(self, tensors, block_count):
        return {t.name: {EXPERT: self.experts, MATRIX: self.rest, ROUTER: F32, HC: F32, PINNED: F32,
                         INDEX: I32}[t.role] for t in tensors}

    def quantizes(self, t):
        return t.role not in (INDEX, PINNED)


@dataclass
class DS4Recipe(Recipe):
    """ds4's q2 and q4 layouts (antirez/ds4 gguf-tools): experts IQ2_XXS with Q2_K down projections, or Q4_K;
    attention projections, shared experts and output Q8_0; every other matrix F16; 1-D F32."""

    _ATTN_PROJ = re.compile(r"\.attn_(kv|q_a|q_b|output_a|output_b)\.weight$")

    def choose(self, tensors, block_count):
        q2 = self.name == "ds4-q2"
        out = {}
        for t in tensors:
            if t.role == INDEX:
                out[t.name] = I32
            elif _n_dims(t.shape) < 2:
                out[t.name] = F32
            elif t.role == EXPERT:
                out[t.name] = T("Q4_K") if not q2 else T("Q2_K") if "ffn_down" in t.name else T("IQ2_XXS")
            elif "_shexp." in t.name or t.name.startswith("output.") or self._ATTN_PROJ.search(t.name):
                out[t.name] = T("Q8_0")
            else:
                out[t.name] = F16
        return out

    def quantizes(self, t):
        return t.role != INDEX and _n_dims(t.shape) >= 2


@dataclass
class LlamaMix(Recipe):
    """llama.cpp's quantizer's choice for a file type (llama_tensor_get_type), for deepseek4's tensor names:
    only the categories output, token_embd and ffn_gate/up/down exist there (no attn_q/k/v/output/qkv tensor)."""

    ftype: str = "Q8_0"
    has_imatrix: bool = False  # set by the converter: some rules differ with an importance matrix
    n_expert: int = 0          # set by the converter: one rule of IQ3_M asks for 8 experts

    @classmethod
    def of(cls, ftype: str) -> "LlamaMix":
        return cls(ftype, FTYPES[ftype][0], ftype=ftype)

    @property
    def default(self) -> int:
        """llama_ftype_get_default_type"""
        return T(FTYPES[self.ftype][1])

    @staticmethod
    def allows(t: GGUFTensor) -> bool:
        """llama.cpp's tensor_allows_quantization for deepseek4's names."""
        n = t.name
        return (n.endswith("weight") and _n_dims(t.shape) >= 2 and "_norm.weight" not in n
                and "ffn_gate_inp.weight" not in n and "ffn_gate_tid2eid.weight" not in n)

    def quantizes(self, t):
        return self.allows(t)

    def choose(self, tensors, block_count):
        ft, default = self.ftype, self.default
        low_iq = ft in ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M")
        n = block_count

        def more_bits(i: int) -> bool:
            return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2

        out = {}
        i_ffn_down = 0  # llama.cpp counts ffn_down tensors in its loader's order: by layer, then by name
        for t in sorted(tensors, key=lambda t: (_layer(t.name), t.name)):
            if not self.allows(t):
                out[t.name] = None
                continue
            name, new = t.name, default
            if default in (F32, F16, BF16):  # not a quantized type: llama.cpp applies no rule
                pass
            elif self.fixed(t) is not None:  # given outright (Recipe.assign)
                pass
            elif self.override(t) is not None:  # a manual type: no rule, and not counted among the ffn_down
                new = self.override(t)
            elif self.pure:
                pass
            elif name == "output.weight":
                if ft == "MXFP4_MOE" or t.shape[-1] % _block(new):
                    new = T("Q8_0")
                elif ft in ("IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"):
                    new = T("Q5_K")
                elif new != T("Q8_0"):
                    new = T("Q6_K")
            elif ft == "MXFP4_MOE":
                new = T("MXFP4") if len(t.shape) == 3 and t.shape[0] > 1 else T("Q8_0")
            elif name == "token_embd.weight":
                if ft in ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"):
                    new = T("Q2_K")
                elif ft in ("IQ2_S", "IQ2_M", "IQ3_XXS"):
                    new = T("IQ3_S")
                elif ft in ("TQ1_0", "TQ2_0", "Q2_0"):
                    new = T("Q4_K")
            elif low_iq:
                if "ffn_down" in name:
                    if i_ffn_down < n // 8:
                        new = T("IQ3_S") if ft in ("IQ2_S", "IQ2_M") else T("Q2_K")
                    i_ffn_down += 1
            elif "ffn_down" in name:
                i = _layer(name)
                if ft == "Q2_K":
                    new = T("Q3_K")
                elif ft == "Q2_K_S":
                    if i < n // 8:
                        new = T("Q4_K")
                elif ft == "IQ3_XXS" and not self.has_imatrix:
                    new = T("Q4_K") if i < n // 8 else T("Q3_K")
                elif ft == "Q3_K_M":
                    new = T("Q5_K") if i < n // 16 else T("Q4_K")
                elif ft == "IQ3_M" and (i < n // 8 or (self.n_expert == 8 and more_bits(i))):
                    new = T("Q4_K")
                elif ft == "Q3_K_L":
                    new = T("Q5_K")
                elif ft == "Q4_K_M":
                    if more_bits(i):
                        new = T("Q6_K")
                elif i < n // 8 and ft in ("IQ4_NL", "IQ4_XS") and not self.has_imatrix:
                    new = T("Q5_K")
                elif ft == "Q5_K_M" and more_bits(i):
                    new = T("Q6_K")
                elif ft == "Q4_K_S" and i < n // 8:
                    new = T("Q5_K")
                elif ft in ("Q4_0", "Q5_0") and self.has_imatrix and i < n // 8:
                    new = T("Q4_1") if ft == "Q4_0" else T("Q5_1")
            elif ("ffn_gate" in name or "ffn_up" in name) and ft == "IQ3_XS":
                i = _layer(name)
                if n // 8 <= i < 7 * n // 8:
                    new = T("IQ3_XXS")
            out[name] = new
        return out
