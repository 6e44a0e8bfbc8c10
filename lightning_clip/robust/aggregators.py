"""Robust aggregation rules on stacked vectors ``[n, d]``, and the one pre-aggregation pipeline (pure torch).

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

The pre-aggregation is ``NNM(clip_C(ARC(x)))``, each step optional (:func:`preaggregate`): ARC's scale
factors and the static-clipping factors ``min(1, C / (||v|| + 1e-6))`` depend on the ``n`` norms only
(:func:`preaggregation_stats`), so every row is scaled once, by the product of both; nearest-neighbour
mixing (:func:`nearest_neighbor_mixing`) follows. :func:`aggregate` is ``rule(preaggregate(x))``. The
DDP hook calls the same two functions, so its result is this module's bit for bit.

Non-finite inputs: the rules expect finite vectors (ARC zeroes non-finite rows first). They do nothing
special about NaN/Inf: ``mean`` propagates them; the sorting rules sort NaN above ``+Inf`` (torch's
order), so a NaN may be trimmed away where ``numpy`` would return NaN.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lightning_clip.core.functional import clip_coefficient
from lightning_clip.exceptions import check_choice, check_positive_float, check_positive_int
from lightning_clip.robust.arc import ARCStats, arc_stats, check_num_byzantine, scale_rows
from lightning_clip.robust.checks import check_matrix, check_norms, compute_dtype

__all__ = [
    "AGGREGATORS",
    "aggregate",
    "aggregate_with_stats",
    "geometric_median",
    "krum",
    "mean",
    "median",
    "multi_krum",
    "nearest_neighbor_mixing",
    "preaggregate",
    "preaggregation_stats",
    "static_clip",
    "trimmed_mean",
]


def _check_optional_byzantine(n: int, num_byzantine: int | None) -> None:
    if num_byzantine is not None:
        check_num_byzantine(n, num_byzantine)


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"Expected argument `{name}` to be a bool but got {value!r}")
    return value


def _squared_distances(x: Tensor) -> Tensor:
    """Pairwise squared Euclidean distances ``[n, n]`` computed from differences (no cancellation)."""
    return torch.stack([(x - row).pow(2).sum(dim=1) for row in x])


def mean(x: Tensor, num_byzantine: int | None = None) -> Tensor:
    """Return the coordinate-wise average of the rows of ``x``.

    Args:
        x: Tensor ``[n, d]``.
        num_byzantine: Accepted for a uniform signature; validated when given, otherwise unused.
    """
    xc = check_matrix("x", x)
    _check_optional_byzantine(xc.shape[0], num_byzantine)
    return xc.mean(dim=0).to(x.dtype)


def trimmed_mean(x: Tensor, num_byzantine: int) -> Tensor:
    """Return the coordinate-wise trimmed mean: drop the ``f`` largest and ``f`` smallest values per coordinate.

    Args:
        x: Tensor ``[n, d]``.
        num_byzantine: Number ``f`` of values trimmed at each end, ``0 <= f < n/2``.
    """
    xc = check_matrix("x", x)
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
    xc = check_matrix("x", x)
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
    xc = check_matrix("x", x)
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
    xc = check_matrix("x", x)
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
    xc = check_matrix("x", x)
    n = xc.shape[0]
    f = check_num_byzantine(n, num_byzantine)
    d2 = _squared_distances(xc).fill_diagonal_(float("-inf"))
    nearest = torch.sort(d2, dim=1, stable=True).indices[:, : n - f]
    weights = torch.zeros((n, n), dtype=xc.dtype, device=xc.device)
    weights.scatter_(1, nearest, 1.0 / (n - f))
    return (weights @ xc).to(x.dtype)


def preaggregation_stats(
    norms: Tensor, num_byzantine: int, *, arc: bool = True, static_clip: float | None = None
) -> ARCStats:
    """Return the scale factors of ``clip_C(ARC(.))`` for vectors of norms ``norms [n]``.

    With ``arc``, ARC's factors (:func:`~lightning_clip.robust.arc.arc_stats`; a non-finite norm gets
    ``0``). With ``static_clip = C``, each vector's norm after ARC is then clipped to ``C``: the factor
    ``min(1, C / (norm * arc_scale + 1e-6))``, the formula of ``torch.nn.utils.clip_grad_norm_``, is
    multiplied in. Without ARC a non-finite norm gets a NaN (NaN norm) or ``0`` (infinite norm) static
    factor: static clipping does not neutralise non-finite vectors.

    Returns:
        :class:`~lightning_clip.robust.arc.ARCStats` whose ``scales`` are the combined factors and
        ``clipped`` marks factors below 1. ``threshold`` is ARC's threshold; without ARC it is ``C``
        (``+inf`` when there is no static clip either), and ``num_clipped`` is ``0``.
    """
    _check_bool("arc", arc)
    bound = None if static_clip is None else check_positive_float("static_clip", static_clip)
    if arc:
        stats = arc_stats(norms, num_byzantine)
    else:
        x = check_norms("norms", norms)
        check_num_byzantine(x.shape[0], num_byzantine)
        ones = torch.ones_like(x)
        fill = float("inf") if bound is None else bound
        stats = ARCStats(norms=x, threshold=torch.full((), fill, dtype=x.dtype, device=x.device), scales=ones,
                         clipped=ones < 1, num_clipped=0)
    if bound is None:
        return stats
    post = stats.norms * stats.scales
    if arc:  # a vector ARC zeroes has norm 0 afterwards
        post = torch.where(torch.isfinite(stats.norms), post, torch.zeros_like(post))
    scales = stats.scales * clip_coefficient(bound, post)
    return stats._replace(scales=scales, clipped=scales < 1)


def preaggregate(
    x: Tensor, num_byzantine: int, *, arc: bool = True, static_clip: float | None = None, nnm: bool = False
) -> tuple[Tensor, ARCStats]:
    """Return ``NNM(clip_C(ARC(x)))`` (each step only when asked) and the clipping statistics.

    Args:
        x: Tensor ``[n, d]``.
        num_byzantine: Number ``f`` of possibly Byzantine rows, ``0 <= f < n/2``.
        arc: Apply ARC; its non-finite rows become zeros.
        static_clip: If set, clip every row (after ARC) to this L2 norm, a positive finite number.
        nnm: Apply nearest-neighbour mixing last.

    Returns:
        The pre-aggregated ``[n, d]`` (dtype of ``x``) and :func:`preaggregation_stats` of the rows' norms.
    """
    check_matrix("x", x)
    _check_bool("nnm", nnm)
    norms = torch.linalg.vector_norm(x, dim=1, dtype=compute_dtype(x.dtype))
    stats = preaggregation_stats(norms, num_byzantine, arc=arc, static_clip=static_clip)
    if arc or static_clip is not None:
        x = scale_rows(x, stats.scales, norms if arc else None)
    if nnm:
        x = nearest_neighbor_mixing(x, num_byzantine)
    return x, stats


def static_clip(x: Tensor, max_norm: float) -> Tensor:
    """Return ``x`` with every row scaled to L2 norm at most ``max_norm``: ``x_i * min(1, C / (||x_i|| + 1e-6))``.

    The ARC paper's static-clipping baseline: one fixed threshold ``C`` for every input, whatever the
    inputs look like (ARC instead derives its threshold from them). A row with NaN/Inf stays
    non-finite, as with ``clip_grad_norm_``.

    Args:
        x: Tensor ``[n, d]``.
        max_norm: The norm bound ``C`` (positive, finite).
    """
    check_positive_float("max_norm", max_norm)
    return preaggregate(x, 0, arc=False, static_clip=max_norm)[0]


#: Aggregation rules by name; each is called as ``rule(x, num_byzantine)``.
AGGREGATORS: dict[str, Callable[..., Tensor]] = {
    "mean": mean,
    "cwtm": trimmed_mean,
    "median": median,
    "geomed": geometric_median,
    "krum": krum,
    "multikrum": multi_krum,
}


def aggregate_with_stats(
    x: Tensor,
    rule: str,
    num_byzantine: int,
    nnm: bool = False,
    arc: bool = False,
    static_clip: float | None = None,
) -> tuple[Tensor, ARCStats]:
    """:func:`aggregate` and the :func:`preaggregation_stats` of the rows (what the DDP hook reports)."""
    check_choice("rule", rule, tuple(AGGREGATORS))
    pre, stats = preaggregate(x, num_byzantine, arc=arc, static_clip=static_clip, nnm=nnm)
    return AGGREGATORS[rule](pre, num_byzantine), stats


def aggregate(
    x: Tensor,
    rule: str,
    num_byzantine: int,
    nnm: bool = False,
    arc: bool = False,
    static_clip: float | None = None,
) -> Tensor:
    """Return ``rule(NNM(clip_C(ARC(x))))``; each pre-aggregation step only when asked (:func:`preaggregate`).

    Args:
        x: Tensor ``[n, d]``.
        rule: One of the keys of :data:`AGGREGATORS`.
        num_byzantine: Number ``f`` of possibly Byzantine rows, ``0 <= f < n/2``.
        nnm: Apply nearest-neighbour mixing before the rule.
        arc: Apply ARC (:func:`~lightning_clip.robust.arc.arc_clip`) first.
        static_clip: If set, clip every row to this L2 norm after ARC and before NNM.

    Raises:
        ValueError: If ``rule`` is unknown, ``num_byzantine`` is out of range or ``static_clip`` is not
            a positive finite number.
    """
    return aggregate_with_stats(x, rule, num_byzantine, nnm=nnm, arc=arc, static_clip=static_clip)[0]
