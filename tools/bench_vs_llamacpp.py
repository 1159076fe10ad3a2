"""flashlite and llama.cpp on the same GGUF, side by side: prompt processing and generation tok/s and their ratio.

    python tools/bench_vs_llamacpp.py MODEL.gguf [MORE.gguf] --llamacpp-python VENV/bin/python [-p 512] [-n 128]
        [-t 1,2] [-r 3]
    python tools/bench_vs_llamacpp.py --install VENV     # makes VENV with llama-cpp-python 0.3.36 (compiles it)

Each round runs one process of each engine in turn (alternated, so that a machine's drift falls on both): a
warmup, then ppP (P random tokens in one batch, logits of the last only) and tgN (N random tokens one at a time)
on a fresh cache, as llama-bench and `flashlite bench` time them. The table gives the medians over the rounds and
flashlite / llama.cpp. llama.cpp runs with its weight repacking off (it aborts on some deepseek4 files otherwise)
and n_batch = n_ubatch = P; the environment's FLASHLITE_LLAMACPP_PYTHON names its interpreter when the option is
not given. Nothing here runs in CI: llama-cpp-python is installed only by --install.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"

_LLAMA = r"""
import json, sys, time
import numpy as np
import llama_cpp

path, n_prompt, n_gen, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
llama_cpp.llama_backend_init()
mp = llama_cpp.llama_model_default_params()
mp.use_extra_bufts = False
model = llama_cpp.llama_model_load_from_file(path.encode(), mp)
if not model:
    raise SystemExit(f"{path}: llama.cpp cannot load it")
cp = llama_cpp.llama_context_default_params()
cp.n_ctx = n_prompt + n_gen + 16
cp.n_batch = cp.n_ubatch = max(n_prompt, 1)
cp.n_threads = cp.n_threads_batch = threads
ctx = llama_cpp.llama_init_from_model(model, cp)
vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
batch = llama_cpp.llama_batch_init(max(n_prompt, 1), 0, 1)
rng = np.random.default_rng(0)

def decode(tokens, start):
    batch.n_tokens = len(tokens)
    for i, tok in enumerate(tokens):
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = int(tok), start + i, 1
        batch.seq_id[i][0] = 0
        batch.logits[i] = i == len(tokens) - 1
    if llama_cpp.llama_decode(ctx, batch) != 0:
        raise SystemExit(f"{path}: llama_decode failed")

def run(p, g):
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
    t0 = time.perf_counter()
    if p:
        decode(rng.integers(0, vocab, p), 0)
    t1 = time.perf_counter()
    for i, tok in enumerate(rng.integers(0, vocab, g)):
        decode([tok], p + i)
    return t1 - t0, time.perf_counter() - t1

run(min(n_prompt, 32), 1)  # warmup
pp, _ = run(n_prompt, 0)
_, tg = run(0, n_gen)
print(json.dumps({"pp": n_prompt / pp, "tg": n_gen / tg}))
"""


def flashlite_rates(model: str, n_prompt: int, n_gen: int, threads: int) -> dict:
    """ppP and tgN tok/s from one `flashlite bench` process (its warmup, one repetition each)."""
    out = subprocess.run([sys.executable, "-m", "flashlite.cli", "bench", "-m", model, "-p", str(n_prompt),
                          "-n", str(n_gen), "-t", str(threads), "-r", "1", "-o", "json"],
                         capture_output=True, text=True, cwd=REPO)
    if out.returncode:
        raise SystemExit(f"flashlite bench failed on {model}: {out.stderr.strip()[-2000:]}")
    records = json.loads(out.stdout)
    return {"pp": next(r["avg_ts"] for r in records if r["n_prompt"]),
            "tg": next(r["avg_ts"] for r in records if r["n_gen"])}


def llama_rates(python: str, model: str, n_prompt: int, n_gen: int, threads: int) -> dict:
    out = subprocess.run([python, "-c", _LLAMA, model, str(n_prompt), str(n_gen), str(threads)],
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"llama.cpp failed on {model}: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def install(venv: str) -> None:
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    subprocess.run([os.path.join(venv, "bin", "python"), "-m", "pip", "install", LLAMA_CPP_PYTHON, "numpy"],
                   check=True)
    print(f"llama.cpp's Python binding is in {venv}; pass --llamacpp-python {venv}/bin/python")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="*", help="GGUF files")
    ap.add_argument("--llamacpp-python", default=os.environ.get("FLASHLITE_LLAMACPP_PYTHON"),
                    help="the interpreter of a venv with llama-cpp-python (see --install)")
    ap.add_argument("--install", metavar="VENV", help="make VENV with llama-cpp-python and stop")
    ap.add_argument("-p", "--n-prompt", type=int, default=512)
    ap.add_argument("-n", "--n-gen", type=int, default=128)
    ap.add_argument("-t", "--threads", default="1,2", help="thread counts, comma-separated")
    ap.add_argument("-r", "--rounds", type=int, default=3, help="alternated rounds; medians are reported")
    args = ap.parse_args()
    if args.install:
        install(args.install)
        return
    if not args.models or not args.llamacpp_python:
        ap.error("give GGUF files and --llamacpp-python (or FLASHLITE_LLAMACPP_PYTHON)")
    threads = [int(t) for t in args.threads.split(",")]
    rows = []
    for model in args.models:
        for t in threads:
            fl, ll = {"pp": [], "tg": []}, {"pp": [], "tg": []}
            for _ in range(args.rounds):
                for key, value in flashlite_rates(model, args.n_prompt, args.n_gen, t).items():
                    fl[key].append(value)
                for key, value in llama_rates(args.llamacpp_python, model, args.n_prompt, args.n_gen, t).items():
                    ll[key].append(value)
            for key, name in (("pp", f"pp{args.n_prompt}"), ("tg", f"tg{args.n_gen}")):
                a, b = statistics.median(fl[key]), statistics.median(ll[key])
                rows.append((Path(model).name, t, name, a, b, a / b))
                print(f"{Path(model).name} t={t} {name}: flashlite {a:.2f}  llama.cpp {b:.2f}  ({a / b:.2f}x)",
                      file=sys.stderr)
    print("| model | threads | test | flashlite t/s | llama.cpp t/s | flashlite / llama.cpp |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, t, test, a, b, ratio in rows:
        print(f"| {name} | {t} | {test} | {a:.2f} | {b:.2f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
