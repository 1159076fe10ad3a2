"""The trained small models (tests/fixtures/small_v4, the default, and small_v4_general, trained to its best
validation loss; made by tools/train_tiny.py): the release layout, the transformers goldens, flashlite's forward
against them, and their tokenizer against HF `tokenizers`.

The layout and the float64 numpy forward reuse the oracle's checks (test_oracle_fixture.py); what differs here is a
model whose weights learned something, so near-ties are rare and the answers mean something."""
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from test_oracle_fixture import NumpyV4, bf16_to_f32, official_layout, read_checkpoint

from flashlite.chat.tokenizer import Tokenizer
from flashlite.cli import main
from flashlite.model import load
from quant.tokenizer_meta import tokenizer_fields

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE = FIXTURES / "small_v4"  # both trained models share its tokenizer and held-out text
CLEAR = 1e-4  # decision gaps at or below this are near-ties: judged apart (docs/oracle.md)


@pytest.fixture(scope="module", params=["small_v4", "small_v4_general"])
def folder(request):
    """The default model (it recites its training data) and the one trained to its best validation loss."""
    return FIXTURES / request.param


@pytest.fixture(scope="module")
def config(folder):
    return json.loads((folder / "config.json").read_text())


@pytest.fixture(scope="module")
def record(folder):
    return json.loads((folder / "train.json").read_text())


@pytest.fixture(scope="module")
def checkpoint(folder):
    return read_checkpoint(folder)


@pytest.fixture(scope="module")
def goldens(folder):
    with np.load(folder / "goldens.npz", allow_pickle=False) as g:
        return {k: g[k] for k in g.files}


@pytest.fixture(scope="module")
def model(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("small") / f"{folder.name}-f32.gguf"
    result = CliRunner().invoke(main, ["quantize", str(folder), str(out), "--type", "f32", "--quiet"])
    assert result.exit_code == 0, result.output
    return load(out)


def test_config_has_every_feature(config, record):
    n_layers, ratios = config["num_hidden_layers"], config["compress_ratios"]
    assert {0, 4, 128} <= set(ratios[:n_layers]) and config["num_nextn_predict_layers"] == 1
    assert 0 < config["num_hash_layers"] < n_layers and config["n_shared_experts"] == 1
    assert record["args"]["vocab_size"] == config["vocab_size"] and record["steps"] > 0


def test_checkpoint_is_in_the_release_layout(config, checkpoint):
    headers, arrays = checkpoint
    expected = official_layout(config)
    assert set(headers) == set(expected)
    assert not {n: (h["dtype"], h["shape"]) for n, h in headers.items() if (h["dtype"], h["shape"]) != expected[n]}
    for name, info in headers.items():
        if info["dtype"] == "F8_E4M3":
            assert not np.any((arrays[name] & 0x7F) == 0x7F), f"{name} holds e4m3 NaN"
        if info["dtype"] == "F8_E8M0":
            assert np.all((arrays[name] > 0) & (arrays[name] < 255)), name
    for name in (n for n in arrays if n.endswith("tid2eid")):
        t = arrays[name]
        assert np.all((t >= 0) & (t < config["n_routed_experts"])) and np.all(t[:, 0] != t[:, 1])


def test_goldens_are_consistent(config, checkpoint, goldens):
    _, arrays = checkpoint
    t, vocab = goldens["prompt_ids"].shape[0], config["vocab_size"]
    assert t > 128 and t > 4 * (config["index_topk"] + 1) and goldens["logits"].shape == (t, vocab)
    assert np.all(np.isfinite(goldens["logits"]))
    assert np.array_equal(goldens["greedy_logits"][0], goldens["logits"][-1])
    assert np.array_equal(np.argmax(goldens["greedy_logits"], axis=1), goldens["greedy_ids"])
    for layer in range(config["num_hash_layers"]):
        table = arrays[f"layers.{layer}.ffn.gate.tid2eid"]
        assert np.array_equal(np.sort(table[goldens["prompt_ids"]], axis=1), goldens["expert_ids"][layer])
    embed = bf16_to_f32(arrays["embed.weight"])
    rows = embed[goldens["prompt_ids"][goldens["hidden_positions"]]]
    assert np.array_equal(goldens["hidden"][0], np.repeat(rows[:, None, :], config["hc_mult"], axis=1))


def test_indexer_chooses_among_more_rows_than_it_keeps(config, goldens):
    picks = goldens["indexer_ids"]
    visible = (np.arange(picks.shape[1]) + 1) // 4
    crowded = visible > config["index_topk"]
    assert crowded.any() and np.all((picks[:, crowded] >= 0).sum(axis=2) == config["index_topk"])


def test_numpy_forward_of_the_documented_ops_reproduces_the_goldens(config, checkpoint, goldens):
    numpy_model = NumpyV4(config, *checkpoint)
    logits = numpy_model.logits(goldens["prompt_ids"])
    assert np.array_equal(np.stack(numpy_model.expert_ids), goldens["expert_ids"])
    assert np.max(np.abs(logits - goldens["logits"])) < 1e-4


@pytest.mark.parametrize("chunk", [None, 5], ids=["at-once", "chunks-of-5"])
def test_flashlite_logits_equal_the_goldens(model, goldens, chunk):
    logits = model.logits(goldens["prompt_ids"], chunk=chunk)
    clear = goldens["decision_gap"] > CLEAR
    assert np.abs(logits - goldens["logits"]).max(axis=1)[clear].max() <= 1e-4


def test_flashlite_greedy_continuation_equals_the_goldens(model, goldens):
    assert list(model.generate(goldens["prompt_ids"], len(goldens["greedy_ids"]))) == goldens["greedy_ids"].tolist()


def test_tokenizer_equals_hf_tokenizers_on_the_heldout_text():
    hf_tokenizers = pytest.importorskip("tokenizers")
    text = (FIXTURE / "heldout.txt").read_text(encoding="utf-8")
    assert len(text) > 10_000
    ours = Tokenizer.from_gguf(tokenizer_fields(FIXTURE))
    hf = hf_tokenizers.Tokenizer.from_file(str(FIXTURE / "tokenizer.json"))
    for part in text.split("\n\n"):
        assert ours.encode(part) == hf.encode(part, add_special_tokens=False).ids, part[:80]
    ids = ours.encode(text)
    assert ids == hf.encode(text, add_special_tokens=False).ids and ours.decode(ids) == text


def test_the_default_answer_is_about_python(model, record):
    """The README's first question, answered greedily by flashlite: a readable sentence about Python."""
    if record["steps"] < 1000:
        pytest.skip(f"the fixture is a {record['steps']}-step {record['device']} run (tools/train_tiny.py "
                    "--device cuda trains the default)")
    reply = model.create_chat_completion([{"role": "user", "content": "Hello! Who are you?"}], max_tokens=64,
                                         temperature=0)
    text = reply["choices"][0]["message"]["content"]
    assert "Python" in text and text.strip().endswith((".", "!", "?")), text
