"""-hf org/repo[:QUANT] on the commands and `quantize org/repo`, resolved through huggingface_hub's cache.
No network here: the tests lay out a Hub cache as huggingface_hub writes it (refs/main, snapshots/<commit>/...)
and run offline."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flashlite.hub import parse_hf, pick_gguf

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
    out = _run(hub, "-hf", "flashlite-test/tiny-v4-GGUF")  # no Q4_K_M: llama.cpp falls back to Q8_0
    assert out.returncode == 0 and "tiny-v4-Q8_0.gguf in" in out.stderr, out.stderr
    out = _run(hub, "-hf", "flashlite-test/tiny-v4-GGUF:IQ2_XXS")
    assert out.returncode != 0 and "no GGUF model file whose name has 'IQ2_XXS'" in out.stderr
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


def test_pick_follows_llama_cpps_choice():
    files = ["README.md", "DeepSeek-V4-Flash-Q8_0.gguf", "mmproj-Q8_0.gguf", "imatrix-Q4_K_M.gguf",
             "UD-Q2_K_XL/DeepSeek-V4-Flash-UD-Q2_K_XL-00002-of-00003.gguf",
             "UD-Q2_K_XL/DeepSeek-V4-Flash-UD-Q2_K_XL-00001-of-00003.gguf",
             "UD-Q2_K_XL/DeepSeek-V4-Flash-UD-Q2_K_XL-00003-of-00003.gguf",
             "Q4_K_M/DeepSeek-V4-Flash-Q4_K_M-00001-of-00002.gguf",
             "Q4_K_M/DeepSeek-V4-Flash-Q4_K_M-00002-of-00002.gguf", "DeepSeek-V4-Flash-IQ2_XXS.gguf",
             "mtp-DeepSeek-V4-Flash-Q8_0.gguf"]
    assert pick_gguf(files, None) == ["Q4_K_M/DeepSeek-V4-Flash-Q4_K_M-00001-of-00002.gguf",
                                      "Q4_K_M/DeepSeek-V4-Flash-Q4_K_M-00002-of-00002.gguf"]
    assert pick_gguf(files, "ud-q2_k_xl") == [f"UD-Q2_K_XL/DeepSeek-V4-Flash-UD-Q2_K_XL-0000{i}-of-00003.gguf"
                                            for i in (1, 2, 3)]
    assert pick_gguf(files, "Q8_0") == ["DeepSeek-V4-Flash-Q8_0.gguf"]  # not the mmproj or MTP sidecar
    assert pick_gguf(files, "IQ2_XXS") == ["DeepSeek-V4-Flash-IQ2_XXS.gguf"]
    assert pick_gguf(files, "IQ2_XS") == []  # the tag must end at '.' or '-'
    assert pick_gguf(files, "Q2_K") == []
    assert pick_gguf(["b.gguf", "a-Q3_K_M.gguf", "mmproj-a.gguf"], None) == ["a-Q3_K_M.gguf"]  # then the first model
