"""What `pip install` builds from: the source distribution holds every module of the Python packages and every
source and header of the C core, so an install from PyPI's sdist (or a wheel built from it) is complete."""
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_sdist_holds_every_module_and_c_source(tmp_path):
    # from a copy without build leftovers: an egg-info's old file list would fill the gaps of a wrong config
    tree = tmp_path / "tree"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(".git", "tests", "build", "dist", "*.egg-info",
                                                              "__pycache__", "*.so", "*.gguf"))
    run = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(tmp_path)], cwd=tree,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    (archive,) = tmp_path.glob("flashlite-*.tar.gz")
    with tarfile.open(archive) as tar:
        shipped = {Path(*Path(name).parts[1:]).as_posix() for name in tar.getnames()}
    wanted = {p.relative_to(ROOT).as_posix()
              for pattern in ("flashlite/**/*.py", "quant/**/*.py", "csrc/**/*.c", "csrc/**/*.h")
              for p in ROOT.glob(pattern) if "__pycache__" not in p.parts}
    assert wanted - shipped == set()
