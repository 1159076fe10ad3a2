"""`flashlite perplexity` and `flashlite imatrix` (flashlite/quality.py, flashlite/imatrix.py): llama-perplexity's
statistics against an independent numpy computation, its chunking on a stub model and the oracle model, and the
importance matrix against the float64 numpy forward of the oracle checkpoint (test_oracle_fixture.NumpyV4)."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from test_oracle_fixture import NumpyV4, read_checkpoint

from flashlite import backends as backend
from flashlite import imatrix as fim
from flashlite import quality
from flashlite.cli import main
from flashlite.model import load
from flashlite.models import deepseek_v4
from quant import layout
from quant.imatrix import read_imatrix

FIXTURE = Path(__file__).parent / "fixtures" / "tiny_v4"
SMALL = Path(__file__).parent / "fixtures" / "small_v4"


# ------------------------------------------------------------------ statistics

def reference_stats(logits, base, targets):
    """llama-perplexity's summary, token by token in plain Python/numpy (exact distributions)."""
    nll, nll_b, kld, dp, same = [], [], [], [], []
    for row, brow, t in zip(logits.astype(np.float64), base.astype(np.float64), targets):
        p = np.exp(row - row.max())
        p /= p.sum()
        q = np.exp(brow - brow.max())
        q /= q.sum()
        nll.append(-math.log(p[t]))
        nll_b.append(-math.log(q[t]))
        kld.append(sum(qi * (math.log(qi) - math.log(pi)) for qi, pi in zip(q, p)))
        dp.append(p[t] - q[t])
        same.append(int(np.argmax(row)) == int(np.argmax(brow)))
    n = len(nll)

    def mean_err(v):
        v = np.array(v)
        return v.mean(), v.std() / math.sqrt(n - 1)

    def percentile(values, fraction):  # perplexity.cpp's interpolation
        values = sorted(values)
        p = fraction * (len(values) - 1)
        i = int(p)
        return (1 - (p - i)) * values[i] + (p - i) * values[min(i + 1, len(values) - 1)]

    m, e = mean_err(nll)
    mse, mse_e = mean_err(np.square(dp))
    f = np.mean(same)
    return {"ppl": math.exp(m), "ppl_err": math.exp(m) * e, "ppl_base": math.exp(np.mean(nll_b)),
            "kld_mean": mean_err(kld)[0], "kld_mean_err": mean_err(kld)[1], "kld_median": float(np.median(kld)),
            "kld_p99": percentile(kld, 0.99), "kld_max": max(kld), "same_top": f,
            "same_top_err": math.sqrt(f * (1 - f) / (n - 1)), "p_diff_rms": math.sqrt(mse),
            "p_diff_rms_err": 0.5 / math.sqrt(mse) * mse_e, "ln_ppl_ratio": m - np.mean(nll_b)}


def test_statistics_equal_an_independent_computation():
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((3, 40, 50)) * 3).astype(np.float32)
    base = (logits + rng.standard_normal(logits.shape) * 0.5).astype(np.float32)
    targets = rng.integers(0, 50, (3, 40))
    scores = quality.TokenScores()
    for i in range(3):
        scores.add(logits[i], targets[i], base[i])
    got = quality.summarize(scores, 3, 82)
    want = reference_stats(logits.reshape(-1, 50), base.reshape(-1, 50), targets.reshape(-1))
    assert got.count == 120 and got.chunks == 3
    assert got.ppl == pytest.approx(want["ppl"], rel=1e-9)
    assert got.ppl_err == pytest.approx(want["ppl_err"], rel=1e-9)
    for name, value in want.items():
        if name not in ("ppl", "ppl_err"):
            assert getattr(got.kl, name) == pytest.approx(value, rel=1e-7, abs=1e-12), name
    assert 0 < got.kl.same_top < 1 and got.kl.kld_median < got.kl.kld_p99 < got.kl.kld_max


def test_identical_models_have_no_divergence():
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((30, 20)).astype(np.float32)
    scores = quality.TokenScores()
    scores.add(logits, rng.integers(0, 20, 30), logits)
    kl = quality.summarize(scores, 1, 62).kl
    assert kl.kld_mean == pytest.approx(0, abs=1e-12) and kl.same_top == 1 and kl.p_diff_rms == 0
    assert kl.ln_ppl_ratio == 0


# ------------------------------------------------------------------ chunking, on a stub model

class StubTokenizer:
    bos_id = 7

    def encode(self, text, allow_special=True):
        return [ord(c) % 50 for c in text]


class StubModel:
    """Logits at position i: a fixed function of the chunk's tokens up to i (a causal model), vocab 50."""

    def __init__(self, add_bos):
        self.meta = {"tokenizer.ggml.add_bos_token": add_bos}
        self.file = self
        self.tokenizer = StubTokenizer()
        self.vocab_size, self.ctx = 50, 1000
        self.calls = []

    def get(self, key, default=None):
        return self.meta.get(key, default)

    def token_ids(self, ids):
        return np.asarray(ids, np.int64)

    def logits(self, ids, chunk=None):
        self.calls.append(np.array(ids))
        h = np.cumsum(np.asarray(ids, np.float64) * 0.37 + 1.0)
        return np.cos(h[:, None] * np.arange(1, 51)[None, :] * 0.1).astype(np.float32) * 4


@pytest.mark.parametrize("bos", [False, True])
def test_chunks_and_scored_positions_follow_llama_perplexity(bos):
    text = "".join(chr(65 + (i * 7919) % 57) for i in range(170))
    model = StubModel(bos)
    result = quality.perplexity(model, text, ctx=40)
    ids = [7] * bos + [ord(c) % 50 for c in text]
    n_chunks = len(ids) // 40
    assert result.chunks == n_chunks == 4 and result.count == n_chunks * (40 - 1 - 20)
    nll = []
    for i in range(n_chunks):
        chunk = list(ids[i * 40:(i + 1) * 40])
        if bos:
            chunk[0] = 7
        assert np.array_equal(model.calls[i], chunk)
        logits = model.logits(chunk).astype(np.float64)
        for pos in range(20, 39):
            row = logits[pos]
            nll.append(-(row[chunk[pos + 1]] - row.max() - math.log(np.exp(row - row.max()).sum())))
    assert result.ppl == pytest.approx(math.exp(np.mean(nll)), rel=1e-12)


def test_too_short_a_text_and_bad_arguments_are_refused():
    model = StubModel(False)
    with pytest.raises(ValueError, match="needs at least 80"):
        quality.perplexity(model, "x" * 79, ctx=40)
    with pytest.raises(ValueError, match="at least 3"):
        quality.make_chunks(np.arange(10), 2)
    assert len(quality.perplexity(model, "x" * 100, ctx=40, n_chunks=1).lines()) == 1


# ------------------------------------------------------------------ on the oracle model

@pytest.fixture(scope="module")
def q8_model(tiny_gguf):
    return load(tiny_gguf("--type", "Q8_0"))


def test_perplexity_and_kld_of_real_models_equal_numpy(model, q8_model):
    ids = np.random.default_rng(3).integers(0, model.vocab_size, 100)
    result = quality.perplexity(q8_model, ids, ctx=32, kl_base=model)
    chunks = [ids[i * 32:(i + 1) * 32] for i in range(3)]  # the oracle's GGUF adds no BOS
    logits = np.concatenate([q8_model.logits(c)[16:31] for c in chunks])
    base = np.concatenate([model.logits(c)[16:31] for c in chunks])
    want = reference_stats(logits, base, np.concatenate([c[17:] for c in chunks]))
    assert result.chunks == 3 and result.count == 45
    assert result.ppl == pytest.approx(want["ppl"], rel=1e-9)
    assert result.kl.kld_mean == pytest.approx(want["kld_mean"], rel=1e-6)
    assert result.kl.same_top == want["same_top"] and result.kl.kld_mean > 0
    # the base's logits computed once serve several models
    again = quality.perplexity(q8_model, ids, ctx=32, kl_base=quality.base_logits(model, chunks))
    assert again.kl.kld_mean == result.kl.kld_mean


def test_one_token_a_call_measures_what_one_call_measures(model, q8_model):
    ids = np.random.default_rng(5).integers(0, model.vocab_size, 80)
    result = quality.perplexity(q8_model, ids, ctx=40, kl_base=model, batch=1)
    chunks = [ids[:40], ids[40:]]
    logits = np.concatenate([q8_model.logits(c, chunk=1)[20:39] for c in chunks])
    base = np.concatenate([model.logits(c, chunk=1)[20:39] for c in chunks])
    want = reference_stats(logits, base, np.concatenate([c[21:] for c in chunks]))
    assert result.kl.kld_mean == pytest.approx(want["kld_mean"], rel=1e-6)
    # the core multiplies any number of tokens with the arithmetic of one: the batch changes no bit
    assert result.kl.kld_mean == quality.perplexity(q8_model, ids, ctx=40, kl_base=model).kl.kld_mean


def test_perplexity_command(tmp_path, tiny_gguf):
    text = tmp_path / "text.txt"
    text.write_text("def f(x):\n    return x * 2\n" * 40)
    f32, q8 = str(tiny_gguf("--type", "f32")), str(tiny_gguf("--type", "Q8_0"))
    run = CliRunner().invoke(main, ["perplexity", "-m", q8, "-f", str(text), "-c", "64", "--kl-base", f32])
    assert run.exit_code == 0, run.output
    assert "Final estimate: PPL = " in run.stdout and "Same top p:" in run.stdout and "Mean    KLD:" in run.stdout
    assert "chunks" in run.stderr  # the progress bar
    for args, message in (([q8, "-f", str(tmp_path / "none.txt")], "none.txt"),
                          ([q8, "-f", str(text), "-c", "1000"], "needs at least 2000"),
                          ([q8, "-f", str(text), "-c", "4096"], "context of 1024"),
                          ([str(text), "-f", str(text)], "text.txt")):
        bad = CliRunner().invoke(main, ["perplexity", "-m", *args])
        assert bad.exit_code != 0 and message in bad.output and "Traceback" not in bad.output
        assert [line for line in bad.output.splitlines() if line.startswith("Error")] == \
            [bad.output.strip().splitlines()[-1]], bad.output  # one line of error, after click's usage lines


# ------------------------------------------------------------------ importance matrix

def test_visible_experts_compute_what_the_core_computes(model):
    moe = model.net.layers[3].ffn
    rng = np.random.default_rng(4)
    x = rng.standard_normal((37, model.args.dim)).astype(np.float32)
    idx = np.stack([rng.permutation(8)[:2] for _ in range(37)]).astype(np.int32)
    w = rng.random((37, 2)).astype(np.float32)
    core, visible = np.zeros_like(x), np.zeros_like(x)
    backend.moe_experts(x, idx, w, moe.w1, moe.w3, moe.w2, moe.limit, core)
    deepseek_v4.MoE.experts_visible(x, idx, w, moe.w1, moe.w3, moe.w2, moe.limit, visible)
    assert np.allclose(core, visible, rtol=1e-5, atol=1e-6)


class _Observed:
    """A weight of NumpyV4 whose products x @ W.T report x."""

    __array_ufunc__ = None  # numpy defers x @ this to __rmatmul__

    def __init__(self, seen, name, a):
        self.seen, self.name, self.a = seen, name, a

    @property
    def T(self):
        return self

    def __getitem__(self, rows):  # wo_a's groups: slices of the one matrix
        return _Observed(self.seen, self.name, self.a[rows])

    def __rmatmul__(self, x):
        self.seen.append((self.name, np.array(x)))
        return x @ self.a.T


class ObservedNumpyV4(NumpyV4):
    def __init__(self, *args):
        super().__init__(*args)
        self.seen = []

    def w(self, name):
        a = super().w(name)
        if a.ndim == 2 and name != "embed.weight" and a.dtype.kind == "f" and not name.endswith(".ape"):
            return _Observed(self.seen, name, a)
        return a


def gguf_name(release: str) -> tuple[str, int | None]:
    """release tensor name -> (GGUF name, expert or None)"""
    if release in layout._ROOT:
        return layout._ROOT[release][0], None
    parts = release.split(".")
    i = int(parts[1])
    if len(parts) > 5 and parts[3] == "experts":
        return f"blk.{i}.{layout._EXPERTS[parts[5]]}", int(parts[4])
    return f"blk.{i}.{layout._LAYER['.'.join(parts[2:])][0]}", None


def test_imatrix_sums_equal_those_of_the_numpy_forward(model, goldens):
    config = json.loads((FIXTURE / "config.json").read_text())
    headers, arrays = read_checkpoint(FIXTURE)
    ids = goldens["prompt_ids"]
    reference = ObservedNumpyV4(config, headers, arrays)
    reference.logits(ids)
    want_sums, want_counts = {}, {}
    for release, x in reference.seen:
        name, expert = gguf_name(release)
        n_expert = config["n_routed_experts"] if expert is not None else 1
        want_sums.setdefault(name, np.zeros((n_expert, x.shape[1])))
        want_counts.setdefault(name, np.zeros(n_expert))
        want_sums[name][expert or 0] += (x * x).sum(0)
        want_counts[name][expert or 0] += x.shape[0]

    im = fim.collect(model, ids, ctx=ids.size, dataset="prompt")
    assert im.chunk_count == 1 and im.chunk_size == ids.size and im.datasets == ["prompt"]
    assert set(im.sums) == set(want_sums)
    assert "blk.0.ffn_down_exps.weight" in im.sums and "blk.2.indexer.proj.weight" in im.sums
    for name in want_sums:
        assert np.array_equal(im.counts[name], want_counts[name]), name
        assert np.allclose(im.sums[name], want_sums[name], rtol=2e-4, atol=1e-5 * want_sums[name].max()), name
    wo_a = im.counts["blk.0.attn_output_a.weight"]
    assert wo_a[0] == ids.size * config["o_groups"]  # one row of sums over every group's input
    routed = im.counts["blk.3.ffn_gate_exps.weight"]
    assert routed.sum() == ids.size * config["num_experts_per_tok"] and routed.size == 8


def test_imatrix_command_writes_what_quantize_reads(tmp_path, tiny_gguf):
    text = tmp_path / "calibration.txt"
    text.write_text("import os\nprint(os.path.join('a', 'b'))\n" * 30)
    f32 = str(tiny_gguf("--type", "f32"))
    out = tmp_path / "imatrix.gguf"
    run = CliRunner().invoke(main, ["imatrix", "-m", f32, "-f", str(text), "-o", str(out), "-c", "64"])
    assert run.exit_code == 0, run.output
    im = read_imatrix(out)
    assert im.datasets == ["calibration.txt"] and im.chunk_size == 64 and im.chunk_count >= 1
    assert im.sums["blk.3.ffn_down_exps.weight"].shape == (8, 128)
    again = CliRunner().invoke(main, ["imatrix", "-m", f32, "-f", str(text), "-o", str(out)])
    assert again.exit_code != 0 and "exists" in again.output
    outs = {}
    for tag, extra in (("with", ["--imatrix", str(out)]), ("without", [])):
        outs[tag] = tmp_path / f"q4_0-{tag}.gguf"
        q = CliRunner().invoke(main, ["quantize", f32, str(outs[tag]), "--type", "q4_0", "--quiet", *extra])
        assert q.exit_code == 0, q.output
    assert outs["with"].read_bytes() != outs["without"].read_bytes()
    assert load(outs["with"]).logits([1, 2, 3]).shape == (3, 512)
