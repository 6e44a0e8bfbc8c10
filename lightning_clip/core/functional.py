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

__all__ = [
    "clip_coefficient",
    "clip_grads_by_value_",
    "clip_grads_with_norm_",
    "geometric_quantile_update",
    "scale_grads_",
]

#: The epsilon torch and Lightning add to the total norm before dividing.
EPS = 1e-6


def clip_coefficient(threshold: Tensor | float, total_norm: Tensor) -> Tensor:
    """Return ``min(1, threshold / (total_norm + 1e-6))`` as a 0-d tensor.

    Evaluated as ``reciprocal(total_norm + 1e-6) * threshold``, which is how torch evaluates
    ``max_norm / (total_norm + 1e-6)`` for a Python ``max_norm``, so results match it bit for bit.
    """
    return torch.clamp((total_norm + EPS).reciprocal() * threshold, max=1.0)


def geometric_quantile_update(threshold: Tensor, below: Tensor | float, quantile: float,
                              learning_rate: float) -> Tensor:
    """Return ``threshold * exp(-learning_rate * (below - quantile))``: one step of the geometric quantile tracker.

    ``below`` is the fraction of norms at or under ``threshold`` (an indicator ``1[norm <= threshold]``
    for one norm, or a noisy clipped count divided by the number of clients, as in Andrew et al. 2021,
    "Differentially Private Learning with Adaptive Clipping"). The threshold then drifts towards the
    ``quantile`` of the norms: it shrinks while more than that fraction is under it and grows otherwise.
    Pure and on the device: callers decide what to do with a non-finite norm before calling.
    """
    step = torch.as_tensor(below, dtype=threshold.dtype, device=threshold.device) - quantile
    return threshold * torch.exp(step * -learning_rate)


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
    """Clamp every gradient entry in place to ``[-threshold, threshold]``.

    A float ``threshold`` gives exactly ``torch.nn.utils.clip_grad_value_`` (one foreach pass per
    device and dtype). So does a 0-d ``threshold`` tensor on the CPU, whose value is read for free.
    A ``threshold`` tensor anywhere else is never read on the host: each gradient is clamped
    against it on its device (one kernel per gradient, no host-device synchronisation).
    """
    if isinstance(threshold, Tensor):
        if threshold.device.type != "cpu":
            for (device, dtype), tensors in _grouped(grads).items():
                _clamp_by_tensor_(tensors, threshold.to(device, dtype))
            return
        threshold = float(threshold)
    for tensors in _grouped(grads).values():
        torch._foreach_clamp_min_(tensors, -threshold)
        torch._foreach_clamp_max_(tensors, threshold)


def _clamp_by_tensor_(tensors: Sequence[Tensor], bound: Tensor) -> None:
    # torch's foreach clamps take Python scalars only (a tensor would be read on the host).
    low = -bound
    for t in tensors:
        torch.clamp_(t, min=low, max=bound)
