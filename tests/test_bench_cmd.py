"""flashlite bench: what each test feeds and times (against a model that records its calls), the records' numbers
against their samples, and the table and errors through the command line."""
import json

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from flashlite.cli.bench_cmd import BenchTest, run_test
from flashlite.cli import main


class RecordingModel:
    """Stands in for Model: records every forward pass by cache, so that the schedule can be checked."""

    vocab_size = 100

    def __init__(self):
        self.calls = []
        self.caches = 0

    def new_cache(self):
        self.caches += 1
        return self.caches

    def forward(self, ids, cache=None, logits="all"):
        self.calls.append((cache, len(ids), logits))


def test_each_repetition_prefills_the_depth_untimed_then_the_prompt_in_one_batch_then_one_token_at_a_time():
    model = RecordingModel()
    samples = run_test(model, BenchTest(n_prompt=7, n_gen=3, n_depth=5, n_threads=1), repetitions=2, warmup=True,
                       rng=np.random.default_rng(0))
    assert len(samples) == 2 and all(ns > 0 for ns in samples)
    assert model.caches == 3  # the warmup's and one fresh cache per repetition
    warm = [(1, 5, "none"), (1, 7, "last"), (1, 1, "last")]
    rep = [[(c, 5, "none"), (c, 7, "last")] + [(c, 1, "last")] * 3 for c in (2, 3)]
    assert model.calls == warm + rep[0] + rep[1]


def test_a_generation_test_feeds_no_prompt():
    model = RecordingModel()
    run_test(model, BenchTest(n_prompt=0, n_gen=4, n_depth=0, n_threads=1), repetitions=1, warmup=False,
             rng=np.random.default_rng(0))
    assert model.calls == [(1, 1, "last")] * 4


def test_json_records_carry_llama_bench_fields_whose_rates_are_the_samples(tiny_gguf):
    path = tiny_gguf("--type", "q8_0")
    result = CliRunner().invoke(main, ["bench", "-m", str(path), "-p", "6", "-n", "3", "-pg", "4,2", "-r", "2",
                                       "-t", "1,2", "-o", "json"])
    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)
    tensors = gguf.GGUFReader(path).tensors
    weights_bytes, weights_params = sum(int(t.n_bytes) for t in tensors), sum(int(t.n_elements) for t in tensors)
    assert [(r["n_threads"], r["n_prompt"], r["n_gen"]) for r in records] == [
        (1, 6, 0), (1, 0, 3), (1, 4, 2), (2, 6, 0), (2, 0, 3), (2, 4, 2)]
    for r in records:
        tokens = r["n_prompt"] + r["n_gen"]
        assert len(r["samples_ns"]) == 2
        assert r["samples_ts"] == pytest.approx([tokens * 1e9 / ns for ns in r["samples_ns"]])
        assert r["avg_ts"] == pytest.approx(np.mean(r["samples_ts"]))
        assert r["stddev_ts"] == pytest.approx(np.std(r["samples_ts"], ddof=1))
        assert r["avg_ns"] == int(np.mean(r["samples_ns"]))
        assert r["model_type"].startswith("deepseek4 ") and r["model_type"].endswith(" Q8_0")
        assert (r["model_size"], r["model_n_params"]) == (weights_bytes, weights_params)


def test_the_table_has_a_row_per_test(tiny_gguf):
    path = tiny_gguf("--type", "q8_0")
    result = CliRunner().invoke(main, ["bench", "-m", str(path), "-p", "5", "-n", "2", "-d", "3", "-r", "1"])
    assert result.exit_code == 0, result.output
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith("|")]
    assert [c.strip() for c in lines[0].strip("|").split("|")] == ["model", "size", "params", "backend", "threads",
                                                                   "test", "t/s"]
    assert [ln.split("|")[6].strip() for ln in lines[2:]] == ["pp5 @ d3", "tg2 @ d3"]


@pytest.mark.parametrize("args, message", [
    (["-p", "x"], "expected integers"),
    (["-t", "0"], "must be >= 1"),
    (["-pg", "5"], "expected PP,TG"),
    (["-p", "100000"], "tokens of context"),
])
def test_bad_options_are_one_line_errors(tiny_gguf, args, message):
    result = CliRunner().invoke(main, ["bench", "-m", str(tiny_gguf("--type", "q8_0")), "-r", "1", *args])
    assert result.exit_code == 2 and message in result.output, result.output
