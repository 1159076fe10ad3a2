"""tools/train_tiny.py's torch model against transformers' DeepseekV4ForCausalLM and make_reference's formats.

The trainer's forward must be the oracle's (docs/oracle.md) so that what it learns is what flashlite runs, and its
fake quantization must land on the values the release writer stores, so that writing the release loses nothing.
Needs the dev extra (torch, transformers)."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import make_reference as ref  # noqa: E402
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
