"""The pipeline ``rule(NNM(bucket(clip_C(ARC(x)))))`` in one process, against the steps composed by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lightning_clip.robust.pipeline as pipeline
import lightning_clip.robust.rules as rules
from lightning_clip.robust.arc import arc_clip, arc_stats
from lightning_clip.robust.pipeline import (
    aggregate,
    bucket_permutation,
    bucketing,
    nearest_neighbor_mixing,
    preaggregate,
    preaggregation_stats,
    static_clip,
)
from lightning_clip.robust.rules import RULES, geometric_median, mean, median, trimmed_mean

nnm = nearest_neighbor_mixing

NAN = float("nan")


def rand(rng: np.random.Generator, n: int, d: int) -> torch.Tensor:
    return torch.from_numpy(rng.standard_normal((n, d)))

def test_nnm_hand_case():
    x = torch.tensor([[0.0], [1.0], [3.0], [10.0]])
    # n=4, f=1: each row averages its 3 nearest rows, itself included.
    expected = torch.tensor([[4 / 3], [4 / 3], [4 / 3], [14 / 3]])
    torch.testing.assert_close(nnm(x, 1), expected)


def test_nnm_ties_broken_by_index_and_self_first():
    x = torch.tensor([[0.0], [1.0], [-1.0]])
    # n=3, f=1: itself plus one neighbour; row 0 is at distance 1 from both 1 and -1 -> row 1.
    torch.testing.assert_close(nnm(x, 1), torch.tensor([[0.5], [0.5], [-0.5]]))
    dup = torch.tensor([[1.0], [1.0], [5.0]])
    torch.testing.assert_close(nnm(dup, 1), torch.tensor([[1.0], [1.0], [3.0]]))


def test_nnm_f_zero_is_the_mean_everywhere_and_matches_numpy():
    rng = np.random.default_rng(6)
    x = rand(rng, 6, 3)
    torch.testing.assert_close(nnm(x, 0), x.mean(dim=0).expand(6, 3))
    xn = x.numpy()
    for f in range(3):
        out = nnm(x, f).numpy()
        for i in range(6):
            idx = np.argsort(np.linalg.norm(xn - xn[i], axis=1), kind="stable")[: 6 - f]
            np.testing.assert_allclose(out[i], xn[idx].mean(axis=0), rtol=1e-12, atol=1e-15)


def test_aggregate_unknown_name_lists_allowed():
    with pytest.raises(ValueError, match=r"`rule` to be one of 'mean', 'cwtm', .* but got 'avg'"):
        aggregate(torch.zeros(3, 2), "avg", 1)


def test_aggregate_composes_arc_and_nnm():
    rng = np.random.default_rng(7)
    x = rand(rng, 9, 5)
    x[0] *= 1000
    x[1, 2] = NAN
    for name, rule in RULES.items():
        clean = arc_clip(x, 2)
        torch.testing.assert_close(aggregate(x, name, 2, nnm=True, arc=True), rule(nnm(clean, 2), 2))
        torch.testing.assert_close(aggregate(clean, name, 2), rule(clean, 2))
        assert torch.isfinite(aggregate(x, name, 2, nnm=True, arc=True)).all()


def test_static_clip_matches_torch_clip_grad_norm_row_by_row():
    rng = np.random.default_rng(11)
    x = rand(rng, 6, 5).float() * torch.tensor([[0.1], [1.0], [3.0], [10.0], [0.0], [2.0]])
    out = static_clip(x, 2.0)
    for i in range(x.shape[0]):
        p = torch.nn.Parameter(torch.zeros(5))
        p.grad = x[i].clone()
        torch.nn.utils.clip_grad_norm_([p], max_norm=2.0)
        torch.testing.assert_close(out[i], p.grad, rtol=1e-6, atol=0)
    norms = out.norm(dim=1)
    assert (norms <= 2.0 + 1e-5).all()
    assert torch.equal(out[[0, 4]], x[[0, 4]])  # below the bound (and zero): untouched
    torch.testing.assert_close(static_clip(out, 2.0), out)  # clipping twice changes nothing (to rounding)


def test_static_clip_keeps_non_finite_rows_non_finite_and_validates():
    x = torch.tensor([[NAN, 1.0], [float("inf"), 0.0], [3.0, 4.0]])
    out = static_clip(x, 1.0)
    assert not torch.isfinite(out[0]).any() and not torch.isfinite(out[1]).all()
    torch.testing.assert_close(out[2], torch.tensor([0.6, 0.8]))
    assert torch.isnan(preaggregation_stats(torch.tensor([NAN]), 0, arc=False, static_clip=1.0).scales).all()
    for bad in (0.0, -1.0, NAN, float("inf")):
        with pytest.raises(ValueError, match=r"`max_norm`"):
            static_clip(x, bad)
        with pytest.raises(ValueError, match=r"`static_clip`"):
            aggregate(x[2:], "mean", 0, static_clip=bad)
    with pytest.raises(TypeError, match=r"`static_clip` to be a number"):
        aggregate(x[2:], "mean", 0, static_clip="2")  # type: ignore[arg-type]


def test_aggregate_order_is_arc_then_static_clip_then_nnm_then_rule():
    rng = np.random.default_rng(12)
    x = rand(rng, 9, 6).float()
    x[0] *= 50
    x[3] *= 5
    for name, rule in RULES.items():
        expected = rule(nnm(static_clip(arc_clip(x, 2), 1.5), 2), 2)
        torch.testing.assert_close(aggregate(x, name, 2, nnm=True, arc=True, static_clip=1.5), expected)
        torch.testing.assert_close(aggregate(x, name, 2, static_clip=1.5), rule(static_clip(x, 1.5), 2))
    # The clip acts before NNM: clipping the mixed rows instead gives another result.
    swapped = trimmed_mean(static_clip(nnm(arc_clip(x, 2), 2), 1.5), 2)
    assert not torch.allclose(aggregate(x, "cwtm", 2, nnm=True, arc=True, static_clip=1.5), swapped)


def test_aggregate_validates_num_byzantine_for_every_rule():
    for name in RULES:
        with pytest.raises(ValueError, match=r"n/2 = 2.0 but got 2"):
            aggregate(torch.zeros(4, 2), name, 2)


@pytest.mark.parametrize("name", list(RULES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_dtype_shape_and_determinism(name, dtype):
    rng = np.random.default_rng(8)
    x = rand(rng, 7, 4).to(dtype)
    out = aggregate(x, name, 2, nnm=True)
    assert out.shape == (4,) and out.dtype == dtype
    assert torch.equal(out, aggregate(x, name, 2, nnm=True))
    assert nnm(x, 2).dtype == dtype


def test_input_validation():
    with pytest.raises(ValueError, match=r"`x` to be a 2-D tensor"):
        mean(torch.zeros(3))
    with pytest.raises(ValueError, match=r"n >= 1"):
        median(torch.zeros(0, 3))
    with pytest.raises(TypeError, match=r"floating dtype"):
        trimmed_mean(torch.zeros(3, 2, dtype=torch.int32), 1)
    with pytest.raises(TypeError, match=r"`nnm` to be a bool"):
        aggregate(torch.zeros(3, 2), "mean", 1, nnm=1)  # type: ignore[arg-type]


def test_no_host_sync_runs_on_meta_device():
    x = torch.empty(7, 3, device="meta")
    for name in ["mean", "cwtm", "median", "krum", "multikrum"]:
        assert aggregate(x, name, 2, nnm=True, arc=True).shape == (3,)
    assert geometric_median(x, 2, tol=0.0, max_iter=3).shape == (3,)


def test_bucketing_hand_case():
    x = torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0], [6.0, 7.0], [8.0, 9.0]])
    out = bucketing(x, 2, torch.tensor([2, 0, 4, 1, 3]))
    # buckets {2, 0}, {4, 1}, {3}
    torch.testing.assert_close(out, torch.tensor([[2.0, 3.0], [5.0, 6.0], [6.0, 7.0]]))
    torch.testing.assert_close(bucketing(x, 1, torch.tensor([4, 3, 2, 1, 0])), x.flip(0))


def test_bucket_permutation_is_seeded_by_seed_and_step_only():
    p = bucket_permutation(8, 3, 5)
    assert sorted(p.tolist()) == list(range(8))
    torch.manual_seed(123)  # the global generator plays no part
    assert torch.equal(bucket_permutation(8, 3, 5), p)
    others = [bucket_permutation(8, 3, s) for s in range(6, 12)] + [bucket_permutation(8, 4, 5)]
    assert any(not torch.equal(q, p) for q in others)


def test_aggregate_with_bucketing_is_rule_of_the_buckets_of_the_clipped_rows():
    rng = np.random.default_rng(23)
    x = rand(rng, 9, 4).float()
    x[0] *= 100
    perm = bucket_permutation(9, 7, 2)
    expected = trimmed_mean(nnm(bucketing(arc_clip(x, 1), 2, perm), 1), 1)
    out = aggregate(x, "cwtm", 1, nnm=True, arc=True, bucket_size=2, bucket_seed=7, step=2)
    torch.testing.assert_close(out, expected)
    # another step draws another permutation and (here) another aggregate
    assert not torch.equal(aggregate(x, "cwtm", 1, nnm=True, arc=True, bucket_size=2, bucket_seed=7, step=3), out)


def test_bucketing_validation():
    x = torch.zeros(5, 2)
    with pytest.raises(ValueError, match=r"`bucket_size` to leave more than 2 \* num_byzantine = 2 buckets "
                                         r"\(num_byzantine=1\)"):
        aggregate(x, "cwtm", 1, bucket_size=3)  # 2 buckets cannot hold an honest majority
    with pytest.raises(ValueError, match=r"`permutation` to be a permutation of range\(5\)"):
        bucketing(x, 2, torch.tensor([0, 0, 1, 2, 3]))
    with pytest.raises(ValueError, match=r"`bucket_size`"):
        bucketing(x, 0, torch.arange(5))


def test_chunked_passes_equal_one_pass(monkeypatch):
    rng = np.random.default_rng(25)
    x = rand(rng, 6, 50)
    c = rand(rng, 1, 50)[0]
    whole = {name: aggregate(x, name, 1, nnm=True, arc=True, center=c) for name in RULES}
    monkeypatch.setattr(pipeline, "CHUNK", 7)  # 8 chunks of the coordinate-wise passes
    monkeypatch.setattr(rules, "DIST_CHUNK", 7)  # and of the sums over the coordinates
    for name, value in whole.items():
        torch.testing.assert_close(aggregate(x, name, 1, nnm=True, arc=True, center=c), value, rtol=1e-12, atol=1e-12)


def test_preaggregation_multiplies_arc_and_static_factors_written_out_by_hand():
    x = torch.tensor([[3.0, 4.0], [0.0, 1.0], [30.0, 40.0], [float("nan"), 0.0], [0.6, 0.8]])
    norms = torch.tensor([5.0, 1.0, 50.0, float("nan"), 1.0])
    # n = 5, f = 1: k = floor(2 * 4 / 5) = 1 -> ARC zeroes the NaN row and keeps the rest (threshold 50).
    arc = arc_stats(norms, 1)
    assert arc.scales.tolist() == [1.0, 1.0, 1.0, 0.0, 1.0] and float(arc.threshold) == 50.0
    stats = preaggregation_stats(norms, 1, static_clip=2.0)
    expected = [2.0 / (5.0 + 1e-6), 1.0, 2.0 / (50.0 + 1e-6), 0.0, 1.0]
    torch.testing.assert_close(stats.scales, torch.tensor(expected), rtol=1e-6, atol=0)
    assert stats.clipped.tolist() == [True, False, True, True, False]
    out, _ = preaggregate(x, 1, static_clip=2.0)
    assert torch.isfinite(out).all() and torch.equal(out[3], torch.zeros(2))
    torch.testing.assert_close(out.norm(dim=1), torch.tensor([2.0, 1.0, 2.0, 0.0, 1.0]), rtol=1e-5, atol=1e-6)
    # Without ARC the NaN row stays NaN (static clipping does not neutralise it); the threshold is C.
    no_arc = preaggregation_stats(norms, 1, arc=False, static_clip=2.0)
    assert torch.isnan(no_arc.scales[3]) and float(no_arc.threshold) == 2.0 and no_arc.num_clipped == 0
    assert float(preaggregation_stats(norms, 1, arc=False).threshold) == float("inf")


def test_preaggregation_runs_on_meta_tensors_without_host_sync():
    x = torch.empty(6, 4, device="meta")
    out, stats = preaggregate(x, 2, static_clip=1.0, nnm=True)
    assert out.shape == (6, 4) and stats.scales.shape == (6,)
