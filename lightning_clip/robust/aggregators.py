"""Robust aggregation rules on stacked vectors ``[n, d]``, and the one pre-aggregation pipeline (pure torch).

Every rule takes ``x`` of shape ``[n, d]`` (one worker's vector per row) and ``num_byzantine``
(``f``, with ``0 <= f < n/2``; ignored by the rules that do not need it) and returns the aggregate
``[d]`` in the dtype of ``x``. Arithmetic runs in float32 (float64 for float64 inputs).

=============== =========================== ===================================================
registry name   function                    aggregate
=============== =========================== ===================================================
``"mean"``      :func:`mean`                coordinate-wise average
``"cwtm"``      :func:`trimmed_mean`        per coordinate: drop the ``f`` largest and ``f``
                                            smallest values, average the other ``n - 2f``
``"median"``    :func:`median`              per coordinate: the median (average of the two middle
                                            values for even ``n``, like ``numpy.median``)
``"meamed"``    :func:`meamed`              per coordinate: the mean of the ``n - f`` values
                                            closest to the median
``"geomed"``    :func:`geometric_median`    smoothed Weiszfeld iterations
``"krum"``      :func:`krum`                the vector with the lowest Krum score
``"multikrum"`` :func:`multi_krum`          average of the ``n - f`` lowest-score vectors
``"cclip"``     :func:`centered_clipping`   ``v <- v + mean_i clip_tau(x_i - v)`` from a centre
=============== =========================== ===================================================

The pre-aggregation is ``NNM(bucket(clip_C(ARC(x))))``, each step optional (:func:`preaggregate`): ARC's
scale factors and the static-clipping factors ``min(1, C / (||v|| + 1e-6))`` depend on the ``n`` norms
only (:func:`preaggregation_stats`), so every row is scaled once, by the product of both; bucketing
(:func:`bucketing`) then averages random groups of ``s`` rows, and nearest-neighbour mixing
(:func:`nearest_neighbor_mixing`) follows. :func:`aggregate` is ``rule(preaggregate(x))``.

**One pipeline for one process and for coordinate shards.** Every step is either coordinate-wise or
needs only sums over the coordinates of small quantities (``n`` norms, the ``n x n`` squared
distances of NNM and Krum, ``n`` distances per Weiszfeld or centered-clipping iteration). The
pipeline is written once, :func:`aggregate_shard`, on a block of coordinates ``[n, m]`` with a
``reduce`` callable that sums such a small tensor over all the blocks. In one process there is one
block and ``reduce`` is the identity (:func:`aggregate`); the sharded DDP path
(:mod:`lightning_clip.distributed.sharded`) gives each rank ``d / n`` coordinates and an all-reduce.
Coordinate-wise rules compute each coordinate from its own column only, so both give the same bits;
the distance-based steps differ only in the order their partial sums are added.

Non-finite inputs: the rules expect finite vectors (ARC zeroes non-finite rows first). They do nothing
special about NaN/Inf: ``mean`` propagates them; ``cwtm`` and ``median`` sort each column with a
network of elementwise min/max, through which a NaN spreads, so a coordinate with a NaN comes out NaN
(``numpy.median``'s behaviour); ``+-Inf`` are ordinary values there.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_clip.core.functional import clip_coefficient
from lightning_clip.exceptions import (
    check_bool,
    check_choice,
    check_non_negative_int,
    check_positive_float,
    check_positive_int,
)
from lightning_clip.robust.arc import ARCStats, arc_stats, check_num_byzantine, scale_rows
from lightning_clip.robust.checks import check_floating, check_matrix, check_norms, compute_dtype

__all__ = [
    "AGGREGATORS",
    "Reduce",
    "RuleOptions",
    "aggregate",
    "aggregate_shard",
    "aggregate_with_stats",
    "bucket_permutation",
    "bucketing",
    "centered_clipping",
    "selection_network",
    "sorting_network",
    "geometric_median",
    "krum",
    "mean",
    "meamed",
    "median",
    "multi_krum",
    "nearest_neighbor_mixing",
    "preaggregate",
    "preaggregation_stats",
    "static_clip",
    "trimmed_mean",
]

#: Sums a small tensor (norms, distances) over every block of coordinates; the identity for one block.
Reduce = Callable[[Tensor], Tensor]


def _identity(t: Tensor) -> Tensor:
    return t


def _check_optional_byzantine(n: int, num_byzantine: int | None) -> None:
    if num_byzantine is not None:
        check_num_byzantine(n, num_byzantine)




#: Columns per chunk of the passes over ``[n, d]`` that would otherwise make ``[n, d]`` temporaries.
COLUMNS = 1 << 18


def _chunks(d: int) -> list[tuple[int, int]]:
    return [(a, min(d, a + COLUMNS)) for a in range(0, max(d, 1), COLUMNS)]


def _squared_distances(x: Tensor) -> Tensor:
    """Pairwise squared Euclidean distances ``[n, n]`` computed from differences (no cancellation).

    Summed over column chunks of :data:`COLUMNS`, so the temporaries stay small.
    """
    n = x.shape[0]
    total = torch.zeros((n, n), dtype=x.dtype, device=x.device)
    for a, b in _chunks(x.shape[1]):
        block = x[:, a:b]
        total += torch.stack([(block - row).pow(2).sum(dim=1) for row in block])
    return total


def _sum_rows(x: Tensor | Sequence[Tensor]) -> Tensor:
    """``x[0] + x[1] + ...`` added row by row: each column's bits do not depend on how many columns there are."""
    acc = x[0].clone()
    for row in x[1:]:
        acc += row
    return acc


def _mean_rows(x: Tensor) -> Tensor:
    return _sum_rows(x) / x.shape[0]


def _row_sq_dist(x: Tensor, z: Tensor) -> Tensor:
    """``||x_i - z||^2`` for every row ``i`` (this block's part of it), by column chunks."""
    total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for a, b in _chunks(x.shape[1]):
        total += (x[:, a:b] - z[a:b]).pow(2).sum(dim=1)
    return total


def _weighted_sum_rows(x: Tensor, w: Tensor) -> Tensor:
    """``sum_i w_i x_i`` added row by row, by column chunks (the bits of a column do not depend on the chunks)."""
    out = torch.empty_like(x[0])
    for a, b in _chunks(x.shape[1]):
        out[a:b] = _sum_rows(w.unsqueeze(1) * x[:, a:b])
    return out


# ----------------------------------------------------------------------------- coordinate-wise rules


def mean(x: Tensor, num_byzantine: int | None = None) -> Tensor:
    """Return the coordinate-wise average of the rows of ``x``.

    Args:
        x: Tensor ``[n, d]``.
        num_byzantine: Accepted for a uniform signature; validated when given, otherwise unused.
    """
    xc = check_matrix("x", x)
    _check_optional_byzantine(xc.shape[0], num_byzantine)
    return _mean_rows(xc).to(x.dtype)


@functools.lru_cache(maxsize=64)
def sorting_network(n: int) -> tuple[tuple[int, int], ...]:
    """Batcher's odd-even merge sort for ``n`` inputs: compare-exchange pairs ``(i, j)``, ``i < j``, in order.

    Built for the next power of two; pairs reaching past ``n`` are dropped (as if padded with ``+inf``).
    ``O(n log^2 n)`` pairs.
    """
    size = 1
    while size < n:
        size *= 2
    pairs = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p) and i + j + k < n:
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return tuple(pairs)


@functools.lru_cache(maxsize=256)
def selection_network(n: int, lo: int, hi: int) -> tuple[tuple[int, int, bool, bool], ...]:
    """The steps of :func:`sorting_network` that positions ``lo .. hi - 1`` of the sorted output depend on.

    Each step is ``(i, j, want_min, want_max)``: position ``i`` takes the minimum of positions ``i`` and
    ``j`` if ``want_min``, ``j`` the maximum if ``want_max`` (an output no later step reads is not
    computed). When exactly two positions are kept, a last compare-exchange between just those two is
    dropped: ``min(a, b) + max(a, b)`` is ``a + b`` bit for bit (floating-point addition commutes).
    """
    pairs = list(sorting_network(n))
    needed = set(range(lo, hi))
    if hi - lo == 2:
        last = max((k for k, (i, j) in enumerate(pairs) if {i, j} & needed), default=None)
        if last is not None and pairs[last] == (lo, hi - 1):
            del pairs[last]
    steps = []
    for i, j in reversed(pairs):
        want_min, want_max = i in needed, j in needed
        if want_min or want_max:
            needed |= {i, j}
            steps.append((i, j, want_min, want_max))
    return tuple(reversed(steps))


def _selected_rows(xc: Tensor, lo: int, hi: int) -> list[Tensor]:
    """Order statistics ``lo .. hi - 1`` of each column of ``xc`` (sorted, except that two kept values may come
    in either order), by the elementwise min/max of :func:`selection_network`.

    Exact (min and max do no arithmetic), the same values the whole sorting network gives, and several
    times faster than ``torch.sort`` along the short axis. A NaN spreads through the min/max of its column:
    that column comes out NaN.
    """
    rows: list[Tensor] = list(xc.unbind(0))
    for i, j, want_min, want_max in selection_network(len(rows), lo, hi):
        a, b = rows[i], rows[j]
        if want_min:
            rows[i] = torch.minimum(a, b)
        if want_max:
            rows[j] = torch.maximum(a, b)
    return rows[lo:hi]


def _trimmed_mean(xc: Tensor, f: int) -> Tensor:
    n = xc.shape[0]
    if f == 0:
        return _mean_rows(xc)
    return _sum_rows(_selected_rows(xc, f, n - f)) / (n - 2 * f)


def trimmed_mean(x: Tensor, num_byzantine: int) -> Tensor:
    """Return the coordinate-wise trimmed mean: drop the ``f`` largest and ``f`` smallest values per coordinate.

    The kept values of each column are picked by elementwise min/max (:func:`selection_network`, the part of
    a sorting network they depend on), summed in sorted order and divided by ``n - 2f``.

    Args:
        x: Tensor ``[n, d]``.
        num_byzantine: Number ``f`` of values trimmed at each end, ``0 <= f < n/2``.
    """
    xc = check_matrix("x", x)
    f = check_num_byzantine(xc.shape[0], num_byzantine)
    return _trimmed_mean(xc, f).to(x.dtype)


def _median(xc: Tensor) -> Tensor:
    n = xc.shape[0]
    if n % 2:
        return _selected_rows(xc, n // 2, n // 2 + 1)[0]
    a, b = _selected_rows(xc, n // 2 - 1, n // 2 + 1)
    return (a + b) / 2


def median(x: Tensor, num_byzantine: int | None = None) -> Tensor:
    """Return the coordinate-wise median; for even ``n`` the average of the two middle values.

    Args:
        x: Tensor ``[n, d]``.
        num_byzantine: Accepted for a uniform signature; validated when given, otherwise unused.
    """
    xc = check_matrix("x", x)
    _check_optional_byzantine(xc.shape[0], num_byzantine)
    return _median(xc).to(x.dtype)


def _meamed(xc: Tensor, f: int) -> Tensor:
    n = xc.shape[0]
    if f == 0:
        return _mean_rows(xc)
    dev = (xc - _median(xc)).abs()
    nearest = torch.sort(dev, dim=0, stable=True).indices[: n - f]
    return _mean_rows(torch.gather(xc, 0, nearest))


def meamed(x: Tensor, num_byzantine: int) -> Tensor:
    """Return the mean around the median: per coordinate, the mean of the ``n - f`` values closest to the median.

    Ties in the distance to the median are broken by the lower row index. ``f = 0`` gives the mean.

    Args:
        x: Tensor ``[n, d]``.
        num_byzantine: Number ``f`` of values left out per coordinate, ``0 <= f < n/2``.
    """
    xc = check_matrix("x", x)
    f = check_num_byzantine(xc.shape[0], num_byzantine)
    return _meamed(xc, f).to(x.dtype)


#: The coordinate-wise rules on a block in the compute dtype, ``(xc, f) -> [m]``: each coordinate from its own
#: column, so the same bits under any split of the coordinates.
COORDINATE_RULES: dict[str, Callable[[Tensor, int], Tensor]] = {
    "mean": lambda xc, f: _mean_rows(xc),
    "cwtm": _trimmed_mean,
    "median": lambda xc, f: _median(xc),
    "meamed": _meamed,
}


# ----------------------------------------------------------------------------- distance-based rules


def _weiszfeld(xc: Tensor, eps: float, max_iter: int, tol: float, reduce: Reduce) -> Tensor:
    n = xc.shape[0]
    z = _mean_rows(xc)
    d2 = reduce(_row_sq_dist(xc, z))
    for it in range(max_iter):
        w = 1.0 / torch.clamp(d2.sqrt(), min=eps)
        z_new = _weighted_sum_rows(xc, w) / w.sum()
        if tol > 0:  # next distances, the move and the new norm: one reduction
            both = reduce(torch.cat([_row_sq_dist(xc, z_new), (z_new - z).pow(2).sum().reshape(1),
                                     z_new.pow(2).sum().reshape(1)]))
            d2, step, bound = both[:n], both[n].sqrt(), tol * torch.clamp(both[n + 1].sqrt(), min=1.0)
            z = z_new
            if bool(step <= bound):
                break
        else:
            z = z_new
            if it + 1 < max_iter:
                d2 = reduce(_row_sq_dist(xc, z))
    return z


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
    return _weiszfeld(xc, eps, max_iter, tol, _identity).to(x.dtype)


def _krum_scores(d2: Tensor, f: int) -> Tensor:
    n = d2.shape[0]
    d2 = d2.clone().fill_diagonal_(float("inf"))
    return torch.sort(d2, dim=1).values[:, : n - f - 1].sum(dim=1)


def _krum_selection(d2: Tensor, f: int, m: int) -> Tensor:
    """Indices of the ``m`` rows of lowest Krum score (ties: lower index first), from squared distances."""
    return torch.sort(_krum_scores(d2, f), stable=True).indices[:m]


def _check_m(n: int, m: int | None, f: int) -> int:
    if m is None:
        return n - f
    check_positive_int("m", m)
    if m > n:
        raise ValueError(f"Expected argument `m` to satisfy 1 <= m <= n = {n} but got {m}")
    return m


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
    m = _check_m(n, m, f)
    return _mean_rows(xc[_krum_selection(_squared_distances(xc), f, m)]).to(x.dtype)


def _centered_clipping(xc: Tensor, center: Tensor | None, tau: float, iters: int, reduce: Reduce) -> Tensor:
    return _centered_clipping_blocks([xc], [True], None if center is None else [center], tau, iters, reduce)[0]


def _centered_clipping_blocks(blocks: list[Tensor], counted: list[bool], centres: list[Tensor] | None,
                              tau: float, iters: int, reduce: Reduce, chunk: int | None = None) -> list[Tensor]:
    """Centered clipping (``iters`` times ``v <- v + mean_i clip_tau(x_i - v)``) over blocks of coordinates,
    each from its part of the centre (zeros without one).

    Column by column, in chunks of ``chunk`` columns (:data:`COLUMNS` by default); each iteration's ``n``
    distances are summed over the ``counted`` blocks, then by ``reduce`` (over the ranks, for the sharded
    path). Returns each block's result in the compute dtype.
    """
    n = blocks[0].shape[0]
    cdt = compute_dtype(blocks[0].dtype)
    size = COLUMNS if chunk is None else chunk
    if centres is None:
        v = [torch.zeros(b.shape[1], dtype=cdt, device=b.device) for b in blocks]
    else:
        v = [c.to(cdt) for c in centres]
    for _ in range(iters):
        part = torch.zeros(n, dtype=cdt, device=blocks[0].device)
        for block, vb, count in zip(blocks, v, counted):
            if count:
                for a in range(0, block.shape[1], size):
                    part += (block[:, a : a + size].to(cdt) - vb[a : a + size]).pow(2).sum(dim=1)
        dist = reduce(part).sqrt()
        coeff = torch.where(dist > tau, tau / dist, torch.ones_like(dist)).unsqueeze(1)
        moved = []
        for block, vb in zip(blocks, v):
            step = torch.empty_like(vb)
            for a in range(0, block.shape[1], size):
                x = block[:, a : a + size].to(cdt)
                step[a : a + size] = _sum_rows((x - vb[a : a + size]) * coeff) / n
            moved.append(vb + step)
        v = moved
    return v


def centered_clipping(
    x: Tensor,
    num_byzantine: int | None = None,
    center: Tensor | None = None,
    tau: float = 1.0,
    iters: int = 1,
) -> Tensor:
    """Return centered clipping (Karimireddy et al., 2021): ``iters`` times ``v <- v + mean_i clip_tau(x_i - v)``.

    ``clip_tau(z) = z * min(1, tau / ||z||)``. The iteration starts from ``center``, in training the
    previous step's aggregate: that is the rule's state, kept by the caller (the ``ddp_arc`` hook keeps
    and checkpoints it). Without a centre it starts from zero.

    Args:
        x: Tensor ``[n, d]``.
        num_byzantine: Accepted for a uniform signature; validated when given, otherwise unused.
        center: The starting point ``[d]``, or ``None`` for zeros.
        tau: The clipping radius (positive, finite).
        iters: Number of iterations (positive).
    """
    xc = check_matrix("x", x)
    _check_optional_byzantine(xc.shape[0], num_byzantine)
    tau = check_positive_float("tau", tau)
    check_positive_int("iters", iters)
    _check_center(center, xc.shape[1])
    return _centered_clipping(xc, center, tau, iters, _identity).to(x.dtype)


def _check_center(center: Tensor | None, d: int) -> None:
    if center is None:
        return
    check_floating("center", center)
    if center.ndim != 1 or center.shape[0] != d:
        raise ValueError(f"Expected argument `center` to be a 1-D tensor of {d} elements but got shape "
                         f"{tuple(center.shape)}")


# ----------------------------------------------------------------------------- pre-aggregation


def _nnm_weights(d2: Tensor, f: int) -> Tensor:
    """The mixing matrix ``[n, n]`` of NNM from squared distances: row ``i`` averages its ``n - f`` nearest."""
    n = d2.shape[0]
    d2 = d2.clone().fill_diagonal_(float("-inf"))
    nearest = torch.sort(d2, dim=1, stable=True).indices[:, : n - f]
    weights = torch.zeros((n, n), dtype=d2.dtype, device=d2.device)
    return weights.scatter_(1, nearest, 1.0 / (n - f))


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
    f = check_num_byzantine(xc.shape[0], num_byzantine)
    return (_nnm_weights(_squared_distances(xc), f) @ xc).to(x.dtype)


def bucket_permutation(n: int, seed: int, step: int) -> Tensor:
    """The row permutation of :func:`bucketing` at ``step``: the same on every rank, replayed on resume.

    Drawn on the CPU from a generator seeded by ``(seed, step)`` alone.

    Args:
        n: Number of rows (positive).
        seed: Non-negative seed.
        step: Non-negative step counter.
    """
    check_positive_int("n", n)
    check_non_negative_int("seed", seed)
    check_non_negative_int("step", step)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step * 7_919 + 17)
    return torch.randperm(n, generator=gen)


def _num_buckets(n: int, bucket_size: int) -> int:
    return math.ceil(n / bucket_size)


def _bucketing(x: Tensor, bucket_size: int, permutation: Tensor) -> Tensor:
    n = x.shape[0]
    shuffled = x[permutation.to(x.device)]
    rows = [_mean_rows(shuffled[i : i + bucket_size]) for i in range(0, n, bucket_size)]
    return torch.stack(rows)


def bucketing(x: Tensor, bucket_size: int, permutation: Tensor) -> Tensor:
    """Return the means of random buckets of ``bucket_size`` rows: ``[ceil(n / s), d]`` in the dtype of ``x``.

    Bucket ``j`` averages rows ``permutation[j s : (j + 1) s]`` (the last bucket may hold fewer), in
    the compute dtype (Karimireddy et al., 2022). A robust rule on the buckets tolerates the same ``f``
    if ``f < ceil(n / s) / 2``.

    Args:
        x: Tensor ``[n, d]``.
        bucket_size: ``s``, rows per bucket (positive; ``1`` only permutes).
        permutation: A permutation of ``range(n)``, e.g. :func:`bucket_permutation`.
    """
    xc = check_matrix("x", x)
    check_positive_int("bucket_size", bucket_size)
    _check_permutation(permutation, xc.shape[0])
    return _bucketing(xc, bucket_size, permutation).to(x.dtype)


def _check_permutation(permutation: Tensor, n: int) -> None:
    if not isinstance(permutation, Tensor) or permutation.ndim != 1 or permutation.shape[0] != n:
        raise ValueError(f"Expected argument `permutation` to be a 1-D tensor holding a permutation of range({n}) "
                         f"but got {permutation!r}")
    if permutation.device.type != "meta" and not torch.equal(torch.sort(permutation.cpu()).values, torch.arange(n)):
        raise ValueError(f"Expected argument `permutation` to be a permutation of range({n}) but got "
                         f"{permutation.tolist()}")


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
    check_bool("arc", arc)
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


@dataclass(frozen=True)
class RuleOptions:
    """Everything :func:`aggregate_shard` needs besides the vectors, validated once.

    Attributes:
        rule: A key of :data:`AGGREGATORS`.
        num_byzantine: ``f``, with ``0 <= f < n/2`` and, with bucketing, ``f < ceil(n / s) / 2``.
        nnm: Nearest-neighbour mixing before the rule.
        arc: ARC first.
        static_clip: Static clipping bound after ARC, or ``None``.
        bucket_size: ``s`` of :func:`bucketing`; ``1`` (the default) skips bucketing.
        bucket_seed: Seed of :func:`bucket_permutation`.
        cclip_tau: Radius of :func:`centered_clipping`.
        cclip_iters: Iterations of :func:`centered_clipping`.
    """

    rule: str = "mean"
    num_byzantine: int = 0
    nnm: bool = False
    arc: bool = False
    static_clip: float | None = None
    bucket_size: int = 1
    bucket_seed: int = 0
    cclip_tau: float = 1.0
    cclip_iters: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.rule, str):
            raise TypeError(f"Expected argument `rule` to be a string but got {self.rule!r}")
        check_choice("rule", self.rule, tuple(AGGREGATORS))
        check_non_negative_int("num_byzantine", self.num_byzantine)
        check_bool("nnm", self.nnm)
        check_bool("arc", self.arc)
        if self.static_clip is not None:
            object.__setattr__(self, "static_clip", check_positive_float("static_clip", self.static_clip))
        check_positive_int("bucket_size", self.bucket_size)
        check_non_negative_int("bucket_seed", self.bucket_seed)
        object.__setattr__(self, "cclip_tau", check_positive_float("cclip_tau", self.cclip_tau))
        check_positive_int("cclip_iters", self.cclip_iters)

    def num_rows(self, n: int) -> int:
        """How many rows reach NNM and the rule: ``ceil(n / bucket_size)``."""
        return _num_buckets(n, self.bucket_size)

    def check_world_size(self, n: int) -> None:
        """Raise ``ValueError`` unless ``f < n/2`` and, with bucketing, ``f < ceil(n / s) / 2``."""
        check_num_byzantine(n, self.num_byzantine)
        rows = self.num_rows(n)
        if self.bucket_size > 1 and 2 * self.num_byzantine >= rows:
            raise ValueError(
                f"Expected argument `bucket_size` to leave more than 2 num_byzantine = {2 * self.num_byzantine} "
                f"buckets of {n} vectors but got bucket_size={self.bucket_size} ({rows} buckets); use "
                f"bucket_size <= {max(1, (n - 1) // (2 * self.num_byzantine)) if self.num_byzantine else n}"
            )


def aggregate_shard(
    xs: Tensor,
    norms: Tensor,
    options: RuleOptions,
    *,
    step: int = 0,
    center: Tensor | None = None,
    reduce: Reduce = _identity,
) -> tuple[Tensor, ARCStats]:
    """The whole pipeline on one block of coordinates: ``rule(NNM(bucket(clip_C(ARC(x)))))`` restricted to them.

    Args:
        xs: The block ``[n, m]`` of every row (any floating dtype; the steps cast back to it as
            :func:`aggregate` does).
        norms: The L2 norms ``[n]`` of the *whole* rows, in the compute dtype.
        options: The rule and its pre-aggregation.
        step: Step counter of the bucketing permutation.
        center: The block ``[m]`` of centered clipping's starting point, or ``None`` for zeros.
        reduce: Sums a small tensor over every block (all-reduce); the identity when ``xs`` is everything.

    Returns:
        The aggregate's block ``[m]`` (dtype of ``xs``) and :func:`preaggregation_stats` of ``norms``.
    """
    o = options
    n = xs.shape[0]
    o.check_world_size(n)
    f = o.num_byzantine
    stats = preaggregation_stats(norms, f, arc=o.arc, static_clip=o.static_clip)
    x = xs
    if o.arc or o.static_clip is not None:
        x = scale_rows(x, stats.scales, norms if o.arc else None)
    if o.bucket_size > 1:
        x = _bucketing(x.to(compute_dtype(x.dtype)), o.bucket_size, bucket_permutation(n, o.bucket_seed, step)
                       ).to(xs.dtype)
    if o.nnm:
        xc = x.to(compute_dtype(x.dtype))
        x = (_nnm_weights(reduce(_squared_distances(xc)), f) @ xc).to(xs.dtype)
    xc = x.to(compute_dtype(x.dtype))
    rule = o.rule
    if rule in COORDINATE_RULES:
        out = COORDINATE_RULES[rule](xc, f)
    elif rule == "geomed":
        out = _weiszfeld(xc, 1e-8, 100, 1e-6, reduce)
    elif rule in ("krum", "multikrum"):
        m = 1 if rule == "krum" else xc.shape[0] - f
        out = _mean_rows(xc[_krum_selection(reduce(_squared_distances(xc)), f, m)])
    else:  # "cclip"
        out = _centered_clipping(xc, center, o.cclip_tau, o.cclip_iters, reduce)
    return out.to(xs.dtype), stats


def preaggregate(
    x: Tensor,
    num_byzantine: int,
    *,
    arc: bool = True,
    static_clip: float | None = None,
    nnm: bool = False,
    bucket_size: int = 1,
    permutation: Tensor | None = None,
) -> tuple[Tensor, ARCStats]:
    """Return ``NNM(bucket(clip_C(ARC(x))))`` (each step only when asked) and the clipping statistics.

    Args:
        x: Tensor ``[n, d]``.
        num_byzantine: Number ``f`` of possibly Byzantine rows, ``0 <= f < n/2``.
        arc: Apply ARC; its non-finite rows become zeros.
        static_clip: If set, clip every row (after ARC) to this L2 norm, a positive finite number.
        nnm: Apply nearest-neighbour mixing last.
        bucket_size: Average random buckets of this many rows before NNM (:func:`bucketing`); ``1`` skips it.
        permutation: The bucketing permutation (default :func:`bucket_permutation` ``(n, 0, 0)``).

    Returns:
        The pre-aggregated ``[ceil(n / bucket_size), d]`` (dtype of ``x``) and :func:`preaggregation_stats`
        of the rows' norms.
    """
    check_matrix("x", x)
    check_bool("nnm", nnm)
    check_positive_int("bucket_size", bucket_size)
    norms = torch.linalg.vector_norm(x, dim=1, dtype=compute_dtype(x.dtype))
    stats = preaggregation_stats(norms, num_byzantine, arc=arc, static_clip=static_clip)
    if arc or static_clip is not None:
        x = scale_rows(x, stats.scales, norms if arc else None)
    if bucket_size > 1:
        x = bucketing(x, bucket_size, bucket_permutation(x.shape[0], 0, 0) if permutation is None else permutation)
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
    "meamed": meamed,
    "cclip": centered_clipping,
}


def aggregate_with_stats(
    x: Tensor,
    rule: str,
    num_byzantine: int,
    nnm: bool = False,
    arc: bool = False,
    static_clip: float | None = None,
    *,
    center: Tensor | None = None,
    cclip_tau: float = 1.0,
    cclip_iters: int = 1,
    bucket_size: int = 1,
    bucket_seed: int = 0,
    step: int = 0,
) -> tuple[Tensor, ARCStats]:
    """:func:`aggregate` and the :func:`preaggregation_stats` of the rows (what the DDP hook reports)."""
    check_choice("rule", rule, tuple(AGGREGATORS))
    xc = check_matrix("x", x)
    options = RuleOptions(rule=rule, num_byzantine=num_byzantine, nnm=nnm, arc=arc, static_clip=static_clip,
                          bucket_size=bucket_size, bucket_seed=bucket_seed, cclip_tau=cclip_tau,
                          cclip_iters=cclip_iters)
    check_non_negative_int("step", step)
    _check_center(center, xc.shape[1])
    norms = torch.linalg.vector_norm(x, dim=1, dtype=compute_dtype(x.dtype))
    return aggregate_shard(x, norms, options, step=step, center=center)


def aggregate(
    x: Tensor,
    rule: str,
    num_byzantine: int,
    nnm: bool = False,
    arc: bool = False,
    static_clip: float | None = None,
    *,
    center: Tensor | None = None,
    cclip_tau: float = 1.0,
    cclip_iters: int = 1,
    bucket_size: int = 1,
    bucket_seed: int = 0,
    step: int = 0,
) -> Tensor:
    """Return ``rule(NNM(bucket(clip_C(ARC(x)))))``; each pre-aggregation step only when asked.

    Args:
        x: Tensor ``[n, d]``.
        rule: One of the keys of :data:`AGGREGATORS`.
        num_byzantine: Number ``f`` of possibly Byzantine rows, ``0 <= f < n/2``.
        nnm: Apply nearest-neighbour mixing before the rule.
        arc: Apply ARC (:func:`~lightning_clip.robust.arc.arc_clip`) first.
        static_clip: If set, clip every row to this L2 norm after ARC and before bucketing and NNM.
        center: Centered clipping's starting point ``[d]`` (the previous aggregate); ``None`` for zeros.
        cclip_tau: Centered clipping's radius.
        cclip_iters: Centered clipping's iterations.
        bucket_size: Average random buckets of this many rows before NNM (:func:`bucketing`); ``1`` skips it.
        bucket_seed: Seed of the bucketing permutation (:func:`bucket_permutation`).
        step: Step counter of the bucketing permutation.

    Raises:
        ValueError: If ``rule`` is unknown, ``num_byzantine`` is out of range (for ``n`` rows, and for the
            ``ceil(n / bucket_size)`` buckets) or an option is out of its range.
    """
    return aggregate_with_stats(x, rule, num_byzantine, nnm, arc, static_clip, center=center, cclip_tau=cclip_tau,
                                cclip_iters=cclip_iters, bucket_size=bucket_size, bucket_seed=bucket_seed,
                                step=step)[0]
