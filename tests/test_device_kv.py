"""The fp8 KV cache on a torch device (flashlite/device/kv_rows.py, torch_device.DeviceRowLog): its rows packed
byte for byte as the C core packs them (csrc/kv_pack.c, the independent implementation), the model on it following
the CPU backend's fp8 cache, and its saved caches read by the CPU backend. Skipped without torch."""
import numpy as np
import pytest

from flashlite._native import lib
from flashlite.kv_cache import RowFormat
from flashlite.model import load

torch = pytest.importorskip("torch")
from flashlite.device import kv_rows  # noqa: E402  (needs torch)


def hostile_rows(rng, n: int, dim: int) -> np.ndarray:
    """Rows over 60 binades, with the cases a rounding gets wrong: zeros and negative zeros, blocks at the scale
    floor, values at the saturation bound and past it, and the halfway points of both grids."""
    x = rng.standard_normal((n, dim)).astype(np.float32) * np.exp2(rng.integers(-30, 30, (n, 1))).astype(np.float32)
    x[0] = 0.0
    x[1, ::3] = -0.0
    x[2] = 1e-30
    x[3, :5] = 1e30
    x[4] = (np.arange(dim) % 16) * np.float32(0.25 * 2 ** -6)  # e4m3's subnormal halfway points at scale 1
    x[5] = np.float32(448.0) * rng.choice([-1, 1], dim)
    x[6] = np.resize(np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0], np.float32), dim)  # e2m1's bounds
    x[7] = np.nextafter(x[6], np.float32(np.inf))
    x[8] = rng.standard_normal(dim).astype(np.float32) * np.float32(2.0 ** -130)  # subnormal float32 values
    return x


@pytest.mark.parametrize("dim,rope", [(512, 64), (128, 0), (192, 64)])
def test_fp8_rows_pack_as_the_c_core_packs_them(dim, rope):
    fmt = RowFormat(dim, lib.FL_KV_FP8, rope)
    rows = hostile_rows(np.random.default_rng(dim), 300, dim)
    packed = kv_rows.pack_fp8(torch.from_numpy(rows), rope).numpy()
    np.testing.assert_array_equal(packed, fmt.pack(rows))
    unpacked = kv_rows.unpack_fp8(torch.from_numpy(packed), dim, rope).numpy()
    np.testing.assert_array_equal(unpacked.view(np.uint32), fmt.unpack(packed).view(np.uint32))


@pytest.mark.parametrize("dim", [128, 64])
def test_fp4_rows_pack_as_the_c_core_packs_them(dim):
    fmt = RowFormat(dim, lib.FL_KV_FP4)
    rows = hostile_rows(np.random.default_rng(dim + 1), 300, dim)
    packed = kv_rows.pack_fp4(torch.from_numpy(rows)).numpy()
    np.testing.assert_array_equal(packed, fmt.pack(rows))
    unpacked = kv_rows.unpack_fp4(torch.from_numpy(packed), dim).numpy()
    np.testing.assert_array_equal(unpacked.view(np.uint32), fmt.unpack(packed).view(np.uint32))


@pytest.fixture(scope="module")
def fp8_models(f32_gguf):
    return load(f32_gguf, device="torch-cpu", threads=1, kv_format="fp8"), load(f32_gguf, kv_format="fp8")


def test_the_device_fp8_cache_follows_the_cpu_one(fp8_models, goldens):
    """The same rows rounded on the same grid: the device's logits follow the CPU backend's within float32
    rounding at the clear positions, and its logs hold the packed bytes (the CPU's 3.5 KB a token, not float32
    rows), equal to the CPU cache's but where float32 rounding put a value on the other side of a rounding
    boundary."""
    on_device, on_cpu = fp8_models
    ids = goldens["prompt_ids"]
    a, b = on_device.logits(ids), on_cpu.logits(ids)
    clear = goldens["decision_gap"] > 1e-4
    delta = np.abs(a - b).max(axis=1)
    print(f"fp8 cache, torch-cpu against cpu: max |delta| {delta[clear].max():.3g}, median {np.median(delta):.3g}")
    assert np.median(delta) <= 3e-4 and (a.argmax(1) == b.argmax(1))[clear].mean() >= 0.98
    on_device.reset()
    on_device.forward(ids[:200])
    on_cpu.reset()
    on_cpu.forward(ids[:200])
    same = total = 0
    for dev_layer, cpu_layer in zip(on_device.cache.layers, on_cpu.cache.layers):
        for dev_log, cpu_log in zip(dev_layer.logs(), cpu_layer.logs()):
            stored = dev_log._span(dev_log.start, dev_log.end)
            assert isinstance(stored, torch.Tensor) and stored.shape[1] * stored.element_size() == dev_log.fmt.nbytes
            assert stored.dtype == (torch.float32 if dev_log.fmt.kind is None else torch.uint8)
            dev_bytes, cpu_bytes = dev_log.packed(dev_log.start, dev_log.end), cpu_log.packed(cpu_log.start,
                                                                                              cpu_log.end)
            assert dev_bytes.shape == cpu_bytes.shape
            if dev_log.fmt.kind is not None:
                same, total = same + (dev_bytes == cpu_bytes).sum(), total + dev_bytes.size
    print(f"packed KV bytes equal to the CPU cache's: {same / total:.5f} of {total}")
    assert total > 0 and same / total >= 0.99
    kv = on_device.cache.layers[0].kv
    assert kv.nbytes() <= 0.4 * 4 * kv.fmt.dim * len(kv)  # 193 bytes a 128-dim row here, not float32's 512


def test_a_device_fp8_cache_saved_continues_on_the_cpu(fp8_models, goldens, tmp_path):
    """save_cache on the device, load_cache on the CPU backend (the same host layout): the CPU continues from the
    device's rows as it continues from its own after the same prefix, within the two backends' float32 rounding;
    and the device's own reload continues bitwise."""
    on_device, on_cpu = fp8_models
    ids = goldens["prompt_ids"][:240]
    on_device.reset()
    on_device.forward(ids[:200])
    on_device.save_cache(tmp_path / "c.npz")
    assert on_device.load_cache(tmp_path / "c.npz").kv_format == "fp8"
    resumed = on_device.load_cache(tmp_path / "c.npz")
    np.testing.assert_array_equal(on_device.forward(ids[200:210], cache=resumed), on_device.forward(ids[200:210]))
    from_device = on_cpu.load_cache(tmp_path / "c.npz")
    own = on_cpu.new_cache()
    on_cpu.forward(ids[:200], cache=own)
    cont_dev, cont_own = on_cpu.forward(ids[200:240], cache=from_device), on_cpu.forward(ids[200:240], cache=own)
    delta = np.abs(cont_dev - cont_own).max(axis=1)
    print(f"cpu continuing a device cache against its own: median {np.median(delta):.3g}, max {delta.max():.3g}")
    assert np.median(delta) <= 3e-4


def test_hybrid_placement_counts_the_cache_at_its_row_format(f32_gguf):
    """The KV bytes the placement reserves (placement.kv_cache_bytes) bound the cache a prefill of ctx tokens
    fills, in each format, with no more slack than the compressors' pending windows: an fp8 cache counted at
    float32 rows (36% over here) would fail."""
    from flashlite.backends import placement
    ids = np.arange(1, 301)
    for kv_format in ("f32", "fp8"):
        model = load(f32_gguf, kv_format=kv_format)
        model.forward(ids)
        filled = sum(layer.nbytes() for layer in model.cache.layers)
        counted = placement.kv_cache_bytes(model.args, ids.size, model.cache.rewind, kv_format)
        print(f"{kv_format}: filled {filled} bytes, counted {counted}")
        assert filled <= counted <= 1.2 * filled  # measured 12.6% (f32) and 15.1% (fp8) over


def test_a_device_fp8_cache_rolls_back_exactly(fp8_models, goldens):
    """Rolled back across a ratio-4 window and the compressed rows, the device's packed logs continue bitwise as
    if the rejected tokens had never come (what speculative decoding's rollback relies on)."""
    on_device, _ = fp8_models
    ids = goldens["prompt_ids"][:220]
    on_device.reset()
    on_device.forward(ids[:150])
    straight = on_device.forward(ids[150:170])
    on_device.reset()
    on_device.forward(ids[:150])
    on_device.forward(ids[150:220])
    on_device.truncate(150)
    np.testing.assert_array_equal(on_device.forward(ids[150:170]), straight)


def test_a_device_ring_keeps_its_slots_doubles_and_gives_back_memory():
    """A device log's ring (DeviceRowLog): position p at slot p % capacity; appends and trims do not move it; it
    doubles when it holds more positions than it has slots (the rows laid out again), and after a long chunk is
    trimmed away it shrinks to twice the rows left; the rows read back as appended throughout."""
    from flashlite.backends.torch_device import DeviceRowLog

    log = DeviceRowLog(RowFormat(4), torch.device("cpu"))
    rows = np.arange(4 * 300, dtype=np.float32).reshape(300, 4)
    log.append(torch.from_numpy(rows[:10]))
    ring = log.buffer
    assert log.capacity == 16
    log.trim(6)
    log.append(torch.from_numpy(rows[10:20]))  # 14 positions in 16 slots, wrapping around
    assert log.buffer is ring and log.slots([6, 15, 16, 19]).tolist() == [6, 15, 0, 3]
    np.testing.assert_array_equal(log.rows(6, 20).numpy(), rows[6:20])
    log.append(torch.from_numpy(rows[20:23]))  # 17 positions: doubled
    assert log.capacity == 32 and log.buffer is not ring
    np.testing.assert_array_equal(log.rows(6, 23).numpy(), rows[6:23])
    log.append(torch.from_numpy(rows[23:300]))
    assert log.capacity == 512
    log.trim(280)  # 20 positions left
    assert log.capacity == 64
    np.testing.assert_array_equal(log.rows(280, 300).numpy(), rows[280:300])
    log.truncate(290)
    log.restore(283, log.packed(283, 290))  # fits: in place
    assert log.capacity == 64 and log.start == 283 and log.end == 290
    np.testing.assert_array_equal(log.rows(283, 290).numpy(), rows[283:290])
