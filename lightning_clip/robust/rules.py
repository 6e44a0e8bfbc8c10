"""The robust aggregation rules as objects in one registry, :data:`RULES` (pure torch).

A rule maps ``n`` vectors (the rows of ``x [n, d]``) and ``f = num_byzantine`` (``0 <= f < n/2``) to one
vector ``[d]`` in the dtype of ``x``; arithmetic runs in float32 (float64 for float64 inputs). Every rule is
one of two kinds, which is all the pipeline (:mod:`lightning_clip.robust.pipeline`) needs to know:

* **coordinate-wise** (:attr:`Rule.coordinate_wise`): each coordinate of the aggregate comes from its own
  column (:meth:`Rule.columns`), so the rule gives the same bits under any split of the coordinates;
* **over blocks** (:meth:`Rule.blocks`): besides the columns, the rule needs a few small sums over every
  coordinate, which :class:`Blocks` computes from the coordinates it holds and its ``reduce`` completes (the
  identity in one process; an all-reduce over the ranks in DDP): the ``n x n`` squared distances
  (:meth:`Blocks.squared_distances`), the ``n x n`` Gram matrix (:meth:`Blocks.gram`), the ``n`` distances to
  a point, once per iteration (:meth:`Blocks.distances_to`).

=============== =========================== ===================================================
registry name   rule                        aggregate
=============== =========================== ===================================================
``"mean"``      :func:`mean`                coordinate-wise average
``"cwtm"``      :func:`trimmed_mean`        per coordinate: drop the ``f`` largest and ``f``
                                            smallest values, average the other ``n - 2f``
``"median"``    :func:`median`              per coordinate: the median (average of the two middle
                                            values for even ``n``, like ``numpy.median``)
``"meamed"``    :func:`meamed`              per coordinate: the mean of the ``n - f`` values
                                            closest to the median
``"geomed"``    :func:`geometric_median`    smoothed Weiszfeld iterations (Gram matrix)
``"krum"``      :func:`krum`                the vector with the lowest Krum score (distances)
``"multikrum"`` :func:`multi_krum`          average of the ``n - f`` lowest-score vectors (distances)
``"cclip"``     :func:`centered_clipping`   ``v <- v + mean_i clip_tau(x_i - v)`` from a centre
                                            (distances per iteration)
=============== =========================== ===================================================

Adding a rule: a :class:`Rule` subclass and its :data:`RULES` entry (and, if it has settings, the fields of
:class:`~lightning_clip.robust.options.ARCConfig` named in its :attr:`Rule.option_fields`).

Non-finite inputs: the rules expect finite vectors (ARC zeroes non-finite rows first). ``mean`` propagates
NaN/Inf; ``cwtm`` and ``median`` select with elementwise min/max, through which a NaN spreads, so a column
with a NaN comes out NaN (``numpy.median``'s behaviour); ``+-Inf`` are ordinary values there.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from lightning_clip.exceptions import check_positive_float, check_positive_int
from lightning_clip.robust.arc import check_num_byzantine
from lightning_clip.robust.checks import check_floating, check_matrix, compute_dtype

__all__ = [
    "DIST_CHUNK",
    "RULES",
    "Blocks",
    "CenteredClipping",
    "CoordinateMedian",
    "GeometricMedian",
    "Mean",
    "MeanAroundMedian",
    "MultiKrum",
    "Reduce",
    "Rule",
    "TrimmedMean",
    "centered_clipping",
    "check_center",
    "geometric_median",
    "krum",
    "krum_selection",
    "meamed",
    "mean",
    "mean_rows",
    "median",
    "multi_krum",
    "selection_network",
    "sorting_network",
    "sum_rows",
    "trimmed_mean",
]

#: Sums a small tensor (distances, a Gram matrix) over every block of coordinates; the identity for one block.
Reduce = Callable[[Tensor], Tensor]

#: Columns per chunk of the sweeps that sum over the coordinates (distances, Gram matrix, centered clipping):
#: small enough that the float32 partial sums stay accurate and a chunk of every row stays in the cache.
DIST_CHUNK = 1 << 15


def _identity(t: Tensor) -> Tensor:
    return t


def sum_rows(x: Tensor | Sequence[Tensor]) -> Tensor:
    """``x[0] + x[1] + ...`` added row by row: each column's bits do not depend on how many columns there are."""
    acc = x[0].clone()
    for row in x[1:]:
        acc += row
    return acc


def mean_rows(x: Tensor) -> Tensor:
    """:func:`sum_rows` divided by the number of rows."""
    return sum_rows(x) / x.shape[0]


def check_center(center: Tensor | None, d: int) -> None:
    """Raise unless ``center`` is ``None`` or a floating 1-D tensor of ``d`` elements."""
    if center is None:
        return
    check_floating("center", center)
    if center.ndim != 1 or center.shape[0] != d:
        raise ValueError(f"Expected argument `center` to be a 1-D tensor of {d} elements but got shape "
                         f"{tuple(center.shape)}")


# ----------------------------------------------------------------------------- the small sums


@dataclass
class Blocks:
    """The ``n`` rows, split into blocks of coordinates, and how to sum a small tensor over every coordinate.

    Attributes:
        parts: The blocks ``[n, m_i]`` this process holds (compute dtype or lower).
        counted: Per block, whether its partial sums are added here (a block that every process holds, such as
            the sharded path's tails, counts on one process only).
        reduce: Completes a partial sum over the blocks held elsewhere (an all-reduce; the identity in one process).
    """

    parts: list[Tensor]
    counted: list[bool]
    reduce: Reduce = _identity

    @property
    def n(self) -> int:
        return self.parts[0].shape[0]

    @property
    def compute_dtype(self) -> torch.dtype:
        return compute_dtype(self.parts[0].dtype)

    def partial_sum(self, partial: Callable[[Tensor], Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """The sum of ``partial(chunk)`` over the column chunks of every counted block (before ``reduce``)."""
        acc = torch.zeros(shape, dtype=dtype, device=self.parts[0].device)
        for part, count in zip(self.parts, self.counted):
            if count:
                for a in range(0, part.shape[1], DIST_CHUNK):
                    acc += partial(part[:, a : a + DIST_CHUNK])
        return acc

    def squared_distances(self) -> Tensor:
        """The ``[n, n]`` squared Euclidean distances between the rows (compute dtype).

        ``pdist`` on each column chunk, squared and added: one pass, no ``[n, m]`` temporaries.
        """
        n, cdt = self.n, self.compute_dtype
        upper = self.partial_sum(lambda x: torch.nn.functional.pdist(x.to(cdt)).square(), (n * (n - 1) // 2,), cdt)
        out = torch.zeros((n, n), dtype=cdt, device=upper.device)
        i, j = torch.triu_indices(n, n, 1, device=upper.device)
        out[i, j] = upper
        out[j, i] = upper
        return self.reduce(out)

    def gram(self) -> Tensor:
        """The ``[n, n]`` Gram matrix ``X X^T`` of the rows, in float64."""

        def partial(x: Tensor) -> Tensor:
            x = x.to(torch.float64)
            return x @ x.T

        return self.reduce(self.partial_sum(partial, (self.n, self.n), torch.float64))

    def distances_to(self, points: Sequence[Tensor]) -> Tensor:
        """``||x_i - v||^2`` for every row ``i`` ``[n]``; ``v`` given block by block (``points[i]`` of ``parts[i]``)."""
        cdt = self.compute_dtype
        acc = torch.zeros(self.n, dtype=cdt, device=self.parts[0].device)
        for part, v, count in zip(self.parts, points, self.counted):
            if count:
                for a in range(0, part.shape[1], DIST_CHUNK):
                    acc += (part[:, a : a + DIST_CHUNK].to(cdt) - v[a : a + DIST_CHUNK]).pow(2).sum(dim=1)
        return self.reduce(acc)

    def weighted_sums(self, w: Tensor) -> Iterator[Tensor]:
        """``sum_i w_i x_i`` of each block in turn (compute dtype of ``w``), rows added one by one."""
        for part in self.parts:
            z = torch.empty(part.shape[1], dtype=w.dtype, device=w.device)
            for a in range(0, part.shape[1], DIST_CHUNK):
                z[a : a + DIST_CHUNK] = sum_rows(w.unsqueeze(1) * part[:, a : a + DIST_CHUNK].to(w.dtype))
            yield z


# ----------------------------------------------------------------------------- the rules


@dataclass(frozen=True)
class Rule:
    """An aggregation rule ``[n, d] -> [d]``; call it as ``rule(x, num_byzantine)``.

    Subclasses set :attr:`coordinate_wise` and implement :meth:`columns`, or implement :meth:`blocks`.
    """

    #: Whether each coordinate of the aggregate comes from its own column only (:meth:`columns`).
    coordinate_wise: ClassVar[bool] = False
    #: Whether the rule starts from a centre (the previous aggregate), the state its caller keeps.
    uses_center: ClassVar[bool] = False
    #: Whether ``num_byzantine`` must be given (``False``: validated when given, otherwise unused).
    needs_num_byzantine: ClassVar[bool] = True
    #: The rule's settings taken from the options object: rule attribute -> ``ARCConfig`` field.
    option_fields: ClassVar[Mapping[str, str]] = {}

    def columns(self, xc: Tensor, f: int) -> Tensor:
        """The aggregate ``[m]`` of the columns of ``xc [n, m]`` (compute dtype); coordinate-wise rules only."""
        raise NotImplementedError

    def blocks(self, blocks: Blocks, f: int, center: Sequence[Tensor] | None = None) -> Iterator[Tensor]:
        """The aggregate of each block of ``blocks``, in order (compute dtype), as soon as each is ready; ``center``
        holds each block's part of the starting point of a :attr:`uses_center` rule (``None``: zeros)."""
        raise NotImplementedError

    def configured(self, options: Any) -> Rule:
        """This rule with its settings taken from ``options`` (an ``ARCConfig``) per :attr:`option_fields`."""
        if not self.option_fields:
            return self
        return dataclasses.replace(self, **{attr: getattr(options, name) for attr, name in self.option_fields.items()})

    def check(self, n: int, num_byzantine: int | None) -> int:
        """Return ``f`` for ``n`` rows (``0`` when not given and not needed), or raise."""
        if num_byzantine is None and not self.needs_num_byzantine:
            return 0
        return check_num_byzantine(n, num_byzantine)  # type: ignore[arg-type]

    def __call__(self, x: Tensor, num_byzantine: int | None = None, center: Tensor | None = None) -> Tensor:
        """The rule on ``x [n, d]`` in one process (``center``: the starting point of :attr:`uses_center` rules)."""
        xc = check_matrix("x", x)
        f = self.check(xc.shape[0], num_byzantine)
        if self.coordinate_wise:
            return self.columns(xc, f).to(x.dtype)
        check_center(center, xc.shape[1])
        start = None if center is None else [center]
        return next(iter(self.blocks(Blocks([xc], [True]), f, start))).to(x.dtype)


@dataclass(frozen=True)
class Mean(Rule):
    """The coordinate-wise average."""

    coordinate_wise = True
    needs_num_byzantine = False

    def columns(self, xc: Tensor, f: int) -> Tensor:
        return mean_rows(xc)


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

    Exact (min and max do no arithmetic), the values the whole sorting network gives, and several times faster
    than ``torch.sort`` along the short axis.
    """
    rows: list[Tensor] = list(xc.unbind(0))
    for i, j, want_min, want_max in selection_network(len(rows), lo, hi):
        a, b = rows[i], rows[j]
        if want_min:
            rows[i] = torch.minimum(a, b)
        if want_max:
            rows[j] = torch.maximum(a, b)
    return rows[lo:hi]


@dataclass(frozen=True)
class TrimmedMean(Rule):
    """Per coordinate: drop the ``f`` largest and ``f`` smallest values, average the other ``n - 2f``.

    The kept values are picked by elementwise min/max (:func:`selection_network`) and summed in sorted order.
    """

    coordinate_wise = True

    def columns(self, xc: Tensor, f: int) -> Tensor:
        n = xc.shape[0]
        if f == 0:
            return mean_rows(xc)
        return sum_rows(_selected_rows(xc, f, n - f)) / (n - 2 * f)


@dataclass(frozen=True)
class CoordinateMedian(Rule):
    """Per coordinate: the median; for even ``n`` the average of the two middle values."""

    coordinate_wise = True
    needs_num_byzantine = False

    def columns(self, xc: Tensor, f: int) -> Tensor:
        n = xc.shape[0]
        if n % 2:
            return _selected_rows(xc, n // 2, n // 2 + 1)[0]
        a, b = _selected_rows(xc, n // 2 - 1, n // 2 + 1)
        return (a + b) / 2


@dataclass(frozen=True)
class MeanAroundMedian(Rule):
    """Per coordinate: the mean of the ``n - f`` values closest to the median (ties: the lower row index)."""

    coordinate_wise = True

    def columns(self, xc: Tensor, f: int) -> Tensor:
        n = xc.shape[0]
        if f == 0:
            return mean_rows(xc)
        dev = (xc - CoordinateMedian().columns(xc, f)).abs()
        nearest = torch.sort(dev, dim=0, stable=True).indices[: n - f]
        return mean_rows(torch.gather(xc, 0, nearest))


@dataclass(frozen=True)
class GeometricMedian(Rule):
    """Smoothed Weiszfeld iterations from the coordinate-wise mean: ``z <- sum_i w_i x_i / sum_i w_i``,
    ``w_i = 1 / max(eps, ||z - x_i||)``, at most ``max_iter`` times, or until an iteration moves ``z`` by at
    most ``tol * max(1, ||z||)`` (one host read per iteration; ``tol = 0`` runs exactly ``max_iter`` with none).

    Every iterate is a weighted mean of the rows, ``z = X^T v``, so every quantity an iteration needs (the
    distances ``||x_i - z||^2 = (e_i - v)^T G (e_i - v)``, the move, the norm) is a quadratic form in the Gram
    matrix ``G = X X^T``: one sweep over the coordinates and one ``reduce`` of ``n^2`` floats (float64), then
    iterations on ``n``-vectors, then one sweep to form ``z``.
    """

    eps: float = 1e-8
    max_iter: int = 100
    tol: float = 1e-6
    needs_num_byzantine = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "eps", check_positive_float("eps", self.eps))
        check_positive_int("max_iter", self.max_iter)
        object.__setattr__(self, "tol", check_positive_float("tol", self.tol, allow_zero=True))

    def blocks(self, blocks: Blocks, f: int, center: Sequence[Tensor] | None = None) -> Iterator[Tensor]:
        n, cdt = blocks.n, blocks.compute_dtype
        gram = blocks.gram()
        eye = torch.eye(n, dtype=torch.float64, device=gram.device)

        def forms(u: Tensor) -> Tensor:  # u^T G u for every row u of u
            return ((u @ gram) * u).sum(dim=1).clamp(min=0.0)

        v = torch.full((n,), 1.0 / n, dtype=torch.float64, device=gram.device)
        d2 = forms(eye - v).to(cdt)
        w = torch.ones(n, dtype=cdt, device=gram.device)
        for it in range(self.max_iter):
            w = 1.0 / torch.clamp(d2.sqrt(), min=self.eps)
            v_new = w.to(torch.float64) / w.to(torch.float64).sum()
            if self.tol > 0:
                d2 = forms(eye - v_new).to(cdt)
                moved = forms(torch.stack([v_new - v, v_new]))
                v = v_new
                if bool(moved[0].sqrt() <= self.tol * torch.clamp(moved[1].sqrt(), min=1.0)):
                    break
            else:
                v = v_new
                if it + 1 < self.max_iter:
                    d2 = forms(eye - v).to(cdt)
        total = w.sum()
        for z in blocks.weighted_sums(w):
            yield z.div_(total)


def _check_m(n: int, m: int | None, f: int) -> int:
    if m is None:
        return n - f
    check_positive_int("m", m)
    if m > n:
        raise ValueError(f"Expected argument `m` to satisfy 1 <= m <= n = {n} but got {m}")
    return m


def krum_selection(d2: Tensor, f: int, m: int) -> Tensor:
    """Indices of the ``m`` rows of lowest Krum score (ties: lower index first), from squared distances ``d2``.

    The score of row ``i`` is the sum of its squared distances to its ``n - f - 1`` nearest other rows.
    """
    n = d2.shape[0]
    d2 = d2.clone().fill_diagonal_(float("inf"))
    scores = torch.sort(d2, dim=1).values[:, : max(n - f - 1, 0)].sum(dim=1)
    return torch.sort(scores, stable=True).indices[:m]


@dataclass(frozen=True)
class MultiKrum(Rule):
    """The average of the ``m`` rows of lowest Krum score (``None``: ``n - f``; ``1`` is Krum)."""

    m: int | None = None

    def blocks(self, blocks: Blocks, f: int, center: Sequence[Tensor] | None = None) -> Iterator[Tensor]:
        m = _check_m(blocks.n, self.m, f)
        chosen = krum_selection(blocks.squared_distances(), f, m)
        cdt = blocks.compute_dtype
        for part in blocks.parts:
            out = torch.empty(part.shape[1], dtype=cdt, device=part.device)
            for a in range(0, part.shape[1], DIST_CHUNK):
                out[a : a + DIST_CHUNK] = mean_rows(part[chosen, a : a + DIST_CHUNK].to(cdt))
            yield out


@dataclass(frozen=True)
class CenteredClipping(Rule):
    """Centered clipping (Karimireddy et al., 2021): ``iters`` times ``v <- v + mean_i clip_tau(x_i - v)``,
    ``clip_tau(z) = z * min(1, tau / ||z||)``, from a centre (in training the previous aggregate, the state
    the caller keeps; zeros without one). Each iteration needs the ``n`` distances ``||x_i - v||``.
    """

    tau: float = 1.0
    iters: int = 1
    uses_center = True
    needs_num_byzantine = False
    option_fields = {"tau": "cclip_tau", "iters": "cclip_iters"}

    def __post_init__(self) -> None:
        object.__setattr__(self, "tau", check_positive_float("tau", self.tau))
        check_positive_int("iters", self.iters)

    def blocks(self, blocks: Blocks, f: int, center: Sequence[Tensor] | None = None) -> Iterator[Tensor]:
        n, cdt = blocks.n, blocks.compute_dtype
        if center is None:
            v = [torch.zeros(p.shape[1], dtype=cdt, device=p.device) for p in blocks.parts]
        else:
            v = [c.to(cdt) for c in center]
        for _ in range(self.iters):
            dist = blocks.distances_to(v).sqrt()
            coeff = torch.where(dist > self.tau, self.tau / dist, torch.ones_like(dist)).unsqueeze(1)
            moved = []
            for part, vb in zip(blocks.parts, v):
                step = torch.empty_like(vb)
                for a in range(0, part.shape[1], DIST_CHUNK):
                    step[a : a + DIST_CHUNK] = sum_rows((part[:, a : a + DIST_CHUNK].to(cdt) - vb[a : a + DIST_CHUNK])
                                                        * coeff) / n
                moved.append(vb + step)
            v = moved
        yield from v


#: The aggregation rules by name, each with its default settings; each is called as ``rule(x, num_byzantine)``.
RULES: dict[str, Rule] = {
    "mean": Mean(),
    "cwtm": TrimmedMean(),
    "median": CoordinateMedian(),
    "geomed": GeometricMedian(),
    "krum": MultiKrum(m=1),
    "multikrum": MultiKrum(),
    "meamed": MeanAroundMedian(),
    "cclip": CenteredClipping(),
}


# ----------------------------------------------------------------------------- the rules as functions


def mean(x: Tensor, num_byzantine: int | None = None) -> Tensor:
    """Return the coordinate-wise average of the rows of ``x [n, d]`` (``num_byzantine`` validated when given)."""
    return RULES["mean"](x, num_byzantine)


def trimmed_mean(x: Tensor, num_byzantine: int) -> Tensor:
    """Return the coordinate-wise trimmed mean of ``x [n, d]`` (:class:`TrimmedMean`), ``0 <= f < n/2``."""
    return RULES["cwtm"](x, num_byzantine)


def median(x: Tensor, num_byzantine: int | None = None) -> Tensor:
    """Return the coordinate-wise median of ``x [n, d]``; for even ``n`` the average of the two middle values."""
    return RULES["median"](x, num_byzantine)


def meamed(x: Tensor, num_byzantine: int) -> Tensor:
    """Return the mean around the median of ``x [n, d]`` (:class:`MeanAroundMedian`); ``f = 0`` gives the mean."""
    return RULES["meamed"](x, num_byzantine)


def geometric_median(x: Tensor, num_byzantine: int | None = None, eps: float = 1e-8, max_iter: int = 100,
                     tol: float = 1e-6) -> Tensor:
    """Return an approximate geometric median of the rows of ``x [n, d]`` (:class:`GeometricMedian`).

    Args:
        x: Tensor ``[n, d]``.
        num_byzantine: Validated when given, otherwise unused.
        eps: Smoothing: distances below ``eps`` count as ``eps`` (positive).
        max_iter: Maximum number of Weiszfeld iterations (positive).
        tol: Relative movement below which the iteration stops (non-negative; ``0``: no host read).
    """
    return GeometricMedian(eps, max_iter, tol)(x, num_byzantine)


def krum(x: Tensor, num_byzantine: int) -> Tensor:
    """Return the row of ``x [n, d]`` with the lowest Krum score (ties: the lowest index)."""
    return RULES["krum"](x, num_byzantine)


def multi_krum(x: Tensor, num_byzantine: int, m: int | None = None) -> Tensor:
    """Return the mean of the ``m`` rows of ``x [n, d]`` of lowest Krum score (``1 <= m <= n``, default ``n - f``)."""
    return MultiKrum(m)(x, num_byzantine)


def centered_clipping(x: Tensor, num_byzantine: int | None = None, center: Tensor | None = None, tau: float = 1.0,
                      iters: int = 1) -> Tensor:
    """Return centered clipping of ``x [n, d]`` (:class:`CenteredClipping`) from ``center [d]`` (``None``: zeros).

    Args:
        x: Tensor ``[n, d]``.
        num_byzantine: Validated when given, otherwise unused.
        center: The starting point ``[d]``, or ``None`` for zeros.
        tau: The clipping radius (positive, finite).
        iters: Number of iterations (positive).
    """
    return CenteredClipping(tau, iters)(x, num_byzantine, center)
