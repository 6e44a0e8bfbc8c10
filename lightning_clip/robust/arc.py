"""Adaptive Robust Clipping (ARC, arXiv 2405.14432) on norms ``[n]`` and on stacked vectors ``[n, d]``.

Pure torch. Given ``n`` vectors of which at most ``f = num_byzantine`` may be Byzantine, ARC clips
the ``k = floor(2 f (n - f) / n)`` vectors of largest L2 norm to the norm of the ``(k+1)``-th
largest one and leaves the others untouched. Everything except ``k`` (a Python int computed from
the shapes) stays a tensor on the input's device: no ``.item()``, no branching on values.

Edge cases, all decided here once:

* **Non-finite norms** (NaN, +Inf, -Inf) rank above every finite norm and always get scale ``0``:
  a non-finite vector is never passed through, even when ``k = 0``. :func:`arc_clip` zeroes such
  rows explicitly (``NaN * 0`` is NaN). A row of finite entries whose norm overflows the compute
  dtype is treated the same way.
* **Ties** with the threshold: a vector whose norm equals the threshold gets scale exactly ``1``.
  With several equal largest norms the threshold equals them and nothing is clipped.
* **More than k non-finite norms**: the ``(k+1)``-th largest is then non-finite, so the threshold
  falls back to the largest *finite* norm (``0`` when there is none). The non-finite vectors get
  scale ``0`` and every finite vector keeps scale ``1`` -- the same outcome as "clip the top k"
  with the non-finite ones counted as largest. The threshold is always finite.
* ``k = 0`` (``num_byzantine = 0``, or ``n`` too small): the threshold is the largest finite norm
  and every finite vector has scale ``1``.
* A vector of norm ``0`` has scale ``1``.

Norms and scales are computed in float32, or in float64 for float64 inputs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from lightning_clip.exceptions import check_non_negative_int, check_positive_int
from lightning_clip.robust.checks import check_floating, check_norms, compute_dtype

__all__ = [
    "ARCStats",
    "arc_clip",
    "arc_num_clipped",
    "arc_scales",
    "arc_stats",
    "arc_threshold",
    "check_num_byzantine",
    "scale_rows",
]


class ARCStats(NamedTuple):
    """What ARC did to one set of ``n`` norms (all tensors on the norms' device).

    Attributes:
        norms: The input norms ``[n]`` in the compute dtype (float32, or float64).
        threshold: 0-d clipping threshold (always finite).
        scales: Scale factors ``[n]`` in ``[0, 1]``.
        clipped: Boolean ``[n]``: ``True`` where the scale is below 1 (clipped or non-finite).
        num_clipped: ``k``, the number of vectors ARC is allowed to clip (a Python int).
    """

    norms: Tensor
    threshold: Tensor
    scales: Tensor
    clipped: Tensor
    num_clipped: int


def check_num_byzantine(n: int, num_byzantine: int) -> int:
    """Return ``num_byzantine`` or raise unless it is an integer with ``0 <= num_byzantine < n/2``.

    Args:
        n: Total number of vectors (workers), at least 1.
        num_byzantine: Number ``f`` of possibly Byzantine vectors.

    Raises:
        TypeError: If ``n`` or ``num_byzantine`` is not an integer.
        ValueError: If ``n < 1`` or ``num_byzantine`` is outside ``[0, n/2)``.
    """
    check_positive_int("n", n)
    check_non_negative_int("num_byzantine", num_byzantine)
    if 2 * num_byzantine >= n:
        raise ValueError(
            f"Expected argument `num_byzantine` to satisfy 0 <= num_byzantine < n/2 = {n / 2} "
            f"but got {num_byzantine}"
        )
    return num_byzantine


def arc_num_clipped(n: int, num_byzantine: int) -> int:
    """Return ``k = floor(2 f (n - f) / n)``, the number of vectors ARC clips, in exact integer arithmetic.

    Args:
        n: Total number of vectors (workers), at least 1.
        num_byzantine: Number ``f`` of possibly Byzantine vectors, ``0 <= f < n/2``.

    Raises:
        TypeError: If an argument is not an integer.
        ValueError: If ``n < 1`` or ``num_byzantine`` is outside ``[0, n/2)``.
    """
    f = check_num_byzantine(n, num_byzantine)
    return (2 * f * (n - f)) // n


def _threshold(x: Tensor, finite: Tensor, k: int) -> Tensor:
    """Threshold for norms ``x`` (compute dtype) with finiteness mask ``finite``; see the module notes."""
    largest_finite = torch.where(finite, x, torch.zeros_like(x)).amax()
    if k == 0:
        return largest_finite
    key = torch.where(finite, x, torch.full_like(x, float("inf")))
    candidate = torch.topk(key, k + 1, sorted=True).values[k]
    return torch.where(torch.isfinite(candidate), candidate, largest_finite)


def _scales(x: Tensor, finite: Tensor, threshold: Tensor) -> Tensor:
    clip = finite & (x > threshold)
    ratio = threshold / torch.where(clip, x, torch.ones_like(x))
    scales = torch.where(clip, ratio, torch.ones_like(x))
    return torch.where(finite, scales, torch.zeros_like(x))


def arc_threshold(norms: Tensor, num_byzantine: int) -> Tensor:
    """Return ARC's clipping threshold: the ``(k+1)``-th largest norm, non-finite norms ranking first.

    Args:
        norms: 1-D tensor ``[n]`` of per-vector L2 norms.
        num_byzantine: Number ``f`` of possibly Byzantine vectors, ``0 <= f < n/2``.

    Returns:
        A finite 0-d tensor (float32, or float64 for float64 norms) on the norms' device. When more
        than ``k`` norms are non-finite it is the largest finite norm (``0`` if none); when ``k = 0``
        it is the largest finite norm.
    """
    x = check_norms("norms", norms)
    k = arc_num_clipped(x.shape[0], num_byzantine)
    return _threshold(x, torch.isfinite(x), k)


def arc_scales(norms: Tensor, num_byzantine: int) -> Tensor:
    """Return ARC's scale factors: ``threshold / norm`` for the norms above the threshold, else 1.

    Args:
        norms: 1-D tensor ``[n]`` of per-vector L2 norms.
        num_byzantine: Number ``f`` of possibly Byzantine vectors, ``0 <= f < n/2``.

    Returns:
        Scale factors ``[n]`` in ``[0, 1]`` (float32, or float64 for float64 norms) on the norms'
        device. Non-finite norms get ``0``, norms equal to the threshold and zero norms get ``1``.
    """
    x = check_norms("norms", norms)
    finite = torch.isfinite(x)
    threshold = arc_threshold(x, num_byzantine)
    return _scales(x, finite, threshold)


def arc_stats(norms: Tensor, num_byzantine: int) -> ARCStats:
    """Return the norms, threshold, scales, clipped mask and ``k`` of ARC on ``norms`` in one pass.

    Args:
        norms: 1-D tensor ``[n]`` of per-vector L2 norms.
        num_byzantine: Number ``f`` of possibly Byzantine vectors, ``0 <= f < n/2``.
    """
    x = check_norms("norms", norms)
    k = arc_num_clipped(x.shape[0], num_byzantine)
    finite = torch.isfinite(x)
    threshold = _threshold(x, finite, k)
    scales = _scales(x, finite, threshold)
    return ARCStats(norms=x, threshold=threshold, scales=scales, clipped=scales < 1, num_clipped=k)


def scale_rows(x: Tensor, scales: Tensor, norms: Tensor | None = None) -> Tensor:
    """Return ``x [n, d]`` with row ``i`` multiplied by ``scales[i]``, in the compute dtype, then cast back.

    With ``norms`` given, rows whose norm is not finite are set to zero (``NaN * 0`` is NaN): the way
    ARC neutralises a non-finite vector. Without it, non-finite rows pass through scaled.
    """
    cdt = compute_dtype(x.dtype)
    scaled = x.to(cdt) * scales.to(cdt).unsqueeze(1)
    if norms is not None:
        scaled = torch.where(torch.isfinite(norms).unsqueeze(1), scaled, torch.zeros((), dtype=cdt, device=x.device))
    return scaled.to(x.dtype)


def arc_clip(vectors: Tensor, num_byzantine: int) -> Tensor:
    """Return a copy of ``vectors`` with ARC applied row-wise; the input is not modified.

    Args:
        vectors: Tensor ``[n, d]``, one vector per row (floating dtype).
        num_byzantine: Number ``f`` of possibly Byzantine rows, ``0 <= f < n/2``.

    Returns:
        Tensor ``[n, d]`` of the input's dtype and device. Rows with a non-finite entry (or whose
        norm overflows) are all zeros, so the result is always finite.
    """
    check_floating("vectors", vectors)
    if vectors.ndim != 2:
        raise ValueError(
            f"Expected argument `vectors` to be a 2-D tensor [n, d] but got shape {tuple(vectors.shape)}"
        )
    norms = torch.linalg.vector_norm(vectors, dim=1, dtype=compute_dtype(vectors.dtype))
    return scale_rows(vectors, arc_scales(norms, num_byzantine), norms)
