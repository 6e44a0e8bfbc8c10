"""Pure clipping primitives (torch only). Trailing underscore = in place.

Measuring is split from scaling, as in :mod:`torch.nn.utils.clip_grad`: the caller measures once
(:func:`lightning_clip.core.grads.gradient_stats`) and hands the total norm in. The scale coefficient is
clamped, never branched on, so nothing here synchronises the host with the device.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["clip_coefficient", "clip_grads_by_value_", "clip_grads_with_norm_", "scale_grads_"]

#: The epsilon torch and Lightning add to the total norm before dividing.
EPS = 1e-6


def clip_coefficient(threshold: Tensor | float, total_norm: Tensor) -> Tensor:
    """Return ``min(1, threshold / (total_norm + 1e-6))`` as a 0-d tensor.

    Evaluated as ``reciprocal(total_norm + 1e-6) * threshold``, which is how torch evaluates
    ``max_norm / (total_norm + 1e-6)`` for a Python ``max_norm``, so results match it bit for bit.
    """
    return torch.clamp((total_norm + EPS).reciprocal() * threshold, max=1.0)


def _grouped(grads: Sequence[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[Tensor]]:
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = defaultdict(list)
    for g in grads:
        groups[(g.device, g.dtype)].append(g)
    return groups


@torch.no_grad()
def scale_grads_(grads: Sequence[Tensor], coef: Tensor) -> None:
    """Multiply every tensor of ``grads`` in place by the 0-d tensor ``coef`` (one foreach pass)."""
    for (device, _), tensors in _grouped(grads).items():
        torch._foreach_mul_(tensors, coef.to(device))


@torch.no_grad()
def clip_grads_with_norm_(grads: Sequence[Tensor], threshold: Tensor | float, total_norm: Tensor) -> Tensor:
    """Scale ``grads`` so that their total norm is at most ``threshold``; return the coefficient used.

    Identical to ``torch.nn.utils.clip_grads_with_norm_`` for a float ``threshold``; a tensor
    ``threshold`` (adaptive policies) keeps the whole computation on the device.
    """
    coef = clip_coefficient(threshold, total_norm)
    if len(grads):
        scale_grads_(grads, coef)
    return coef


@torch.no_grad()
def clip_grads_by_value_(grads: Sequence[Tensor], threshold: Tensor | float) -> None:
    """Clamp every gradient entry in place to ``[-threshold, threshold]``."""
    if isinstance(threshold, Tensor):
        for (device, dtype), tensors in _grouped(grads).items():
            t = threshold.to(device, dtype)
            torch._foreach_clamp_min_(tensors, -t)
            torch._foreach_clamp_max_(tensors, t)
        return
    for tensors in _grouped(grads).values():
        torch._foreach_clamp_min_(tensors, -threshold)
        torch._foreach_clamp_max_(tensors, threshold)
