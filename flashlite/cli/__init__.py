"""The `flashlite` command line: a thin click layer over the Python API."""
from __future__ import annotations

import os

import click

from flashlite.cli.bench_cmd import bench
from flashlite.cli.chat_cmd import chat
from flashlite.cli.pull_cmd import pull
from flashlite.cli.quality_cmd import imatrix, perplexity
from flashlite.cli.quantize_cmd import quantize
from flashlite.cli.run_cmd import run
from flashlite.cli.serve_cmd import serve


class Commands(click.Group):
    """Every failure ends in one line on stderr and a non-zero exit, never a traceback (FLASHLITE_DEBUG=1 shows
    it): click's own usage errors as click prints them, anything else as "Error: <kind>: <message>"."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort, KeyboardInterrupt):
            raise
        except BrokenPipeError:  # the reader went away (`| head`): nothing left to say to it
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            ctx.exit(1)
        except Exception as exc:
            if os.environ.get("FLASHLITE_DEBUG"):
                raise
            raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc


def _cpu_name() -> str | None:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("model name", "Model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def system_info() -> dict:
    """What this install runs on: versions, the C core's SIMD levels and threads, the CPU, and which block types
    the core multiplies (llama.cpp's `system_info` line, as data)."""
    import platform

    import numpy as np

    from flashlite import __version__, block_formats
    from flashlite import matmul as fm

    return {
        "flashlite": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.machine(),
        "cpu": _cpu_name() or platform.processor() or platform.machine(),
        "simd": fm.simd_level(),
        "simd_levels": fm.simd_levels(),
        "vnni": fm.has_vnni(),
        "threads": fm.threads(),
        "types": [block_formats.type_name(t) for t in range(64) if block_formats.can_matmul(t)],
    }


def _version(ctx, param, value) -> None:
    if not value or ctx.resilient_parsing:
        return
    info = system_info()
    click.echo(f"flashlite {info['flashlite']} (C core: {info['simd']} of {', '.join(info['simd_levels'])}"
               f"{', VNNI' if info['vnni'] else ''}; {info['threads']} threads; Python {info['python']}, numpy "
               f"{info['numpy']})")
    ctx.exit()


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_version,
              help="the version and the C core's build: SIMD levels, threads")
def main() -> None:
    """CPU-first inference for DeepSeek V4-Flash."""


@main.command("system-info")
@click.option("--json", "as_json", is_flag=True, help="one JSON object")
def system_info_cmd(as_json: bool) -> None:
    """Print what this install runs on (versions, SIMD level, threads, the weight types the core multiplies)."""
    import json

    info = system_info()
    if as_json:
        click.echo(json.dumps(info))
        return
    for key, value in info.items():
        click.echo(f"{key}: {', '.join(value) if isinstance(value, list) else value}")


main.add_command(bench)
main.add_command(chat)
main.add_command(imatrix)
main.add_command(perplexity)
main.add_command(pull)
main.add_command(quantize)
main.add_command(run)
main.add_command(serve)
