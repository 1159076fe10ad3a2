"""-hf org/repo[:QUANT] on the commands and `quantize org/repo`, resolved through huggingface_hub's cache.
No network here: the tests lay out a Hub cache as huggingface_hub writes it (refs/main, snapshots/<commit>/...)
and run offline."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flashlite.hub import parse_hf

FIXTURE = Path(__file__).parent / "fixtures" / "tiny_v4"

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def hub(tiny_gguf, tmp_path_factory):
    """HF_HOME with flashlite-test/tiny-v4-GGUF holding a Q8_0 model in a folder of its own and an F32 file."""
    home = tmp_path_factory.mktemp("hf")
    repo = home / "hub" / "models--flashlite-test--tiny-v4-GGUF"
    snapshot = repo / "snapshots" / COMMIT
    (snapshot / "Q8_0").mkdir(parents=True)
    shutil.copy(tiny_gguf("--type", "q8_0"), snapshot / "Q8_0" / "tiny-v4-Q8_0.gguf")
    shutil.copy(tiny_gguf("--type", "f32"), snapshot / "tiny-v4-f32.gguf")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    checkpoint = home / "hub" / "models--flashlite-test--tiny_v4" / "snapshots" / COMMIT
    shutil.copytree(FIXTURE, checkpoint, ignore=shutil.ignore_patterns("goldens.npz", "inference", "README.md"))
    (checkpoint.parent.parent / "refs").mkdir()
    (checkpoint.parent.parent / "refs" / "main").write_text(COMMIT)
    return home


def _flashlite(hub, *args):
    env = dict(os.environ, HF_HOME=str(hub), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "flashlite.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def _run(hub, *args):
    return _flashlite(hub, "run", "--tokens", "1,2,3", "-n", "2", *args)


def test_hf_repo_and_quant_pick_the_cached_file(hub):
    for spec, name in (("flashlite-test/tiny-v4-GGUF:q8_0", "tiny-v4-Q8_0.gguf"),
                       ("flashlite-test/tiny-v4-GGUF:F32", "tiny-v4-f32.gguf")):
        out = _run(hub, "-hf", spec)
        assert out.returncode == 0, out.stderr
        assert f"{name} in" in out.stderr and len(out.stdout.strip().split(",")) == 2


def test_hf_errors_name_the_problem(hub, tiny_gguf):
    out = _run(hub, "-hf", "flashlite-test/tiny-v4-GGUF")
    assert out.returncode != 0 and "no GGUF file whose name contains 'Q4_K_M'" in out.stderr
    out = _run(hub, "-hf", "flashlite-test/not-here:Q8_0")
    assert out.returncode != 0 and "cannot get flashlite-test/not-here" in out.stderr
    out = _run(hub, "-hf", "flashlite-test/tiny-v4-GGUF:Q8_0", "-m", str(tiny_gguf()))
    assert out.returncode != 0 and "exactly one of -m/--model and -hf/--hf-repo" in out.stderr
    with pytest.raises(ValueError, match="expected org/repo"):
        parse_hf("just-a-name")


def test_quantize_takes_a_repo_id(hub, tiny_gguf, tmp_path):
    out = _flashlite(hub, "quantize", "flashlite-test/tiny_v4", str(tmp_path / "hub.gguf"), "--quiet")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "hub.gguf").read_bytes() == tiny_gguf().read_bytes()  # general.name from the repo too
    out = _flashlite(hub, "quantize", "flashlite-test/absent", str(tmp_path / "absent.gguf"))
    assert out.returncode != 0 and "quantize: cannot get flashlite-test/absent" in out.stderr
