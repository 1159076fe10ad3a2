"""A model split across several GGUF files (llama.cpp's gguf-split layout, written here by gguf-py's own writer):
loaded from its first file, it runs to the same logits as the single file, with its experts mapped or read from
disk, and a missing or mislabelled file is named."""
import shutil

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from flashlite import load


def _split(src, folder, max_tensors: int) -> list:
    """Rewrite the GGUF src as NAME-0000i-of-0000N.gguf files of at most max_tensors tensors each."""
    reader = GGUFReader(src)
    writer = GGUFWriter(folder / "split.gguf", reader.fields["general.architecture"].contents(),
                        split_max_tensors=max_tensors)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.asarray(t.data), raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return sorted(folder.glob("split-*.gguf"))


@pytest.fixture(scope="module")
def single(tiny_gguf):
    return tiny_gguf()


@pytest.fixture(scope="module")
def shards(single, tmp_path_factory):
    return _split(single, tmp_path_factory.mktemp("split"), max_tensors=70)


def test_split_model_runs_to_the_same_logits(single, shards, goldens):
    assert [p.name for p in shards] == [f"split-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    ids = goldens["prompt_ids"][:64]
    want = load(single).logits(ids)
    model = load(shards[0])
    assert {w.path for w in model.file.tensors.values()} == {str(p) for p in shards}
    assert np.array_equal(model.logits(ids), want)
    with load(shards[0], ram_budget="2M", expert_usage=False) as offloaded:
        assert np.array_equal(offloaded.logits(ids), want)
        assert offloaded.stats()["expert_misses"] > 0


def test_missing_or_mislabelled_shard_is_named(shards, tmp_path):
    for p in shards:
        shutil.copy(p, tmp_path / p.name)
    (tmp_path / shards[2].name).unlink()
    with pytest.raises(FileNotFoundError, match="split-00003-of-00003.gguf"):
        load(tmp_path / shards[0].name)
    shutil.copy(shards[1], tmp_path / shards[2].name)
    with pytest.raises(ValueError, match="split-00003-of-00003.gguf: expected split.no 2"):
        load(tmp_path / shards[0].name)
    with pytest.raises(ValueError, match="should be the first file of a split model"):
        load(tmp_path / shards[1].name)
