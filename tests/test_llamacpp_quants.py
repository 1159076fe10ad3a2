"""Every file type of llama.cpp's quantizer, on llama.cpp's own conversion of the oracle checkpoint.

tests/fixtures/llamacpp/quants.json was made by tools/make_llamacpp_quants.py with llama.cpp itself (the files are
too large to commit): for each file type, the type and a hash of every tensor llama.cpp's quantizer wrote, and
llama.cpp's own logits on the oracle prompt judged against transformers' goldens. Here `flashlite quantize` makes
each file type from the same source: every tensor must come out with llama.cpp's type and byte for byte its bytes
(the mix and every quantizer), and flashlite must run the file at least as close to the goldens as llama.cpp does
(its activations stay f32 where llama.cpp rounds them to 8 bits).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from flashlite.cli import main
from flashlite.gguf_reader import GGUFReader
from flashlite.model import load
from quant.imatrix import Imatrix, write_imatrix

FIXTURES = Path(__file__).parent / "fixtures"
MANIFEST = json.loads((FIXTURES / "llamacpp" / "quants.json").read_text())
SOURCE = Path(__file__).parents[1] / MANIFEST["source"]
CLEAR = 1e-4  # as tests/test_forward.py: decision gaps at or below this are near-ties


@pytest.fixture(scope="module")
def flat_imatrix(tmp_path_factory) -> Path:
    """Weight 1 for every column of every matrix (per expert): what the manifest's tool gives llama.cpp for the
    file types it will not make without an importance matrix."""
    im = Imatrix(datasets=["flat"], chunk_count=1, chunk_size=512)
    with GGUFReader(SOURCE) as r:
        for t in r.tensors:
            dims = [n for n in t.ne]
            while len(dims) > 1 and dims[-1] == 1:
                dims.pop()
            if len(dims) >= 2 and t.name.endswith(".weight"):
                experts = t.ne[2] if len(t.ne) == 3 else 1
                im.sums[t.name] = np.ones((experts, t.ne[0]), np.float32)
                im.counts[t.name] = np.ones(experts, np.float32)
    path = tmp_path_factory.mktemp("imatrix") / "flat.imatrix.gguf"
    write_imatrix(path, im)
    return path


@pytest.fixture(scope="module")
def goldens():
    return np.load(FIXTURES / "tiny_v4" / "goldens.npz")


@pytest.mark.parametrize("ftype", sorted(MANIFEST["ftypes"]))
def test_file_type_is_llama_cpp_byte_for_byte_and_runs_closer_than_llama_cpp(ftype, flat_imatrix, goldens, tmp_path):
    want = MANIFEST["ftypes"][ftype]
    out = tmp_path / f"{ftype}.gguf"
    args = ["quantize", str(SOURCE), str(out), "--type", ftype, "--quiet"]
    if want["imatrix"] == "flat":
        args += ["--imatrix", str(flat_imatrix)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output

    with GGUFReader(out) as r:
        got = {t.name: f"{t.type}:{hashlib.sha256(r.data(t).tobytes()).hexdigest()[:16]}" for t in r.tensors}
    expected = dict(zip(MANIFEST["tensors"], want["tensors"]))
    assert got.keys() == expected.keys()
    wrong = [(n, got[n], expected[n]) for n in expected if got[n] != expected[n]]
    assert not wrong, f"{len(wrong)} tensor(s) differ from llama.cpp's (name, ours, theirs): {wrong[:4]}"

    logits = load(out).logits(goldens["prompt_ids"])
    clear = goldens["decision_gap"] > CLEAR
    top1 = float((logits.argmax(1) == goldens["logits"].argmax(1))[clear].mean())
    rms = float(np.sqrt(np.mean((logits - goldens["logits"]) ** 2)))
    theirs = want["llama_cpp"]
    print(f"{ftype}: top-1 {top1:.3f} (llama.cpp {theirs['top1_clear']:.3f}), rms {rms:.3f} "
          f"(llama.cpp {theirs['rms']:.3f})")
    assert top1 >= theirs["top1_clear"]
    assert rms <= theirs["rms"]
