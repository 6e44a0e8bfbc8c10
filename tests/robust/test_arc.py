"""ARC against a sort-based numpy reference, exact k, edge cases and properties."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from lightning_clip.robust.arc import (
    ARCStats,
    arc_clip,
    arc_num_clipped,
    arc_scales,
    arc_stats,
    arc_threshold,
    check_num_byzantine,
)

NAN, INF = float("nan"), float("inf")


def reference_arc(v: np.ndarray, f: int) -> tuple[np.ndarray, float]:
    """Literal ARC in float64: sort by norm (non-finite first), clip the first k to the (k+1)-th norm."""
    n = v.shape[0]
    k = math.floor(Fraction(2 * f * (n - f), n))
    norms = np.linalg.norm(v, axis=1)
    finite = np.isfinite(norms)
    key = np.where(finite, norms, np.inf)
    order = np.argsort(-key, kind="stable")
    largest_finite = norms[finite].max() if finite.any() else 0.0
    thr = largest_finite if k == 0 or not np.isfinite(key[order[k]]) else key[order[k]]
    out = v.copy()
    for i in order[:k]:
        if finite[i] and norms[i] > thr:
            out[i] = v[i] * (thr / norms[i])
    out[~finite] = 0.0
    return out, float(thr)


def random_vectors(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    # Row norms spread over several orders of magnitude, so the sort order is well defined.
    return rng.standard_normal((n, d)) * np.exp(rng.uniform(-3, 3, size=(n, 1)))


# ----------------------------------------------------------------------------- k


def test_num_clipped_exact_against_fraction():
    for n in range(1, 260):
        for f in range(0, (n + 1) // 2):
            assert arc_num_clipped(n, f) == math.floor(Fraction(2 * f * (n - f), n)), (n, f)


@pytest.mark.parametrize(("n", "f"), [(121, 55), (72, 30), (242, 33), (450, 165)])
def test_num_clipped_where_float_formulas_are_off(n, f):
    exact = math.floor(Fraction(2 * f * (n - f), n))
    floats = {math.floor(2 * f * (1 - f / n)), math.floor(2 * (f / n) * (n - f))}
    assert floats != {exact}  # at least one float formulation is off by one here
    assert arc_num_clipped(n, f) == exact


def test_num_clipped_known_values():
    assert arc_num_clipped(1, 0) == 0
    assert arc_num_clipped(11, 1) == 1  # floor(20/11)
    assert arc_num_clipped(11, 3) == 4  # floor(48/11)
    assert arc_num_clipped(10, 4) == 4  # floor(48/10)


def test_num_clipped_at_least_f_and_below_n():
    for n in range(1, 80):
        for f in range(0, (n + 1) // 2):
            k = arc_num_clipped(n, f)
            assert f <= k < n


@pytest.mark.parametrize(
    ("n", "f", "exc", "match"),
    [
        (4, 2, ValueError, r"Expected argument `num_byzantine` to satisfy 0 <= num_byzantine < n/2 = 2.0 but got 2"),
        (5, 3, ValueError, r"0 <= num_byzantine < n/2 = 2.5 but got 3"),
        (5, -1, ValueError, r"`num_byzantine` to be a non-negative integer but got -1"),
        (0, 0, ValueError, r"`n` to be a positive integer but got 0"),
        (5, 1.0, TypeError, r"`num_byzantine`"),
        (5, True, TypeError, r"`num_byzantine`"),
        (5.0, 1, TypeError, r"`n`"),
    ],
)
def test_num_byzantine_validation(n, f, exc, match):
    with pytest.raises(exc, match=match):
        arc_num_clipped(n, f)
    with pytest.raises(exc, match=match):
        check_num_byzantine(n, f)


def test_validation_of_tensors():
    with pytest.raises(ValueError, match=r"`norms` to be a 1-D tensor"):
        arc_scales(torch.ones(2, 2), 0)
    with pytest.raises(TypeError, match=r"`norms` to be a torch.Tensor"):
        arc_scales([1.0, 2.0], 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`vectors` to be a 2-D tensor"):
        arc_clip(torch.ones(3), 0)
    with pytest.raises(TypeError, match=r"floating dtype"):
        arc_clip(torch.ones(3, 2, dtype=torch.int64), 0)
    with pytest.raises(ValueError, match=r"n/2 = 1.5 but got 2"):
        arc_clip(torch.ones(3, 2), 2)
    with pytest.raises(ValueError, match=r"`n` to be a positive integer but got 0"):
        arc_scales(torch.ones(0), 0)


# ----------------------------------------------------------------------------- against the reference


def test_arc_clip_matches_reference_many_shapes():
    rng = np.random.default_rng(0)
    sizes = [*range(1, 24), 31, 64, 121, 127, 200, 242]
    for n in sizes:
        fs = sorted({0, (n - 1) // 2, *rng.integers(0, (n + 1) // 2, size=3).tolist()})
        for f in fs:
            v = random_vectors(rng, n, int(rng.integers(1, 9)))
            expected, thr = reference_arc(v, f)
            got = arc_clip(torch.from_numpy(v), f)
            assert got.dtype == torch.float64
            np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=0, err_msg=f"n={n} f={f}")
            assert arc_threshold(torch.from_numpy(np.linalg.norm(v, axis=1)), f).item() == pytest.approx(thr)
            got32 = arc_clip(torch.from_numpy(v).float(), f)
            np.testing.assert_allclose(got32.numpy(), expected, rtol=1e-5, atol=1e-6, err_msg=f"n={n} f={f}")


def test_arc_clip_matches_reference_with_non_finite_rows():
    rng = np.random.default_rng(1)
    for n in [3, 5, 8, 11, 17, 40]:
        for f in range(0, (n + 1) // 2):
            v = random_vectors(rng, n, 4)
            bad = rng.choice(n, size=int(rng.integers(1, n + 1)), replace=False)
            for j, i in enumerate(bad):
                v[i, j % 4] = [NAN, INF, -INF][j % 3]
            expected, _ = reference_arc(v, f)
            got = arc_clip(torch.from_numpy(v), f)
            assert torch.isfinite(got).all()
            np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=0, err_msg=f"n={n} f={f}")
            assert (got[torch.from_numpy(bad)] == 0).all()


# ----------------------------------------------------------------------------- hand cases


def test_ties_with_threshold_get_scale_exactly_one():
    # n=5, f=1: k=1; the largest three norms tie, so the threshold equals them and nothing moves.
    norms = torch.tensor([1.0, 2.0, 3.0, 3.0, 3.0])
    assert torch.equal(arc_scales(norms, 1), torch.ones(5))
    # n=4, f=1: k=1; 5 is clipped to 4, both 4s keep scale exactly 1.
    scales = arc_scales(torch.tensor([5.0, 4.0, 4.0, 1.0]), 1)
    assert torch.equal(scales, torch.tensor([0.8, 1.0, 1.0, 1.0]))


def test_hand_case_n11_f3():
    norms = torch.arange(1.0, 12.0)  # k = 4: 8..11 clipped to 7
    stats = arc_stats(norms, 3)
    assert isinstance(stats, ARCStats)
    assert stats.num_clipped == 4
    assert stats.threshold.item() == 7.0
    expected = torch.ones(11)
    expected[7:] = 7.0 / norms[7:]
    torch.testing.assert_close(stats.scales, expected, rtol=0, atol=0)
    assert stats.clipped.tolist() == [False] * 7 + [True] * 4


def test_k_zero_is_a_noop():
    rng = np.random.default_rng(2)
    for n in [1, 2, 3, 7]:
        v = torch.from_numpy(random_vectors(rng, n, 5)).float()
        assert torch.equal(arc_clip(v, 0), v)
    # n=2, f=0 and n=1: k = 0 as well; threshold is the largest norm
    assert arc_threshold(torch.tensor([3.0, 4.0]), 0).item() == 4.0
    assert torch.equal(arc_scales(torch.tensor([2.0]), 0), torch.ones(1))


def test_zero_norms_get_scale_one():
    assert torch.equal(arc_scales(torch.zeros(5), 2), torch.ones(5))
    v = torch.zeros(5, 3)
    assert torch.equal(arc_clip(v, 2), v)


def test_non_finite_norms_always_get_scale_zero():
    # k = 0 still neutralises non-finite vectors.
    s = arc_scales(torch.tensor([1.0, NAN, 2.0]), 0)
    assert s.tolist() == [1.0, 0.0, 1.0]
    # one non-finite, k = 1: it is "the clipped one", the threshold is the largest finite norm.
    stats = arc_stats(torch.tensor([1.0, 2.0, 3.0, 10.0, NAN]), 1)
    assert stats.threshold.item() == 10.0
    assert stats.scales.tolist() == [1.0, 1.0, 1.0, 1.0, 0.0]
    # fewer non-finite than k: the next largest finite norm is clipped as usual (k = 4 for n=11, f=3).
    norms = torch.tensor([INF, NAN, 1, 2, 3, 4, 5, 6, 7, 8, 9], dtype=torch.float32)
    stats = arc_stats(norms, 3)
    assert stats.threshold.item() == 7.0
    assert stats.scales[:2].tolist() == [0.0, 0.0]
    torch.testing.assert_close(stats.scales[-2:], torch.tensor([7 / 8, 7 / 9]))
    assert stats.clipped.sum().item() == 4


def test_more_non_finite_than_k():
    # n=5, f=1, k=1 but three non-finite norms: they get 0, finite ones keep 1,
    # threshold falls back to the largest finite norm.
    stats = arc_stats(torch.tensor([NAN, 2.0, INF, 5.0, -INF]), 1)
    assert stats.threshold.item() == 5.0
    assert stats.scales.tolist() == [0.0, 1.0, 0.0, 1.0, 0.0]
    # All non-finite: threshold 0, everything zeroed, nothing NaN.
    stats = arc_stats(torch.tensor([NAN, INF, NAN]), 1)
    assert stats.threshold.item() == 0.0
    assert stats.scales.tolist() == [0.0, 0.0, 0.0]
    v = torch.tensor([[NAN, 1.0], [INF, 0.0], [1.0, -INF]])
    assert torch.equal(arc_clip(v, 1), torch.zeros(3, 2))


def test_overflowing_norm_is_treated_as_non_finite():
    v = torch.tensor([[3e38, 3e38], [1.0, 0.0], [0.0, 2.0]])
    out = arc_clip(v, 0)
    assert torch.isfinite(out).all()
    assert out[0].tolist() == [0.0, 0.0]
    assert torch.equal(out[1:], v[1:])


# ----------------------------------------------------------------------------- dtypes, devices, input


@pytest.mark.parametrize(
    ("dtype", "rtol"), [(torch.bfloat16, 1e-2), (torch.float16, 2e-3), (torch.float32, 1e-5), (torch.float64, 1e-12)]
)
def test_dtype_preserved_and_close_to_reference(dtype, rtol):
    rng = np.random.default_rng(3)
    for n, f in [(5, 1), (11, 3), (40, 13)]:
        v = torch.from_numpy(rng.standard_normal((n, 16)) * np.exp(rng.uniform(-1, 1, (n, 1)))).to(dtype)
        v[0, 3] = NAN
        out = arc_clip(v, f)
        assert out.dtype == dtype
        assert out.device == v.device
        assert torch.isfinite(out).all()
        expected, _ = reference_arc(v.double().numpy(), f)
        np.testing.assert_allclose(out.double().numpy(), expected, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_scales_dtype_and_threshold_is_0d(dtype):
    norms = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=dtype)
    expected = torch.float64 if dtype == torch.float64 else torch.float32
    assert arc_scales(norms, 1).dtype == expected
    thr = arc_threshold(norms, 1)
    assert thr.ndim == 0 and thr.dtype == expected


def test_input_not_modified():
    v = torch.tensor([[10.0, 0.0], [1.0, 1.0], [NAN, 1.0], [0.5, 0.5], [2.0, 0.0]])
    before = v.clone()
    out = arc_clip(v, 1)
    torch.testing.assert_close(v, before, rtol=0, atol=0, equal_nan=True)
    assert out.data_ptr() != v.data_ptr()
    norms = torch.tensor([5.0, NAN, 1.0])
    n_before = norms.clone()
    arc_scales(norms, 1)
    torch.testing.assert_close(norms, n_before, rtol=0, atol=0, equal_nan=True)


def test_no_host_sync_runs_on_meta_device():
    # The meta device has no data: any .item() or branching on values would raise here.
    assert arc_scales(torch.empty(9, device="meta"), 3).shape == (9,)
    assert arc_threshold(torch.empty(9, device="meta"), 3).shape == ()
    out = arc_clip(torch.empty(9, 4, device="meta", dtype=torch.bfloat16), 3)
    assert out.shape == (9, 4) and out.dtype == torch.bfloat16
    stats = arc_stats(torch.empty(9, device="meta"), 3)
    assert stats.clipped.shape == (9,)


# ----------------------------------------------------------------------------- properties


def test_properties_on_random_inputs():
    rng = np.random.default_rng(4)
    for _ in range(200):
        n = int(rng.integers(1, 60))
        f = int(rng.integers(0, (n + 1) // 2))
        v = torch.from_numpy(random_vectors(rng, n, int(rng.integers(1, 6))))
        stats = arc_stats(torch.linalg.vector_norm(v, dim=1), f)
        out = arc_clip(v, f)
        in_norms = torch.linalg.vector_norm(v, dim=1)
        out_norms = torch.linalg.vector_norm(out, dim=1)
        # clipped norms never exceed the threshold
        assert (out_norms <= stats.threshold * (1 + 1e-12)).all()
        # at most k vectors change, and they are exactly those with norm above the threshold
        changed = (out != v).any(dim=1)
        assert changed.sum().item() <= stats.num_clipped
        assert torch.equal(changed, in_norms > stats.threshold)
        assert torch.equal(stats.clipped, in_norms > stats.threshold)
        # scales in [0, 1]; direction kept; order of norms kept
        assert ((stats.scales >= 0) & (stats.scales <= 1)).all()
        torch.testing.assert_close(out, v * stats.scales.unsqueeze(1), rtol=0, atol=0)
        order = torch.argsort(in_norms)
        assert (torch.diff(out_norms[order]) >= -1e-12 * stats.threshold).all()
        # a second pass on finite inputs changes nothing (beyond rounding): the clipped ones tie
        torch.testing.assert_close(arc_clip(out, f), out, rtol=1e-12, atol=0)


def test_second_pass_can_change_when_non_finite_rows_were_zeroed():
    # Not idempotent with non-finite inputs: zeroed rows drop to the bottom of the order.
    v = torch.tensor([[NAN], [5.0], [4.0], [3.0], [1.0]])
    once = arc_clip(v, 1)
    assert once[:, 0].tolist() == [0.0, 5.0, 4.0, 3.0, 1.0]
    assert arc_clip(once, 1)[:, 0].tolist() == [0.0, 4.0, 4.0, 3.0, 1.0]
