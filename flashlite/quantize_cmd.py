"""`flashlite quantize`: a DeepSeek V4 safetensors folder, or a deepseek4 GGUF, -> a deepseek4 GGUF file."""
from __future__ import annotations

import os
import signal

import click


def _recipes_help() -> str:
    from quant.recipes import DS4_RECIPES, FTYPES, NAMED_RECIPES

    return (f"a llama.cpp file type, with the per-tensor mix its quantizer writes ({', '.join(FTYPES)}); ds4's "
            f"recipes ({', '.join(DS4_RECIPES)}); or flashlite's: one type for every weight matrix (q4_k, q5_k, "
            f"iq3_s, ...) or EXPERTS-REST for the routed experts and the rest apart, e.g. "
            f"{', '.join(NAMED_RECIPES)} (mxfp4 experts are a lossless repack of the checkpoint's FP4)")


class _Terminated(Exception):
    pass


def _raise_terminated(signum, frame):
    raise _Terminated(f"terminated by signal {signum}")


@click.command("quantize", help="Convert the checkpoint folder SRC (safetensors + config.json + tokenizer.json, "
                                "release or save_pretrained layout) into the deepseek4 GGUF file OUT. SRC may also "
                                "be a Hugging Face repo id (org/repo), fetched into the Hub cache first, or a "
                                "deepseek4 GGUF to requantize (as llama-quantize does: tensors already in their new "
                                "type are copied, the others decoded and quantized again).")
@click.argument("src", type=click.Path())
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--type", "type_name", default="mxfp4-q8_0", show_default=True, help=_recipes_help())
@click.option("--tensor-type", "tensor_types", multiple=True, metavar="PATTERN=TYPE",
              help="override the type of the GGUF tensors whose name matches the regex PATTERN (repeatable; "
                   "the last match wins), e.g. 'ffn_down_exps=q8_0'")
@click.option("--imatrix", "imatrix_path", type=click.Path(dir_okay=False),
              help="an importance matrix (llama.cpp's GGUF or legacy .dat format, from `llama-imatrix` or "
                   "`flashlite imatrix`): the quantizers weigh each column's error by it")
@click.option("--mtp", is_flag=True,
              help="write the checkpoint's MTP block (mtp.0.*) as a draft GGUF for speculative decoding instead of "
                   "the model, in the layout llama.cpp's convert_hf_to_gguf.py --mtp writes (its -md takes it, "
                   "as do flashlite's --spec-type mtp -md FILE)")
@click.option("--dspark", is_flag=True,
              help="write the checkpoint's DSpark draft (mtp.0..N, a DeepSeek V4 -0731 checkpoint) as a draft GGUF "
                   "instead of the model, in the layout llama.cpp's convert_hf_to_gguf.py writes for it (flashlite's "
                   "--spec-type dspark -md FILE reads it)")
@click.option("--force", is_flag=True, help="overwrite OUT if it exists")
@click.option("--quiet", is_flag=True, help="no progress bar")
def quantize(src, out, type_name, tensor_types, imatrix_path, mtp, dspark, force, quiet):
    from flashlite.hub import download_checkpoint, is_repo_id
    from quant.convert import convert
    from quant.imatrix import read_imatrix
    from quant.recipes import Recipe

    if mtp and dspark:
        raise click.UsageError("--mtp and --dspark write different drafts: give one")
    try:
        recipe = Recipe.parse(type_name, tensor_types)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    imatrix = None
    if imatrix_path is not None:
        try:
            imatrix = read_imatrix(imatrix_path)
        except (OSError, ValueError) as exc:
            raise click.BadParameter(str(exc), param_hint="--imatrix") from exc
    name = None  # the folder's name, or for a repo id the repo's (its cached folder is named by a commit)
    if not os.path.exists(src) and is_repo_id(src):
        name = src.split("/")[1]
        try:
            src = download_checkpoint(src)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from exc
    try:  # SIGTERM unwinds like Ctrl-C, so the temporary file is removed
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    try:
        convert(src, out, recipe, force=force, progress=not quiet, log=lambda msg: click.echo(msg, err=True),
                name=name, imatrix=imatrix, mtp=mtp, dspark=dspark)
    except (OSError, ValueError, _Terminated) as exc:
        raise click.ClickException(str(exc)) from exc
    except KeyboardInterrupt:
        raise click.ClickException(f"interrupted: {out} was not written") from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
