"""Unit-wise adaptive gradient clipping (AGC) against a numpy computation of the NFNets formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_clip.core.unitwise import adaptive_clip_grads_, unitwise_norm


def _reference(w: np.ndarray, g: np.ndarray, clip_factor: float, eps: float) -> tuple[np.ndarray, int]:
    """g <- g * min(1, clip_factor * max(||w||, eps) / max(||g||, 1e-6)) per row of dim 0 (whole tensor if <= 1-d)."""
    w64, g64 = w.astype(np.float64), g.astype(np.float64)
    if g.ndim <= 1:
        w_rows, g_rows = w64.reshape(1, -1), g64.reshape(1, -1)
    else:
        w_rows, g_rows = w64.reshape(w.shape[0], -1), g64.reshape(g.shape[0], -1)
    out = np.empty_like(g_rows)
    clipped = 0
    for r in range(g_rows.shape[0]):
        wn = max(np.sqrt((w_rows[r] ** 2).sum()), eps)
        gn = max(np.sqrt((g_rows[r] ** 2).sum()), 1e-6)
        ratio = clip_factor * wn / gn
        clipped += ratio < 1.0
        out[r] = g_rows[r] * min(1.0, ratio)
    return out.reshape(g.shape), clipped


def _tensors(seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(6, 5), (4, 3, 3, 3), (7,), (), (3, 4)]
    params = [torch.randn(s, generator=gen) for s in shapes]
    params[4][1] = 0.0  # a zero-initialised unit: its weight norm is floored at eps
    scales = [0.05, 1.0, 0.01, 3.0, 0.2]  # some units under the bound, some far over it
    grads = [torch.randn(s, generator=gen) * k for s, k in zip(shapes, scales)]
    grads[0][2] = 0.0  # a zero gradient row: the 1e-6 floor keeps it finite
    return params, grads


@pytest.mark.parametrize("clip_factor,eps", [(0.01, 1e-3), (0.16, 1e-3), (0.5, 0.1)])
def test_matches_the_formula(clip_factor, eps):
    params, grads = _tensors(0)
    expected = [_reference(w.numpy(), g.numpy(), clip_factor, eps) for w, g in zip(params, grads)]
    clipped = adaptive_clip_grads_(params, grads, clip_factor, eps)
    for (exp, _), g in zip(expected, grads):
        np.testing.assert_allclose(g.numpy(), exp, rtol=2e-6, atol=1e-12)
    assert int(clipped) == sum(n for _, n in expected) > 0


def test_zero_unit_moves_by_eps_and_bound_holds_and_twice_changes_nothing():
    params, grads = _tensors(1)
    adaptive_clip_grads_(params, grads, 0.01, 1e-3)
    for w, g in zip(params, grads):
        bound = unitwise_norm(w).clamp(min=1e-3) * 0.01
        assert (unitwise_norm(g) <= bound * (1 + 1e-5)).all()
    assert unitwise_norm(grads[4])[1].item() == pytest.approx(0.01 * 1e-3, rel=1e-5)  # zero weights: eps floor
    again = [g.clone() for g in grads]
    adaptive_clip_grads_(params, again, 0.01, 1e-3)  # units at the bound may be "clipped" again by a rounding
    for a, b in zip(again, grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0)


def test_precomputed_whole_tensor_norms_are_reused_for_vectors_and_scalars():
    params, grads = _tensors(2)
    copies = [g.clone() for g in grads]
    adaptive_clip_grads_(params, grads, 0.05, 1e-3)
    norms = [torch.linalg.vector_norm(g) if g.ndim <= 1 else None for g in copies]
    adaptive_clip_grads_(params, copies, 0.05, 1e-3, grad_norms=norms)
    for a, b in zip(copies, grads):
        assert torch.equal(a, b)


def test_unitwise_norm_shapes():
    assert unitwise_norm(torch.ones(4, 3, 2)).shape == (4, 1, 1)
    assert unitwise_norm(torch.ones(5)).shape == ()
    assert unitwise_norm(torch.ones(4, 3, 2, dtype=torch.bfloat16)).dtype == torch.float32
    with pytest.raises(ValueError, match="as many parameters as gradients"):
        adaptive_clip_grads_([torch.ones(2)], [], 0.01, 1e-3)
