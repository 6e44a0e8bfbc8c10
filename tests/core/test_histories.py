"""Exact-percentile histories against numpy.percentile, bit for bit, on both backends."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_clip.core.histories import (
    BACKENDS,
    DeviceHistory,
    HostHistory,
    NormHistory,
    SortedChunks,
    make_history,
)

CPU = torch.device("cpu")
META = torch.device("meta")
FALLBACK = torch.tensor(-1.0)


def _bits(x) -> int:
    return int(np.asarray(x, dtype=np.float32).view(np.int32))


def _reference(seen: list[np.float32], window: int | None, q: float) -> np.float32:
    values = np.asarray(seen if window is None else seen[-window:], dtype=np.float32)
    out = np.percentile(values, q * 100.0)
    assert out.dtype == np.float32  # numpy interpolates a float32 history in float32
    return out


def _sequence(rng: np.random.Generator, n: int) -> np.ndarray:
    kind = rng.integers(4)
    if kind == 0:  # lognormal over many decades
        v = rng.lognormal(0.0, 4.0, n)
    elif kind == 1:  # many exact ties (and zeros)
        v = np.round(rng.lognormal(0.0, 1.0, n) * 2) / 2
    elif kind == 2:  # nearly equal values: interpolation between neighbours one ulp apart
        v = 1.0 + rng.integers(0, 8, n) * np.finfo(np.float32).eps
    else:  # huge and tiny norms, float32 subnormals included
        v = 10.0 ** rng.uniform(-45, 38, n)
    v = v.astype(np.float32)
    v[rng.random(n) < 0.05] = np.nan
    v[rng.random(n) < 0.03] = np.inf
    return v


def _quantile(rng: np.random.Generator) -> float:
    pick = rng.integers(5)
    if pick == 0:
        return float(rng.uniform(0.0, 1.0))
    if pick == 1:
        return float(rng.choice([1e-9, 1e-4, 0.001, 0.999, 0.9999, 1 - 1e-9]))
    if pick == 2:
        return float(rng.integers(1, 100)) / 100.0  # whole percentiles, as users write them
    if pick == 3:
        return float(rng.choice([0.25, 0.5, 0.75, 0.9, 0.95, 0.99]))
    return float(rng.uniform(0.0, 100.0)) / 100.0


@pytest.mark.parametrize("backend", ["host", "device"])
@pytest.mark.parametrize("seed", range(8))
def test_percentile_is_numpy_bit_for_bit(backend, seed):
    """Property: every step of many random histories, windows, percentiles and sizes."""
    rng = np.random.default_rng(seed)
    checked = 0
    for _ in range(25):
        n = int(rng.integers(1, 120))
        window = [None, None, 1, 2, int(rng.integers(1, 40))][int(rng.integers(5))]
        q = _quantile(rng)
        history = make_history(backend, window, CPU)
        seen: list[np.float32] = []
        for v in _sequence(rng, n):
            history.insert(torch.tensor(v))
            if np.isfinite(v):
                seen.append(v)
            got = history.percentile(q, FALLBACK)
            assert got.shape == () and got.dtype == torch.float32
            if not seen:
                assert torch.equal(got, FALLBACK)
                continue
            expected = _reference(seen, window, q)
            assert _bits(got.numpy()) == _bits(expected), (n, window, q, len(seen))
            checked += 1
        assert len(history) == (len(seen) if window is None else min(window, len(seen)))
    assert checked > 500


@pytest.mark.parametrize("window", [None, 5])
def test_backends_agree_and_values_are_oldest_first(window):
    rng = np.random.default_rng(7)
    norms = _sequence(rng, 200)
    host, device = make_history("host", window, CPU), make_history("device", window, CPU)
    for v in norms:
        host.insert(torch.tensor(v))
        device.insert(torch.tensor(v))
        assert torch.equal(host.percentile(0.9, FALLBACK), device.percentile(0.9, FALLBACK))
    finite = norms[np.isfinite(norms)]
    expected = np.sort(finite) if window is None else finite[-window:]
    np.testing.assert_array_equal(host.values(), expected)
    np.testing.assert_array_equal(device.values(), expected)
    assert host.values().dtype == device.values().dtype == np.float32


@pytest.mark.parametrize("backend", ["host", "device"])
@pytest.mark.parametrize("window", [None, 1, 6])
def test_built_from_values_continues_like_inserted_one_by_one(backend, window):
    rng = np.random.default_rng(3)
    norms = _sequence(rng, 90)
    split = 50
    finite = norms[:split][np.isfinite(norms[:split])]
    start = finite if window is None else finite[-window:]
    bulk = make_history(backend, window, CPU, start)
    stepwise = make_history(backend, window, CPU)
    for v in norms[:split]:
        stepwise.insert(torch.tensor(v))
    np.testing.assert_array_equal(bulk.values(), stepwise.values())
    for v in norms[split:]:
        bulk.insert(torch.tensor(v))
        stepwise.insert(torch.tensor(v))
        assert torch.equal(bulk.percentile(0.37, FALLBACK), stepwise.percentile(0.37, FALLBACK))
    np.testing.assert_array_equal(bulk.values(), stepwise.values())


def test_make_history_chooses_the_backend():
    assert isinstance(make_history("auto", None, CPU), HostHistory)
    assert isinstance(make_history("auto", None, META), DeviceHistory)
    assert isinstance(make_history("host", 3, META), HostHistory)
    assert isinstance(make_history("device", 3, CPU), DeviceHistory)
    assert BACKENDS == ("auto", "host", "device")
    for backend in ("host", "device"):
        h = make_history(backend, None, CPU)
        assert isinstance(h, NormHistory) and h.backend == backend
    with pytest.raises(ValueError, match=r"`backend`.*'auto', 'host', 'device'.*'gpu'"):
        make_history("gpu", None, CPU)


@pytest.mark.parametrize("window", [None, 4])
def test_device_backend_never_reads_the_device(window):
    """On the meta device any host read (.item(), bool(), float()) raises: the step path has none."""
    history = make_history("device", window, META, np.asarray([1.0, 2.0], dtype=np.float32))
    fallback = torch.zeros((), device=META)
    for _ in range(40):  # the whole-history buffer grows on the way
        history.insert(torch.empty((), device=META))
        out = history.percentile(0.9, fallback)
        assert out.device == META and out.shape == () and out.dtype == torch.float32


def test_sorted_chunks_split_and_merge_across_chunks():
    rng = np.random.default_rng(11)
    chunks = SortedChunks(load=8)
    reference: list[np.float32] = []
    for v in rng.lognormal(0.0, 1.0, 400).astype(np.float32):
        chunks.add(v)
        reference.append(v)
    assert len(chunks.chunks) > 10  # it really split
    for v in rng.permutation(np.asarray(reference))[:350]:
        chunks.remove(v)
        reference.remove(v)
    expected = np.sort(np.asarray(reference, dtype=np.float32))
    np.testing.assert_array_equal(chunks.values(), expected)
    assert chunks.size == len(expected) == sum(chunks.sizes)
    assert [chunks.at(r) for r in range(len(expected))] == list(expected)
    assert all(np.all(np.diff(c[:n]) >= 0) for c, n in zip(chunks.chunks, chunks.sizes))


def test_sorted_chunks_from_sorted_values_equals_added():
    values = np.sort(np.random.default_rng(5).lognormal(0.0, 1.0, 3000).astype(np.float32))
    bulk = SortedChunks(load=64, sorted_values=values)
    np.testing.assert_array_equal(bulk.values(), values)
    assert [bulk.at(r) for r in (0, 63, 64, 1500, 2999)] == [values[r] for r in (0, 63, 64, 1500, 2999)]
    bulk.add(np.float32(values[100]))
    bulk.remove(np.float32(values[2000]))
    expected = np.sort(np.concatenate([np.delete(values, 2000), values[100:101]]))
    np.testing.assert_array_equal(bulk.values(), expected)


def test_host_memory_is_four_bytes_per_value_up_to_chunk_slack():
    history = make_history("host", None, CPU)
    n = 6000
    for v in np.random.default_rng(1).lognormal(0.0, 1.0, n).astype(np.float32):
        history.insert(torch.tensor(v))
    assert isinstance(history, HostHistory) and len(history.sorted.chunks) > 1
    # float32 values in chunks at least half full: at most 8 bytes per value (+ one chunk)
    assert history.nbytes() <= 8 * n + 4 * history.sorted.cap
    windowed = make_history("host", 3000, CPU)
    for v in np.random.default_rng(2).lognormal(0.0, 1.0, 7000).astype(np.float32):
        windowed.insert(torch.tensor(v))
    assert isinstance(windowed, HostHistory) and len(windowed) == 3000
    assert windowed.ring is not None and windowed.ring.nbytes == 4 * 3000
    assert windowed.nbytes() <= 8 * 3000 + 4 * windowed.sorted.cap + windowed.ring.nbytes


def test_fp64_norms_are_rounded_to_float32_alike():
    f32_max = float(np.finfo(np.float32).max)
    norms = [
        1e300,  # finite in fp64, inf in fp32: never enters
        2.0**128 - 2.0**103,  # the first fp64 value that fp32 rounds to inf: never enters
        2.0**128 - 2.0**103 - 2.0**80,  # rounds down to the largest fp32
        1.0 / 3.0,
    ]
    expected = np.asarray([1.0 / 3.0, f32_max], dtype=np.float32)
    for backend in ("host", "device"):
        history = make_history(backend, None, CPU)
        for v in norms:
            history.insert(torch.tensor(v, dtype=torch.float64))
        np.testing.assert_array_equal(history.values(), expected)
        assert history.percentile(0.999, FALLBACK).item() == np.float32(np.percentile(expected, 99.9))


def test_pair_reads_across_chunk_boundaries():
    values = np.arange(50, dtype=np.float32)
    chunks = SortedChunks(load=8, sorted_values=values)
    for r in range(50):
        assert chunks.pair(r) == (float(r), float(min(r + 1, 49))), r
