"""`flashlite bench`: llama-bench's prompt-processing and generation tests (pp512, tg128, pp512+tg128), its table
and its JSON fields, so that the two engines' numbers read side by side."""
from __future__ import annotations

import csv
import io
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import click
import numpy as np

from flashlite.cli.run_cmd import load_model, load_options


@dataclass
class BenchTest:
    """One row of the table: n_prompt tokens in one batch, then n_gen tokens one at a time, after n_depth tokens
    that are in the cache and not timed (llama-bench's -d)."""

    n_prompt: int
    n_gen: int
    n_depth: int
    n_threads: int

    @property
    def name(self) -> str:
        parts = ([f"pp{self.n_prompt}"] if self.n_prompt else []) + ([f"tg{self.n_gen}"] if self.n_gen else [])
        return "+".join(parts) + (f" @ d{self.n_depth}" if self.n_depth else "")


@dataclass
class Result:
    """llama-bench's JSON record, less the fields of its GPU and batching options."""

    flashlite_version: str
    cpu_info: str
    backends: str
    model_filename: str
    model_type: str
    model_size: int
    model_n_params: int
    n_threads: int
    n_prompt: int
    n_gen: int
    n_depth: int
    test_time: str
    avg_ns: int = 0
    stddev_ns: int = 0
    avg_ts: float = 0.0
    stddev_ts: float = 0.0
    samples_ns: list[int] = field(default_factory=list)
    samples_ts: list[float] = field(default_factory=list)


def _int_list(text: str, name: str, lowest: int) -> list[int]:
    """llama-bench's list syntax: "512", "128,256", or a range "1-4"."""
    values = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part[1:]:
                lo, hi = part.split("-", 1)
                values.extend(range(int(lo), int(hi) + 1))
            else:
                values.append(int(part))
        except ValueError:
            raise click.BadParameter(f"expected integers separated by commas (or a range a-b), got {text!r}",
                                     param_hint=name) from None
    if not values or min(values) < lowest:
        raise click.BadParameter(f"values must be >= {lowest}, got {text!r}", param_hint=name)
    return values


def _pg(text: str) -> tuple[int, int]:
    try:
        pp, tg = (int(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"expected PP,TG (e.g. 512,128), got {text!r}", param_hint="-pg") from None
    if pp < 1 or tg < 1:
        raise click.BadParameter(f"both counts must be >= 1, got {text!r}", param_hint="-pg")
    return pp, tg


def model_description(model) -> tuple[str, int, int]:
    """(llama-bench's model_type: architecture, parameters, file type; bytes of the weights; parameters)."""
    from quant.recipes import FTYPES

    size = sum(t.data.nbytes for t in model.file.tensors.values())
    params = sum(int(np.prod(t.ne)) for t in model.file.tensors.values())
    ftype = model.file.metadata.get("general.file_type")
    ftype_name = next((name for name, (ft, _) in FTYPES.items() if ft == ftype), "?")
    arch = model.file.metadata.get("general.architecture", "?")
    scaled = f"{params / 1e9:.1f}B" if params >= 1e9 else f"{params / 1e6:.0f}M"
    return f"{arch} {scaled} {ftype_name}", size, params


def run_test(model, test: BenchTest, repetitions: int, warmup: bool, rng: np.random.Generator) -> list[int]:
    """Nanoseconds of each repetition: a fresh cache, the depth prefilled untimed, then the prompt in one batch
    and the generated tokens one by one (random tokens throughout, as llama-bench feeds them)."""
    from flashlite._native import check, lib

    check(lib.fl_threads_set(test.n_threads), "fl_threads_set")
    vocab = model.vocab_size

    def once(n_prompt: int, n_gen: int) -> int:
        cache = model.new_cache()
        if test.n_depth:
            model.forward(rng.integers(0, vocab, test.n_depth), cache=cache, logits="none")
        t0 = time.perf_counter_ns()
        if n_prompt:
            model.forward(rng.integers(0, vocab, n_prompt), cache=cache, logits="last")
        for token in rng.integers(0, vocab, n_gen):
            model.forward([int(token)], cache=cache, logits="last")
        return time.perf_counter_ns() - t0

    if warmup:  # llama-bench's: the kernels' first touch of the weights and the page cache, not timed
        once(min(test.n_prompt, 32), 1 if test.n_gen else 0)
    return [once(test.n_prompt, test.n_gen) for _ in range(repetitions)]


def _summarise(result: Result, samples: list[int], tokens: int) -> None:
    result.samples_ns = samples
    result.samples_ts = [tokens * 1e9 / ns for ns in samples]
    result.avg_ns = int(statistics.mean(samples))
    result.stddev_ns = int(statistics.stdev(samples)) if len(samples) > 1 else 0
    result.avg_ts = statistics.mean(result.samples_ts)
    result.stddev_ts = statistics.stdev(result.samples_ts) if len(samples) > 1 else 0.0


def _markdown(results: list[Result], tests: list[BenchTest]) -> str:
    head = ["model", "size", "params", "backend", "threads", "test", "t/s"]
    rows = []
    for r, t in zip(results, tests):
        size = f"{r.model_size / 2**30:.2f} GiB" if r.model_size >= 2**30 else f"{r.model_size / 2**20:.2f} MiB"
        params = f"{r.model_n_params / 1e9:.2f} B" if r.model_n_params >= 1e9 else f"{r.model_n_params / 1e6:.2f} M"
        rows.append([r.model_type, size, params,
                     r.backends, str(r.n_threads), t.name, f"{r.avg_ts:.2f} ± {r.stddev_ts:.2f}"])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    right = {1, 2, 4, 5, 6}

    def line(cells):
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in
                                 enumerate(zip(cells, widths))) + " |"

    rule = "| " + " | ".join(("-" * (w - 1) + ":") if i in right else "-" * w for i, w in enumerate(widths)) + " |"
    return "\n".join([line(head), rule, *(line(row) for row in rows)])


@click.command("bench")
@click.option("-m", "--model", "model_paths", multiple=True, type=click.Path(dir_okay=False),
              help="deepseek4 GGUF file (repeat for several)")
@click.option("-p", "--n-prompt", "n_prompt", default="512", show_default=True,
              help="prompt lengths to time, comma-separated (0: none)")
@click.option("-n", "--n-gen", "n_gen", default="128", show_default=True,
              help="numbers of generated tokens to time, comma-separated (0: none)")
@click.option("-pg", "pg", multiple=True, metavar="PP,TG", help="a prompt then generation, timed together")
@click.option("-d", "--n-depth", "n_depth", default="0", show_default=True,
              help="tokens already in the cache before each test (not timed), comma-separated")
@click.option("-t", "--threads", default=None, help="thread counts, comma-separated (default: the core's)")
@click.option("-r", "--repetitions", default=5, show_default=True, type=click.IntRange(1, 1000),
              help="timed runs of each test")
@click.option("-o", "--output", "fmt", default="md", show_default=True,
              type=click.Choice(["md", "json", "jsonl", "csv"]), help="table or records")
@click.option("--no-warmup", is_flag=True, help="time the first run too")
@click.option("-c", "--ctx-size", "ctx", default=None, type=click.IntRange(min=1),
              help="context length (default: the model's)")
@load_options
def bench(model_paths, n_prompt, n_gen, pg, n_depth, threads, repetitions, fmt, no_warmup, ctx, load_opts):
    """Time prompt processing (ppN) and generation (tgN) as llama-bench does, one row per model, thread count
    and test: tokens per second, mean ± standard deviation of the repetitions."""
    from flashlite import __version__
    from flashlite import matmul as fm
    from flashlite.cli import system_info

    prompts = _int_list(n_prompt, "-p", 0)
    gens = _int_list(n_gen, "-n", 0)
    depths = _int_list(n_depth, "-d", 0)
    thread_counts = _int_list(threads, "-t", 1) if threads else [fm.threads()]
    if max(thread_counts) > 256:
        raise click.BadParameter("at most 256 threads", param_hint="-t")
    pgs = [_pg(v) for v in pg]
    if not model_paths and load_opts["hf_repo"] is None:
        raise click.UsageError("give -m/--model (or -hf/--hf-repo)")
    info = system_info()
    results: list[Result] = []
    tests_run: list[BenchTest] = []
    rng = np.random.default_rng(0)
    for path in model_paths or [None]:
        model = load_model(path, thread_counts[0], ctx, load_opts)
        model_type, size, params = model_description(model)
        shapes = ([(p, 0) for p in prompts if p] + [(0, g) for g in gens if g] + pgs)
        try:
            for n_threads in thread_counts:
                for depth in depths:
                    for p, g in shapes:
                        test = BenchTest(p, g, depth, n_threads)
                        if depth + p + g > model.ctx:
                            raise click.BadParameter(f"{test.name} needs {depth + p + g} tokens of context, the "
                                                     f"model has {model.ctx} (raise -c)", param_hint="-p/-n/-d")
                        result = Result(__version__, info["cpu"], f"CPU ({info['simd']})", model.file.path,
                                        model_type, size, params, n_threads, p, g, depth,
                                        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
                        _summarise(result, run_test(model, test, repetitions, not no_warmup, rng), p + g)
                        results.append(result)
                        tests_run.append(test)
                        if fmt == "jsonl":
                            click.echo(json.dumps(asdict(result)))
                        else:
                            click.echo(f"{model_type} t={n_threads} {test.name}: {result.avg_ts:.2f} t/s",
                                       err=True)
        finally:
            model.close()
    if fmt == "md":
        click.echo(_markdown(results, tests_run))
    elif fmt == "json":
        click.echo(json.dumps([asdict(r) for r in results], indent=2))
    elif fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(asdict(results[0])) if results else [])
        writer.writeheader()
        for r in results:
            writer.writerow({k: (json.dumps(v) if isinstance(v, list) else v) for k, v in asdict(r).items()})
        click.echo(out.getvalue(), nl=False)
    sys.stdout.flush()
