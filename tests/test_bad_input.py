"""Bad input through the command line and the Python API: one clear line naming the argument, a non-zero exit,
never a traceback, an overflow or a silently changed value."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import gguf
import pytest

from flashlite.model import load

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def q8(tiny_gguf):
    return tiny_gguf("--type", "q8_0")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flashlite.cli", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, cwd=ROOT, timeout=120)


@pytest.mark.parametrize("args,message", [
    (["run", "--tokens", "1,99999999999999999999", "-n", "2"], "99999999999999999999 is not a token id (0..511)"),
    (["run", "--tokens", "1,2,512"], "512 is not a token id (0..511)"),
    (["run", "--tokens", "1,2", "-n", "5000"], "the prompt's 2 tokens and 5000 more exceed the context of 1024"),
    (["run", "--tokens", "1,2", "--ram-budget", "99999999999T"], "is not a size between 1 byte and 4 EiB"),
    (["run", "--tokens", "1,2", "-t", "300"], "300 is not in the range 1<=x<=256"),
    (["chat", "-p", "hi", "--temp", "nan"], "--temp: NaN is not a number"),
    (["chat", "-p", "hi", "--top-p", "0"], "0.0 is not in the range 0.0<x<=1.0"),
    (["chat", "-p", "a prompt longer than the context", "-c", "4"], "the context holds 4"),
], ids=["token-overflow", "token-range", "n-beyond-context", "ram-budget", "threads", "temp-nan", "top-p-zero",
        "prompt-beyond-context"])
def test_cli_errors_are_one_line_and_non_zero(q8, args, message):
    out = _cli(*args[:1], "-m", str(q8), *args[1:])
    assert out.returncode != 0
    assert message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout


def test_unexpected_failure_is_one_line_unless_debugging(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGUF" + bytes(60))  # version 0
    out = _cli("run", "-m", str(bad), "--tokens", "1")
    assert out.returncode == 1 and "unsupported GGUF version 0" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("ids,kind,message", [
    ([], ValueError, "token_ids: expected a non-empty flat sequence"),
    ([1.5, 2], TypeError, "token_ids: expected integers, got float64"),
    ([[1, 2], [3, 4]], ValueError, "got shape (2, 2)"),
    ([1, 512], ValueError, "token_ids: 512 is not a token id (0..511)"),
    ([-1], ValueError, "token_ids: -1 is not a token id"),
    ([1, 2**70], ValueError, "is not a token id"),
])
def test_api_validates_token_ids(q8, ids, kind, message):
    m = load(q8)
    for call in (lambda: m.logits(ids), lambda: list(m.generate(ids, 2)), lambda: m.forward(ids)):
        with pytest.raises(kind, match=message.replace("(", r"\(").replace(")", r"\)")):
            call()


@pytest.mark.parametrize("messages,message", [
    ([], "messages: expected a non-empty array"),
    ([{"role": "robot", "content": "hi"}], "messages[0].role: expected one of"),
    ([{"role": "user", "content": 5}], "messages[0].content: expected a string"),
    ("hello", "messages: expected a non-empty array"),
])
def test_api_validates_messages_as_the_server_does(q8, messages, message):
    m = load(q8)
    with pytest.raises(ValueError) as err:
        m.create_chat_completion(messages, max_tokens=2)
    assert str(err.value).startswith(message)


def test_version_and_system_info_name_the_c_cores_build():
    import json

    from flashlite import __version__
    from flashlite import matmul as fm

    out = _cli("--version")
    assert out.returncode == 0 and out.stdout.startswith(f"flashlite {__version__} (C core: {fm.simd_level()}")
    info = json.loads(_cli("system-info", "--json").stdout)
    assert info["simd"] == fm.simd_level() and info["threads"] == fm.threads()
    assert {"Q4_K", "IQ2_XXS", "MXFP4", "Q2_0"} <= set(info["types"])


def _with_nan_scale(src: Path, dst: Path, tensor: str, row: int, block: int) -> None:
    """A copy of src whose Q8_0 tensor has the fp16 scale of one block set to NaN (0x7e00)."""
    info = next(t for t in gguf.GGUFReader(src).tensors if t.name == tensor)
    assert info.tensor_type == gguf.GGMLQuantizationType.Q8_0
    row_bytes = info.shape[0] // 32 * 34
    data = bytearray(src.read_bytes())
    at = info.data_offset + row * row_bytes + block * 34
    data[at:at + 2] = (0x7e00).to_bytes(2, "little")
    dst.write_bytes(bytes(data))


def test_check_tensors_finds_a_nan_scale_that_a_plain_load_does_not_read(q8, tmp_path):
    bad = tmp_path / "nan-scale.gguf"
    rows = next(t for t in gguf.GGUFReader(q8).tensors if t.name == "blk.1.ffn_gate_exps.weight").shape[1]
    _with_nan_scale(q8, bad, "blk.1.ffn_gate_exps.weight", row=2 * rows + 3, block=1)
    load(q8, check_tensors=True).close()  # a sound file passes
    load(bad).close()  # the expert matrices are not read at load
    message = "tensor 'blk.1.ffn_gate_exps.weight' (Q8_0) has a non-finite scale in expert 2, row 3, block 1"
    with pytest.raises(ValueError, match=re.escape(message)):
        load(bad, check_tensors=True)
    run = _cli("run", "-m", str(bad), "--tokens", "1,2", "-n", "1", "--check-tensors")
    assert run.returncode == 1 and message in run.stderr and "Traceback" not in run.stderr, run.stderr
