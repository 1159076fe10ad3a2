"""Peak memory and speed of `flashlite quantize` on a synthetic checkpoint at V4-Flash's real widths.

Writes (or reuses) a release-layout checkpoint with tools/make_synthetic.py, converts it in a child process and
reports the child's peak RSS (VmHWM: getrusage's ru_maxrss would include this parent's RSS at fork) next to the bound "1 GB plus the largest tensor", the checkpoint and
output sizes, and the rate. The checkpoint is meant to be larger than that bound, to show memory does not grow
with the model.

    python tools/bench_quantize_rss.py /tmp/v4-synth --layers 2 --experts 256 --type mxfp4-q8_0
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))

import make_synthetic  # noqa: E402

CHILD = """
import sys, time
from quant.convert import convert
from quant.recipes import Recipe
t0 = time.perf_counter()
s = convert(sys.argv[1], sys.argv[2], Recipe.parse(sys.argv[3]), force=True, progress=True)
with open("/proc/self/status") as fh:
    peak_kb = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
print("RESULT", s.nbytes, time.perf_counter() - t0, peak_kb)
"""


def largest_tensor_bytes(folder: Path) -> int:
    sizes = {}
    for path in folder.glob("*.safetensors"):
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for name, e in header.items():
            if name == "__metadata__":
                continue
            a, b = e["data_offsets"]
            key = name.split(".experts.")[0] + "." + name.rsplit(".", 2)[-2] if ".experts." in name else name
            sizes[key] = sizes.get(key, 0) + b - a  # experts count stacked, as the GGUF holds them
    return max(sizes.values())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, help="synthetic checkpoint folder (written if it has no config.json)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--type", dest="type_name", default="mxfp4-q8_0")
    ap.add_argument("--out", type=Path, default=None, help="output GGUF (default: FOLDER.gguf, removed after)")
    args = ap.parse_args(argv)
    if not (args.folder / "config.json").is_file():
        t0 = time.perf_counter()
        size = make_synthetic.write_checkpoint(args.folder, "flash", args.layers, args.experts)
        print(f"synthetic checkpoint: {size / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s")
    config = json.loads((args.folder / "config.json").read_text())
    size = sum(p.stat().st_size for p in args.folder.glob("*.safetensors"))
    largest = largest_tensor_bytes(args.folder)
    out = args.out or args.folder.with_suffix(".gguf")
    run = subprocess.run([sys.executable, "-c", CHILD, str(args.folder), str(out), args.type_name], cwd=ROOT,
                         stdout=subprocess.PIPE, text=True, check=True)
    line = next(x for x in run.stdout.splitlines() if x.startswith("RESULT"))
    _, written, seconds, peak_kb = line.split()
    written, seconds, peak = int(written), float(seconds), int(peak_kb) * 1024
    bound = (1 << 30) + largest
    print(f"checkpoint {size / 1e9:.2f} GB ({config['num_hidden_layers']} layers, {config['n_routed_experts']} experts), largest tensor "
          f"{largest / 1e9:.2f} GB -> {args.type_name} GGUF {written / 1e9:.2f} GB")
    print(f"peak RSS {peak / 1e6:.0f} MB; bound 1 GB + largest tensor = {bound / 1e6:.0f} MB "
          f"({'within' if peak < bound else 'OVER'})")
    print(f"time {seconds:.1f} s: {size / 1e6 / seconds:.0f} MB/s read, {written / 1e6 / seconds:.0f} MB/s written")
    if args.out is None:
        out.unlink()


if __name__ == "__main__":
    main()
