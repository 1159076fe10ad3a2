"""flashlite: a CPU-first quantized inference runtime for DeepSeek V4-Flash."""

__version__ = "0.1.0"
from flashlite.model import load  # noqa: E402,F401
