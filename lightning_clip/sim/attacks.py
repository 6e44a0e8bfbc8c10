"""Byzantine vectors for simulations and tests (pure torch, deterministic given a generator or seed).

Each attack returns the vector a Byzantine worker sends instead of its honest one. Attacks that
only need the worker's own vector take ``own`` (any shape; the result has the same shape, dtype
and device). The omniscient attacks (``alie``, ``foe``, ``ipm``) take the honest workers' vectors
``honest`` of shape ``[h, d]`` and return ``[d]``.

============= ============================= =================================================
name          function                      Byzantine vector
============= ============================= =================================================
``sign_flip`` :func:`sign_flip`             ``-own``
``scale``     :func:`scale`                 ``factor * own``
``gaussian``  :func:`gaussian`              ``N(mean, std^2)`` noise shaped like ``own``
``nan``       :func:`nan_attack`            all NaN
``inf``       :func:`inf_attack`            all +Inf
``zero``      :func:`zero`                  all zeros
``alie``      :func:`alie`                  ``mean(honest) - z * std(honest)`` per coordinate
                                            (``z`` of either sign; population or sample std)
``foe``       :func:`foe`                   ``-eps * mean(honest)``, ``eps = 10`` (large: FOE;
                                            ``eps`` of either sign)
``ipm``       :func:`ipm`                   ``-eps * mean(honest)``, ``eps = 0.1`` (small: IPM)
============= ============================= =================================================

The adaptive attacks (mimic, line-searched FOE and ALIE) are in :mod:`lightning_clip.sim.adaptive`;
:class:`~lightning_clip.sim.byzantine.ByzantineSpec` says which ranks send what. Data-level attacks
(label flipping, gradient ascent on the negated loss) corrupt the gradient itself, not the vector
sent; they are switches of :class:`~lightning_clip.tools.demo.DigitsClassifier` (``label_flip``,
``gradient_ascent`` with ``byzantine_ranks``), keyed on the module's ``global_rank``.
:func:`fixed_clip_defence` clips known-Byzantine vectors to a fixed norm (a baseline for ARC).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_clip.core.functional import clip_coefficient
from lightning_clip.exceptions import check_finite_float, check_positive_float
from lightning_clip.robust.checks import check_floating, check_matrix, compute_dtype

__all__ = [
    "ATTACKS",
    "FIXED_CLIP_MAX_NORM",
    "FOE_EPS",
    "GAUSSIAN_STD",
    "IPM_EPS",
    "STD_CORRECTIONS",
    "alie",
    "alie_z",
    "check_correction",
    "fixed_clip_defence",
    "foe",
    "gaussian",
    "honest_std",
    "inf_attack",
    "ipm",
    "nan_attack",
    "scale",
    "sign_flip",
    "zero",
]

#: Default attack factor of :func:`foe` (Fall of Empires, large epsilon: a big reversed mean).
FOE_EPS = 10.0
#: Default attack factor of :func:`ipm` (inner product manipulation, small epsilon).
IPM_EPS = 0.1
#: Default standard deviation of :func:`gaussian` (the Gaussian Byzantine vectors of Blanchard et al. 2017).
GAUSSIAN_STD = 200.0
#: Default norm bound of :func:`fixed_clip_defence`.
FIXED_CLIP_MAX_NORM = 2.0
#: The standard deviations :func:`alie` can use: ``0`` the population one, ``1`` the sample one (Bessel).
STD_CORRECTIONS = (0, 1)


def _honest(honest: Tensor) -> Tensor:
    return check_matrix("honest", honest)


def sign_flip(own: Tensor) -> Tensor:
    """Return ``-own``."""
    return -check_floating("own", own)


def scale(own: Tensor, factor: float) -> Tensor:
    """Return ``factor * own`` (``factor`` finite, any sign)."""
    factor = check_finite_float("factor", factor)
    return check_floating("own", own) * factor


def gaussian(
    own: Tensor,
    std: float = GAUSSIAN_STD,
    generator: torch.Generator | int | None = None,
    mean: float = 0.0,
) -> Tensor:
    """Return Gaussian noise ``N(mean, std^2)`` shaped like ``own`` (``own``'s values are ignored).

    Args:
        own: The worker's own vector; gives the shape, dtype and device.
        std: Standard deviation (positive).
        generator: A ``torch.Generator`` (samples are drawn on its device, then moved), an int seed
            (a fresh CPU generator seeded with it), or ``None`` for torch's global generator.
        mean: Mean of every coordinate (finite).
    """
    own = check_floating("own", own)
    std = check_positive_float("std", std)
    mean = check_finite_float("mean", mean)
    cdt = compute_dtype(own.dtype)
    if isinstance(generator, int) and not isinstance(generator, bool):
        generator = torch.Generator().manual_seed(generator)
    if generator is None:
        noise = torch.randn(own.shape, dtype=cdt, device=own.device)
    elif isinstance(generator, torch.Generator):
        noise = torch.randn(own.shape, dtype=cdt, device=generator.device, generator=generator)
    else:
        raise TypeError(
            f"Expected argument `generator` to be a torch.Generator, an int seed or None but got {generator!r}"
        )
    return (noise * std + mean).to(device=own.device, dtype=own.dtype)


def nan_attack(own: Tensor) -> Tensor:
    """Return a vector shaped like ``own`` filled with NaN."""
    return torch.full_like(check_floating("own", own), float("nan"))


def inf_attack(own: Tensor) -> Tensor:
    """Return a vector shaped like ``own`` filled with +Inf."""
    return torch.full_like(check_floating("own", own), float("inf"))


def zero(own: Tensor) -> Tensor:
    """Return a vector of zeros shaped like ``own``."""
    return torch.zeros_like(check_floating("own", own))


def alie_z(n: int, num_byzantine: int) -> float:
    """Return ALIE's default ``z = Phi^{-1}((n - s) / n)`` with ``s = floor(n/2 + 1) - f``.

    ``Phi^{-1}`` is the standard normal quantile, computed as ``sqrt(2) * erfinv(2p - 1)``
    (Baruch et al. 2019, "A Little Is Enough").

    Args:
        n: Total number of workers, honest and Byzantine.
        num_byzantine: Number ``f`` of Byzantine workers.

    Raises:
        ValueError: If ``s`` is outside ``[1, n - 1]`` (the quantile would be infinite).
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"Expected argument `n` to be a positive integer but got {n!r}")
    if not isinstance(num_byzantine, int) or isinstance(num_byzantine, bool) or num_byzantine < 0:
        raise ValueError(f"Expected argument `num_byzantine` to be a non-negative integer but got {num_byzantine!r}")
    s = n // 2 + 1 - num_byzantine
    if not 1 <= s <= n - 1:
        raise ValueError(
            f"Expected ALIE's s = floor(n/2 + 1) - num_byzantine to satisfy 1 <= s <= n - 1 = {n - 1} "
            f"(n = {n}, num_byzantine = {num_byzantine}) but got s = {s}; pass `z` explicitly instead"
        )
    p = (n - s) / n
    return float(torch.erfinv(torch.tensor(2.0 * p - 1.0, dtype=torch.float64))) * math.sqrt(2.0)


def check_correction(correction: Any) -> int:
    """Return ``correction`` or raise naming it unless it is one of :data:`STD_CORRECTIONS`."""
    if isinstance(correction, bool) or correction not in STD_CORRECTIONS:
        raise ValueError(
            f"Expected argument `correction` to be 0 (population std) or 1 (sample std) but got {correction!r}"
        )
    return int(correction)


def honest_std(honest: Tensor, correction: int = 0) -> Tensor:
    """Return the coordinate-wise standard deviation of ``honest [h, d]`` in its compute dtype.

    ``sqrt(var)`` with ``correction = 0`` (population) or ``1`` (sample: needs ``h >= 2``).
    """
    hc = _honest(honest)
    correction = check_correction(correction)
    if correction > hc.shape[0] - 1:
        raise ValueError(
            f"Expected at least 2 honest rows for the sample std (correction = 1) but got {hc.shape[0]}"
        )
    return hc.var(dim=0, correction=correction).sqrt()


def alie(
    honest: Tensor, num_byzantine: int | None = None, z: float | None = None, correction: int = 0
) -> Tensor:
    """Return "A Little Is Enough": ``mean(honest) - z * std(honest)`` coordinate-wise.

    ``z`` may have either sign: ``z = -tau`` with ``correction = 1`` is ``mean + tau * std`` with the
    sample std, the convention of some libraries (e.g. ByzFL's ``ALittleIsEnough(tau)``).

    Args:
        honest: The honest workers' vectors ``[h, d]``.
        num_byzantine: Number ``f`` of Byzantine workers; with ``z`` unset it gives the default
            ``z = alie_z(h + f, f)``.
        z: The number of standard deviations (finite, any sign); overrides the default.
        correction: ``0``: the population std (one honest row is enough); ``1``: the sample std
            (``h >= 2``).

    Raises:
        ValueError: If neither ``num_byzantine`` nor ``z`` is given.
    """
    hc = _honest(honest)
    if z is None:
        if num_byzantine is None:
            raise ValueError("Expected argument `num_byzantine` or `z` to be given to `alie` but got neither")
        z = alie_z(hc.shape[0] + num_byzantine, num_byzantine)
    z = check_finite_float("z", z)
    out = hc.mean(dim=0) - z * honest_std(hc, correction)
    return out.to(honest.dtype)


def foe(honest: Tensor, eps: float = FOE_EPS) -> Tensor:
    """Return "Fall of Empires" with a large factor: ``-eps * mean(honest)``.

    ``eps`` is finite, of either sign (a negative one sends a positive multiple of the honest mean);
    ``foe(honest, tau)`` is ByzFL's ``InnerProductManipulation(tau)``.
    """
    hc = _honest(honest)
    eps = check_finite_float("eps", eps)
    return (-eps * hc.mean(dim=0)).to(honest.dtype)


def ipm(honest: Tensor, eps: float = IPM_EPS) -> Tensor:
    """Return inner product manipulation with a small factor: ``-eps * mean(honest)`` (``eps`` positive)."""
    return foe(honest, eps=check_positive_float("eps", eps))


def fixed_clip_defence(own: Tensor, max_norm: float = FIXED_CLIP_MAX_NORM) -> Tensor:
    """Return ``own`` clipped to L2 norm ``max_norm``: ``own * min(1, max_norm / (||own|| + 1e-6))``.

    A baseline in which only the Byzantine workers' vectors are clipped, each to an absolute bound
    (honest vectors never are), as ``torch.nn.utils.clip_grad_norm_(params, max_norm)`` applied on the
    attackers alone. It is not a defence one can deploy (it needs to know who is Byzantine), and like
    torch's function it does not neutralise NaN/Inf (a non-finite input gives NaN). The norm is taken
    in float32 (float64 for float64).

    Args:
        own: The Byzantine worker's vector (any shape).
        max_norm: The norm bound (positive).
    """
    own = check_floating("own", own)
    max_norm = check_positive_float("max_norm", max_norm)
    cdt = compute_dtype(own.dtype)
    norm = torch.linalg.vector_norm(own, dtype=cdt)
    return (own.to(cdt) * clip_coefficient(max_norm, norm)).to(own.dtype)


#: Attacks by name (the names :class:`ByzantineSpec` and YAML configs use).
ATTACKS: dict[str, Callable[..., Tensor]] = {
    "sign_flip": sign_flip,
    "scale": scale,
    "gaussian": gaussian,
    "nan": nan_attack,
    "inf": inf_attack,
    "zero": zero,
    "alie": alie,
    "foe": foe,
    "ipm": ipm,
}
