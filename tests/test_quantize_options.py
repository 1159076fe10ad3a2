"""llama-quantize's options on `flashlite quantize`: the types they choose on the tiny oracle checkpoint, the dry
run, the refusal to requantize, and one-line errors naming the option for bad values. (Byte-for-byte agreement with
llama.cpp's quantizer under the same options: tests/test_llamacpp_quants.py.)"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from flashlite import block_formats
from flashlite.cli import main
from flashlite.gguf_reader import GGUFReader
from quant.imatrix import Imatrix

FIXTURES = Path(__file__).parent / "fixtures"
CHECKPOINT = FIXTURES / "tiny_v4"
LLAMACPP_GGUF = FIXTURES / "llamacpp" / "tiny_v4-mxfp4_moe.gguf"


def quantize(*args: str):
    return CliRunner().invoke(main, ["quantize", *map(str, args), "--quiet"])


def types_of(path: Path) -> dict[str, str]:
    with GGUFReader(path) as r:
        return {t.name: block_formats.type_name(t.type) for t in r.tensors}


def test_options_choose_llama_cpps_types_on_the_oracle_checkpoint(tmp_path):
    """Q5_K_M's mix (attention and shared experts Q5_K, which rows of 128 turn into Q5_1; Q6_K on the ffn_down of
    the layers with more bits), under --tensor-type (the first matching pattern wins and its tensors skip the mix's
    rules), --output-tensor-type and --token-embedding-type (given outright, no fallback)."""
    out = tmp_path / "x.gguf"
    result = quantize(CHECKPOINT, out, "--type", "Q5_K_M", "--tensor-type", r"blk\.0\.ffn_down_exps=iq4_nl",
                      "--tensor-type", "ffn_down=q4_1", "--tensor-type", "FFN_UP_EXPS=q8_0",
                      "--output-tensor-type", "q4_0", "--token-embedding-type", "q8_0")
    assert result.exit_code == 0, result.output
    got = types_of(out)
    assert got["output.weight"] == "Q4_0" and got["token_embd.weight"] == "Q8_0"
    assert got["blk.0.ffn_down_exps.weight"] == "IQ4_NL"  # the first of two matching patterns
    assert {got[f"blk.{i}.ffn_down_exps.weight"] for i in range(1, 6)} == {"Q4_1"}  # not Q5_K_M's Q6_K
    assert {got[f"blk.{i}.ffn_down_shexp.weight"] for i in range(6)} == {"Q4_1"}
    assert {got[f"blk.{i}.ffn_up_exps.weight"] for i in range(6)} == {"Q8_0"}  # the pattern is lower-cased
    assert {got[f"blk.{i}.ffn_gate_exps.weight"] for i in range(6)} == {"Q5_1"}  # Q5_K's fallback for rows of 128
    assert got["blk.0.ffn_gate_inp.weight"] == "BF16" and got["blk.0.ffn_gate_tid2eid.weight"] == "I32"

    plain, pure = tmp_path / "plain.gguf", tmp_path / "pure.gguf"
    assert quantize(CHECKPOINT, plain, "--type", "Q4_K_M").exit_code == 0
    assert quantize(CHECKPOINT, pure, "--type", "Q4_K_M", "--pure", "--leave-output-tensor").exit_code == 0
    plain, pure = types_of(plain), types_of(pure)
    # Q4_K_M gives output Q6_K (Q8_0 for rows of 128) and the ffn_down of layers 2 and 5 (use_more_bits for 6
    # layers) Q6_K (Q8_0 again)
    assert plain["output.weight"] == "Q8_0" and pure["output.weight"] == "BF16"  # the converter's type
    assert [plain[f"blk.{i}.ffn_down_exps.weight"] for i in range(6)] == ["Q5_0", "Q5_0", "Q8_0", "Q5_0", "Q5_0",
                                                                          "Q8_0"]
    assert {pure[f"blk.{i}.ffn_down_exps.weight"] for i in range(6)} == {"Q5_0"}  # Q4_K's fallback, every layer
    assert {n for n in plain if plain[n] != pure[n]} == {
        "output.weight", *(f"blk.{i}.ffn_down_{k}.weight" for i in (2, 5) for k in ("exps", "shexp"))}


def test_dry_run_prints_each_tensors_type_and_size_and_writes_nothing(tmp_path):
    out = tmp_path / "x.gguf"
    args = ("--type", "Q4_K_M", "--tensor-type", "ffn_down_exps=q8_0")
    dry = quantize(CHECKPOINT, "--dry-run", *args)
    assert dry.exit_code == 0, dry.output
    assert list(tmp_path.iterdir()) == []
    assert quantize(CHECKPOINT, out, *args).exit_code == 0
    with GGUFReader(out) as r:
        written = {t.name: (block_formats.type_name(t.type), t.nbytes) for t in r.tensors}
    lines = [line for line in dry.stdout.splitlines() if line.startswith("[")]
    assert len(lines) == len(written)
    for line in lines:
        name, new_type, size = line.split("]")[1].split()[0], line.split("->")[1].split()[0], float(line.split()[-2])
        assert (new_type, round(written[name][1] / 2**20, 3)) == (written[name][0], size), line
    total = float(dry.stdout.split("quant size =")[1].split()[0])
    assert total == round(sum(n for _, n in written.values()) / 2**20, 2)


def test_requantizing_a_quantized_gguf_takes_allow_requantize(tmp_path):
    out = tmp_path / "x.gguf"
    refused = quantize(LLAMACPP_GGUF, out, "--type", "Q4_K_M")
    assert refused.exit_code != 0 and "--allow-requantize" in refused.output and "is MXFP4 already" in refused.output
    assert list(tmp_path.iterdir()) == []
    # its quantized tensors keep their types under MXFP4_MOE (BF16 and F32 ones are quantized, not requantized)
    assert quantize(LLAMACPP_GGUF, out, "--type", "MXFP4_MOE").exit_code == 0
    assert quantize(LLAMACPP_GGUF, out, "--type", "Q4_K_M", "--allow-requantize", "--force").exit_code == 0


def test_tensor_type_file_adds_to_tensor_type(tmp_path):
    """Items separated by spaces or newlines, after those of --tensor-type (so the flags win where both match)."""
    listing = tmp_path / "types.txt"
    listing.write_text("ffn_down_exps=q8_0  attn_kv=q4_0\nffn_up=q4_1\n")
    by_file = quantize(CHECKPOINT, "--dry-run", "--type", "Q4_K_M", "--tensor-type", "ffn_up_exps=iq4_nl",
                       "--tensor-type-file", listing)
    by_flags = quantize(CHECKPOINT, "--dry-run", "--type", "Q4_K_M", "--tensor-type", "ffn_up_exps=iq4_nl",
                        "--tensor-type", "ffn_down_exps=q8_0", "--tensor-type", "attn_kv=q4_0",
                        "--tensor-type", "ffn_up=q4_1")
    assert by_file.exit_code == 0 and by_file.stdout == by_flags.stdout
    assert "blk.3.ffn_up_exps.weight" in by_file.stdout and "-> IQ4_NL" in by_file.stdout


def test_override_kv_sets_metadata_as_llama_quantize_writes_it(tmp_path):
    import gguf

    out = tmp_path / "x.gguf"
    result = quantize(CHECKPOINT, out, "--type", "Q8_0", "--override-kv", "general.name=str:renamed",
                      "--override-kv", "x.count=int:-7", "--override-kv", "x.scale=float:0.5",
                      "--override-kv", "x.flag=bool:false", "--override-kv", "deepseek4.expert_used_count=int:3")
    assert result.exit_code == 0, result.output
    fields = gguf.GGUFReader(out).fields
    V = gguf.GGUFValueType
    got = {k: (fields[k].types[0], fields[k].contents()) for k in
           ("general.name", "x.count", "x.scale", "x.flag", "deepseek4.expert_used_count")}
    assert got == {"general.name": (V.STRING, "renamed"), "x.count": (V.UINT32, 7), "x.scale": (V.FLOAT32, 0.5),
                   "x.flag": (V.BOOL, False), "deepseek4.expert_used_count": (V.UINT32, 3)}
    assert list(fields).count("general.name") == 1


def test_include_and_exclude_weights_select_imatrix_entries_by_substring():
    im = Imatrix({n: np.ones((1, 4), np.float32) for n in ("blk.0.ffn_up_exps.weight", "blk.0.attn_kv.weight",
                                                         "blk.1.attn_q_a.weight")},
                 {n: np.ones(1, np.float32) for n in ("blk.0.ffn_up_exps.weight", "blk.0.attn_kv.weight",
                                                       "blk.1.attn_q_a.weight")})
    assert sorted(im.select(include=["attn"]).sums) == ["blk.0.attn_kv.weight", "blk.1.attn_q_a.weight"]
    assert sorted(im.select(exclude=["attn_q", "exps"]).sums) == ["blk.0.attn_kv.weight"]
    assert im.select(include=["nothing"]) is None  # then the quantizers run as without a matrix
    with pytest.raises(ValueError, match="cannot be used together"):
        im.select(include=["a"], exclude=["b"])


@pytest.mark.parametrize("args,words", [
    (["--output-tensor-type", "q9_k"], "--output-tensor-type: unknown type 'q9_k'"),
    (["--token-embedding-type", "nope"], "--token-embedding-type: unknown type 'nope'"),
    (["--tensor-type", "attn_kv"], "--tensor-type: expected PATTERN=TYPE"),
    (["--tensor-type", "attn_kv="], "--tensor-type: expected PATTERN=TYPE"),
    (["--tensor-type", "attn_(kv=q8_0"], "--tensor-type: bad pattern"),
    (["--tensor-type", "attn_kv=q8_x"], "--tensor-type 'attn_kv=q8_x': unknown type 'q8_x'"),
    (["--tensor-type-file", "/nonexistent/types.txt"], "--tensor-type-file: cannot read /nonexistent/types.txt"),
    (["--override-kv", "general.name"], "--override-kv: expected KEY=TYPE:VALUE"),
    (["--override-kv", "a.b=long:3"], "--override-kv: TYPE is one of int, float, bool, str"),
    (["--override-kv", "a.b=int:three"], "--override-kv: 'three' is not an int"),
    (["--override-kv", "a.b=bool:yes"], "--override-kv: a bool is true or false"),
    (["--override-kv", "general.architecture=str:llama"], "--override-kv: general.architecture is the writer's"),
    (["--include-weights", "attn"], "--include-weights and --exclude-weights select entries of --imatrix"),
    (["--type", "q8_0", "--pure"], "--pure: turns off the mix rules of llama.cpp's file types"),
    (["--type", "F16", "--pure"], "--pure: llama.cpp's F16 is not a quantized file type"),
    (["--type", "BF16", "--tensor-type", "attn=q8_0"], "--tensor-type: llama.cpp's BF16 is not a quantized"),
    (["--output-tensor-type", "q4_k"], "--output-tensor-type: output.weight has rows of 128, not a multiple of "
                                       "Q4_K's block of 256"),
])
def test_bad_values_fail_in_one_line_naming_the_option(tmp_path, args, words):
    out = tmp_path / "x.gguf"
    result = quantize(CHECKPOINT, out, "--type", "Q4_K_M", *args)
    assert result.exit_code != 0 and words in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert errors == [result.output.strip().splitlines()[-1]], result.output
    assert list(tmp_path.iterdir()) == []


def _split(src: Path, folder: Path, max_tensors: int) -> list[Path]:
    """src rewritten as NAME-0000i-of-0000N.gguf files of at most max_tensors tensors (gguf-py's split writer)."""
    from gguf import GGUFReader as Reader, GGUFValueType, GGUFWriter

    reader = Reader(src)
    writer = GGUFWriter(folder / "split.gguf", "deepseek4", split_max_tensors=max_tensors)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        writer.add_key_value(key, field.contents(), vtype, sub_type=field.types[-1] if vtype == GGUFValueType.ARRAY
                             else None)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.asarray(t.data), raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return sorted(folder.glob("split-*.gguf"))


def test_keep_split_writes_the_sources_splits(tmp_path):
    """Each tensor lands in the file of its source's number, with the bytes the unsplit file gets; the model loads
    from its first file."""
    from flashlite.gguf_file import shard_number
    from flashlite.model import load

    (tmp_path / "src").mkdir()
    shards = _split(LLAMACPP_GGUF, tmp_path / "src", max_tensors=70)
    assert len(shards) == 3
    whole = tmp_path / "whole.gguf"
    assert quantize(LLAMACPP_GGUF, whole, "--type", "Q8_0", "--allow-requantize").exit_code == 0
    result = quantize(shards[0], tmp_path / "q8.gguf", "--type", "Q8_0", "--allow-requantize", "--keep-split")
    assert result.exit_code == 0, result.output
    outs = sorted(tmp_path.glob("q8-*.gguf"))
    assert [p.name for p in outs] == [f"q8-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    with GGUFReader(whole) as r:
        want = {t.name: bytes(r.data(t).tobytes()) for t in r.tensors}
    for shard, out in zip(shards, outs):
        with GGUFReader(shard) as a, GGUFReader(out) as b:
            assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
            assert all(bytes(b.data(t).tobytes()) == want[t.name] for t in b.tensors)
            assert b.metadata["split.no"] == shard_number(out.name) - 1 and b.metadata["split.count"] == 3
    ids = np.arange(1, 17)
    assert np.array_equal(load(outs[0]).logits(ids), load(whole).logits(ids))
    again = quantize(shards[0], tmp_path / "q8.gguf", "--type", "Q8_0", "--allow-requantize", "--keep-split")
    assert again.exit_code != 0 and "q8-00001-of-00003.gguf: already exists" in again.output


LLAMA_QUANTIZE_KEEP_SPLIT = """
import ctypes, sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype, p.nthread, p.allow_requantize, p.keep_split = 7, 2, True, True  # Q8_0
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))
"""


@pytest.mark.skipif(not os.environ.get("FLASHLITE_LLAMACPP_PYTHON"),
                    reason="FLASHLITE_LLAMACPP_PYTHON (a llama-cpp-python venv) is not set")
def test_keep_split_files_are_llama_cpps(tmp_path):
    """llama.cpp's quantizer with keep_split writes the same files' tensors, byte for byte, and the same keys
    (split.* alone) after the first file."""
    (tmp_path / "src").mkdir()
    shards = _split(LLAMACPP_GGUF, tmp_path / "src", max_tensors=70)
    subprocess.run([os.environ["FLASHLITE_LLAMACPP_PYTHON"], "-c", LLAMA_QUANTIZE_KEEP_SPLIT, str(shards[0]),
                    str(tmp_path / "theirs")], check=True, capture_output=True)
    assert quantize(shards[0], tmp_path / "ours.gguf", "--type", "Q8_0", "--allow-requantize",
                    "--keep-split").exit_code == 0
    for i in (1, 2, 3):
        with GGUFReader(tmp_path / f"ours-0000{i}-of-00003.gguf") as a, \
                GGUFReader(tmp_path / f"theirs-0000{i}-of-00003.gguf") as b:
            assert [(t.name, t.type, a.data(t).tobytes()) for t in a.tensors] == \
                [(t.name, t.type, b.data(t).tobytes()) for t in b.tensors]
            if i > 1:
                assert a.metadata == b.metadata


def test_imatrix_is_recorded_in_the_metadata_as_llama_quantize_does(tmp_path):
    """quantize.imatrix.file, .dataset, .entries_count (what --include-weights left) and .chunks_count."""
    import gguf

    from quant.imatrix import write_imatrix

    names = ["blk.0.attn_kv.weight", "blk.1.attn_kv.weight", "blk.0.attn_q_a.weight"]
    im = Imatrix({n: np.full((1, 128), 2.0, np.float32) for n in names}, {n: np.ones(1, np.float32) for n in names},
                 ["calibration.txt"], chunk_count=5, chunk_size=64)
    write_imatrix(tmp_path / "im.gguf", im)
    out = tmp_path / "x.gguf"
    result = quantize(CHECKPOINT, out, "--type", "Q4_0", "--imatrix", tmp_path / "im.gguf",
                      "--include-weights", "attn_kv")
    assert result.exit_code == 0, result.output
    fields = gguf.GGUFReader(out).fields
    got = {k.removeprefix("quantize.imatrix."): fields[k].contents() for k in fields
           if k.startswith("quantize.imatrix.")}
    assert got == {"file": str(tmp_path / "im.gguf"), "dataset": "calibration.txt", "entries_count": 2,
                   "chunks_count": 5}


def test_llama_quantizes_aliases_name_its_mixes():
    """Q4_K is llama-quantize's alias of Q4_K_M (and Q3_K, Q5_K of the _M mixes); lower-case q4_k stays flashlite's
    single type."""
    from quant.recipes import LlamaMix, Recipe, SplitRecipe

    for alias, ftype in (("Q3_K", "Q3_K_M"), ("Q4_K", "Q4_K_M"), ("Q5_K", "Q5_K_M")):
        recipe = Recipe.parse(alias)
        assert isinstance(recipe, LlamaMix) and recipe.ftype == ftype
    assert isinstance(Recipe.parse("q4_k"), SplitRecipe)
