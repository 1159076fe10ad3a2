"""How much of `flashlite pull`'s conversion hides behind its download: a synthetic release-layout checkpoint served
by the Hub stand-in of the tests (tests/hub_server.py) on 127.0.0.1 at a fixed rate, pulled with a fresh HF_HOME,
against the download alone plus `flashlite quantize` of the same folder (download, then convert).

    python tools/bench_pull.py --layers 12 --experts 32 --rate 8 --type q4_k-q8_0
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "tests"))

import make_synthetic  # noqa: E402
from hub_server import FakeHub  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--rate", type=float, default=8.0, help="MB/s")
    ap.add_argument("--type", default="q4_k-q8_0")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_pull.") as tmp:
        tmp = Path(tmp)
        folder = tmp / "syn"
        total = make_synthetic.write_checkpoint(folder, args.preset, args.layers, args.experts)
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "flashlite.cli", "quantize", str(folder), str(tmp / "q.gguf"),
                        "--type", args.type, "--quiet"], check=True, capture_output=True)
        quantize = time.perf_counter() - t
        with FakeHub({"bench/syn": folder}, rate=args.rate * 1e6) as hub:
            env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
            env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp / "hf"), HF_HUB_DISABLE_TELEMETRY="1")
            t = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "flashlite.cli", "pull", "bench/syn", str(tmp / "p.gguf"),
                                "--type", args.type, "--quiet"], capture_output=True, text=True, env=env)
            wall = time.perf_counter() - t
            if r.returncode:
                sys.exit(r.stderr)
            sent = sum(hub.served.values())
        m = re.search(r"plan ([\d.]+) s, download ([\d.]+) s, then ([\d.]+) s after the last shard landed; "
                      r"conversion ([\d.]+) s", r.stderr)
        plan, download, after, conversion = map(float, m.groups())
        print(f"{args.preset} x{args.layers} layers x{args.experts} experts, {total / 1e6:.0f} MB of tensors, "
              f"{args.layers + 1} shards, --type {args.type}, {args.rate:g} MB/s ({sent / 1e6:.0f} MB sent)")
        print(f"pull {wall:.1f} s (process) = plan {plan:.1f} + download {download:.1f} + after the last shard "
              f"{after:.1f} + start-up {wall - plan - download - after:.1f}")
        print(f"conversion inside the pull {conversion:.1f} s; flashlite quantize alone {quantize:.1f} s; "
              f"download then quantize: {plan + download + quantize:.1f} s")


if __name__ == "__main__":
    main()
