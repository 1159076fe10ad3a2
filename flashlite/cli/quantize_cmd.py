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
                                "type are copied, the others decoded and quantized again; quantized ones only with "
                                "--allow-requantize). The options after --tensor-type are llama-quantize's.")
@click.argument("src", type=click.Path())
@click.argument("out", required=False, type=click.Path(dir_okay=False))
@click.option("--type", "type_name", default="mxfp4-q8_0", show_default=True, help=_recipes_help())
@click.option("--tensor-type", "tensor_types", multiple=True, metavar="PATTERN=TYPE",
              help="the type of the tensors the recipe quantizes whose GGUF name the regex PATTERN (lower-cased) "
                   "matches; repeatable, the first matching one wins, as llama-quantize; e.g. 'ffn_down_exps=q8_0'")
@click.option("--tensor-type-file", "tensor_type_files", multiple=True, type=click.Path(dir_okay=False),
              help="a file of PATTERN=TYPE items separated by spaces or newlines, after --tensor-type's")
@click.option("--output-tensor-type", default=None, metavar="TYPE", help="the type of output.weight")
@click.option("--token-embedding-type", default=None, metavar="TYPE", help="the type of token_embd.weight")
@click.option("--leave-output-tensor", is_flag=True, help="keep output.weight in its source type")
@click.option("--pure", is_flag=True,
              help="a llama.cpp file type without its mix: every tensor it quantizes in the type's default type")
@click.option("--imatrix", "imatrix_path", type=click.Path(dir_okay=False),
              help="an importance matrix (llama.cpp's GGUF or legacy .dat format, from `llama-imatrix` or "
                   "`flashlite imatrix`): the quantizers weigh each column's error by it")
@click.option("--include-weights", multiple=True, metavar="NAME",
              help="use the importance matrix only for the tensors whose name contains NAME (repeatable)")
@click.option("--exclude-weights", multiple=True, metavar="NAME",
              help="do not use the importance matrix for the tensors whose name contains NAME (repeatable)")
@click.option("--override-kv", "kv_overrides", multiple=True, metavar="KEY=TYPE:VALUE",
              help="set a metadata key in the output (TYPE: int, float, bool or str; repeatable)")
@click.option("--allow-requantize", is_flag=True,
              help="let a GGUF's already quantized tensors be quantized again (two roundings: worse than "
                   "quantizing the original)")
@click.option("--keep-split", is_flag=True,
              help="a split GGUF source is written as the same splits: OUT less .gguf, then -0000i-of-0000N.gguf")
@click.option("--dry-run", is_flag=True,
              help="print each tensor's type and size and the totals; write nothing (OUT not needed)")
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
def quantize(src, out, type_name, tensor_types, tensor_type_files, output_tensor_type, token_embedding_type,
             leave_output_tensor, pure, imatrix_path, include_weights, exclude_weights, kv_overrides,
             allow_requantize, keep_split, dry_run, mtp, dspark, force, quiet):
    from flashlite.hub import download_checkpoint, is_repo_id
    from quant.convert import convert, plan, plan_lines
    from quant.gguf_meta import parse_kv_override
    from quant.imatrix import read_imatrix
    from quant.recipes import Recipe, read_tensor_type_file

    if mtp and dspark:
        raise click.UsageError("--mtp and --dspark write different drafts: give one")
    if out is None and not dry_run:
        raise click.UsageError("give OUT, the GGUF to write (or --dry-run)")
    if (include_weights or exclude_weights) and imatrix_path is None:
        raise click.UsageError("--include-weights and --exclude-weights select entries of --imatrix FILE")
    try:  # every option's error names it
        tensor_types = list(tensor_types) + [item for f in tensor_type_files for item in read_tensor_type_file(f)]
        recipe = Recipe.parse(type_name, tensor_types, output_type=output_tensor_type,
                              token_embd_type=token_embedding_type, leave_output=leave_output_tensor, pure=pure)
        kv = [parse_kv_override(item) for item in kv_overrides]
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    imatrix = None
    if imatrix_path is not None:
        try:
            imatrix = read_imatrix(imatrix_path).select(include_weights, exclude_weights)
        except (OSError, ValueError) as exc:
            raise click.BadParameter(str(exc), param_hint="--imatrix") from exc
        if imatrix is not None:  # after the user's, as llama-quantize adds them
            kv += imatrix.kv(imatrix_path)
    name = None  # the folder's name, or for a repo id the repo's (its cached folder is named by a commit)
    if not os.path.exists(src) and is_repo_id(src):
        name = src.split("/")[1]
        try:
            src = download_checkpoint(src)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from exc
    if dry_run:  # llama-quantize --dry-run: the plan, nothing written (requantizing is only reported)
        try:
            p = plan(src, recipe, imatrix, mtp=mtp, allow_requantize=True, kv_overrides=kv)
        except (OSError, ValueError) as exc:
            raise click.ClickException(str(exc)) from exc
        try:
            for note in p.notes:
                click.echo(f"note: {note}", err=True)
            for line in plan_lines(p):
                click.echo(line)
        finally:
            p.source.close()
        return
    try:  # SIGTERM unwinds like Ctrl-C, so the temporary file is removed
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    try:
        convert(src, out, recipe, force=force, progress=not quiet, log=lambda msg: click.echo(msg, err=True),
                name=name, imatrix=imatrix, mtp=mtp, allow_requantize=allow_requantize, kv_overrides=kv,
                keep_split=keep_split, dspark=dspark)
    except (OSError, ValueError, _Terminated) as exc:
        raise click.ClickException(str(exc)) from exc
    except KeyboardInterrupt:
        raise click.ClickException(f"interrupted: {out} was not written") from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
