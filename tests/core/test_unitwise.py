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


def _timm_reference(params: list[torch.Tensor], grads: list[torch.Tensor], clip_factor: float, eps: float) -> None:
    """timm's ``adaptive_clip_grad`` (timm/utils/agc.py) as it reads: norms in the tensors' own dtype, a unit
    below its bound kept, every other unit scaled by ``bound / max(||g||, 1e-6)``."""
    def norm(x: torch.Tensor) -> torch.Tensor:
        return x.norm(2.0) if x.ndim <= 1 else x.norm(2.0, dim=tuple(range(1, x.ndim)), keepdim=True)

    for w, g in zip(params, grads):
        max_norm = norm(w.detach()).clamp_(min=eps).mul_(clip_factor)
        grad_norm = norm(g.detach())
        clipped = g.detach() * (max_norm / grad_norm.clamp(min=1e-6))
        g.copy_(torch.where(grad_norm < max_norm, g.detach(), clipped))


def _random_model(seed: int, dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Weights and gradients of random shapes, with zero and tiny units, units far within and far over their bound."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(8, 5), (6, 3, 2, 2), (9,), (), (4, 7), (3, 1), (1,)]
    params, grads = [], []
    for shape in shapes:
        w = torch.randn(shape, generator=gen, dtype=torch.float64) * 10 ** float(torch.empty(()).uniform_(-3, 1,
                                                                                                        generator=gen))
        g = torch.randn(shape, generator=gen, dtype=torch.float64) * 10 ** float(torch.empty(()).uniform_(-9, 1,
                                                                                                        generator=gen))
        if len(shape) >= 1 and shape[0] > 1:
            w[0] = 0.0  # a zero-weight unit: bound = clip_factor * eps
            g[-1] = 2e-8  # a tiny gradient unit: ||g|| under the 1e-6 floor
        params.append(w.to(dtype))
        grads.append(g.to(dtype))
    return params, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("clip_factor,eps", [(0.01, 1e-3), (0.02, 1e-3), (0.04, 1e-3), (0.08, 1e-3), (0.16, 1e-3),
                                             (1e-4, 1e-4), (0.5, 1e-9), (1e-3, 1e-6)])
def test_bitwise_equal_to_timm_on_random_models(dtype, clip_factor, eps):
    for seed in range(25):
        params, grads = _random_model(seed, dtype)
        expected = [g.clone() for g in grads]
        _timm_reference(params, expected, clip_factor, eps)
        adaptive_clip_grads_(params, grads, clip_factor, eps)
        for got, want in zip(grads, expected):
            assert got.dtype == dtype and torch.equal(got, want), (seed, got, want)


def test_a_unit_within_its_bound_is_left_alone_even_below_the_gradient_floor():
    # bound = 0.1 * 1e-6 = 1e-7 (zero weights), ||g|| = 2e-8 < bound; the 1e-6 floor alone would scale it by 0.1
    w, g = torch.zeros(1, 3), torch.tensor([[2e-8, 0.0, 0.0]])
    clipped = adaptive_clip_grads_([w], [g], 0.1, 1e-6)
    assert torch.equal(g, torch.tensor([[2e-8, 0.0, 0.0]])) and int(clipped) == 0
    over = torch.tensor([[3e-7, 0.0, 0.0]])  # over the bound: scaled by bound / max(||g||, 1e-6), as in the paper
    assert int(adaptive_clip_grads_([w], [over], 0.1, 1e-6)) == 1
    assert over[0, 0].item() == pytest.approx(3e-7 * 1e-7 / 1e-6, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gradients_are_clipped_with_float32_norms(dtype):
    params, grads = _random_model(3, dtype)
    expected = []
    for w, g in zip(params, grads):  # the float32 computation, cast back to the tensor's dtype
        w32, g32 = w.float(), g.float()
        bound = unitwise_norm(w32).clamp(min=1e-3) * 0.05
        gn = unitwise_norm(g32)
        factor = torch.where(gn < bound, torch.ones_like(gn), bound / gn.clamp(min=1e-6))
        expected.append(g * factor.to(dtype))
    adaptive_clip_grads_(params, grads, 0.05, 1e-3)
    for got, want in zip(grads, expected):
        assert got.dtype == dtype and torch.equal(got, want)


def test_float64_norms_are_float64():
    assert unitwise_norm(torch.ones(3, 2, dtype=torch.float64)).dtype == torch.float64
    assert unitwise_norm(torch.ones(3, dtype=torch.float64)).dtype == torch.float64
