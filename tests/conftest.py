"""Fixtures shared by the test files: the oracle checkpoint quantized to GGUF, once per session and recipe."""
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from flashlite import matmul as fm
from flashlite.cli import main
from flashlite.model import load

FIXTURE = Path(__file__).parent / "fixtures" / "tiny_v4"


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    """tiny_gguf(*quantize_args) -> tiny_v4.gguf quantized from the oracle checkpoint with those arguments of
    `flashlite quantize` (none: the default recipe); made once per session for each distinct list."""
    made = {}

    def make(*args: str) -> Path:
        if args not in made:
            out = tmp_path_factory.mktemp("gguf") / "tiny_v4.gguf"
            result = CliRunner().invoke(main, ["quantize", str(FIXTURE), str(out), "--quiet", *args])
            assert result.exit_code == 0, result.output
            made[args] = out
        return made[args]

    return make


@pytest.fixture(scope="session")
def f32_gguf(tiny_gguf):
    """The oracle model with every tensor f32: its logits follow transformers' to about 1e-5."""
    return tiny_gguf("--type", "f32")


@pytest.fixture(scope="module")
def model(f32_gguf):
    """The f32 oracle model, loaded once per test file (a file may define a model of its own instead)."""
    return load(f32_gguf)


@pytest.fixture(scope="session")
def goldens():
    """transformers' float32 logits, routing and hidden states for the oracle prompt (tools/make_reference.py)."""
    return np.load(FIXTURE / "goldens.npz")


@pytest.fixture(params=fm.simd_levels())
def level(request):
    """Each SIMD level this CPU runs, forced for the test and restored after."""
    before = fm.simd_level()
    fm.set_simd_level(request.param)
    yield request.param
    fm.set_simd_level(before)
