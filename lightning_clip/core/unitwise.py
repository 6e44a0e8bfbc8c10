"""Unit-wise adaptive gradient clipping (AGC, Brock et al. 2021, "High-Performance Large-Scale Image
Recognition Without Normalization"). Pure torch, in place, no host-device synchronisation.

A *unit* is one output unit of a parameter: a row along dim 0 (a ``Linear`` weight's output feature, a
convolution's output channel), or the whole tensor for 0-d and 1-d parameters (biases, gains). With
``bound = clip_factor * max(||w||, eps)``, where ``w`` is the unit's weights, a unit whose gradient norm is
below its bound is left alone, and any other unit's gradient ``g`` is scaled by ``bound / max(||g||, 1e-6)``:
its norm is then at most the bound. This is timm's ``adaptive_clip_grad`` bit for bit in float32 and
float64 (the norms are taken in the gradient's dtype there). For float16 and bfloat16 tensors the norms and
the factor are computed in float32, where timm rounds the norms to the tensor's 8- or 11-bit mantissa (a
relative error up to 0.4% that can flip the decision for a unit near its bound).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["GRAD_FLOOR", "adaptive_clip_grads_", "norm_dtype", "unitwise_norm"]

#: The floor of a unit's gradient norm in the denominator (the paper's 1e-6).
GRAD_FLOOR = 1e-6


def norm_dtype(x: Tensor) -> torch.dtype:
    """The dtype unit norms of ``x`` are computed in: float64 for float64 tensors, float32 otherwise."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def unitwise_norm(x: Tensor) -> Tensor:
    """The L2 norm of each unit of ``x`` in :func:`norm_dtype`: shape ``[rows, 1, ..., 1]`` for ``x.ndim >= 2``
    (norm over every dim but 0), a 0-d tensor for 0-d and 1-d ``x`` (the whole tensor)."""
    if x.ndim <= 1:
        return torch.linalg.vector_norm(x, 2.0, dtype=norm_dtype(x))
    return torch.linalg.vector_norm(x, 2.0, dim=tuple(range(1, x.ndim)), keepdim=True, dtype=norm_dtype(x))


@torch.no_grad()
def adaptive_clip_grads_(params: Sequence[Tensor], grads: Sequence[Tensor], clip_factor: float, eps: float,
                         grad_norms: Sequence[Tensor | None] | None = None) -> Tensor:
    """Clip each unit of ``grads`` in place to ``clip_factor`` times its weights' norm (floored at ``eps``).

    A unit whose gradient norm is below that bound is left unchanged (whatever ``eps`` and ``clip_factor``).

    Args:
        params: the parameters (weights ``w``), in the order of ``grads``.
        grads: their gradients, scaled in place.
        clip_factor: positive ratio of a unit's gradient norm to its weight norm allowed.
        eps: positive floor of a unit's weight norm (so zero-initialised units can move).
        grad_norms: optional precomputed whole-tensor gradient norms (0-d) reused for 0-d and 1-d gradients,
            whose one unit is the whole tensor, where their dtype is :func:`norm_dtype` of the gradient;
            ``None`` entries (and norms of another dtype) are measured here.

    Returns:
        0-d int64 tensor on the first gradient's device: the number of units scaled down.
    """
    if len(params) != len(grads):
        raise ValueError(f"Expected as many parameters as gradients but got {len(params)} and {len(grads)}")
    device = grads[0].device if len(grads) else torch.device("cpu")
    clipped = torch.zeros((), dtype=torch.long, device=device)
    for i, (w, g) in enumerate(zip(params, grads)):
        known = None if grad_norms is None else grad_norms[i]
        dtype = norm_dtype(g)
        reuse = known is not None and g.ndim <= 1 and known.dtype == dtype  # a float32 norm of float64 is too coarse
        g_norm = known.to(g.device) if known is not None and reuse else unitwise_norm(g)
        max_norm = unitwise_norm(w.detach()).to(dtype).clamp(min=eps) * clip_factor
        ratio = max_norm / g_norm.clamp(min=GRAD_FLOOR)
        within = g_norm < max_norm  # left alone, even where the floor of ||g|| makes ratio < 1
        g.mul_(torch.where(within, torch.ones_like(ratio), ratio).to(g.dtype))
        clipped += (~within & ~(ratio >= 1.0)).sum().to(device)
    return clipped
