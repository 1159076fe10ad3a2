"""`flashlite run`: greedy generation from a GGUF, with prefill and decode speed."""
from __future__ import annotations

import functools
import time

import click


def _parse_tokens(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError as exc:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}", param_hint="--tokens") from exc
    if not ids:
        raise click.BadParameter("no token ids given", param_hint="--tokens")
    return ids


def load_options(command):
    """-hf, -dev, --gpu-mem, --no-cuda-graphs, --ram-budget, --expert-policy, --kv-format and --check-tensors, shared
    by every command that loads a model; the command receives them as one `load_opts` dict for load_model."""
    names = ("hf_repo", "device", "gpu_mem", "cuda_graphs", "ram_budget", "expert_policy", "kv_format",
             "check_tensors")

    @functools.wraps(command)
    def with_load_opts(**kwargs):
        return command(load_opts={n: kwargs.pop(n) for n in names}, **kwargs)

    options = (
        click.option("-hf", "-hfr", "--hf-repo", default=None, metavar="ORG/REPO[:QUANT]",
                     help="a GGUF from the Hugging Face Hub instead of -m (QUANT default Q4_K_M), kept in its cache"),
        click.option("-dev", "--device", default="cpu", show_default=True, metavar="DEVICE",
                     help="where the model runs: cpu, cuda, cuda:N, npu, npu:N, torch-cpu or auto (CUDA when torch "
                          "sees a GPU); the GPU backends need pip install 'flashlite[cuda]' (docs/gpu.md)"),
        click.option("--gpu-mem", default=None, metavar="SIZE",
                     help="with -dev: the device's memory for the model (e.g. 20G); KV cache, dense weights, head, "
                          "shared experts, then the hottest routed experts go there, the rest run on the CPU; "
                          "default: what the GPU has free less 1 GiB (torch-cpu: everything)"),
        click.option("--cuda-graphs/--no-cuda-graphs", default=True, show_default=True,
                     help="with -dev cuda: replay the parts of a decode step whose shapes the position does not "
                          "change as captured CUDA graphs; --no-cuda-graphs runs every step op by op"),
        click.option("--ram-budget", default=None, metavar="SIZE",
                     help="keep routed experts on disk with a cache of SIZE (e.g. 24G); default: all mapped"),
        click.option("--expert-policy", default="lru", show_default=True, type=click.Choice(["lru", "lfu"]),
                     help="which cached expert a miss evicts (with --ram-budget)"),
        click.option("--kv-format", default="f32", show_default=True, type=click.Choice(["f32", "fp8"]),
                     help="KV rows as computed, or rounded and packed as DeepSeek's reference (4x smaller)"),
        click.option("--check-tensors", is_flag=True,
                     help="read every tensor at load and refuse Inf or NaN values or block scales"),
    )
    for option in reversed(options):
        with_load_opts = option(with_load_opts)
    return with_load_opts


def spec_options(command):
    """--spec-type, --spec-draft-n-max and -md (llama.cpp's names), for the commands that decode; the command
    receives them as one `spec_opts` dict for load_model."""
    from flashlite.speculative import ALIASES, MAX_DRAFT, SPEC_TYPES

    @functools.wraps(command)
    def with_spec_opts(**kwargs):
        return command(spec_opts={n: kwargs.pop(n) for n in ("spec_type", "spec_draft_n_max", "model_draft")},
                       **kwargs)

    options = (
        click.option("--spec-type", default=None, type=click.Choice(SPEC_TYPES + tuple(sorted(ALIASES))),
                     help="speculative decoding: ngram (prompt lookup over the prompt and output), mtp (V4's MTP "
                          "block, from -md), dspark (a DSpark draft, from -md); the output is plain decoding's "
                          "(greedy) or has its distribution; default none, or the kind of the -md file"),
        click.option("--spec-draft-n-max", default=None, type=click.IntRange(1, MAX_DRAFT),
                     help="most tokens drafted per verified batch (default 4; fewer, or none, while they are "
                          "rejected)"),
        click.option("-md", "--spec-draft-model", "--model-draft", "model_draft", default=None,
                     type=click.Path(dir_okay=False),
                     help="draft GGUF for speculative decoding: an MTP draft (flashlite quantize --mtp, llama.cpp's "
                          "convert_hf_to_gguf.py --mtp) or a DSpark draft (llama.cpp's convert_hf_to_gguf.py on a "
                          "DSpark checkpoint)"),
    )
    for option in reversed(options):
        with_spec_opts = option(with_spec_opts)
    return with_spec_opts


def spec_summary(model) -> str | None:
    """A line on speculative decoding's drafts since load, or None without any."""
    st = model.stats()
    if not st["spec_rounds"]:
        return None
    rate = st["accepted_tokens"] / st["drafted_tokens"] if st["drafted_tokens"] else 0.0
    return (f"speculative: {st['drafted_tokens']} drafted, {st['accepted_tokens']} accepted ({rate:.1%}), "
            f"{st['spec_rounds']} verified batches")


def load_model(model_path, threads, ctx, load_opts, spec_opts=None):
    """Load a GGUF for a command: a bad file is a clean click error, and the load time is reported."""
    from flashlite.hub import download_gguf
    from flashlite.model import load

    options = dict(load_opts)
    hf = options.pop("hf_repo")
    if (model_path is None) == (hf is None):
        raise click.UsageError("give exactly one of -m/--model and -hf/--hf-repo")
    if hf is not None:
        try:
            model_path = download_gguf(hf)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from exc
    t0 = time.perf_counter()
    if options["ram_budget"] is None:
        del options["ram_budget"], options["expert_policy"]
    if options["gpu_mem"] is None:
        del options["gpu_mem"]
    options.update({k: v for k, v in (spec_opts or {}).items() if v is not None})
    try:
        model = load(model_path, threads=threads, ctx=ctx, **options)
    except (OSError, ValueError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"loaded {model_path} in {time.perf_counter() - t0:.2f} s", err=True)
    if getattr(model.device, "placement", None) is not None:
        click.echo(str(model.device.placement), err=True)
    return model


@click.command("run")
@click.option("-m", "--model", "model_path", default=None, type=click.Path(dir_okay=False),
              help="deepseek4 GGUF file")
@click.option("-p", "--prompt", default=None, help="prompt text (needs the tokenizer in the GGUF)")
@click.option("-f", "--file", "prompt_file", default=None, type=click.File("r", encoding="utf-8"),
              help="file whose text is the prompt")
@click.option("--tokens", default=None, help="prompt as comma-separated token ids")
@click.option("-n", "--n-predict", "--predict", "n_predict", default=32, show_default=True, type=click.IntRange(min=1),
              help="tokens to generate")
@click.option("-t", "--threads", default=None, type=click.IntRange(1, 256), help="threads, 1..256 (default: one per physical core, one fewer from 8)")
@click.option("-c", "--ctx-size", "ctx", default=None, type=click.IntRange(min=1),
              help="context length (default: the model's)")
@load_options
@spec_options
def run(model_path, prompt, prompt_file, tokens, n_predict, threads, ctx, load_opts, spec_opts):
    """Generate N tokens greedily after a prompt and report tokens/s."""
    if [prompt, prompt_file, tokens].count(None) != 2:
        raise click.UsageError("give exactly one of -p/--prompt, -f/--file and --tokens")
    if prompt_file is not None:
        prompt = prompt_file.read()
    model = load_model(model_path, threads, ctx, load_opts, spec_opts)
    tokenizer = None
    if prompt is not None:
        tokenizer = model.tokenizer
        ids = tokenizer.encode(prompt)
    else:
        ids = _parse_tokens(tokens)
        try:
            model.token_ids(ids)
        except ValueError as exc:
            raise click.BadParameter(str(exc).removeprefix("token_ids: "), param_hint="--tokens") from exc
    if len(ids) + n_predict > model.ctx:
        raise click.BadParameter(f"the prompt's {len(ids)} tokens and {n_predict} more exceed the context of "
                                 f"{model.ctx} (lower -n or raise -c)", param_hint="-n")

    out = []
    t0 = time.perf_counter()
    t_first = None
    try:
        for token in model.generate(ids, n_predict):
            if t_first is None:
                t_first = time.perf_counter()
            out.append(token)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    t_end = time.perf_counter()
    click.echo(tokenizer.decode(out) if tokenizer else ",".join(str(t) for t in out))
    prefill = t_first - t0
    click.echo(f"prefill: {len(ids)} tokens in {prefill:.3f} s ({len(ids) / prefill:.2f} tok/s)", err=True)
    if len(out) > 1:
        decode = t_end - t_first
        click.echo(f"decode: {len(out) - 1} tokens in {decode:.3f} s ({(len(out) - 1) / decode:.2f} tok/s)", err=True)
    summary = spec_summary(model)
    if summary:
        click.echo(summary, err=True)
    if load_opts["ram_budget"] is not None:
        st = model.stats()
        demanded = st["expert_hits"] + st["expert_misses"]
        click.echo(f"experts: {st['expert_hits'] / max(demanded, 1):.1%} hits, "
                   f"{st['expert_bytes_read'] / max(st['tokens'], 1) / 2**20:.1f} MiB read per token, "
                   f"{st['io_stall_seconds']:.3f} s waiting for the disk", err=True)
    model.close()
