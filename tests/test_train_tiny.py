"""tools/train_tiny.py's torch model against transformers' DeepseekV4ForCausalLM and make_reference's formats.

The trainer's forward must be the oracle's (docs/oracle.md) so that what it learns is what flashlite runs, and its
fake quantization must land on the values the release writer stores, so that writing the release loses nothing.
Needs the dev extra (torch, transformers)."""
import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import make_reference as ref  # noqa: E402
from torch.optim.optimizer import register_optimizer_step_post_hook  # noqa: E402
import train_tiny as tt  # noqa: E402

ARGS = dict(tt.SMALL_ARGS, vocab_size=512)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """make_reference's random weights (clamps firing, sinks, ape, biases, hash tables) at the trainer's sizes."""
    out = tmp_path_factory.mktemp("release")
    (out / "config.json").write_text(json.dumps(ref.root_config(ARGS)))
    ck = ref.build_checkpoint(ARGS, 7)
    values = dict(ck.values)
    values.update({n: a for n, (dtype, a) in ck.stored.items() if dtype == "I64"})
    return out, ck, values


@pytest.mark.parametrize("dense", [False, True], ids=["per-expert", "dense-experts"])
def test_forward_equals_transformers(release, dense, monkeypatch):
    out, ck, values = release
    monkeypatch.setattr(tt, "DENSE_MOE", dense)
    hf = ref.reference_model(out, ck, ARGS)
    own = tt.build_model(ARGS).eval()
    tt.load_official(own, values)
    ids = torch.from_numpy(np.random.default_rng(1).integers(0, ARGS["vocab_size"], 200))[None]
    with torch.no_grad():
        expected = hf(ids, use_cache=False).logits[0].numpy()
        logits, mtp, _ = own(ids, ids[:, 1:])
    assert np.abs(logits[0].numpy() - expected).max() < 1e-4
    assert mtp.shape == (1, 199, ARGS["vocab_size"]) and torch.isfinite(mtp).all()


def test_layout_is_the_release_layout(release):
    _, ck, _ = release
    own = tt.official_tensors(tt.build_model(ARGS))
    expected = {n for n, (dtype, _) in ck.stored.items() if dtype != "F8_E8M0"}
    assert set(own) == expected
    assert all(own[n].shape == ck.values[n].shape for n in own if n in ck.values)


def test_fake_quantization_lands_on_the_stored_values():
    grids, rng = tt.release_grids(), np.random.default_rng(3)
    w = (rng.standard_normal((300, 200)) * 0.05).astype(np.float32)
    w[0, :4] = [0.0, 448.0, 1e-9, -3.1]
    assert np.array_equal(grids["FP8"](torch.from_numpy(w)).numpy(), ref.quantize_fp8_block(w)[2])
    w = (rng.standard_normal((128, 256)) * 0.6).astype(np.float32)
    w[0, :9] = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, 6.0]  # e2m1 ties at scale 1
    assert np.array_equal(grids["FP4"](torch.from_numpy(w)).numpy(), ref.quantize_fp4_expert(w)[2])
    assert np.array_equal(grids["BF16"](torch.from_numpy(w)).numpy(), ref.bf16_round(w)[1])


def test_written_release_reloads_in_transformers_with_the_quantized_forward(tmp_path):
    """Quantized-phase forward == transformers on the checkpoint write_release made from the same weights."""
    from transformers import DeepseekV4ForCausalLM, FineGrainedFP8Config

    own = tt.build_model(ARGS, seed=11).eval()
    with torch.no_grad():  # move the inert parts off their init so that they matter
        for name, p in own.named_parameters():
            if name.endswith(("attn_sink", "ape", "_base")):
                p.normal_()
    tt.write_release(own, ARGS, tmp_path)
    quant = FineGrainedFP8Config(dequantize=True, scale_fmt="ue8m0", expert_dtype="fp4")
    hf = DeepseekV4ForCausalLM.from_pretrained(tmp_path, quantization_config=quant, dtype=torch.float32,
                                               attn_implementation="eager").eval()
    ids = torch.from_numpy(np.random.default_rng(2).integers(0, ARGS["vocab_size"], 150))[None]
    own.quant.on = True
    with torch.no_grad():
        logits, _, _ = own(ids)
        expected = hf(ids, use_cache=False).logits[0].numpy()
    assert np.abs(logits[0].numpy() - expected).max() < 1e-4


def test_validation_split_takes_whole_modules_by_a_seeded_rule():
    records = [{"module": f"mod{i}{sub}", "name": "x"} for i in range(400) for sub in ("", ".sub")]
    picked = {r["module"] for r in records if tt.validation(r, seed=1)}
    tops = {m.split(".")[0] for m in picked}
    assert picked == {m for t in tops for m in (t, t + ".sub")}  # a module goes with its submodules
    assert 400 / tt.VALID_EVERY / 2 < len(tops) < 400 / tt.VALID_EVERY * 2
    assert tops != {r["module"].split(".")[0] for r in records if tt.validation(r, seed=2)}
    assert not any(tt.validation(r, seed=1, every=0) for r in records)


def _work(path, rng, vocab=512):
    """A prepared folder of random documents: 8 training documents that the model can memorize (seen again
    and again, so that the validation loss on other documents turns up) and 40 validation documents."""
    def docs(name, n):
        lengths = rng.integers(20, 60, n)
        np.save(path / f"{name}_ids.npy", rng.integers(3, vocab, lengths.sum()).astype(np.uint16))
        np.save(path / f"{name}_offsets.npy", np.concatenate([[0], np.cumsum(lengths)]))

    docs("train", 8)
    docs("valid", 40)
    docs("heldout", 10)
    (path / "corpus.json").write_text(json.dumps({"vocab_size": vocab}))
    (path / "prompts.json").write_text("[]")
    return path


def test_early_stopping_writes_the_best_validation_weights(tmp_path, monkeypatch):
    """The run stops `patience` evaluations after the best validation loss, and the weights written are those of
    that evaluation (recomputed here on the written model), not the last step's."""
    monkeypatch.setattr(tt, "SMALL_ARGS", ARGS)
    work = _work(tmp_path, np.random.default_rng(5))
    written = {}

    def keep(model, a, out):  # the weights to be written, without writing them
        out.mkdir(parents=True, exist_ok=True)
        written["model"] = model

    monkeypatch.setattr(tt, "write_release", keep)
    torch.set_num_threads(1)
    record = tt.train(work, tmp_path / "out", steps=60, batch=2, seq_len=32, lr=1e-2, n_evals=30, valid_rows=6,
                      patience=3)
    losses = [e["valid_loss"] for e in record["evals"]]
    best = record["best"]
    assert best["valid_loss"] == min(losses) and losses.index(best["valid_loss"]) == len(losses) - 4
    assert record["steps"] < 60 and best["step"] < record["evals"][-1]["step"]

    ids = np.load(work / "valid_ids.npy").astype(np.int64)
    pieces = tt.pieces_of(np.load(work / "valid_offsets.npy"), 33)
    rows = tt.pack_rows(ids, pieces, np.random.default_rng(tt.SEED + 1).permutation(len(pieces)), 33)[:6]
    model = written["model"].eval()
    model.quant.on = True
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(rows), 2):
            x, y, _, _ = tt.batch_tensors(rows[i:i + 2], "cpu")
            logits, _, _ = model(x)
            total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())) * len(rows[i:i + 2])
    assert abs(total / len(rows) - best["valid_loss"]) < 1e-3


def _final_state(out):
    return torch.load(out / tt.CHECKPOINT, weights_only=False)


def test_resumed_run_equals_the_run_in_one_go(tmp_path, monkeypatch):
    """N steps in one go and N/2 steps, a SIGTERM, then `resume`: the same weights, optimizer state, losses,
    validation history and early-stopping state, bit for bit (same thread count, CPU)."""
    monkeypatch.setattr(tt, "SMALL_ARGS", ARGS)
    monkeypatch.setattr(tt, "write_release", lambda model, a, out: out.mkdir(parents=True, exist_ok=True))
    work = _work(tmp_path, np.random.default_rng(5))
    torch.set_num_threads(1)
    settings = dict(steps=12, batch=2, seq_len=32, lr=1e-2, n_evals=6, valid_rows=4, patience=20, checkpoint_every=60)
    whole = tt.train(work, tmp_path / "whole", **settings)

    def term_after_half(opt, args, kwargs):  # a kill mid-run: the run ends at the step boundary after it
        if opt.state_dict()["state"][0]["step"] == settings["steps"] // 2:
            os.kill(os.getpid(), signal.SIGTERM)

    hook = register_optimizer_step_post_hook(term_after_half)
    try:
        first = tt.train(work, tmp_path / "parts", **settings)
    finally:
        hook.remove()
    assert first["steps"] == 6 and first["stopped"] == f"signal {signal.SIGTERM}"
    assert _final_state(tmp_path / "parts")["step"] == 6
    second = tt.resume(tmp_path / "parts")
    assert second["resumed_at"] == [6] and second["steps"] == 12 and second["stopped"] is None

    def untimed(entries):
        return [{k: v for k, v in e.items() if k != "s"} for e in entries]

    assert untimed(second["log"]) == untimed(whole["log"]) and untimed(second["evals"]) == untimed(whole["evals"])
    assert len(whole["evals"]) == 6 and whole["best"]["step"] < 12  # the early-stopping state crossed the resume
    a, b = _final_state(tmp_path / "whole"), _final_state(tmp_path / "parts")
    assert a["since_best"] == b["since_best"] > 0 and a["best"]["step"] == b["best"]["step"]
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
        assert torch.equal(a["best"]["state"][name], b["best"]["state"][name]), name
    for i, s in a["opt"]["state"].items():
        assert all(torch.equal(s[k], b["opt"]["state"][i][k]) for k in s)


def test_resume_without_a_checkpoint_names_the_folder(tmp_path):
    with pytest.raises(SystemExit, match=f"no {tt.CHECKPOINT} in {tmp_path}"):
        tt.resume(tmp_path)


def _written_release(path, seed=13):
    """A release checkpoint of a (random, moved off its init) model at ARGS' sizes, as train writes one; its
    sharp output head puts its loss far from a freshly initialised model's (ln 512)."""
    model = tt.build_model(ARGS, seed=seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("attn_sink", "ape", "_base")):
                p.normal_()
        dict(model.named_parameters())["head.weight"].mul_(50)
    tt.write_release(model, ARGS, path)
    return path


def test_init_of_zero_steps_writes_the_input_release(tmp_path, monkeypatch):
    """0 steps from --init: the written release holds the input's weights, value for value. (Not byte for byte: a
    block whose largest code rounded to half the grid's top, e.g. 3 of FP4's 6, is stored again with half the scale
    and double the codes, the same values.)"""
    monkeypatch.setattr(tt, "SMALL_ARGS", ARGS)
    source = _written_release(tmp_path / "source")
    (tmp_path / "work").mkdir()
    work = _work(tmp_path / "work", np.random.default_rng(5))
    torch.set_num_threads(1)
    record = tt.train(work, tmp_path / "out", steps=0, batch=2, seq_len=32, init=source)
    assert record["steps"] == 0 and record["init"] == str(source)
    before, after = tt.read_release(source), tt.read_release(tmp_path / "out")
    assert set(before) == set(after) and len(before) == len(tt.official_tensors(tt.build_model(ARGS)))
    for name in before:
        assert before[name].dtype == after[name].dtype and np.array_equal(before[name], after[name]), name
    for name in ("inference/config.json", "config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (source / name).read_bytes(), name


def test_init_first_step_loss_is_the_input_models_loss(tmp_path, monkeypatch):
    """The first step's logged loss is transformers' loss of the --init checkpoint on that step's batch."""
    from transformers import DeepseekV4ForCausalLM, FineGrainedFP8Config

    monkeypatch.setattr(tt, "SMALL_ARGS", ARGS)
    source = _written_release(tmp_path / "source")
    (tmp_path / "work").mkdir()
    work = _work(tmp_path / "work", np.random.default_rng(5))
    monkeypatch.setattr(tt, "write_release", lambda model, a, out: out.mkdir(parents=True, exist_ok=True))
    torch.set_num_threads(1)
    record = tt.train(work, tmp_path / "out", steps=1, batch=2, seq_len=32, init=source)

    ids = np.load(work / "train_ids.npy").astype(np.int64)
    pieces = tt.pieces_of(np.load(work / "train_offsets.npy"), 33)
    rows = tt.pack_rows(ids, pieces, np.random.default_rng(tt.SEED).permutation(len(pieces)), 33)[:2]
    x, y, _, _ = tt.batch_tensors(rows, "cpu")
    quant = FineGrainedFP8Config(dequantize=True, scale_fmt="ue8m0", expert_dtype="fp4")
    hf = DeepseekV4ForCausalLM.from_pretrained(source, quantization_config=quant, dtype=torch.float32,
                                               attn_implementation="eager").eval()
    with torch.no_grad():
        logits = hf(x, use_cache=False).logits
    expected = float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()))
    assert abs(record["log"][0]["loss"] - expected) < 1e-3
    fresh = tt.train(work, tmp_path / "fresh", steps=1, batch=2, seq_len=32)
    assert abs(fresh["log"][0]["loss"] - expected) > 1  # the loss is the checkpoint's, not the seeded init's


def test_init_names_a_config_that_differs(tmp_path, monkeypatch):
    source = _written_release(tmp_path / "source")
    monkeypatch.setattr(tt, "SMALL_ARGS", dict(ARGS, n_layers=5, compress_ratios=ARGS["compress_ratios"][1:]))
    (tmp_path / "work").mkdir()
    work = _work(tmp_path / "work", np.random.default_rng(5))
    with pytest.raises(SystemExit, match=r"inference/config.json differs from this model in .*n_layers \(6 there, 5 here\)"):
        tt.train(work, tmp_path / "out", steps=0, batch=2, seq_len=32, init=source)
