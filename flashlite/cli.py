"""The `flashlite` command line: a thin click layer over the Python API."""
import os

import click

from flashlite.chat_cmd import chat
from flashlite.quality_cmd import imatrix, perplexity
from flashlite.quantize_cmd import quantize
from flashlite.run_cmd import run
from flashlite.serve_cmd import serve


class Commands(click.Group):
    """Every failure ends in one line on stderr and a non-zero exit, never a traceback (FLASHLITE_DEBUG=1 shows
    it): click's own usage errors as click prints them, anything else as "Error: <kind>: <message>"."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort, KeyboardInterrupt):
            raise
        except Exception as exc:
            if os.environ.get("FLASHLITE_DEBUG"):
                raise
            raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="flashlite")
def main() -> None:
    """CPU-first inference for DeepSeek V4-Flash."""


main.add_command(chat)
main.add_command(imatrix)
main.add_command(perplexity)
main.add_command(quantize)
main.add_command(run)
main.add_command(serve)

if __name__ == "__main__":
    main()
