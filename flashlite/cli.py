"""The `flashlite` command line: a thin click layer over the Python API."""
import click

from flashlite.chat_cmd import chat
from flashlite.quantize_cmd import quantize
from flashlite.run_cmd import run
from flashlite.serve_cmd import serve


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="flashlite")
def main() -> None:
    """CPU-first inference for DeepSeek V4-Flash."""


main.add_command(chat)
main.add_command(quantize)
main.add_command(run)
main.add_command(serve)

if __name__ == "__main__":
    main()
