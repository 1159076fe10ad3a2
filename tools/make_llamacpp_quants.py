"""Requantize a GGUF with llama.cpp's own quantizer (llama-cpp-python's `llama_model_quantize` binding), once per
file type: the files users download are made this way, and the interop tests load them.

Runs with the Python of a virtual environment that has llama-cpp-python (never the project's; see
tools/ggml_oracle.py) and the gguf-py of the same llama.cpp (the package index's gguf knows no Q2_0): in the
venv, `pip install ~/.cache/flashlite/llama_cpp_python-0.3.36/vendor/llama.cpp/gguf-py` once
tools/make_llamacpp_gguf.py has unpacked the sdist there.

    ~/.venvs/llamacpp/bin/python tools/make_llamacpp_quants.py OUT_DIR [--src IN.gguf] [--ftype Q4_K_M ...]
        [--imatrix FILE] [--threads N] [--manifest FILE]

--src defaults to tests/fixtures/llamacpp/tiny_v4-mxfp4_moe.gguf (llama.cpp's own conversion of the oracle
checkpoint). Each file type is written to OUT_DIR/<stem>-<FTYPE>.gguf through a temporary name, so an interrupted
run leaves no partial file. Without --ftype every file type of llama.cpp's quantizer is made.

--mix-manifest FILE records, for a source of many layers (where llama.cpp's per-layer rules show), only the type
llama.cpp gives each tensor: the source's tensors (name, ne, type) and per file type the sha256 of the sorted
"name:type" lines (tests/test_llamacpp_quants.py checks flashlite's recipes against it):

    make_synthetic.py /tmp/syn43 --preset tiny --layers 43 --experts 8
    flashlite quantize /tmp/syn43 syn43.gguf --tensor-type \
        '^(token_embd|output)\.weight$|compressor_(kv|gate)|indexer\.proj|ffn_gate_inp=bf16'
    make_llamacpp_quants.py OUT_DIR --src syn43.gguf --mix-manifest tests/fixtures/llamacpp/mix43.json

--manifest FILE records what tests/test_llamacpp_quants.py checks without llama.cpp (the files are too large to
commit): per file type, each tensor's type and (the start of) the sha256 of its bytes, and llama.cpp's own logits on the oracle
prompt (tests/fixtures/tiny_v4/goldens.npz): its top token at each position, and against transformers' goldens
of the unquantized model its top-1 agreement where the decision is clear (gap > 1e-4) and the RMS of the
difference. llama.cpp runs with weight repacking off (`use_extra_bufts`):
with it, this build aborts on deepseek4 files holding Q8_0 or MXFP4 tensors (ggml_backend_sched_split_graph).

--tensor-type PATTERN=TYPE (repeatable) passes llama.cpp's per-tensor overrides (`llama-quantize --tensor-type`:
the pattern lower-cased as its parser does, the first pattern searched in a tensor's name that matches wins; only
tensors llama.cpp quantizes at all, so never the router ffn_gate_inp), e.g. to make flashlite's or ds4's mixes with
llama.cpp's quantizer; --suffix TEXT is then added to the file names. llama-quantize's other options pass through
the same way, with its names and meanings: --pure, --leave-output-tensor, --output-tensor-type TYPE,
--token-embedding-type TYPE, --override-kv KEY=TYPE:VALUE, and --include-weights / --exclude-weights NAME (which
entries of --imatrix are passed, by substring of the name, as llama-quantize selects them).

--options-manifest FILE records, per file type and options, the type and hash of every tensor and the metadata the
--override-kv options set, under the key "FTYPE OPTION...", into FILE (merged with what it holds):
tests/test_llamacpp_quants.py checks `flashlite quantize` with the same options against it, e.g.

    make_llamacpp_quants.py /tmp/q --ftype Q4_K_M --pure --options-manifest tests/fixtures/llamacpp/options.json

Importance matrix: llama.cpp refuses the types whose search needs one (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S,
IQ3_XXS, and Q2_K in a Q2_K_S file) without one, for every tensor it quantizes in them. With --imatrix, the 2-D
tensors the matrix lacks (deepseek4's compressor position biases, which no product multiplies) and that get such a
type get what flashlite's quantizer weighs them by in that case, each column's sum of squared weights, so that both
quantizers have the same input (but Q2_K, which flashlite then quantizes unweighted). --imatrix FILE passes a
llama.cpp imatrix (GGUF, as
`llama-imatrix` and `flashlite imatrix` write it: `<tensor>.in_sum2` / `<tensor>.counts`); without it those file
types get a flat one (every weight 1 for every tensor), and the file name says `-flat`.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SRC = REPO / "tests" / "fixtures" / "llamacpp" / "tiny_v4-mxfp4_moe.gguf"

# llama.cpp's llama_ftype values by the names llama-quantize takes (include/llama.h)
FTYPES = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K_S": 11,
    "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18,
    "IQ2_XXS": 19, "IQ2_XS": 20, "Q2_K_S": 21, "IQ3_XS": 22, "IQ3_XXS": 23, "IQ1_S": 24, "IQ4_NL": 25, "IQ3_S": 26,
    "IQ3_M": 27, "IQ2_S": 28, "IQ2_M": 29, "IQ4_XS": 30, "IQ1_M": 31, "BF16": 32, "TQ1_0": 36, "TQ2_0": 37,
    "MXFP4_MOE": 38, "Q1_0": 40, "Q2_0": 41,  # NVFP4 (39) is no output type of its quantizer yet
}
# file types some of whose tensors llama.cpp only quantizes with an importance matrix, with their default tensor type
NEEDS_IMATRIX = {"IQ1_S": "IQ1_S", "IQ1_M": "IQ1_M", "IQ2_XXS": "IQ2_XXS", "IQ2_XS": "IQ2_XS", "IQ2_S": "IQ2_XS",
                 "IQ2_M": "IQ2_S", "IQ3_XXS": "IQ3_XXS", "IQ3_XS": "IQ3_S", "Q2_K_S": "Q2_K"}
# the tensor types it refuses to write without one (Q2_K only in a Q2_K_S file); all in blocks of 256
NEEDS_WEIGHTS = {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "Q2_K"}


def read_imatrix(path: str) -> dict[str, np.ndarray]:
    """tensor name -> mean squared activations (in_sum2 / counts, per expert for 3-D tensors, flattened)."""
    import gguf

    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    out = {}
    for name, t in tensors.items():
        if not name.endswith(".in_sum2"):
            continue
        base = name[: -len(".in_sum2")]
        sums = np.array(t.data, np.float32).reshape(-1, int(t.shape[0]))
        counts = np.array(tensors[base + ".counts"].data, np.float32).reshape(-1, 1)
        out[base] = (sums / np.maximum(counts, 1)).reshape(-1).astype(np.float32)
    return out


def flat_imatrix(src: str) -> dict[str, np.ndarray]:
    """Weight 1 for every input column of every matrix (per expert for 3-D tensors)."""
    import gguf

    reader = gguf.GGUFReader(src)
    out = {}
    for t in reader.tensors:
        shape = [int(n) for n in t.shape]
        if len(shape) >= 2 and t.name.endswith(".weight"):
            experts = shape[2] if len(shape) == 3 else 1
            out[t.name] = np.ones(shape[0] * experts, np.float32)
    return out


def energy_imatrix(src: str, names) -> dict[str, np.ndarray]:
    """Each column's sum of squared weights over the rows (per expert for 3-D tensors) of the tensors `names` whose
    rows hold whole blocks of 256 (the others fall back to types that need no weights): the weights flashlite's
    quantizer (quant.convert) gives a tensor of a type that needs them when the importance matrix lacks it."""
    import gguf

    out = {}
    for t in gguf.GGUFReader(src).tensors:
        shape = [int(n) for n in t.shape]
        if t.name in names and shape[0] % 256 == 0:
            rows = np.asarray(t.data, np.float32).reshape(shape[2] if len(shape) == 3 else 1, -1, shape[0])
            out[t.name] = np.square(rows, dtype=np.float64).sum(axis=1).astype(np.float32).reshape(-1)
    return out


def quantize(src: str, out: str, ftype: str, imatrix: dict | None, threads: int,
             tensor_types: list[tuple[str, int]] = (), options: argparse.Namespace | None = None) -> None:
    """`options`: llama-quantize's --pure, --leave-output-tensor, --output-tensor-type, --token-embedding-type and
    --override-kv, as parsed by main()."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype]
    params.nthread = threads
    params.allow_requantize = True
    keep = []
    if options is not None:
        params.pure = options.pure
        params.quantize_output_tensor = not options.leave_output_tensor
        if options.output_tensor_type:
            params.output_tensor_type = ggml_type(options.output_tensor_type)
        if options.token_embedding_type:
            params.token_embedding_type = ggml_type(options.token_embedding_type)
        if options.override_kv:
            kvs = (llama_cpp.llama_model_kv_override * (len(options.override_kv) + 1))()
            for i, item in enumerate(options.override_kv):  # as common.cpp's string_parse_kv_override
                key, _, rest = item.partition("=")
                kind, _, text = rest.partition(":")
                kvs[i].key = key.encode()
                if kind == "int":
                    kvs[i].tag, kvs[i].value.val_i64 = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT, int(text)
                elif kind == "float":
                    kvs[i].tag, kvs[i].value.val_f64 = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_FLOAT, float(text)
                elif kind == "bool":
                    kvs[i].tag, kvs[i].value.val_bool = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_BOOL, text == "true"
                else:
                    kvs[i].tag, kvs[i].value.val_str = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR, text.encode()
            kvs[len(options.override_kv)].key = b""
            params.kv_overrides = kvs
            keep.append(kvs)
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(sorted(imatrix.items())):
            buf = np.ascontiguousarray(values, np.float32)
            keep.append(buf)
            entries[i].name = name.encode()
            entries[i].data = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = buf.size
        entries[len(imatrix)].name = None
        params.imatrix = entries
        keep.append(entries)
    if tensor_types:
        overrides = (llama_cpp.llama_model_tensor_override * (len(tensor_types) + 1))()
        for i, (pattern, qtype) in enumerate(tensor_types):
            overrides[i].pattern = pattern.encode()
            overrides[i].type = qtype
        overrides[len(tensor_types)].pattern = None
        params.tt_overrides = overrides
        keep.append(overrides)
    tmp = f"{out}.partial"
    try:
        status = llama_cpp.llama_model_quantize(src.encode(), tmp.encode(), ctypes.byref(params))
        if status != 0:
            raise SystemExit(f"llama_model_quantize {ftype}: status {status}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def ggml_type(name: str) -> int:
    import gguf

    return int(gguf.GGMLQuantizationType[name.upper()])


def select_weights(imatrix: dict, include: list[str], exclude: list[str]) -> dict | None:
    """llama-quantize's --include-weights / --exclude-weights: entries by substring of their name."""
    kept = {n: v for n, v in imatrix.items()
            if (not include or any(s in n for s in include)) and not any(s in n for s in exclude)}
    return kept or None


def metadata_of(path: str, keys: list[str]) -> dict:
    """[GGUF value type, value] of each key"""
    import gguf

    reader = gguf.GGUFReader(path)
    out = {}
    for key in keys:
        f = reader.fields[key]
        value = f.contents()
        out[key] = [int(f.types[0]), value.item() if hasattr(value, "item") else value]
    return out


def types_sha256(path: str) -> str:
    """sha256 of the file's sorted "name:type" lines"""
    import hashlib

    import gguf

    lines = sorted(f"{t.name}:{int(t.tensor_type)}\n" for t in gguf.GGUFReader(path).tensors)
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def tensor_hashes(path: str) -> dict[str, str]:
    """tensor name -> "<ggml type id>:<the first 16 hex digits of the sha256 of its bytes>" """
    import hashlib

    import gguf

    reader = gguf.GGUFReader(path)
    return {t.name: f"{int(t.tensor_type)}:{hashlib.sha256(np.asarray(t.data).tobytes()).hexdigest()[:16]}"
            for t in reader.tensors}


GOLDENS = REPO / "tests" / "fixtures" / "tiny_v4" / "goldens.npz"
CLEAR = 1e-4  # decision gaps at or below this are near-ties (tests/test_forward.py)


def llama_logits(path: str, ids: list[int], threads: int) -> np.ndarray:
    """llama.cpp's logits for every position of one prompt."""
    import llama_cpp

    llama_cpp.llama_backend_init()
    mp = llama_cpp.llama_model_default_params()
    mp.use_extra_bufts = False
    model = llama_cpp.llama_model_load_from_file(path.encode(), mp)
    if not model:
        raise SystemExit(f"{path}: llama.cpp cannot load it")
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch = 1024, 512, 512
    cp.n_threads = cp.n_threads_batch = threads
    ctx = llama_cpp.llama_init_from_model(model, cp)
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    batch = llama_cpp.llama_batch_init(512, 0, 1)
    out = []
    try:
        for start in range(0, len(ids), 512):
            chunk = ids[start:start + 512]
            batch.n_tokens = len(chunk)
            for i, tok in enumerate(chunk):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, start + i, 1, 1
                batch.seq_id[i][0] = 0
            if llama_cpp.llama_decode(ctx, batch) != 0:
                raise SystemExit(f"{path}: llama_decode failed")
            logits = llama_cpp.llama_get_logits(ctx)
            out.append(np.ctypeslib.as_array(logits, shape=(len(chunk), n_vocab)).copy())
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)
    return np.concatenate(out)


def logit_stats(path: str, threads: int) -> dict:
    """llama.cpp's top token at every position of the oracle prompt, and its top-1 agreement and RMS against
    transformers' goldens of the unquantized model."""
    g = np.load(GOLDENS)
    logits = llama_logits(path, g["prompt_ids"].tolist(), threads)
    clear = g["decision_gap"] > CLEAR
    return {"argmax": logits.argmax(1).tolist(),
            "top1_clear": float((logits.argmax(1) == g["logits"].argmax(1))[clear].mean()),
            "rms": float(np.sqrt(np.mean((logits - g["logits"]) ** 2)))}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--src", default=str(DEFAULT_SRC))
    p.add_argument("--ftype", action="append", choices=sorted(FTYPES), help="repeat for several (default: all)")
    p.add_argument("--imatrix", help="a llama.cpp imatrix GGUF for the types that need one")
    p.add_argument("--tensor-type", action="append", default=[], metavar="PATTERN=TYPE",
                   help="llama.cpp's per-tensor type override (repeatable; the first match wins)")
    p.add_argument("--pure", action="store_true", help="llama-quantize's: no mix rules")
    p.add_argument("--leave-output-tensor", action="store_true", help="llama-quantize's: output.weight as it is")
    p.add_argument("--output-tensor-type", metavar="TYPE", help="llama-quantize's: the type of output.weight")
    p.add_argument("--token-embedding-type", metavar="TYPE", help="llama-quantize's: the type of token_embd.weight")
    p.add_argument("--override-kv", action="append", default=[], metavar="KEY=TYPE:VALUE",
                   help="llama-quantize's metadata override (repeatable)")
    p.add_argument("--include-weights", action="append", default=[], metavar="NAME",
                   help="pass only the --imatrix entries whose name contains NAME (repeatable)")
    p.add_argument("--exclude-weights", action="append", default=[], metavar="NAME",
                   help="pass the --imatrix entries but those whose name contains NAME (repeatable)")
    p.add_argument("--options-manifest", help="merge the tensors' types and hashes per file type and options here")
    p.add_argument("--suffix", default="", help="added to each output file's name (after the file type)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--manifest", help="write the tensors' types and hashes and llama.cpp's logit statistics here")
    p.add_argument("--mix-manifest", help="write the hash of the tensors' types per file type here")
    a = p.parse_args(argv)
    manifest, mixes, cases = {}, {}, {}
    os.makedirs(a.out_dir, exist_ok=True)
    stem = Path(a.src).name.removesuffix(".gguf")
    given = read_imatrix(a.imatrix) if a.imatrix else None
    if given is not None and (a.include_weights or a.exclude_weights):
        given = select_weights(given, a.include_weights, a.exclude_weights)
    overrides = []
    for item in a.tensor_type:
        pattern, _, qname = item.partition("=")
        overrides.append((pattern.lower(), ggml_type(qname)))
    for ftype in a.ftype or list(FTYPES):
        imatrix, tag = given, ""
        if ftype in NEEDS_IMATRIX and imatrix is None:
            imatrix, tag = flat_imatrix(a.src), "-flat"
        elif NEEDS_IMATRIX.get(ftype) in NEEDS_WEIGHTS:
            # llama.cpp also quantizes 2-D tensors no matrix multiplies (the compressors' position biases), which
            # no collected matrix covers and without which it refuses the file: their columns' energy, as flashlite
            lacking = {n for n in flat_imatrix(a.src) if n not in imatrix and n != "token_embd.weight"}  # it needs none
            missing = energy_imatrix(a.src, lacking)
            if missing:
                print(f"{ftype}: sums of squared weights as the importance of {len(missing)} tensor(s) the matrix "
                      f"lacks, e.g. {next(iter(missing))}", flush=True)
                imatrix = {**imatrix, **missing}
        out = os.path.join(a.out_dir, f"{stem}-{ftype}{a.suffix}{tag}.gguf")
        t0 = time.perf_counter()
        quantize(a.src, out, ftype, imatrix, a.threads, overrides, a)
        print(f"{ftype:10s} {os.path.getsize(out):>12,d} bytes  {time.perf_counter() - t0:6.1f} s  {out}",
              flush=True)
        imatrix_kind = "flat" if tag else ("given" if imatrix else None)
        if a.manifest:
            manifest[ftype] = {"imatrix": imatrix_kind, "llama_cpp": logit_stats(out, a.threads),
                               "tensors": tensor_hashes(out)}
        if a.mix_manifest:
            mixes[ftype] = {"imatrix": imatrix_kind, "types_sha256": types_sha256(out)}
        if a.options_manifest:
            cases[" ".join([ftype, *options_args(argv)])] = {
                "ftype": ftype, "args": options_args(argv), "imatrix": imatrix_kind, "tensors": tensor_hashes(out),
                "kv": metadata_of(out, [item.partition("=")[0] for item in a.override_kv])}
    if a.mix_manifest:
        import gguf

        source = [[t.name, [int(n) for n in t.shape], int(t.tensor_type)] for t in gguf.GGUFReader(a.src).tensors]
        _write_json(a.mix_manifest, {"source": Path(a.src).name, "llama_cpp_python": "0.3.36", "tensors": source,
                                     "ftypes": mixes})
    if a.options_manifest:
        import json

        doc = json.loads(Path(a.options_manifest).read_text()) if os.path.exists(a.options_manifest) else {}
        doc.setdefault("source", os.path.relpath(a.src, REPO))
        doc.setdefault("cases", {}).update(cases)
        _write_json(a.options_manifest, doc)
    if a.manifest:
        names = sorted(next(iter(manifest.values()))["tensors"])
        for entry in manifest.values():  # one list per file type, in the order of `tensors`
            entry["tensors"] = [entry["tensors"][n] for n in names]
        _write_json(a.manifest, {"source": os.path.relpath(a.src, REPO), "llama_cpp_python": "0.3.36",
                                 "tensors": names, "ftypes": manifest})


# the options of llama-quantize that an options manifest records, with the number of values each takes
QUANTIZE_OPTIONS = {"--pure": 0, "--leave-output-tensor": 0, "--output-tensor-type": 1, "--token-embedding-type": 1,
                    "--tensor-type": 1, "--override-kv": 1, "--include-weights": 1, "--exclude-weights": 1}


def options_args(argv: list[str]) -> list[str]:
    """The llama-quantize options of a command line, in their order (what flashlite quantize is given too)."""
    out, i = [], 0
    while i < len(argv):
        n = QUANTIZE_OPTIONS.get(argv[i])
        if n is None:
            i += 1
            continue
        out += argv[i:i + 1 + n]
        i += 1 + n
    return out


def _write_json(path: str, doc: dict) -> None:
    import json

    tmp = path + ".partial"
    with open(tmp, "w") as fh:
        json.dump(doc, fh, sort_keys=True, separators=(",", ":"))
        fh.write("\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
