"""The aggregation rules against hand computations and numpy (one process)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_clip.robust.pipeline import aggregate
from lightning_clip.robust.rules import (
    RULES,
    centered_clipping,
    geometric_median,
    krum,
    meamed,
    mean,
    median,
    multi_krum,
    selection_network,
    sorting_network,
    trimmed_mean,
)

NAN = float("nan")


def rand(rng: np.random.Generator, n: int, d: int) -> torch.Tensor:
    return torch.from_numpy(rng.standard_normal((n, d)))

def test_mean_matches_numpy():
    rng = np.random.default_rng(0)
    x = rand(rng, 7, 5)
    np.testing.assert_allclose(mean(x).numpy(), x.numpy().mean(axis=0), rtol=1e-12)


def test_mean_propagates_non_finite():
    x = torch.tensor([[1.0, NAN], [2.0, 3.0]])
    out = mean(x)
    assert out[0].item() == 1.5 and math.isnan(out[1].item())


def test_trimmed_mean_hand_case():
    x = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [100.0, 9.0], [-50.0, -3.0]])
    torch.testing.assert_close(trimmed_mean(x, 1), torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(trimmed_mean(x, 2), torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(trimmed_mean(x, 0), mean(x))


def test_trimmed_mean_matches_sorted_numpy():
    rng = np.random.default_rng(1)
    for n in [1, 2, 3, 4, 7, 10, 31]:
        for f in range(0, (n + 1) // 2):
            x = rand(rng, n, 6)
            expected = np.sort(x.numpy(), axis=0)[f : n - f].mean(axis=0)
            np.testing.assert_allclose(trimmed_mean(x, f).numpy(), expected, rtol=1e-12, atol=1e-15)


def test_trimmed_mean_validates_num_byzantine():
    with pytest.raises(ValueError, match=r"0 <= num_byzantine < n/2 = 2.0 but got 2"):
        trimmed_mean(torch.zeros(4, 2), 2)


def test_median_even_n_averages_the_two_middle_values():
    x = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    assert median(x).item() == 2.5  # torch.median would say 2.0
    assert median(torch.tensor([[3.0], [1.0], [2.0]])).item() == 2.0


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 13])
def test_median_matches_numpy(n):
    rng = np.random.default_rng(n)
    x = rand(rng, n, 9)
    np.testing.assert_allclose(median(x).numpy(), np.median(x.numpy(), axis=0), rtol=1e-12)
    np.testing.assert_allclose(median(x.float()).numpy(), np.median(x.numpy(), axis=0), rtol=1e-6, atol=1e-7)


def objective(z: np.ndarray, x: np.ndarray) -> float:
    return float(np.linalg.norm(x - z, axis=1).sum())


def test_geometric_median_collinear_is_the_middle_point():
    x = torch.tensor([[0.0], [1.0], [2.0], [10.0], [100.0]], dtype=torch.float64)
    assert geometric_median(x).item() == pytest.approx(2.0, abs=1e-6)


def test_geometric_median_equilateral_triangle_is_its_centre():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]], dtype=torch.float64)
    torch.testing.assert_close(geometric_median(x), x.mean(dim=0), rtol=0, atol=1e-6)


def test_geometric_median_is_a_local_minimiser():
    rng = np.random.default_rng(2)
    for n, d in [(5, 2), (8, 3), (11, 10)]:
        x = rng.standard_normal((n, d))
        x[0] *= 50  # an outlier
        z = geometric_median(torch.from_numpy(x), max_iter=1000, tol=1e-12).numpy()
        best = objective(z, x)
        for _ in range(200):
            delta = rng.standard_normal(d) * 10.0 ** rng.uniform(-4, -1)
            assert best <= objective(z + delta, x) + 1e-9


def test_geometric_median_grid_search_in_2d():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 2))
    z = geometric_median(torch.from_numpy(x), max_iter=1000, tol=1e-12).numpy()
    g = np.linspace(-3, 3, 301)
    grid = np.stack(np.meshgrid(g, g), axis=-1).reshape(-1, 2)
    values = np.linalg.norm(x[None, :, :] - grid[:, None, :], axis=2).sum(axis=1)
    assert objective(z, x) <= values.min() + 1e-12
    assert np.linalg.norm(grid[values.argmin()] - z) < 0.03


def test_geometric_median_is_robust_and_deterministic():
    rng = np.random.default_rng(4)
    x = rand(rng, 9, 4)
    x[:3] = 1e6
    z = geometric_median(x)
    assert torch.linalg.vector_norm(z) < 10
    assert torch.equal(geometric_median(x), z)
    # tol=0 runs exactly max_iter iterations (no host sync) and lands in the same place.
    torch.testing.assert_close(geometric_median(x, tol=0.0, max_iter=200), z, rtol=1e-5, atol=1e-5)


def test_geometric_median_validation():
    x = torch.zeros(3, 2)
    with pytest.raises(ValueError, match=r"`eps` to be a positive finite number but got 0.0"):
        geometric_median(x, eps=0.0)
    with pytest.raises(ValueError, match=r"`max_iter` to be a positive integer but got 0"):
        geometric_median(x, max_iter=0)
    with pytest.raises(ValueError, match=r"`tol` to be a non-negative finite number"):
        geometric_median(x, tol=-1.0)
    with pytest.raises(ValueError, match=r"n/2 = 1.5 but got 2"):
        geometric_median(x, num_byzantine=2)


KRUM_X = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [10.0, 10.0]])
# n=4, f=1: each score sums the 2 smallest squared distances to the others:
# p0: 1 + 1 = 2, p1: 1 + 2 = 3, p2: 1 + 2 = 3, p3: 181 + 181 = 362.


def test_krum_hand_case():
    assert torch.equal(krum(KRUM_X, 1), KRUM_X[0])


def test_multi_krum_hand_case_and_tie_by_index():
    torch.testing.assert_close(multi_krum(KRUM_X, 1), torch.tensor([1 / 3, 1 / 3]))  # m = n - f = 3
    torch.testing.assert_close(multi_krum(KRUM_X, 1, m=2), torch.tensor([0.5, 0.0]))  # p1 before p2
    torch.testing.assert_close(multi_krum(KRUM_X, 1, m=4), KRUM_X.mean(dim=0))
    torch.testing.assert_close(multi_krum(KRUM_X, 1, m=1), krum(KRUM_X, 1))


def numpy_krum_scores(x: np.ndarray, f: int) -> np.ndarray:
    n = x.shape[0]
    scores = []
    for i in range(n):
        d2 = sorted(float(((x[i] - x[j]) ** 2).sum()) for j in range(n) if j != i)
        scores.append(sum(d2[: n - f - 1]))
    return np.array(scores)


def test_multi_krum_matches_numpy_brute_force():
    rng = np.random.default_rng(5)
    for n in [2, 3, 5, 8, 13]:
        for f in range(0, (n + 1) // 2):
            x = rng.standard_normal((n, 4))
            order = np.argsort(numpy_krum_scores(x, f), kind="stable")
            for m in {1, n - f, n}:
                expected = x[order[:m]].mean(axis=0)
                got = multi_krum(torch.from_numpy(x), f, m=m)
                np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-15)


def test_multi_krum_validation():
    with pytest.raises(ValueError, match=r"`m` to satisfy 1 <= m <= n = 4 but got 5"):
        multi_krum(KRUM_X, 1, m=5)
    with pytest.raises(ValueError, match=r"`m` to be a positive integer but got 0"):
        multi_krum(KRUM_X, 1, m=0)
    with pytest.raises(ValueError, match=r"n/2 = 2.0 but got 2"):
        krum(KRUM_X, 2)


def test_registry_names():
    assert list(RULES) == ["mean", "cwtm", "median", "geomed", "krum", "multikrum", "meamed", "cclip"]


def test_meamed_hand_cases():
    # column 0: median 2.5, distances [1.5, .5, .5, 97.5] -> keep 1, 2, 3; column 1: the mean of 3 equal values
    x = torch.tensor([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0], [100.0, -50.0]])
    torch.testing.assert_close(meamed(x, 1), torch.tensor([2.0, 5.0]))
    # n = 5, f = 2: median 11, distances [11, 1, 0, 1, 2] -> keep 10, 11, 12
    assert meamed(torch.tensor([[0.0], [10.0], [11.0], [12.0], [13.0]]), 2).item() == pytest.approx(11.0)
    # a tie in distance keeps the lower index: [0, 2, 4], median 2 -> keep 2 and 0
    assert meamed(torch.tensor([[0.0], [2.0], [4.0]]), 1).item() == pytest.approx(1.0)
    # f = 0 is the mean
    torch.testing.assert_close(meamed(x, 0), x.mean(dim=0))


def test_meamed_matches_numpy():
    rng = np.random.default_rng(21)
    for n, f in [(5, 1), (6, 2), (9, 4)]:
        x = rng.standard_normal((n, 11))
        med = np.median(x, axis=0)
        idx = np.argsort(np.abs(x - med), axis=0, kind="stable")[: n - f]
        expected = np.take_along_axis(x, idx, axis=0).mean(axis=0)
        np.testing.assert_allclose(meamed(torch.from_numpy(x), f).numpy(), expected, rtol=1e-12)


def numpy_cclip(x: np.ndarray, v: np.ndarray, tau: float, iters: int) -> np.ndarray:
    for _ in range(iters):
        diff = x - v
        norms = np.linalg.norm(diff, axis=1)
        coeff = np.where(norms > tau, tau / np.where(norms > 0, norms, 1.0), 1.0)
        v = v + (diff * coeff[:, None]).mean(axis=0)
    return v


def test_centered_clipping_hand_case():
    # From 0 with tau = 1: the row (3, 4) is clipped to (0.6, 0.8), the zero rows stay: mean (0.2, 0.8/3)
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.0, 0.0]])
    torch.testing.assert_close(centered_clipping(x, tau=1.0), torch.tensor([0.2, 0.8 / 3]))
    # Second iteration from v1 = (0.2, 0.2667), by hand through numpy
    expected = numpy_cclip(x.double().numpy(), np.zeros(2), 1.0, 2)
    torch.testing.assert_close(centered_clipping(x.double(), tau=1.0, iters=2), torch.from_numpy(expected))
    # A radius above every distance gives the mean in one iteration, from any centre
    c = torch.tensor([10.0, -10.0])
    torch.testing.assert_close(centered_clipping(x, center=c, tau=1e6), x.mean(dim=0))


def test_centered_clipping_matches_numpy_and_bounds_an_outlier():
    rng = np.random.default_rng(22)
    x = rng.standard_normal((7, 5))
    x[0] *= 1e6
    c = rng.standard_normal(5)
    out = centered_clipping(torch.from_numpy(x), center=torch.from_numpy(c), tau=0.5, iters=3)
    np.testing.assert_allclose(out.numpy(), numpy_cclip(x, c, 0.5, 3), rtol=1e-12)
    # Each iteration moves the centre by at most tau, whatever the outlier
    assert np.linalg.norm(out.numpy() - c) <= 3 * 0.5 + 1e-12
    torch.testing.assert_close(aggregate(torch.from_numpy(x), "cclip", 2, center=torch.from_numpy(c), cclip_tau=0.5,
                                         cclip_iters=3), out)


def test_centered_clipping_validation():
    x = torch.zeros(3, 2)
    with pytest.raises(ValueError, match=r"`tau`"):
        centered_clipping(x, tau=0.0)
    with pytest.raises(ValueError, match=r"`iters`"):
        centered_clipping(x, iters=0)
    with pytest.raises(ValueError, match=r"`center` to be a 1-D tensor of 2 elements"):
        centered_clipping(x, center=torch.zeros(3))
    with pytest.raises(ValueError, match=r"`cclip_tau`"):
        aggregate(x, "cclip", 1, cclip_tau=-1.0)


def test_trimmed_mean_for_several_f_matches_numpy():
    rng = np.random.default_rng(24)
    x = rng.standard_normal((13, 9))
    for f in (1, 4, 5, 6):
        expected = np.sort(x, axis=0)[f : 13 - f].mean(axis=0)
        np.testing.assert_allclose(trimmed_mean(torch.from_numpy(x), f).numpy(), expected, rtol=1e-12)


def test_selection_network_gives_the_sorted_values_bit_for_bit():
    # Reference: torch.sort (exact) and the kept values summed in sorted order, as the whole network would.
    gen = torch.Generator().manual_seed(27)
    for n in range(1, 14):
        x = torch.randn(n, 300, generator=gen)
        x[:, :100] = torch.randint(-2, 3, (n, 100), generator=gen).float()  # ties
        x[:, 100:110] *= 1e30  # a sum of the extremes would swallow the rest
        ordered = torch.sort(x, dim=0).values
        for f in range(1, (n + 1) // 2):
            kept = list(ordered[f : n - f].unbind(0))
            acc = kept[0].clone()
            for row in kept[1:]:
                acc += row
            assert torch.equal(trimmed_mean(x, f), acc / (n - 2 * f)), (n, f)
            net = selection_network(n, f, n - f)
            computed = sum(want_min + want_max for _, _, want_min, want_max in net)
            assert computed <= 2 * len(sorting_network(n)), (n, f)
        middle = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
        assert torch.equal(median(x), middle)
    x = torch.randn(4, 50, generator=gen)
    x[2, 7] = float("nan")
    assert torch.isnan(trimmed_mean(x, 1)[7]) and torch.isnan(median(x)[7])  # a NaN spreads in its column
    assert torch.isfinite(trimmed_mean(x, 1)[torch.arange(50) != 7]).all()
    # n = 4, f = 1: 6 min/max instead of the sorting network's 10.
    assert sum(a + b for _, _, a, b in selection_network(4, 1, 3)) == 6


def test_sorting_network_sorts_every_0_1_input_and_random_columns():
    for n in range(1, 12):  # the 0-1 principle: sorting every 0/1 input proves the network
        net = sorting_network(n)
        for bits in range(2**n):
            v = [(bits >> k) & 1 for k in range(n)]
            for i, j in net:
                v[i], v[j] = min(v[i], v[j]), max(v[i], v[j])
            assert v == sorted(v), (n, bits)
    rng = np.random.default_rng(26)
    for n in (13, 33, 64):
        x = rng.integers(0, 5, size=(n, 40)).astype(float)  # many ties
        np.testing.assert_array_equal(median(torch.from_numpy(x)).numpy(), np.median(x, axis=0))
    assert len(sorting_network(512)) < 512 * 9 * 10 // 4 + 512  # O(n log^2 n)
