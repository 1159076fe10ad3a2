"""`flashlite pull`: a model from the Hugging Face Hub: a safetensors checkpoint quantized while it downloads, or a
published GGUF downloaded and checked."""
from __future__ import annotations

import hashlib
import signal

import click

from flashlite.cli.quantize_cmd import _raise_terminated, _recipes_help, _Terminated


@click.command("pull", help="Get the model SPEC (org/repo[@REVISION][:QUANT]) from the Hugging Face Hub through "
                            "huggingface_hub's cache (HF_HOME, HF_TOKEN, HF_ENDPOINT, HF_HUB_OFFLINE apply). A "
                            "safetensors checkpoint is quantized into the deepseek4 GGUF OUT (default "
                            "REPO-TYPE.gguf) while it downloads: each shard is checked against the Hub's sha256 and "
                            "converted as soon as it has landed, while the next one downloads; an interrupted pull "
                            "goes on at the first shard not yet converted when run again. A GGUF repo (or any "
                            "SPEC with :QUANT) is downloaded as published, the file llama.cpp's -hf would pick, "
                            "and checked; OUT, if given, receives it (a folder for a split model).")
@click.argument("spec")
@click.argument("out", required=False, type=click.Path(dir_okay=True))
@click.option("--type", "type_name", default="mxfp4-q8_0", show_default=True, help=_recipes_help())
@click.option("--tensor-type", "tensor_types", multiple=True, metavar="PATTERN=TYPE",
              help="override the type of the GGUF tensors whose name matches the regex PATTERN (repeatable)")
@click.option("--imatrix", "imatrix_path", type=click.Path(dir_okay=False),
              help="an importance matrix (llama.cpp's GGUF or legacy .dat format) the quantizers weigh by")
@click.option("--delete-source", is_flag=True,
              help="remove each shard from the Hub cache once every tensor it feeds is written (peak disk: about "
                   "one shard, two while they overlap, plus the GGUF); for a GGUF repo, move the files to OUT")
@click.option("--force", is_flag=True, help="overwrite OUT if it exists")
@click.option("--quiet", is_flag=True, help="no progress bars")
def pull(spec, out, type_name, tensor_types, imatrix_path, delete_source, force, quiet):
    from flashlite.pull import (PullError, default_out, is_checkpoint, parse_spec, pull_checkpoint, pull_gguf,
                                repo_files)
    from quant.imatrix import read_imatrix
    from quant.recipes import Recipe

    log = lambda msg: click.echo(msg, err=True)  # noqa: E731
    try:
        repo, revision, tag = parse_spec(spec)
    except PullError as exc:
        raise click.BadParameter(str(exc), param_hint="SPEC") from exc
    try:  # SIGTERM unwinds like Ctrl-C: the state is kept for the next run
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread
        previous = None
    try:
        commit, files = repo_files(repo, revision)
        if tag is not None or not is_checkpoint(files):
            typed = click.get_current_context().get_parameter_source("type_name") != click.core.ParameterSource.DEFAULT
            if imatrix_path or tensor_types or typed:
                raise click.UsageError(f"{repo} is downloaded as a published GGUF: --type, --tensor-type and "
                                       f"--imatrix apply to safetensors checkpoints (flashlite quantize "
                                       f"requantizes a GGUF)")
            paths = pull_gguf(repo, tag, out, force=force, delete_source=delete_source, progress=not quiet,
                              log=log, revision=revision, commit_files=(commit, files))
            click.echo(paths[0])
            return
        try:
            recipe = Recipe.parse(type_name, tensor_types)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--type") from exc
        imatrix = imatrix_sha = None
        if imatrix_path is not None:
            try:
                imatrix = read_imatrix(imatrix_path)
                with open(imatrix_path, "rb") as fh:
                    imatrix_sha = hashlib.file_digest(fh, "sha256").hexdigest() if hasattr(
                        hashlib, "file_digest") else hashlib.sha256(fh.read()).hexdigest()
            except (OSError, ValueError) as exc:
                raise click.BadParameter(str(exc), param_hint="--imatrix") from exc
        out = out or default_out(repo, type_name)
        summary = pull_checkpoint(repo, out, recipe, imatrix=imatrix, imatrix_sha256=imatrix_sha,
                                  delete_source=delete_source, force=force, progress=not quiet, log=log,
                                  revision=revision, commit_files=(commit, files))
        click.echo(str(summary.out))
    except (OSError, ValueError, _Terminated) as exc:
        raise click.ClickException(f"{exc}{_resume_hint(out)}") from exc
    except KeyboardInterrupt:
        raise click.ClickException(f"interrupted{_resume_hint(out)}") from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _resume_hint(out) -> str:
    """Where an unfinished checkpoint pull left its state, the line that says the next run goes on from it."""
    import json
    from pathlib import Path

    from flashlite.pull import _state_paths

    if not out:
        return ""
    state = _state_paths(Path(out))[1]
    try:
        done = len(json.loads(state.read_text()).get("done", []))
    except (OSError, ValueError, AttributeError):
        return ""
    return f"; {done} converted shard(s) are recorded in {state}: the same command goes on from there"
