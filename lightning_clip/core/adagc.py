"""Per-tensor adaptive gradient clipping (AdaGC: Wang et al. 2025, "AdaGC: Improving Training Stability for
Large Language Model Pretraining", arXiv 2502.11034). Pure torch, no host-device synchronisation.

Each gradient tensor ``i`` keeps ``gamma_i``, an EMA of its own *clipped* norms. During the first
``warmup_steps`` steps every gradient is clipped globally, ``h = min(1, absolute / ||g||)`` on the total norm,
and ``gamma_i`` starts at the first clipped norm and then takes the minimum with each new one. Afterwards
each tensor is clipped relative to its own history, ``h_i = min(1, relative * gamma_i / ||g_i||)``, and
``gamma_i <- beta * gamma_i + (1 - beta) * h_i * ||g_i||``. A step whose total norm is NaN or Inf leaves
``gamma`` unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_clip.core.functional import EPS, clip_coefficient

__all__ = ["adagc_coefficients"]


def adagc_coefficients(norms: Tensor, total_norm: Tensor, gamma: Tensor, step: int, *, warmup_steps: int,
                       absolute: float, relative: float, beta: float) -> tuple[Tensor, Tensor]:
    """One AdaGC step: the per-tensor scale coefficients and the new ``gamma``.

    Args:
        norms: 1-D fp32 per-tensor gradient norms (the shared gradient pass's).
        total_norm: 0-d total norm of the same gradients.
        gamma: the per-tensor EMA of clipped norms, ``+inf`` where not set yet (at the start). A tensor
            whose ``gamma`` is still unset after warmup (no finite warmup step) keeps being clipped globally.
        step: 0-based index of this step.
        warmup_steps: steps of global clipping at ``absolute``.
        absolute: global threshold during warmup.
        relative: allowed ratio of a tensor's norm to its ``gamma`` after warmup.
        beta: EMA factor of ``gamma``.

    Returns:
        ``(coefficients [k], new_gamma [k])``, fp32, on ``norms``' device.
    """
    norms = norms.float()
    global_coef = clip_coefficient(absolute, total_norm.float()).expand_as(norms)
    if step < warmup_steps:
        coef = global_coef
        new_gamma = torch.minimum(gamma, norms * coef)
    else:
        unset = torch.isinf(gamma)
        relative_coef = (norms.clamp(min=EPS).reciprocal() * (gamma * relative)).clamp(max=1.0)
        coef = torch.where(unset, global_coef, relative_coef)
        clipped = norms * coef
        new_gamma = torch.where(unset, torch.minimum(gamma, clipped), gamma * beta + clipped * (1.0 - beta))
    return coef, torch.where(torch.isfinite(total_norm), new_gamma, gamma)
