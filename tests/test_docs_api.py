"""docs/api.md's example runs as written on the tiny oracle model."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_api_doc_example_runs(tmp_path):
    code = re.search(r"```python\n(.*?)```", (ROOT / "docs" / "api.md").read_text(), re.S).group(1)
    subprocess.run([sys.executable, "-m", "flashlite.cli", "quantize", str(ROOT / "tests/fixtures/tiny_v4"),
                    str(tmp_path / "tiny_v4.gguf"), "--type", "q8_0"], check=True, capture_output=True)
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "finish:" in run.stdout and "'prompt_tokens'" in run.stdout
