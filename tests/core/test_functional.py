"""Clipping primitives against torch.nn.utils.clip_grad_norm_ / clip_grad_value_, plus properties."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.utils import clip_grad_norm_, clip_grad_value_

from lightning_clip.core.functional import (
    EPS,
    _clamp_by_tensor_,
    clip_coefficient,
    clip_grads_by_value_,
    clip_grads_with_norm_,
    geometric_quantile_update,
    scale_grads_,
)
from lightning_clip.core.grads import gradient_stats

SHAPES = [(3,), (5, 4), (7, 2, 3), (1,), (100,), (33, 17), (64, 65)]


def _grads(seed: int, scale: float = 1.0, dtypes=(torch.float32,)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(s, generator=g, dtype=torch.float64) * scale).to(dtypes[i % len(dtypes)])
        for i, s in enumerate(SHAPES)
    ]


def _params(grads: list[torch.Tensor]) -> list[torch.nn.Parameter]:
    ps = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros_like(g))
        p.grad = g.clone()
        ps.append(p)
    return ps


def _norm(ts) -> float:
    return torch.linalg.vector_norm(torch.cat([t.double().flatten() for t in ts])).item()


THRESHOLDS = [1.0, 0.05, 0.3, 7.7]


@pytest.mark.parametrize("threshold", THRESHOLDS)
@pytest.mark.parametrize("as_tensor", [False, True], ids=["float", "tensor"])
@pytest.mark.parametrize("seed,scale", [(0, 1.0 / 16), (1, 0.1), (2, 1.0), (3, 30.0)])
def test_clip_with_norm_bit_identical_to_torch(threshold, as_tensor, seed, scale):
    base = _grads(seed, scale)  # total norms ~0.9 .. ~400: some clipped, some not
    ref_params = _params(base)
    ref_total = clip_grad_norm_(ref_params, threshold)

    grads = [g.clone() for g in base]
    total = gradient_stats(grads).total_norm
    assert torch.equal(total, ref_total)
    thr = torch.tensor(threshold, dtype=torch.float32) if as_tensor else threshold
    coef = clip_grads_with_norm_(grads, thr, total)
    for g, p in zip(grads, ref_params):
        assert torch.equal(g, p.grad)
    # the returned coefficient is the one torch applied: min(1, threshold / (total + 1e-6))
    assert coef.shape == () and coef.dtype == torch.float32
    expected = min(1.0, threshold / (total.item() + 1e-6))
    torch.testing.assert_close(coef.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=0)
    assert torch.equal(coef, torch.clamp(threshold / (ref_total + 1e-6), max=1.0))
    for g, b in zip(grads, base):
        assert torch.equal(g, b * coef)


@pytest.mark.parametrize("threshold", THRESHOLDS)
@pytest.mark.parametrize("seed", range(6))
def test_clipped_norm_equals_threshold_and_clipping_is_idempotent(threshold, seed):
    scale = [0.01, 0.1, 1.0, 5.0, 50.0, 1000.0][seed]
    base = _grads(seed, scale)
    grads = [g.clone() for g in base]
    before = _norm(base)
    coef = clip_grads_with_norm_(grads, threshold, gradient_stats(grads).total_norm)
    after = _norm(grads)
    if before > threshold:
        assert coef.item() < 1.0
        assert after == pytest.approx(threshold, rel=1e-5)  # the property: clipped norm == threshold
    else:
        assert coef.item() == 1.0
        for g, b in zip(grads, base):
            assert torch.equal(g, b)  # untouched, bit for bit
    assert after <= threshold * (1 + 1e-6) or before <= threshold

    # clipping twice changes nothing (beyond the 1e-6 epsilon of the divisor)
    once = [g.clone() for g in grads]
    coef2 = clip_grads_with_norm_(grads, threshold, gradient_stats(grads).total_norm)
    # second coefficient: threshold / (threshold + 1e-6) when the first call clipped, else exactly 1
    tol = 1.5e-6 / threshold + 1e-6
    assert coef2.item() == pytest.approx(1.0, abs=tol)
    for g, o in zip(grads, once):
        torch.testing.assert_close(g, o, rtol=tol, atol=0)


def test_clip_with_nonfinite_total_matches_torch():
    for bad in (float("nan"), float("inf")):
        base = _grads(0)
        base[2][0, 0, 0] = bad
        ref_params = _params(base)
        clip_grad_norm_(ref_params, 1.0)
        grads = [g.clone() for g in base]
        clip_grads_with_norm_(grads, 1.0, gradient_stats(grads).total_norm)
        for g, p in zip(grads, ref_params):
            torch.testing.assert_close(g, p.grad, rtol=0, atol=0, equal_nan=True)


def test_mixed_dtype_clip_scales_every_group():
    base = _grads(4, 3.0, dtypes=(torch.float32, torch.float64, torch.bfloat16))
    grads = [g.clone() for g in base]
    total = gradient_stats(grads).total_norm
    coef = clip_grads_with_norm_(grads, 0.5, total)
    assert coef.item() < 1.0
    for g, b in zip(grads, base):
        assert g.dtype == b.dtype
        torch.testing.assert_close(g, (b.double() * coef.double()).to(b.dtype), rtol=1e-2 if b.dtype ==
                                   torch.bfloat16 else 1e-6, atol=0)
    assert _norm(grads) == pytest.approx(0.5, rel=5e-3)


def test_empty_grads():
    coef = clip_grads_with_norm_([], 1.0, torch.tensor(0.0))
    assert coef.item() == 1.0
    clip_grads_by_value_([], 1.0)
    scale_grads_([], torch.tensor(0.5))


def test_clip_coefficient_formula():
    total = torch.tensor([0.0, 0.5, 1.0, 2.0, 1e6], dtype=torch.float32)
    for t in total:
        c = clip_coefficient(1.0, t)
        assert c.item() == pytest.approx(min(1.0, 1.0 / (t.item() + EPS)), rel=1e-6)
    assert EPS == 1e-6
    # clamp, never branch: works on a tensor threshold without reading it on the host
    assert clip_coefficient(torch.tensor(3.0), torch.tensor(1.0)).item() == 1.0


def test_scale_grads_multiplies_in_place():
    base = _grads(5, dtypes=(torch.float32, torch.float64))
    grads = [g.clone() for g in base]
    ids = [id(g) for g in grads]
    coef = torch.tensor(0.25)
    scale_grads_(grads, coef)
    assert [id(g) for g in grads] == ids
    for g, b in zip(grads, base):
        assert torch.equal(g, b * 0.25)


@pytest.mark.parametrize("threshold", [0.01, 0.3, 1.0, 7.7])
@pytest.mark.parametrize("as_tensor", [False, True], ids=["float", "tensor"])
@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.float32, torch.float64, torch.bfloat16, torch.float16)],
                         ids=["fp32", "mixed"])
def test_clip_by_value_equals_torch(threshold, as_tensor, dtypes):
    base = _grads(7, 2.0, dtypes=dtypes)
    ref_params = _params(base)
    thr = torch.tensor(threshold, dtype=torch.float32) if as_tensor else threshold
    # a 0-d fp32 threshold means the fp32-rounded value (visible on fp64 grads): torch gets that value
    clip_grad_value_(ref_params, float(thr))
    grads = [g.clone() for g in base]
    clip_grads_by_value_(grads, thr)
    for g, p, b in zip(grads, ref_params, base):
        assert g.dtype == b.dtype
        assert torch.equal(g, p.grad)
        assert g.abs().max().item() <= float(thr) * (1 + 2**-7)  # bf16/fp16 round the bound
    # not vacuous: something was clamped (randn * 2 exceeds these thresholds)
    if threshold < 5:
        assert all(not torch.equal(g, b) for g, b in zip(grads, base) if b.numel() > 20)


@pytest.mark.parametrize("threshold", [0.01, 0.3, 3.0])
@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.float32, torch.float64, torch.bfloat16, torch.float16)],
                         ids=["fp32", "mixed"])
def test_clamp_against_a_device_tensor_equals_torch(threshold, dtypes):
    """The path a threshold tensor on an accelerator takes (never read on the host), run on CPU tensors."""
    base = _grads(8, 2.0, dtypes=dtypes)
    thr = torch.tensor(threshold, dtype=torch.float32)
    ref_params = _params(base)
    clip_grad_value_(ref_params, float(thr))
    grads = [g.clone() for g in base]
    for g in grads:
        _clamp_by_tensor_([g], thr.to(g.dtype))
    for g, p in zip(grads, ref_params):
        assert torch.equal(g, p.grad)
    assert any(not torch.equal(g, b) for g, b in zip(grads, base))  # not vacuous


def test_tensor_threshold_never_reads_the_device():
    """On the meta device any host read (.item(), float(), bool()) raises: none of these may read."""
    meta = torch.device("meta")
    grads = [torch.empty(s, device=meta) for s in SHAPES] + [torch.empty(3, dtype=torch.bfloat16, device=meta)]
    threshold = torch.empty((), device=meta)
    total = torch.empty((), device=meta)
    coef = clip_coefficient(threshold, total)
    assert coef.device == meta and coef.shape == ()
    assert clip_grads_with_norm_(grads, threshold, total).device == meta
    clip_grads_by_value_(grads, threshold)
    scale_grads_(grads, coef)
    # and the same with the threshold on the host and the gradients on the device
    clip_grads_by_value_(grads, torch.tensor(0.5))
    clip_grads_with_norm_(grads, torch.tensor(0.5), total)


def test_geometric_quantile_update_matches_the_formula_by_hand() -> None:
    # C_{t+1} = C_t * exp(-eta * (b - gamma)), Andrew et al. 2021, on a hand sequence.
    c, eta, gamma = 1.0, 0.2, 0.5
    threshold = torch.tensor(c)
    for norm in [0.5, 2.0, 3.0, 0.1]:
        below = float(norm <= c)
        c = c * math.exp(-eta * (below - gamma))
        threshold = geometric_quantile_update(threshold, torch.tensor(below), gamma, eta)
        assert float(threshold) == pytest.approx(c, rel=1e-6)
    # a fraction (the DP noisy count over clients) works the same way
    assert float(geometric_quantile_update(torch.tensor(2.0), 0.25, 0.5, 0.2)) == pytest.approx(2.0 * math.exp(0.05))
