"""The GGUF reader on good files (equal to gguf-py's reading) and on hostile ones (a clear GGUFError naming the file
and the field, before any allocation the file's size does not justify), following llama.cpp's gguf.cpp checks."""
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flashlite.gguf_reader import GGUFError, GGUFReader

FIXTURE = Path(__file__).parent / "fixtures" / "llamacpp" / "tiny_v4-mxfp4_moe.gguf"


def _str(s: bytes | str) -> bytes:
    s = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(s)) + s


def kv(key, vtype: int, payload: bytes) -> bytes:
    return _str(key) + struct.pack("<I", vtype) + payload


def tensor_info(name, ne, ttype: int, offset: int) -> bytes:
    return _str(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}q", *ne) + struct.pack("<IQ", ttype,
                                                                                                     offset)


def gguf_bytes(kvs=(), tensors=(), data=b"", version=3, n_kv=None, n_tensors=None, align=32) -> bytes:
    head = b"GGUF" + struct.pack("<Iqq", version, len(tensors) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(tensors)
    return body + bytes(-len(body) % align) + data


def write(tmp_path, blob: bytes) -> Path:
    path = tmp_path / "bad.gguf"
    path.write_bytes(blob)
    return path


def good_f32(name="w", ne=(8, 2)) -> tuple[bytes, bytes]:
    n = int(np.prod(ne))
    return tensor_info(name, ne, 0, 0), np.arange(n, dtype=np.float32).tobytes()


def test_reads_what_gguf_py_reads():
    ours = GGUFReader(FIXTURE)
    theirs = gguf.GGUFReader(FIXTURE)
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors):
        assert (a.offset, a.nbytes, a.type, a.ne) == (b.data_offset, b.n_bytes, b.tensor_type,
                                                       tuple(int(n) for n in b.shape))
        got = ours.data(a)
        assert got.dtype == b.data.dtype and got.shape == b.data.shape
        np.testing.assert_array_equal(got, b.data)
    for key, field in theirs.fields.items():
        if not key.startswith("GGUF."):
            assert ours.metadata[key] == field.contents(), key


def test_minimal_file_and_views(tmp_path):
    info, data = good_f32()
    path = write(tmp_path, gguf_bytes([kv("general.architecture", 8, _str("x")),
                                       kv("a.list", 9, struct.pack("<IQ", 5, 3) + struct.pack("<3i", -1, 0, 7))],
                                      [info], data))
    r = GGUFReader(path)
    assert r.metadata == {"general.architecture": "x", "a.list": [-1, 0, 7]}
    assert r.value_types["a.list"] == (9, 5)
    np.testing.assert_array_equal(r.data(r.tensors[0]), np.arange(16, dtype=np.float32).reshape(2, 8))
    with pytest.raises(ValueError):
        r.data(r.tensors[0])[0, 0] = 1  # read-only


HOSTILE = {
    "magic": (lambda: b"GGUX" + bytes(60), "not a GGUF file"),
    "short": (lambda: b"GGUF\x03\x00", "too short for a GGUF header"),
    "big-endian": (lambda: gguf_bytes(version=3 << 24), "big-endian"),
    "version-1": (lambda: gguf_bytes(version=1), "version 1 is no longer supported"),
    "version-9": (lambda: gguf_bytes(version=9), "unsupported GGUF version 9"),
    "kv-count": (lambda: gguf_bytes(n_kv=2**62), "metadata count .* cannot fit"),
    "tensor-count": (lambda: gguf_bytes(n_tensors=2**40), "tensor count .* cannot fit"),
    "negative-count": (lambda: gguf_bytes(n_kv=-1), "metadata count -1"),
    "key-length": (lambda: gguf_bytes([struct.pack("<Q", 2**63 - 1) + b"k"]), "metadata key 0: length .* exceeds the maximum"),
    "key-past-end": (lambda: gguf_bytes([struct.pack("<Q", 1000) + b"k"]), "metadata key 0 needs 1000 bytes"),
    "empty-key": (lambda: gguf_bytes([kv("", 4, struct.pack("<I", 1))]), "metadata key 0 is empty"),
    "duplicate-key": (lambda: gguf_bytes([kv("a", 4, b"\0" * 4), kv("a", 4, b"\0" * 4)]), "'a' appears twice"),
    "value-type": (lambda: gguf_bytes([kv("a", 13, b"")]), "metadata 'a' has invalid type 13"),
    "array-count": (lambda: gguf_bytes([kv("deepseek4.swiglu_clamp_shexp", 9, struct.pack("<IQ", 6, 2**63 - 1))]),
                    r"metadata 'deepseek4.swiglu_clamp_shexp': 9223372036854775807 elements .* cannot fit"),
    "string-array-count": (lambda: gguf_bytes([kv("t", 9, struct.pack("<IQ", 8, 2**40))]), "strings cannot fit"),
    "array-of-arrays": (lambda: gguf_bytes([kv("a", 9, struct.pack("<IQ", 9, 1) + struct.pack("<IQ", 4, 0))]),
                        "arrays of arrays"),
    "array-type": (lambda: gguf_bytes([kv("a", 9, struct.pack("<IQ", 77, 1))]), "invalid element type 77"),
    "alignment-type": (lambda: gguf_bytes([kv("general.alignment", 5, struct.pack("<i", 32))]), "must be a u32"),
    "alignment-pow2": (lambda: gguf_bytes([kv("general.alignment", 4, struct.pack("<I", 48))]), "not a power of two"),
    "alignment-zero": (lambda: gguf_bytes([kv("general.alignment", 4, struct.pack("<I", 0))]), "not a power of two"),
    "name-length": (lambda: gguf_bytes(tensors=[tensor_info("x" * 64, (32,), 0, 0)]), "is 64 bytes, the limit is 63"),
    "duplicate-tensor": (lambda: gguf_bytes(tensors=[tensor_info("w", (8,), 0, 0), tensor_info("w", (8,), 0, 32)],
                                            data=bytes(64)), "tensor 'w' appears twice"),
    "dims": (lambda: gguf_bytes(tensors=[tensor_info("w", (1,) * 5, 0, 0)]), "5 dimensions, at most 4"),
    "negative-dim": (lambda: gguf_bytes(tensors=[tensor_info("w", (8, -1), 0, 0)]), "negative dimension"),
    "overflow": (lambda: gguf_bytes(tensors=[tensor_info("w", (2**32, 2**32), 0, 0)]), "more than 2\\^63 elements"),
    "type": (lambda: gguf_bytes(tensors=[tensor_info("w", (8,), 4, 0)]), "tensor 'w' has type 4, which is no ggml"),
    "block": (lambda: gguf_bytes(tensors=[tensor_info("w", (33,), 8, 0)]), "33 elements are not whole Q8_0 blocks"),
    "misaligned": (lambda: gguf_bytes(tensors=[tensor_info("w", (8,), 0, 4)], data=bytes(64)),
                   "tensor 'w' data starts at offset 4 of the data section, expected 0"),
    "overlap": (lambda: gguf_bytes(tensors=[tensor_info("a", (16,), 0, 0), tensor_info("b", (8,), 0, 32)],
                                   data=bytes(128)), "tensor 'b' data starts at offset 32 .* expected 64"),
    "truncated-data": (lambda: gguf_bytes(tensors=[tensor_info("w", (64,), 0, 0)], data=bytes(100)),
                       "tensor 'w' data runs past the end of the file"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_header_is_refused_at_once_naming_the_field(tmp_path, case):
    make, message = HOSTILE[case]
    path = write(tmp_path, make())
    with pytest.raises(GGUFError, match=message) as err:
        GGUFReader(path)
    assert str(path) in str(err.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model file"):
        GGUFReader(tmp_path / "absent.gguf")
    with pytest.raises(GGUFError, match="is a directory or device"):
        GGUFReader(tmp_path)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), min_size=1, max_size=12))
def test_corrupted_bytes_read_or_fail_cleanly(tmp_path, edits):
    """Any byte of the header changed: the file still reads, or fails with a GGUFError; never another exception,
    a hang or a large allocation."""
    blob = bytearray(FIXTURE.read_bytes()[:4096 + 8192])
    for at, value in edits:
        blob[at] = value
    path = tmp_path / "fuzz.gguf"
    path.write_bytes(bytes(blob))
    try:
        GGUFReader(path).close()
    except GGUFError:
        pass
