"""Convert the tiny_v4 fixture with llama.cpp's own converter: the interop fixture tests/test_llamacpp_interop.py reads.

    python tools/make_llamacpp_gguf.py            # regenerate tests/fixtures/llamacpp/tiny_v4-mxfp4_moe.gguf
    python tools/make_llamacpp_gguf.py --llamacpp DIR --src CHECKPOINT --out FILE.gguf

Converter: `convert_hf_to_gguf.py` (conversion/deepseek.py `DeepseekV4Model`) with its own gguf-py, both from
llama.cpp as vendored in the llama-cpp-python 0.3.36 sdist (llama_cpp_python-0.3.36.tar.gz, sha256 SDIST_SHA256,
`vendor/llama.cpp`). The sdist is taken from `--llamacpp` (an unpacked llama.cpp tree), else from the cache
(`$XDG_CACHE_HOME/flashlite`, default ~/.cache/flashlite), else fetched there with `pip download --no-deps
--no-binary :all: llama-cpp-python==0.3.36`, checked against the hash and unpacked (only the converter's files).

It runs as `convert_hf_to_gguf.py SRC --outfile TMP --outtype q8_0` in a child Python whose `gguf` is the sdist's
gguf-py, offline (HF_HUB_OFFLINE=1). `--outtype` changes nothing for deepseek4: `tensor_force_quant` fixes every
type (FP8-dequantized matrices Q8_0, BF16 matrices BF16, F32 tensors F32, 1-D and norms F32, routed experts an MXFP4
repack of the FP4 checkpoint, tid2eid I32) and the file type is MOSTLY_MXFP4_MOE; f32, bf16 and auto give the
same bytes. MTP tensors are left out (the converter's default). The one change made at run time: the tiny
tokenizer's vocabulary is not V4's, so the converter's pre-tokenizer hash lookup (`get_vocab_base_pre`) raises;
after checking that tokenizer.json's pre-tokenizer is V4's (same regexes, quant.tokenizer_meta), a wrapper answers
"joyai-llm", what the hash of V4's real tokenizer maps to. The converter's files are not edited.

Needs torch and transformers (`pip install -e .[dev]`). The output is written to a temporary file next to it and
renamed; it is deterministic (same bytes on every run).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from quant.tokenizer_meta import PRE_TOKENIZER, tokenizer_fields  # noqa: E402

SDIST = "llama-cpp-python==0.3.36"
SDIST_FILE = "llama_cpp_python-0.3.36.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
VENDORED = "llama_cpp_python-0.3.36/vendor/llama.cpp"
# what the converter needs of the tree: its entry point, model classes, gguf-py and the chat templates it embeds
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "models/templates/")
DEFAULT_SRC = REPO / "tests" / "fixtures" / "tiny_v4"
DEFAULT_OUT = REPO / "tests" / "fixtures" / "llamacpp" / "tiny_v4-mxfp4_moe.gguf"
OUTTYPE = "q8_0"

# Runs in the child interpreter: argv = llama.cpp dir, checkpoint, output, outtype, pre-tokenizer, --verbose or "".
_DRIVER = r"""
import sys
llama, src, out, outtype, pre, verbose = sys.argv[1:7]
sys.path[:0] = [llama, llama + "/gguf-py"]
import gguf
if not gguf.__file__.startswith(llama):
    sys.exit(f"imported gguf from {gguf.__file__}, not from {llama}/gguf-py")
import convert_hf_to_gguf
from conversion import base

detect = base.TextModel.get_vocab_base_pre

def get_vocab_base_pre(self, tokenizer):
    try:
        return detect(self, tokenizer)
    except NotImplementedError:
        return pre

base.TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv = ["convert_hf_to_gguf.py", src, "--outfile", out, "--outtype", outtype] + ([verbose] if verbose else [])
convert_hf_to_gguf.main()
"""


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flashlite"


def is_converter_tree(path: Path) -> bool:
    return (path / "convert_hf_to_gguf.py").is_file() and (path / "gguf-py" / "gguf" / "__init__.py").is_file()


def cached_converter() -> Path | None:
    """The unpacked converter in the cache, if a previous run put it there."""
    tree = cache_dir() / VENDORED
    return tree if is_converter_tree(tree) else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _unpack_converter(sdist: Path, dest: Path) -> Path:
    """Extract the converter's files of the sdist under dest (staged, then renamed into place)."""
    prefix = VENDORED + "/"
    stage = Path(tempfile.mkdtemp(prefix=".unpack.", dir=dest))
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)
                       and m.name[len(prefix):].startswith(CONVERTER_PARTS) and (m.isfile() or m.isdir())]
            tar.extractall(stage, members=members, filter="data")
        top = VENDORED.split("/")[0]
        if (dest / top).exists():
            shutil.rmtree(dest / top)
        os.replace(stage / top, dest / top)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    tree = dest / VENDORED
    if not is_converter_tree(tree):
        raise RuntimeError(f"{sdist}: no convert_hf_to_gguf.py and gguf-py under {VENDORED}")
    return tree


def fetch_converter() -> Path:
    """The converter from the cache, downloading and unpacking the pinned sdist the first time."""
    tree = cached_converter()
    if tree is not None:
        return tree
    dest = cache_dir()
    dest.mkdir(parents=True, exist_ok=True)
    sdist = dest / SDIST_FILE
    if not sdist.is_file():
        download = Path(tempfile.mkdtemp(prefix=".download.", dir=dest))
        try:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST,
                            "-d", str(download)], check=True)
            os.replace(download / SDIST_FILE, sdist)
        finally:
            shutil.rmtree(download, ignore_errors=True)
    got = _sha256(sdist)
    if got != SDIST_SHA256:
        raise RuntimeError(f"{sdist}: sha256 {got}, expected {SDIST_SHA256} ({SDIST}); delete it to fetch again")
    return _unpack_converter(sdist, dest)


def convert(llamacpp: Path, src: Path, out: Path, verbose: bool = False) -> None:
    """Run llama.cpp's converter on the checkpoint folder src, writing out atomically."""
    if not is_converter_tree(llamacpp):
        raise FileNotFoundError(f"{llamacpp}: not a llama.cpp tree (needs convert_hf_to_gguf.py and gguf-py/)")
    tokenizer_fields(src)  # raises unless tokenizer.json's pre-tokenizer is V4's, which "joyai-llm" stands for
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    os.close(fd)
    try:
        env = {k: v for k, v in os.environ.items() if k not in ("NO_LOCAL_GGUF", "PYTHONPATH")}
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        driver_args = [str(llamacpp.resolve()), str(src.resolve()), tmp, OUTTYPE, PRE_TOKENIZER,
                       "--verbose" if verbose else ""]
        result = subprocess.run([sys.executable, "-c", _DRIVER, *driver_args], cwd=out.parent, env=env,
                                capture_output=not verbose, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"llama.cpp's converter failed ({result.returncode}):\n"
                               f"{(result.stderr or '')[-4000:]}")
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
        tmp = None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, default=DEFAULT_SRC, help="checkpoint folder (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output GGUF (default: %(default)s)")
    parser.add_argument("--llamacpp", type=Path, help=f"an unpacked llama.cpp tree to use instead of {SDIST}")
    parser.add_argument("--verbose", action="store_true", help="show the converter's log")
    args = parser.parse_args(argv)
    llamacpp = args.llamacpp or fetch_converter()
    convert(llamacpp, args.src, args.out, args.verbose)
    print(f"wrote {args.out}: {args.out.stat().st_size} bytes, sha256 {_sha256(args.out)} "
          f"(llama.cpp converter from {llamacpp})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
