"""The `flashlite` command line: a thin click layer over the Python API."""
import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="flashlite")
def main() -> None:
    """CPU-first inference for DeepSeek V4-Flash."""

from flashlite.run_cmd import run as _run  # noqa: E402
main.add_command(_run)
from flashlite.quantize_cmd import quantize as _quantize  # noqa: E402
main.add_command(_quantize)
