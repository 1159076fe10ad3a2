"""`flashlite perplexity` and `flashlite imatrix`: a model's perplexity over a text (and its KL divergence from a base
model), and the importance matrix of its weights over a text."""
from __future__ import annotations

import os
import sys
import time

import click

from flashlite.quality import DEFAULT_CTX


def _load(path, threads, what="-m", hf_repo=None):
    from flashlite.hub import download_gguf
    from flashlite.model import load

    if what == "-m" and (path is None) == (hf_repo is None):
        raise click.UsageError("give exactly one of -m/--model and -hf/--hf-repo")
    if hf_repo is not None:
        what = "-hf"
    try:
        return load(download_gguf(hf_repo) if hf_repo is not None else path, threads=threads)
    except (OSError, ValueError) as exc:
        raise click.BadParameter(str(exc), param_hint=what) from exc


def _read(text_path):
    from flashlite.quality import read_text

    try:
        return read_text(text_path)
    except (OSError, ValueError) as exc:
        raise click.BadParameter(str(exc), param_hint="-f") from exc


class _Bar:
    """A progress line on stderr: chunks done, rate, ETA and a running figure."""

    def __init__(self, label: str, enabled: bool):
        self.label, self.enabled = label, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.start = time.perf_counter()

    def __call__(self, done: int, total: int, figure: str) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / done * (total - done)
        width = 24
        filled = width * done // total
        line = (f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} chunks  "
                f"{elapsed:.1f} s, ETA {eta:.0f} s  {figure}")
        if self.tty:
            sys.stderr.write("\r" + line.ljust(100) + ("\n" if done == total else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()




def _model(command):
    command = click.option("-hf", "-hfr", "--hf-repo", default=None, metavar="ORG/REPO[:QUANT]",
                           help="a GGUF from the Hugging Face Hub instead of -m (QUANT default Q4_K_M)")(command)
    return click.option("-m", "--model", "model_path", default=None, type=click.Path(dir_okay=False),
                        help="deepseek4 GGUF file")(command)


_text = click.option("-f", "--file", "text_path", required=True, type=click.Path(dir_okay=False),
                     help="the text (UTF-8)")
_ctx = click.option("-c", "--ctx-size", "ctx", default=DEFAULT_CTX, show_default=True, type=click.IntRange(min=3),
                    help="tokens per chunk (each chunk a fresh sequence)")
_chunks = click.option("--chunks", "n_chunks", default=None, type=click.IntRange(min=1),
                       help="use at most N chunks (default: all the text fills)")
_threads = click.option("-t", "--threads", default=None, type=click.IntRange(1, 256),
                        help="threads, 1..256 (default: one per physical core, one fewer from 8)")
_quiet = click.option("--quiet", is_flag=True, help="no progress bar")


@click.command("perplexity")
@_model
@_text
@click.option("--kl-base", "base_path", default=None, type=click.Path(dir_okay=False),
              help="a base model (e.g. the f32 GGUF): also report the KL divergence of the model's token "
                   "distributions from the base's, top-1 agreement and delta-p, as llama-perplexity --kl-divergence")
@_ctx
@click.option("-b", "--batch-size", "batch", default=None, type=click.IntRange(min=1),
              help="tokens per forward call (default: a whole chunk; 1 takes the decode kernels, which round "
                   "activations to Q8_0/Q8_K as llama.cpp does)")
@_chunks
@_threads
@_quiet
def perplexity(model_path, hf_repo, text_path, base_path, ctx, batch, n_chunks, threads, quiet):
    """Perplexity of MODEL over a text as llama-perplexity computes it: chunks of CTX tokens, the second half of
    each scored."""
    from flashlite import quality

    text = _read(text_path)
    model = _load(model_path, threads, hf_repo=hf_repo)
    base = _load(base_path, threads, "--kl-base") if base_path else None
    if base is not None and base.vocab_size != model.vocab_size:
        raise click.BadParameter(f"{base_path} has a vocabulary of {base.vocab_size} tokens, {model.file.path} of "
                                 f"{model.vocab_size}", param_hint="--kl-base")
    if ctx > model.ctx:
        raise click.BadParameter(f"{ctx} exceeds the model's context of {model.ctx}", param_hint="-c")
    bar = _Bar("perplexity", not quiet)

    def progress(done, total, running):
        figure = f"PPL {running.ppl:.4f}"
        if running.kl is not None:
            figure += f"  KLD {running.kl.kld_mean:.6f}  same top {100 * running.kl.same_top:.2f}%"
        bar(done, total, figure)

    try:
        result = quality.perplexity(model, text, ctx, n_chunks, base, progress, batch)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    for line in result.lines():
        click.echo(line)


@click.command("imatrix")
@_model
@_text
@click.option("-o", "--output", "out_path", required=True, type=click.Path(dir_okay=False),
              help="the importance matrix to write (llama.cpp's GGUF imatrix format)")
@_ctx
@_chunks
@_threads
@click.option("--force", is_flag=True, help="overwrite the output if it exists")
@_quiet
def imatrix(model_path, hf_repo, text_path, out_path, ctx, n_chunks, threads, force, quiet):
    """The importance matrix of MODEL over a text (the mean squared input of every column of every weight matrix,
    per expert for the routed experts), in llama-imatrix's GGUF format, for `flashlite quantize --imatrix` and
    llama.cpp's quantizer."""
    from flashlite import imatrix as collect_imatrix

    if os.path.exists(out_path) and not force:
        raise click.BadParameter(f"{out_path} exists (--force overwrites it)", param_hint="-o")
    text = _read(text_path)
    model = _load(model_path, threads, hf_repo=hf_repo)
    if ctx > model.ctx:
        raise click.BadParameter(f"{ctx} exceeds the model's context of {model.ctx}", param_hint="-c")
    bar = _Bar("imatrix", not quiet)
    try:
        im = collect_imatrix.collect(model, text, ctx, n_chunks, os.path.basename(text_path),
                                     lambda done, total, ppl: bar(done, total, f"PPL {ppl:.4f}"))
        collect_imatrix.write(out_path, im)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    routed = sum(1 for c in im.counts.values() if c.size > 1)
    unseen = sum(int((c == 0).sum()) for c in im.counts.values() if c.size > 1)
    click.echo(f"wrote {out_path}: {len(im.sums)} matrices ({routed} of stacked experts, {unseen} expert slices "
               f"never routed to) over {im.chunk_count} chunks of {ctx} tokens", err=True)
