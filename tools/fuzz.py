"""Fuzz what flashlite reads from disk: GGUF headers, whole models, saved KV caches.

    python tools/fuzz.py gguf --inputs 1000000          # the GGUF reader on mutated headers
    python tools/fuzz.py model --inputs 20000           # flashlite.load on mutated models of the oracle fixture
    python tools/fuzz.py cache --inputs 20000           # Model.load_cache on mutated saved caches
    python tools/fuzz.py all --inputs 1000 --seed 7     # a short run of each (what tests/test_fuzz.py runs)

Inputs are made by structure-aware mutation of valid files: a GGUF is rebuilt from its parsed fields with some
of them changed (counts, lengths, key and value types, values set to extremes, NaN and infinities, dimensions,
tensor types and offsets, truncation, bytes flipped), so the mutations reach every check rather than dying at the
magic; caches get bytes flipped, cut or fields replaced. Each input must end in the target's documented errors
(ValueError and its kin, FileNotFoundError) or succeed. Anything else is a crash; an input running past
--timeout seconds is a hang (SIGALRM), and one that allocates past --memory-mib (RLIMIT_AS) an unbounded
allocation. Every failing input is saved to tests/fixtures/fuzz/<target>/ (or --save-dir), where
tests/test_fuzz.py replays it from then on. Prints one JSON line: inputs, outcomes, failures, seconds.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import resource
import signal
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from flashlite.gguf_reader import GGUFReader  # noqa: E402

FIXTURE = REPO / "tests" / "fixtures" / "llamacpp" / "tiny_v4-mxfp4_moe.gguf"
REGRESSIONS = REPO / "tests" / "fixtures" / "fuzz"
TARGETS = ("gguf", "model", "cache")
# what a target may raise for a bad file: anything else is a crash
EXPECTED = (ValueError, FileNotFoundError, TypeError, FloatingPointError)

_INT_EXTREMES = [0, 1, 2, 3, 7, 255, 256, 65535, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**62, 2**63 - 1, 2**64 - 1]
_FLOAT_EXTREMES = [0.0, -0.0, -1.0, 1e-45, 1e38, 3.4e38, float("inf"), float("-inf"), float("nan")]
_PACK = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


class Timeout(Exception):
    pass


# ---------------------------------------------------------------- a GGUF as fields, and back

def parse(path: Path) -> dict:
    """The fields of a valid GGUF: version, [(key, type, subtype, value)], [(name, ne, type, offset)], data."""
    with GGUFReader(path) as r:
        kvs = [(k, t, sub, r.metadata[k]) for k, (t, sub) in r.value_types.items()]
        tensors = [(t.name, list(t.ne), t.type, t.offset - r.data_offset) for t in r.tensors]
        data = bytes(r._map[r.data_offset:])
        return {"version": r.version, "kvs": kvs, "tensors": tensors, "data": data, "alignment": r.alignment}


def _string(s) -> bytes:
    raw = s if isinstance(s, bytes) else str(s).encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(raw)) + raw


def _value(vtype: int, value) -> bytes:
    if vtype == 8:
        return _string(value)
    fmt = _PACK.get(vtype, "<I")
    try:
        return struct.pack(fmt, value)
    except (struct.error, TypeError, OverflowError):
        return struct.pack(fmt, 0)


def serialize(g: dict) -> bytes:
    out = io.BytesIO()
    m64 = 2**64 - 1
    out.write(b"GGUF" + struct.pack("<IQQ", g["version"] & 0xFFFFFFFF, g.get("n_tensors", len(g["tensors"])) & m64,
                                    g.get("n_kv", len(g["kvs"])) & m64))
    for key, vtype, sub, value in g["kvs"]:
        out.write(_string(key) + struct.pack("<I", vtype))
        if vtype == 9:
            items = value if isinstance(value, list) else [value]
            count = g.get("array_count", {}).get(key, len(items))
            out.write(struct.pack("<IQ", (sub if sub is not None else 4) & 0xFFFFFFFF, count & (2**64 - 1)))
            for item in items:
                out.write(_value(sub, item))
        else:
            out.write(_value(vtype, value))
    for name, ne, ttype, offset in g["tensors"]:
        out.write(_string(name) + struct.pack("<I", len(ne)))
        for n in ne:
            out.write(struct.pack("<q", max(-2**63, min(2**63 - 1, n))))
        out.write(struct.pack("<IQ", ttype & 0xFFFFFFFF, offset & (2**64 - 1)))
    body = out.getvalue()
    return body + bytes(-len(body) % g["alignment"]) + g["data"]


def mutate_gguf(g: dict, rng) -> bytes:
    """One structure-aware mutation (or a few) of a parsed GGUF, serialized; sometimes cut or flipped after."""
    g = {**g, "kvs": list(g["kvs"]), "tensors": [list(t) for t in g["tensors"]], "array_count": {}}
    for _ in range(int(rng.integers(1, 4))):
        kind = int(rng.integers(0, 12))
        if kind <= 3 and g["kvs"]:  # a value
            i = int(rng.integers(0, len(g["kvs"])))
            key, vtype, sub, value = g["kvs"][i]
            if vtype == 9 and isinstance(value, list) and value and rng.random() < 0.5:
                g["array_count"][key] = int(rng.choice(_INT_EXTREMES))
            elif vtype == 9 and isinstance(value, list) and value:
                j = int(rng.integers(0, len(value)))
                value = list(value)
                value[j] = rng.choice(_FLOAT_EXTREMES if sub in (6, 12) else _INT_EXTREMES).item()
            elif vtype in (6, 12):
                value = float(rng.choice(_FLOAT_EXTREMES))
            elif vtype == 8:
                value = value[:int(rng.integers(0, max(1, len(value))))] if rng.random() < 0.5 else "x" * 70
            else:
                value = int(rng.choice(_INT_EXTREMES))
            g["kvs"][i] = (key, vtype, sub, value)
        elif kind == 4 and g["kvs"]:  # a value's type
            i = int(rng.integers(0, len(g["kvs"])))
            key, _, sub, value = g["kvs"][i]
            g["kvs"][i] = (key, int(rng.integers(0, 14)), int(rng.integers(0, 14)), value)
        elif kind == 5 and g["kvs"]:  # drop or duplicate a key
            i = int(rng.integers(0, len(g["kvs"])))
            if rng.random() < 0.5:
                g["kvs"].pop(i)
            else:
                g["kvs"].insert(i, g["kvs"][i])
        elif kind <= 8 and g["tensors"]:  # a tensor's shape, type or offset
            t = g["tensors"][int(rng.integers(0, len(g["tensors"])))]
            which = int(rng.integers(0, 3))
            if which == 0:
                t[1] = [int(rng.choice(_INT_EXTREMES + [-1])) if rng.random() < 0.3 else n for n in t[1]]
                if rng.random() < 0.2:
                    t[1] = t[1] + [1] * int(rng.integers(1, 4))
            elif which == 1:
                t[2] = int(rng.integers(0, 50))
            else:
                t[3] = int(rng.choice(_INT_EXTREMES)) if rng.random() < 0.5 else t[3] + int(rng.integers(-64, 64))
        elif kind == 9:  # counts
            g["n_kv" if rng.random() < 0.5 else "n_tensors"] = int(rng.choice(_INT_EXTREMES + [-1]))
        elif kind == 10:
            g["version"] = int(rng.choice([0, 1, 2, 3, 4, 3 << 24]))
        else:
            g["alignment"] = int(rng.choice([1, 8, 32, 48, 4096]))
    blob = bytearray(serialize(g))
    if rng.random() < 0.15:
        blob = blob[:int(rng.integers(0, len(blob)))]
    if rng.random() < 0.15:
        for at in rng.integers(0, len(blob), int(rng.integers(1, 8))):
            blob[at] = int(rng.integers(0, 256))
    return bytes(blob)


# ---------------------------------------------------------------- targets

class Target:
    """make(rng) -> bytes of one input; run(path) reads it as flashlite would."""

    def __init__(self, name: str, work: Path):
        self.name, self.work = name, work
        if name in ("gguf", "model"):
            self.parsed = parse(FIXTURE)
            if name == "gguf":  # the reader needs no tensor data: a small file, and many inputs a second
                self.parsed["data"] = self.parsed["data"][:4096]
        else:
            from flashlite.model import load

            self.model = load(FIXTURE)
            cache = self.model.new_cache()
            g = np.load(REPO / "tests" / "fixtures" / "tiny_v4" / "goldens.npz")
            self.model.forward(g["prompt_ids"][:20], cache=cache)
            path = work / "seed.npz"
            self.model.save_cache(path, cache)
            self.seed = path.read_bytes()

    def make(self, rng) -> bytes:
        if self.name != "cache":
            return mutate_gguf(self.parsed, rng)
        blob = bytearray(self.seed)
        if rng.random() < 0.3:
            return bytes(blob[:int(rng.integers(0, len(blob)))])
        for at in rng.integers(0, len(blob), int(rng.integers(1, 16))):
            blob[at] = int(rng.integers(0, 256))
        return bytes(blob)

    def run(self, path: Path) -> None:
        if self.name == "gguf":
            GGUFReader(path).close()
        elif self.name == "model":
            from flashlite.model import load

            m = load(path)
            m.logits([1, 2, 3])
        else:
            self.model.load_cache(path)


def run_one(target: Target, path: Path, timeout: float) -> str:
    """'ok', 'refused' (an expected error), or 'crash: ...', 'hang', 'memory'."""
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        target.run(path)
        return "ok"
    except Timeout:
        return "hang"
    except MemoryError:
        return "memory"
    except EXPECTED:
        return "refused"
    except Exception as exc:  # noqa: BLE001 - the point is to catch what should not happen
        return f"crash: {type(exc).__name__}: {str(exc)[:200]}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def fuzz(name: str, inputs: int, seed: int, timeout: float, save_dir: Path) -> dict:
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        target = Target(name, work)
        path = work / ("input.npz" if name == "cache" else "input.gguf")
        outcomes: dict[str, int] = {}
        failures = []
        t0 = time.perf_counter()
        for _ in range(inputs):
            blob = target.make(rng)
            path.write_bytes(blob)
            outcome = run_one(target, path, timeout)
            key = outcome if not outcome.startswith("crash") else "crash"
            outcomes[key] = outcomes.get(key, 0) + 1
            if outcome not in ("ok", "refused"):
                digest = hashlib.sha256(blob).hexdigest()[:16]
                keep = save_dir / name / f"{digest}{path.suffix}"
                keep.parent.mkdir(parents=True, exist_ok=True)
                keep.write_bytes(blob)
                failures.append({"outcome": outcome, "file": str(keep)})
    return {"target": name, "inputs": inputs, "seed": seed, "outcomes": outcomes, "failures": failures[:20],
            "n_failures": len(failures), "seconds": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("target", choices=TARGETS + ("all",))
    p.add_argument("--inputs", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=10.0, help="seconds one input may take")
    p.add_argument("--memory-mib", type=int, default=4096, help="address-space limit of the process")
    p.add_argument("--save-dir", type=Path, default=REGRESSIONS)
    a = p.parse_args(argv)

    def alarm(signum, frame):
        raise Timeout()

    signal.signal(signal.SIGALRM, alarm)
    limit = a.memory_mib << 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    failed = 0
    for name in TARGETS if a.target == "all" else (a.target,):
        report = fuzz(name, a.inputs, a.seed, a.timeout, a.save_dir)
        print(json.dumps(report), flush=True)
        failed += report["n_failures"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
