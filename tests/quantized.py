"""quantized(): a GGUF written by `flashlite quantize` for a test, failing the test with the command's output."""
from pathlib import Path

from click.testing import CliRunner

from flashlite.cli import main


def quantized(src: Path, out: Path, *args: str) -> Path:
    """`flashlite quantize SRC OUT --quiet ARGS`; returns OUT."""
    result = CliRunner().invoke(main, ["quantize", str(src), str(out), "--quiet", *args])
    assert result.exit_code == 0, result.output
    return out
