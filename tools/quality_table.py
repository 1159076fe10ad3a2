"""The quantization quality table of docs/quality.md, made again: every type and mix `flashlite quantize` writes and
every file type of llama.cpp's quantizer, applied to the trained default model (tests/fixtures/small_v4), each
measured against the exact f32 file on the held-out text (tests/fixtures/small_v4/heldout.txt) as
llama-perplexity --kl-divergence measures it (flashlite/quality.py).

    python tools/quality_table.py [--work DIR] [--llamacpp-python /path/to/venv/bin/python] [--doc docs/quality.md]

Steps, each skipped when its output is already in the work folder (default /tmp/flashlite-quality):
1. f32.gguf: `flashlite quantize tests/fixtures/small_v4 --type f32` (the checkpoint's FP8/FP4 values, exact).
2. calibration.txt: training-like text, never the held-out text: the prose of one in 15 of the training records of
   tools/train_tiny.py's corpus (the same documentation modules the model learned from; the held-out modules are
   excluded by the trainer's own rule), and imatrix.gguf: `flashlite imatrix` of the f32 model over it.
3. flashlite's files: llama.cpp's 35 file types requantized from f32.gguf (as llama-quantize requantizes: the same
   source llama.cpp gets), ds4's recipes and flashlite's own from the checkpoint folder; every one whose types use
   an importance matrix also with imatrix.gguf.
4. llama.cpp's files (with --llamacpp-python, a Python with llama-cpp-python; tools/make_llamacpp_quants.py): every
   file type from f32.gguf, without an importance matrix (a flat one for the types that refuse to run without)
   and with imatrix.gguf, plus llama.cpp made to write flashlite's and ds4's 2-bit expert mixes (the same types,
   through its --tensor-type overrides).
5. Every distinct file (files whose tensors are byte for byte the same are measured once) against f32.gguf:
   size, bits per weight, perplexity, KL divergence, top-1 agreement. results.json keeps them.
6. The tables, printed, and with --doc written into that file between its `<!-- quality-table -->` markers.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tools")]

FIXTURE = REPO / "tests" / "fixtures" / "small_v4"
HELDOUT = FIXTURE / "heldout.txt"
CTX = 512
CALIBRATION_EVERY = 15

FLOAT_TYPES = {"F32", "F16", "BF16"}
# flashlite's mixes beyond one type for all: the named ones, 2-bit expert mixes, and two that split Q8_0's error
MIXES = ("mxfp4-q8_0", "mxfp4-bf16", "q4_k-q8_0", "q8_0-bf16", "q8_0-f32", "f32-q8_0", "iq2_xxs-q8_0",
         "iq2_xs-q8_0", "iq2_s-q8_0", "q2_k-q8_0", "iq3_xxs-q8_0")
# llama.cpp made to write a flashlite or ds4 mix: (file type, --tensor-type overrides, first match wins); the
# router is never quantized by llama.cpp (it stays F32 from the f32 source)
SAME_TYPES = {
    "iq2_xxs-q8_0": ("IQ2_XXS", [r"_exps\.=IQ2_XXS", r"hc_(attn|ffn)_fn\.|output_hc_fn\.=F32", r"_ape\.=F32",
                                 r".=Q8_0"]),
    "q2_k-q8_0": ("Q2_K", [r"_exps\.=Q2_K", r"hc_(attn|ffn)_fn\.|output_hc_fn\.=F32", r"_ape\.=F32", r".=Q8_0"]),
    "ds4-q2": ("IQ2_XXS", [r"ffn_down_exps\.=Q2_K", r"_exps\.=IQ2_XXS",
                           r"_shexp\.|\.attn_(kv|q_a|q_b|output_a|output_b)\.weight|^output\.weight=Q8_0", r".=F16"]),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ inputs

def calibration_text(residue: int = 0) -> str:
    """The prose of the training records whose name hashes to `residue` modulo CALIBRATION_EVERY."""
    import train_tiny as tt

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        records = tt.documented_objects(tt.stdlib_modules()) + tt.topic_records()
    train = [r for r in records if not tt.held_out(r)]
    picked = [r for r in train
              if int(hashlib.sha256(f"{r['module']}:{r['name']}".encode()).hexdigest(), 16) % CALIBRATION_EVERY == residue]
    return "\n\n".join(tt.prose_of(r) for r in picked)


def prepare(work: Path) -> None:
    from flashlite import imatrix as fim
    from flashlite.model import load
    from quant.convert import convert
    from quant.recipes import Recipe

    work.mkdir(parents=True, exist_ok=True)
    if not (work / "f32.gguf").exists():
        convert(FIXTURE, work / "f32.gguf", Recipe.parse("f32"), progress=False, log=lambda m: None)
    if not (work / "calibration.txt").exists():
        (work / "calibration.txt").write_text(calibration_text())
    if not (work / "train-sample.txt").exists():  # another training-like text, for a second look
        (work / "train-sample.txt").write_text(calibration_text(7))
    if not (work / "imatrix.gguf").exists():
        model = load(work / "f32.gguf")
        t0 = time.perf_counter()
        im = fim.collect(model, (work / "calibration.txt").read_text(), CTX, dataset="calibration.txt")
        fim.write(work / "imatrix.gguf", im)
        log(f"imatrix: {im.chunk_count} chunks of {CTX} in {time.perf_counter() - t0:.0f} s")


# ------------------------------------------------------------------ files

def uses_imatrix(name: str) -> bool:
    """Whether a recipe has a type whose quantizer an importance matrix changes (not float, Q8_0 or MXFP4)."""
    from quant.recipes import DS4_RECIPES, FTYPES

    if name in FTYPES:
        return FTYPES[name][1] not in FLOAT_TYPES | {"Q8_0", "MXFP4"}
    if name in DS4_RECIPES:
        return True
    return any(part not in ("f32", "f16", "bf16", "q8_0", "mxfp4") for part in name.split("-"))


def ours(work: Path) -> list[dict]:
    """flashlite's files: (recipe, with or without the importance matrix)."""
    from quant.convert import convert
    from quant.imatrix import read_imatrix
    from quant.recipes import DS4_RECIPES, FTYPES, TYPES, Recipe

    im = read_imatrix(work / "imatrix.gguf")
    names = list(FTYPES) + list(DS4_RECIPES) + [t for t in TYPES if t != "mxfp4"] + list(MIXES)
    out = []
    (work / "ours").mkdir(exist_ok=True)
    for name in names:
        for with_im in ((False, True) if uses_imatrix(name) else (False,)):
            path = work / "ours" / f"{name}{'-imatrix' if with_im else ''}.gguf"
            notes = []
            if not path.exists():
                src = work / "f32.gguf" if name in FTYPES else FIXTURE
                convert(src, path, Recipe.parse(name), progress=False, log=notes.append,
                        imatrix=im if with_im else None)
                path.with_suffix(".notes").write_text("\n".join(notes))
            notes = path.with_suffix(".notes").read_text().splitlines()
            out.append({"maker": "flashlite", "recipe": name, "imatrix": with_im, "path": str(path), "notes": notes})
    return out


def llamacpp(work: Path, python: str | None) -> list[dict]:
    """llama.cpp's files (made when `python` is given and they are missing)."""
    from quant.recipes import FTYPES

    runs = [("plain", [], None, list(FTYPES)),
            ("imatrix", ["--imatrix", str(work / "imatrix.gguf")], None, [f for f in FTYPES if uses_imatrix(f)])]
    runs += [(f"same-{mix}", ["--imatrix", str(work / "imatrix.gguf"), f"--suffix=-as-{mix}"]
              + [f"--tensor-type={o}" for o in overrides], mix, [ftype])
             for mix, (ftype, overrides) in SAME_TYPES.items()]
    out = []
    for tag, extra, mix, ftypes in runs:
        folder = work / f"llamacpp-{tag}"
        folder.mkdir(exist_ok=True)
        missing = [f for f in ftypes if not list(folder.glob(f"f32-{f}.gguf")) + list(folder.glob(f"f32-{f}-*.gguf"))]
        if missing and python:
            cmd = [python, str(REPO / "tools" / "make_llamacpp_quants.py"), str(folder), "--src",
                   str(work / "f32.gguf"), "--threads", str(os.cpu_count()), *extra]
            cmd += [a for f in missing for a in ("--ftype", f)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"llama.cpp's quantizer failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        for f in ftypes:
            for path in sorted(folder.glob(f"f32-{f}*.gguf")):
                rest = path.name[len(f"f32-{f}"):-len(".gguf")]
                if rest and not rest.startswith("-"):
                    continue  # another file type whose name starts with this one's
                out.append({"maker": "llama.cpp", "recipe": mix or f, "ftype": f, "imatrix": tag != "plain",
                            "flat": rest.endswith("-flat"), "path": str(path), "notes": []})
    return out


def content(path: str) -> dict:
    """A GGUF's tensors: a hash of (name, type, bytes) over all of them, sizes, and the weights per type."""
    from flashlite import block_formats
    from flashlite.gguf_reader import GGUFReader

    digest = hashlib.sha256()
    total_bytes = total_n = expert_bytes = expert_n = 0
    by_type: dict[str, int] = {}
    with GGUFReader(path) as reader:
        for t in sorted(reader.tensors, key=lambda t: t.name):
            digest.update(f"{t.name}:{t.type};".encode())
            digest.update(reader.data(t).tobytes())
            n = int(np.prod(t.ne))
            total_bytes += t.nbytes
            total_n += n
            if "_exps." in t.name:
                expert_bytes += t.nbytes
                expert_n += n
            if len(t.ne) >= 2 and n > 4096:
                name = block_formats.type_name(t.type)
                by_type[name] = by_type.get(name, 0) + n
    return {"sha256": digest.hexdigest(), "file_bytes": os.path.getsize(path), "bpw": 8 * total_bytes / total_n,
            "expert_bpw": 8 * expert_bytes / max(expert_n, 1), "types": by_type}


# ------------------------------------------------------------------ measurement

def measure(entries: list[dict], work: Path, text: Path = HELDOUT, cache: str = "results.json",
            n_chunks: int | None = None, only=None, batch: int | None = None) -> dict:
    """results by content hash, each file measured once (the cache file in `work` keeps them): all entries, or
    those whose (recipe, imatrix) is in `only`, over `text` (at most n_chunks, forward calls of `batch` tokens)."""
    from flashlite import quality
    from flashlite.model import load

    cache_path = work / cache
    results = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    for e in entries:
        if "sha256" not in e:
            e.update(content(e["path"]))
    todo = {e["sha256"]: e["path"] for e in entries
            if e["sha256"] not in results and (only is None or (e["recipe"], e["imatrix"]) in only)}
    if not todo:
        return results
    base = load(work / "f32.gguf")
    ids = quality.text_tokens(base, text.read_text())
    chunks = quality.make_chunks(ids, CTX, n_chunks)
    t0 = time.perf_counter()
    base_logits = quality.base_logits(base, chunks, batch=batch)
    log(f"f32 base on {text.name}: {len(chunks)} chunks in {time.perf_counter() - t0:.0f} s; {len(todo)} files")
    for i, (sha, path) in enumerate(todo.items()):
        t0 = time.perf_counter()
        model = load(path)
        r = quality.perplexity(model, ids, CTX, n_chunks, kl_base=base_logits, batch=batch)
        model.close()
        k = r.kl
        results[sha] = {"ppl": r.ppl, "ppl_err": r.ppl_err, "kld": k.kld_mean, "kld_err": k.kld_mean_err,
                        "kld_median": k.kld_median, "kld_p99": k.kld_p99, "top1": k.same_top,
                        "top1_err": k.same_top_err, "dp_rms": k.p_diff_rms, "count": r.count}
        log(f"[{i + 1}/{len(todo)}] {Path(path).parent.name}/{Path(path).name}: PPL {r.ppl:.1f}, KLD "
            f"{k.kld_mean:.5f}, top-1 {100 * k.same_top:.2f}% ({time.perf_counter() - t0:.0f} s)")
        cache_path.write_text(json.dumps(results, indent=1, sort_keys=True))
    return results


# the files also measured on the second training-like text (and, for Q8_0, on the decode path)
SECOND_LOOK = [("f32", False), ("Q8_0", False), ("q8_0", False), ("mxfp4-q8_0", False), ("q8_0-f32", False),
               ("f32-q8_0", False), ("Q6_K", False), ("Q4_K_M", False), ("Q4_K_M", True), ("q4_k-q8_0", True),
               ("ds4-q4", True), ("IQ4_XS", True), ("ds4-q2", False), ("ds4-q2", True), ("iq2_xxs-q8_0", True),
               ("q2_k-q8_0", True), ("IQ2_M", True), ("IQ2_XXS", True), ("Q2_K", True)]
SECOND_CHUNKS = 12
DECODE_LOOK = [("f32", False), ("Q8_0", False), ("q8_0", False)]
DECODE_CHUNKS = 4


# ------------------------------------------------------------------ tables

def _types(e: dict) -> str:
    total = sum(e["types"].values())
    shares = sorted(e["types"].items(), key=lambda kv: -kv[1])
    return ", ".join(f"{t} {100 * n / total:.0f}%" for t, n in shares if n / total >= 0.03)


def _fallbacks(e: dict) -> str:
    return "; ".join(n.split(" instead (")[0].replace(" needs rows in multiples of 256:", " (256-block):")
                     for n in e["notes"] if "needs rows in multiples" in n)


def render(entries: list[dict], results: dict) -> str:
    """The markdown tables."""
    from quant.recipes import DS4_RECIPES, FTYPES

    f32 = next(e for e in entries if e["maker"] == "flashlite" and e["recipe"] == "f32")
    llama_by_sha: dict[str, list[dict]] = {}
    for e in entries:
        if e["maker"] == "llama.cpp":
            llama_by_sha.setdefault(e["sha256"], []).append(e)
    ours_shas = {e["sha256"] for e in entries if e["maker"] == "flashlite"}

    def row(e: dict, label: str, same: str) -> str:
        r = results[e["sha256"]]
        im = "yes" if e["imatrix"] else ("flat" if e.get("flat") else "no")
        return (f"| {label} | {im} | {e['file_bytes'] / 2**20:.2f} | {e['bpw']:.2f} | {e['expert_bpw']:.2f} | "
                f"{r['ppl']:.0f} | {r['kld']:.5f} ± {r['kld_err']:.5f} | {r['kld_p99']:.4f} | "
                f"{100 * r['top1']:.2f} | {same} | {_types(e)} |")

    head = ("| type | imatrix | MiB | bpw | experts bpw | PPL | mean KLD | KLD p99 | top-1 % | llama.cpp's file | "
            "weights by type |\n|---|---|---|---|---|---|---|---|---|---|---|")
    sections = []
    groups = [("llama.cpp's file types (flashlite's requantization of f32.gguf; llama.cpp's own file of the same "
               "type and matrix, when byte for byte the same, is not listed again)", lambda e: e["recipe"] in FTYPES),
              ("ds4's recipes", lambda e: e["recipe"] in DS4_RECIPES),
              ("flashlite's recipes", lambda e: e["recipe"] not in FTYPES and e["recipe"] not in DS4_RECIPES)]
    for title, pick in groups:
        lines = [f"#### {title}\n", head]
        seen = set()
        for e in entries:
            if e["maker"] != "flashlite" or not pick(e) or e["sha256"] in seen:
                continue
            seen.add(e["sha256"])
            twins = llama_by_sha.get(e["sha256"], [])
            same = "identical" if twins else ("—" if e["recipe"] not in FTYPES else "differs")
            # recipes of this group that write the same file share its row (Q2_K_S is Q2_K on this model)
            label = " = ".join(dict.fromkeys(f"`{x['recipe']}`" for x in entries if x["maker"] == "flashlite"
                                             and pick(x) and x["sha256"] == e["sha256"]))
            dup = [x for x in entries if x is not e and x["maker"] == "flashlite" and x["sha256"] == e["sha256"]]
            if dup and e["imatrix"] is False and any(x["imatrix"] for x in dup):
                label += " (the matrix changes nothing)"
            lines.append(row(e, label, same))
        sections.append("\n".join(lines))
    lines = ["#### llama.cpp's files that differ from flashlite's\n", head]
    for e in entries:
        if e["maker"] == "llama.cpp" and e["sha256"] not in ours_shas:
            what = f"`{e['ftype']}`" if e["recipe"] == e["ftype"] else f"`{e['ftype']}` as `{e['recipe']}`"
            lines.append(row(e, what, "llama.cpp's"))
        elif e["maker"] == "llama.cpp" and e["recipe"] != e["ftype"]:
            lines.append(row(e, f"`{e['ftype']}` as `{e['recipe']}`", "identical to flashlite's"))
    sections.append("\n".join(lines))
    fallbacks = sorted({_fallbacks(e) for e in entries if e["maker"] == "flashlite" and _fallbacks(e)})
    base = results[f32["sha256"]]
    sections.append(f"f32 (the base): {f32['file_bytes'] / 2**20:.2f} MiB, PPL {base['ppl']:.0f} ± "
                    f"{base['ppl_err']:.0f} over {base['count']} scored tokens.\n\nFallbacks the recipes noted "
                    f"(rows of 128 columns):\n\n" + "\n".join(f"- {f}" for f in fallbacks))
    return "\n\n".join(sections)


def render_second(entries: list[dict], held: dict, train: dict, decode: dict) -> str:
    """The second look: a few files on training-like text, and Q8_0 on the decode path."""
    lines = [f"#### On training-like text ({SECOND_CHUNKS} chunks of train-sample.txt) next to the held-out text\n",
             "| type | imatrix | bpw | experts bpw | held-out KLD | held-out top-1 % | training-like PPL | "
             "training-like KLD | training-like top-1 % |", "|---|---|---|---|---|---|---|---|---|"]
    for recipe, with_im in SECOND_LOOK:
        e = next((x for x in entries if x["maker"] == "flashlite" and x["recipe"] == recipe
                  and x["imatrix"] == with_im), None)
        if e is None or e["sha256"] not in train:
            continue
        h, t = held[e["sha256"]], train[e["sha256"]]
        lines.append(f"| `{recipe}` | {'yes' if with_im else 'no'} | {e['bpw']:.2f} | {e['expert_bpw']:.2f} | "
                     f"{h['kld']:.5f} | {100 * h['top1']:.2f} | {t['ppl']:.2f} | {t['kld']:.5f} ± {t['kld_err']:.5f} | "
                     f"{100 * t['top1']:.2f} ± {100 * t['top1_err']:.2f} |")
    lines += ["", f"#### The decode path ({DECODE_CHUNKS} chunks, one token a forward call: activations rounded to "
              "Q8_0 as llama.cpp's CPU backend rounds them)\n",
              "| type | text | PPL | mean KLD | KLD p99 | top-1 % |", "|---|---|---|---|---|---|"]
    for recipe, with_im in DECODE_LOOK:
        e = next(x for x in entries if x["maker"] == "flashlite" and x["recipe"] == recipe
                 and x["imatrix"] == with_im)
        for name, res in decode.items():
            r = res.get(e["sha256"])
            if r is not None:
                lines.append(f"| `{recipe}` | {name} | {r['ppl']:.2f} | {r['kld']:.5f} ± {r['kld_err']:.5f} | "
                             f"{r['kld_p99']:.4f} | {100 * r['top1']:.2f} ± {100 * r['top1_err']:.2f} |")
    return "\n".join(lines)


def write_doc(doc: Path, table: str) -> None:
    text = doc.read_text()
    start, end = "<!-- quality-table -->", "<!-- /quality-table -->"
    a, b = text.index(start) + len(start), text.index(end)
    doc.write_text(text[:a] + "\n" + table + "\n" + text[b:])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/flashlite-quality"))
    p.add_argument("--llamacpp-python", help="a Python with llama-cpp-python (makes llama.cpp's files)")
    p.add_argument("--doc", type=Path, help="write the tables into this file between its markers")
    p.add_argument("--json", type=Path, help="write every file's figures here")
    a = p.parse_args(argv)
    prepare(a.work)
    t0 = time.perf_counter()
    entries = ours(a.work)
    log(f"flashlite's files: {len(entries)} ({time.perf_counter() - t0:.0f} s)")
    entries += llamacpp(a.work, a.llamacpp_python)
    results = measure(entries, a.work)
    second = measure(entries, a.work, a.work / "train-sample.txt", "results-train.json", SECOND_CHUNKS,
                     SECOND_LOOK)
    decode = {name: measure(entries, a.work, text, f"results-decode-{name}.json", DECODE_CHUNKS, DECODE_LOOK, 1)
              for name, text in (("held-out", HELDOUT), ("training-like", a.work / "train-sample.txt"))}
    table = render(entries, results) + "\n\n" + render_second(entries, results, second, decode)
    print(table)
    if a.doc:
        write_doc(a.doc, table)
    if a.json:
        a.json.write_text(json.dumps([{k: v for k, v in e.items() if k != "path"} | results[e["sha256"]]
                                      for e in entries], indent=1))


if __name__ == "__main__":
    main()
