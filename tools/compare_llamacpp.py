"""Run one GGUF in flashlite and in llama.cpp on the same tokens and compare both with the file's exact evaluation.

    python tools/compare_llamacpp.py MODEL.gguf --llamacpp-python ~/.venvs/llamacpp/bin/python [--tokens 20]
        [--exact EXACT.gguf]

The exact evaluation is flashlite's f32 path on the file's tensors decoded to F32 (`flashlite quantize MODEL.gguf
EXACT.gguf --type f32`, made in a temporary folder unless --exact names one; it needs disk for an all-F32 copy):
for a quantized file it is what an engine with no rounding of its own would give. Both engines run the tokens as one
prompt; flashlite's matmuls round the activations to 8 bits as llama.cpp's do, for any number of tokens. llama.cpp runs in the given venv
(tools/make_llamacpp_quants.py's llama_logits: weight repacking off). Prints relative RMS and top-1 agreement of
each engine against the exact logits.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

_LLAMA = """
import sys, numpy as np
sys.path.insert(0, sys.argv[1])
from make_llamacpp_quants import llama_logits
np.save(sys.argv[4], llama_logits(sys.argv[2], [int(t) for t in sys.argv[3].split(",")], 2))
"""


def llama_cpp_logits(python: str, model: str, ids: list[int]) -> np.ndarray:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "logits.npy")
        run = subprocess.run([python, "-c", _LLAMA, str(REPO / "tools"), model, ",".join(map(str, ids)), out],
                             capture_output=True, text=True)
        if run.returncode:
            raise SystemExit(f"llama.cpp failed on {model}:\n{run.stderr[-3000:]}")
        return np.load(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--llamacpp-python", required=True, help="the python of a venv with llama-cpp-python")
    p.add_argument("--tokens", type=int, default=20, help="prompt length (ids spread over the vocabulary)")
    p.add_argument("--exact", help="an all-F32 copy of MODEL already made")
    a = p.parse_args(argv)
    from flashlite.model import load

    model = load(a.model)
    vocab = model.args.vocab_size
    ids = [int(i) for i in np.random.default_rng(0).integers(0, vocab, a.tokens)]
    with tempfile.TemporaryDirectory(dir=Path(a.model).parent) as d:
        exact_path = a.exact
        if exact_path is None:
            exact_path = os.path.join(d, "exact.gguf")
            from click.testing import CliRunner

            from flashlite.cli import main as cli

            result = CliRunner().invoke(cli, ["quantize", a.model, exact_path, "--type", "f32", "--allow-requantize",
                                         "--quiet"])
            if result.exit_code:
                raise SystemExit(result.output)
        exact = load(exact_path).logits(ids)
    ours = model.logits(ids)
    theirs = llama_cpp_logits(a.llamacpp_python, a.model, ids)

    def rel(x):
        return float(np.sqrt(np.mean((x - exact) ** 2) / np.mean(exact ** 2)))

    print(f"{Path(a.model).name}: {a.tokens} tokens")
    for name, x in (("flashlite", ours), ("llama.cpp", theirs)):
        print(f"  {name:9s} vs exact: relative RMS {rel(x):.2e}, top-1 agreement {np.mean(x.argmax(1) == exact.argmax(1)):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
