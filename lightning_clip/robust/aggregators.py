"""Robust aggregation rules on stacked vectors ``[n, d]`` (pure torch, deterministic).

Every rule takes ``x`` of shape ``[n, d]`` (one worker's vector per row) and ``num_byzantine``
(``f``, with ``0 <= f < n/2``; ignored by the rules that do not need it) and returns the aggregate
``[d]`` in the dtype of ``x``. Arithmetic runs in float32 (float64 for float64 inputs).

=============== ========================= =====================================================
registry name   function                  aggregate
=============== ========================= =====================================================
``"mean"``      :func:`mean`              coordinate-wise average
``"cwtm"``      :func:`trimmed_mean`      per coordinate: drop the ``f`` largest and ``f``
                                          smallest values, average the other ``n - 2f``
``"median"``    :func:`median`            per coordinate: the median (average of the two middle
                                          values for even ``n``, like ``numpy.median``)
``"geomed"``    :func:`geometric_median`  smoothed Weiszfeld iterations
``"krum"``      :func:`krum`              the vector with the lowest Krum score
``"multikrum"`` :func:`multi_krum`        average of the ``n - f`` lowest-score vectors
=============== ========================= =====================================================

:func:`nnm` (nearest-neighbour mixing) and :func:`static_clip` (every row clipped to one fixed L2
norm, the ARC paper's static-clipping baseline) are pre-aggregation steps returning ``[n, d]``;
:func:`aggregate` composes ARC, static clipping, NNM and a rule by name, in that order.

Non-finite inputs: these rules expect finite vectors (ARC zeroes non-finite rows first). They do
nothing special about NaN/Inf: ``mean`` propagates them; the sorting rules sort NaN above
``+Inf`` (torch's order), so a NaN may be trimmed away where ``numpy`` would return NaN.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lightning_clip.exceptions import check_choice, check_positive_float, check_positive_int
from lightning_clip.robust.arc import arc_clip, check_num_byzantine

__all__ = [
    "AGGREGATORS",
    "aggregate",
    "geometric_median",
    "krum",
    "mean",
    "median",
    "multi_krum",
    "nearest_neighbor_mixing",
    "nnm",
    "static_clip",
    "static_clip_scales",
    "trimmed_mean",
]


def _matrix(x: Tensor) -> Tensor:
    """Validate ``x`` as a non-empty floating ``[n, d]`` tensor; return it in the compute dtype."""
    if not isinstance(x, Tensor):
        raise TypeError(f"Expected argument `x` to be a torch.Tensor but got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"Expected argument `x` to be a 2-D tensor [n, d] but got shape {tuple(x.shape)}")
    if x.shape[0] < 1:
        raise ValueError("Expected argument `x` to hold at least one vector (row) but got n = 0")
    if not x.is_floating_point():
        raise TypeError(f"Expected argument `x` to have a floating dtype but got {x.dtype}")
    return x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)


def _check_optional_byzantine(n: int, num_byzantine: int | None) -> None:
    if num_byzantine is not None:
        check_num_byzantine(n, num_byzantine)


def _squared_distances(x: Tensor) -> Tensor:
    """Pairwise squared Euclidean distances ``[n, n]`` computed from differences (no cancellation)."""
    return torch.stack([(x - row).pow(2).sum(dim=1) for row in x])


def mean(x: Tensor, num_byzantine: int | None = None) -> Tensor:
    """Return the coordinate-wise average of the rows of ``x``.

    Args:
        x: Tensor ``[n, d]``.
        num_byzantine: Accepted for a uniform signature; validated when given, otherwise unused.
    """
    xc = _matrix(x)
    _check_optional_byzantine(xc.shape[0], num_byzantine)
    return xc.mean(dim=0).to(x.dtype)


def trimmed_mean(x: Tensor, num_byzantine: int) -> Tensor:
    """Return the coordinate-wise trimmed mean: drop the ``f`` largest and ``f`` smallest values per coordinate.

    Args:
        x: Tensor ``[n, d]``.
        num_byzantine: Number ``f`` of values trimmed at each end, ``0 <= f < n/2``.
    """
    xc = _matrix(x)
    n = xc.shape[0]
    f = check_num_byzantine(n, num_byzantine)
    kept = torch.sort(xc, dim=0).values[f : n - f]
    return kept.mean(dim=0).to(x.dtype)


def median(x: Tensor, num_byzantine: int | None = None) -> Tensor:
    """Return the coordinate-wise median; for even ``n`` the average of the two middle values.

    Args:
        x: Tensor ``[n, d]``.
        num_byzantine: Accepted for a uniform signature; validated when given, otherwise unused.
    """
    xc = _matrix(x)
    n = xc.shape[0]
    _check_optional_byzantine(n, num_byzantine)
    s = torch.sort(xc, dim=0).values
    mid = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
    return mid.to(x.dtype)


def geometric_median(
    x: Tensor,
    num_byzantine: int | None = None,
    eps: float = 1e-8,
    max_iter: int = 100,
    tol: float = 1e-6,
) -> Tensor:
    """Return an approximate geometric median of the rows of ``x`` (smoothed Weiszfeld).

    Starts from the coordinate-wise mean and iterates ``z <- sum_i w_i x_i / sum_i w_i`` with
    ``w_i = 1 / max(eps, ||z - x_i||)``. Stops after ``max_iter`` iterations, or earlier once an
    iteration moves ``z`` by at most ``tol * max(1, ||z||)``. That early-stop test reads one value
    on the host per iteration; pass ``tol=0`` to run exactly ``max_iter`` iterations without any
    host-device synchronisation.

    Args:
        x: Tensor ``[n, d]``.
        num_byzantine: Accepted for a uniform signature; validated when given, otherwise unused.
        eps: Smoothing: distances below ``eps`` count as ``eps`` (positive).
        max_iter: Maximum number of Weiszfeld iterations (positive).
        tol: Relative movement below which the iteration stops (non-negative).
    """
    xc = _matrix(x)
    _check_optional_byzantine(xc.shape[0], num_byzantine)
    eps = check_positive_float("eps", eps)
    check_positive_int("max_iter", max_iter)
    tol = check_positive_float("tol", tol, allow_zero=True)
    z = xc.mean(dim=0)
    for _ in range(max_iter):
        dist = torch.linalg.vector_norm(xc - z, dim=1)
        w = 1.0 / torch.clamp(dist, min=eps)
        z_new = (w.unsqueeze(1) * xc).sum(dim=0) / w.sum()
        if tol > 0:
            step = torch.linalg.vector_norm(z_new - z)
            bound = tol * torch.clamp(torch.linalg.vector_norm(z_new), min=1.0)
            z = z_new
            if bool(step <= bound):
                break
        else:
            z = z_new
    return z.to(x.dtype)


def _krum_scores(xc: Tensor, f: int) -> Tensor:
    n = xc.shape[0]
    d2 = _squared_distances(xc).fill_diagonal_(float("inf"))
    nearest = torch.sort(d2, dim=1).values[:, : n - f - 1]
    return nearest.sum(dim=1)


def krum(x: Tensor, num_byzantine: int) -> Tensor:
    """Return the row of ``x`` with the lowest Krum score (ties: the lowest index).

    The score of row ``i`` is the sum of its squared distances to its ``n - f - 1`` nearest other rows.

    Args:
        x: Tensor ``[n, d]``.
        num_byzantine: Number ``f`` of possibly Byzantine rows, ``0 <= f < n/2``.
    """
    return multi_krum(x, num_byzantine, m=1)


def multi_krum(x: Tensor, num_byzantine: int, m: int | None = None) -> Tensor:
    """Return the average of the ``m`` rows of ``x`` with the lowest Krum scores (ties: lower index first).

    Args:
        x: Tensor ``[n, d]``.
        num_byzantine: Number ``f`` of possibly Byzantine rows, ``0 <= f < n/2``.
        m: Number of rows averaged, ``1 <= m <= n``; default ``n - f``.
    """
    xc = _matrix(x)
    n = xc.shape[0]
    f = check_num_byzantine(n, num_byzantine)
    if m is None:
        m = n - f
    check_positive_int("m", m)
    if m > n:
        raise ValueError(f"Expected argument `m` to satisfy 1 <= m <= n = {n} but got {m}")
    order = torch.sort(_krum_scores(xc, f), stable=True).indices[:m]
    return xc[order].mean(dim=0).to(x.dtype)


def nearest_neighbor_mixing(x: Tensor, num_byzantine: int) -> Tensor:
    """Return NNM of ``x``: each row replaced by the mean of its ``n - f`` nearest rows, itself included.

    Ties in distance are broken by the lower row index; a row always counts itself first.

    Args:
        x: Tensor ``[n, d]``.
        num_byzantine: Number ``f`` of possibly Byzantine rows, ``0 <= f < n/2``.

    Returns:
        Tensor ``[n, d]`` of the dtype of ``x``.
    """
    xc = _matrix(x)
    n = xc.shape[0]
    f = check_num_byzantine(n, num_byzantine)
    d2 = _squared_distances(xc).fill_diagonal_(float("-inf"))
    nearest = torch.sort(d2, dim=1, stable=True).indices[:, : n - f]
    weights = torch.zeros((n, n), dtype=xc.dtype, device=xc.device)
    weights.scatter_(1, nearest, 1.0 / (n - f))
    return (weights @ xc).to(x.dtype)


def static_clip_scales(norms: Tensor, max_norm: float) -> Tensor:
    """Return the static-clipping factors ``min(1, max_norm / (norm + 1e-6))`` of the norms ``[n]``.

    The formula of ``torch.nn.utils.clip_grad_norm_``. A NaN norm gives a NaN factor and an infinite
    norm gives ``0`` (``inf * 0`` is NaN): static clipping does not neutralise non-finite vectors.

    Args:
        norms: 1-D tensor ``[n]`` of L2 norms.
        max_norm: The norm bound ``C`` (positive, finite).
    """
    max_norm = check_positive_float("max_norm", max_norm)
    return torch.clamp(max_norm / (norms + 1e-6), max=1.0)


def static_clip(x: Tensor, max_norm: float) -> Tensor:
    """Return ``x`` with every row scaled to L2 norm at most ``max_norm``: ``x_i * min(1, C / (||x_i|| + 1e-6))``.

    The ARC paper's static-clipping baseline: one fixed threshold ``C`` for every input, whatever the
    inputs look like (ARC instead derives its threshold from them). Norms in float32 (float64 for
    float64 inputs). A row with NaN/Inf stays non-finite, as with ``clip_grad_norm_``.

    Args:
        x: Tensor ``[n, d]``.
        max_norm: The norm bound ``C`` (positive, finite).

    Returns:
        Tensor ``[n, d]`` of the dtype of ``x``.
    """
    return _static_clip_with_scales(x, max_norm)[0]


def _static_clip_with_scales(x: Tensor, max_norm: float) -> tuple[Tensor, Tensor]:
    """:func:`static_clip` and its factors ``[n]`` (compute dtype); the DDP hook reuses both."""
    xc = _matrix(x)
    scales = static_clip_scales(torch.linalg.vector_norm(xc, dim=1), max_norm)
    return (xc * scales.unsqueeze(1)).to(x.dtype), scales


_static_clip = static_clip

#: Short alias of :func:`nearest_neighbor_mixing`.
nnm = nearest_neighbor_mixing

#: Aggregation rules by name; each is called as ``rule(x, num_byzantine)``.
AGGREGATORS: dict[str, Callable[..., Tensor]] = {
    "mean": mean,
    "cwtm": trimmed_mean,
    "median": median,
    "geomed": geometric_median,
    "krum": krum,
    "multikrum": multi_krum,
}


def aggregate(
    x: Tensor,
    name: str,
    num_byzantine: int,
    nnm: bool = False,
    arc: bool = False,
    static_clip: float | None = None,
) -> Tensor:
    """Return ``rule(NNM(clip_C(ARC(x))))`` for the rule called ``name``; each step only when asked.

    Args:
        x: Tensor ``[n, d]``.
        name: One of the keys of :data:`AGGREGATORS`.
        num_byzantine: Number ``f`` of possibly Byzantine rows, ``0 <= f < n/2``.
        nnm: Apply nearest-neighbour mixing before the rule.
        arc: Apply ARC (:func:`~lightning_clip.robust.arc.arc_clip`) first.
        static_clip: If set, clip every row to this L2 norm (:func:`static_clip`) after ARC and
            before NNM; ``None`` (the default) skips it.

    Raises:
        ValueError: If ``name`` is unknown, ``num_byzantine`` is out of range or ``static_clip`` is not
            a positive finite number.
    """
    check_choice("name", name, tuple(AGGREGATORS))
    if not isinstance(nnm, bool):
        raise TypeError(f"Expected argument `nnm` to be a bool but got {nnm!r}")
    if not isinstance(arc, bool):
        raise TypeError(f"Expected argument `arc` to be a bool but got {arc!r}")
    if static_clip is not None:
        static_clip = check_positive_float("static_clip", static_clip)
    check_num_byzantine(_matrix(x).shape[0], num_byzantine)
    if arc:
        x = arc_clip(x, num_byzantine)
    if static_clip is not None:
        x = _static_clip(x, static_clip)
    if nnm:
        x = nearest_neighbor_mixing(x, num_byzantine)
    return AGGREGATORS[name](x, num_byzantine)
