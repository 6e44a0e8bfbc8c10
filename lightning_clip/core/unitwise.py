"""Unit-wise adaptive gradient clipping (AGC, Brock et al. 2021, "High-Performance Large-Scale Image
Recognition Without Normalization"). Pure torch, in place, no host-device synchronisation.

A *unit* is one output unit of a parameter: a row along dim 0 (a ``Linear`` weight's output feature, a
convolution's output channel), or the whole tensor for 0-d and 1-d parameters (biases, gains). Each
unit's gradient ``g`` is scaled by ``min(1, clip_factor * max(||w||, eps) / max(||g||, 1e-6))``, where
``w`` is the unit's weights: its gradient norm is at most ``clip_factor`` times its weight norm.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["GRAD_FLOOR", "adaptive_clip_grads_", "unitwise_norm"]

#: The floor of a unit's gradient norm in the denominator (the paper's 1e-6).
GRAD_FLOOR = 1e-6


def unitwise_norm(x: Tensor) -> Tensor:
    """The L2 norm of each unit of ``x`` in fp32: shape ``[rows, 1, ..., 1]`` for ``x.ndim >= 2``
    (norm over every dim but 0), a 0-d tensor for 0-d and 1-d ``x`` (the whole tensor)."""
    if x.ndim <= 1:
        return torch.linalg.vector_norm(x, 2.0, dtype=torch.float32)
    return torch.linalg.vector_norm(x, 2.0, dim=tuple(range(1, x.ndim)), keepdim=True, dtype=torch.float32)


@torch.no_grad()
def adaptive_clip_grads_(params: Sequence[Tensor], grads: Sequence[Tensor], clip_factor: float, eps: float,
                         grad_norms: Sequence[Tensor | None] | None = None) -> Tensor:
    """Clip each unit of ``grads`` in place to ``clip_factor`` times its weights' norm (floored at ``eps``).

    Args:
        params: the parameters (weights ``w``), in the order of ``grads``.
        grads: their gradients, scaled in place.
        clip_factor: positive ratio of a unit's gradient norm to its weight norm allowed.
        eps: positive floor of a unit's weight norm (so zero-initialised units can move).
        grad_norms: optional precomputed whole-tensor gradient norms (0-d, fp32) reused for 0-d and 1-d
            gradients, whose one unit is the whole tensor; ``None`` entries are measured here.

    Returns:
        0-d int64 tensor on the first gradient's device: the number of units clipped.
    """
    if len(params) != len(grads):
        raise ValueError(f"Expected as many parameters as gradients but got {len(params)} and {len(grads)}")
    device = grads[0].device if len(grads) else torch.device("cpu")
    clipped = torch.zeros((), dtype=torch.long, device=device)
    for i, (w, g) in enumerate(zip(params, grads)):
        known = None if grad_norms is None else grad_norms[i]
        g_norm = known.to(g.device, torch.float32) if known is not None and g.ndim <= 1 else unitwise_norm(g)
        max_norm = unitwise_norm(w.detach()).clamp(min=eps) * clip_factor
        ratio = max_norm / g_norm.clamp(min=GRAD_FLOOR)
        coef = ratio.clamp(max=1.0)
        g.mul_(coef.to(g.dtype))
        clipped += (ratio < 1.0).sum().to(device)
    return clipped
