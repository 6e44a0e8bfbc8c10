"""Adaptive (omniscient) attacks: mimic, and FOE / ALIE with their factor line-searched (pure torch).

They take the honest workers' vectors ``honest [h, d]``; the line-searched ones also know the server's
aggregation, a callable ``[n, d] -> [d]`` (this module stays free of the rules: pass e.g.
``functools.partial(aggregate, rule="cwtm", num_byzantine=1, nnm=True, arc=True)``; the ``ddp_arc``
hook passes its own pipeline).

============= ============================= =================================================
name          function                      Byzantine vector
============= ============================= =================================================
``mimic``     :func:`mimic`                 a copy of one honest vector (default: the first
                                            honest rank's; ``target="farthest"``: the honest
                                            vector farthest from the honest mean)
``foe_ls``    :func:`foe_ls`                :func:`~lightning_clip.sim.attacks.foe` with
                                            ``eps`` line-searched
``alie_ls``   :func:`alie_ls`               :func:`~lightning_clip.sim.attacks.alie` with
                                            ``z`` line-searched
============= ============================= =================================================

The line search maximises the deviation
``|| server(honest + num_copies copies of the attack vector) - mean(honest) ||`` -- the server's
actual pre-aggregation (ARC, static clipping, NNM) and rule with its ``f`` -- over the factor, with two
searches (:data:`LS_SEARCHES`):

* ``"ours"`` (:func:`search_factor`): both signs, no cap. The factor ``0``, ``+-g`` for every ``g`` of a
  grid of magnitudes and the attack's default factor are evaluated; on each side whose largest
  magnitude is still the best of that side, the factor keeps doubling while the deviation grows (by
  more than :data:`LS_GROWTH_RTOL`, relative); then a golden-section search refines the best factor
  between its evaluated neighbours.
* ``"byzfl"`` (:func:`byzfl_search_factor`): the search of the ByzFL library's ``Optimal_*`` attacks,
  on ByzFL's definitions (ALIE: ``mean + tau * std`` with the sample std, i.e. :func:`alie` with
  ``z = -tau``, ``correction = 1``; FOE: ``-tau * mean``): start at ``tau = 0``, step ``+10``, double
  the step while the deviation grows, then shrink it by ``0.8`` per evaluation; 20 evaluations.
* ``"both"`` (the default): the more damaging of the two (ties: ``"ours"``), so the attacker is at
  least as strong as each search on the same vectors.

``sign=1`` or ``-1`` keeps our search to the factors of that sign (and ``0``), still without a cap: one side of
FOE (``eps >= 0``, ByzFL's side) or ALIE (``z <= 0``, ByzFL's ``mean + tau * std``).

The deviation is a one-step objective. Over a training run, a search free to change sign from step
to step (ours, and ``"both"``) can do less damage than one kept to one side (ByzFL's, or ours with
``sign``): its pushes cancel instead of accumulating. A study should take the worst case over runs with each
search.

Deviations are compared with NaN as the least and ``+inf`` (an aggregate that overflows) as the most
damaging; a factor whose attack vector itself overflows is not a candidate. Everything is
deterministic: no randomness, fixed evaluation order, ties to the smaller ``|factor|`` (then the
positive one). The evaluated stack puts the honest rows first, then the copies.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from lightning_clip.exceptions import check_choice, check_finite_float, check_non_negative_int, check_positive_float
from lightning_clip.robust.checks import check_matrix
from lightning_clip.sim.attacks import FOE_EPS, alie, alie_z, check_correction, foe, honest_std

__all__ = [
    "ADAPTIVE_ATTACKS",
    "ALIE_LS_GRID",
    "BYZFL_SEARCH",
    "FOE_LS_GRID",
    "LS_GROWTH_RTOL",
    "LS_REFINE",
    "LS_SEARCHES",
    "LS_SIGNS",
    "Aggregation",
    "LineSearch",
    "alie_ls",
    "attack_deviation",
    "check_aggregation",
    "check_grid",
    "check_search",
    "check_sign",
    "check_target",
    "foe_ls",
    "line_search",
    "mimic",
    "search_factor",
]

#: Default magnitudes of :func:`foe_ls`'s search (``eps``; each is tried with both signs, :data:`FOE_EPS` added).
FOE_LS_GRID: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
#: Default magnitudes of :func:`alie_ls`'s search (``z``; each with both signs, ALIE's default ``z`` added).
ALIE_LS_GRID: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
#: Default number of golden-section evaluations that refine the best factor of :func:`search_factor`.
LS_REFINE = 8
#: The doubling of :func:`search_factor` goes on while the deviation grows by more than this, relative.
LS_GROWTH_RTOL = 1e-6
#: The line searches :func:`line_search` runs: ours, ByzFL's, or both (the more damaging one wins).
LS_SEARCHES = ("both", "ours", "byzfl")
#: The sides our search may keep to: ``0`` both signs, ``1`` positive factors, ``-1`` negative ones.
LS_SIGNS = (0, 1, -1)
#: ByzFL's line search (``Optimal_ALittleIsEnough`` / ``Optimal_InnerProductManipulation`` defaults).
BYZFL_SEARCH: dict[str, float | int] = {"start": 0.0, "delta": 10.0, "ratio": 0.8, "evals": 20}


def _honest(honest: Tensor) -> Tensor:
    return check_matrix("honest", honest)


#: The server's aggregation as the line-searched attacks see it: ``[n, d] -> [d]``.
Aggregation = Callable[[Tensor], Tensor]


def check_aggregation(aggregation: Any) -> Aggregation:
    if not callable(aggregation):
        raise TypeError(
            "Expected argument `aggregation` to be a callable [n, d] -> [d] (e.g. functools.partial(aggregate, "
            f"rule='cwtm', num_byzantine=1, nnm=True, arc=True)) but got {type(aggregation).__name__}"
        )
    return aggregation


def check_copies(num_copies: Any) -> int:
    if not isinstance(num_copies, int) or isinstance(num_copies, bool) or num_copies < 1:
        raise ValueError(f"Expected argument `num_copies` to be a positive integer but got {num_copies!r}")
    return num_copies


def check_grid(name: str, grid: Any, positive: bool) -> tuple[float, ...]:
    """Validate a non-empty sequence of finite (positive) numbers; return it as a tuple of floats."""
    if isinstance(grid, (str, bytes)) or not isinstance(grid, Sequence):
        raise TypeError(f"Expected argument `{name}` to be a sequence of numbers but got {grid!r}")
    if len(grid) == 0:
        raise ValueError(f"Expected argument `{name}` to hold at least one factor but got an empty sequence")
    check = check_positive_float if positive else check_finite_float
    return tuple(check(f"{name}[{i}]", v) for i, v in enumerate(grid))


def check_target(name: str, target: Any) -> int | str:
    if target == "farthest" and isinstance(target, str):
        return target
    if isinstance(target, int) and not isinstance(target, bool) and target >= 0:
        return target
    raise ValueError(f"Expected argument `{name}` to be a non-negative integer or 'farthest' but got {target!r}")


def mimic(honest: Tensor, target: int | str = 0) -> Tensor:
    """Return a copy of one honest vector (the "mimic" attack of Karimireddy et al., 2022).

    Which one is chosen deterministically, from this step's honest vectors only:

    * ``target=i`` (default ``0``): row ``i`` of ``honest``. The DDP hook stacks the honest ranks in
      rank order, so ``0`` copies the first honest rank's vector.
    * ``target="farthest"``: the honest vector farthest (L2) from the honest mean (ties: the lowest
      index) -- a stateless one-step stand-in for the paper's heuristic of mimicking the worker with
      the largest variance along the principal direction, which learns that direction over the first
      steps.

    Args:
        honest: The honest workers' vectors ``[h, d]``.
        target: A row index ``0 <= target < h``, or ``"farthest"``.
    """
    hc = _honest(honest)
    target = check_target("target", target)
    if isinstance(target, str):  # "farthest"
        dist = torch.linalg.vector_norm(hc - hc.mean(dim=0), dim=1)
        index = int(torch.argmax(torch.nan_to_num(dist, nan=-1.0)))  # first maximum
    else:
        if target >= hc.shape[0]:
            raise ValueError(
                f"Expected argument `target` to be a row of `honest`, 0 <= target < {hc.shape[0]}, but got {target}"
            )
        index = target
    return honest[index].clone()


def attack_deviation(honest: Tensor, byzantine: Tensor, num_copies: int, aggregation: Aggregation) -> Tensor:
    """Return ``|| aggregation(honest rows, then num_copies copies of byzantine) - mean(honest) ||`` (0-d).

    The quantity the line-searched attacks maximise (computed in float32, or float64 for float64).

    Args:
        honest: The honest workers' vectors ``[h, d]``.
        byzantine: The vector each Byzantine worker sends, ``[d]``.
        num_copies: How many Byzantine workers send it.
        aggregation: The server's aggregation, a callable ``[n, d] -> [d]`` such as
            ``functools.partial(aggregate, rule="cwtm", num_byzantine=f, nnm=True, arc=True)``.
    """
    hc = _honest(honest)
    aggregation = check_aggregation(aggregation)
    num_copies = check_copies(num_copies)
    if not isinstance(byzantine, Tensor) or tuple(byzantine.shape) != (hc.shape[1],):
        shape = tuple(byzantine.shape) if isinstance(byzantine, Tensor) else type(byzantine).__name__
        raise ValueError(f"Expected argument `byzantine` to have shape [d] = [{hc.shape[1]}] but got {shape}")
    b = byzantine.to(device=hc.device, dtype=hc.dtype).unsqueeze(0).expand(num_copies, -1)
    agg = aggregation(torch.cat([hc, b]))
    if not isinstance(agg, Tensor) or tuple(agg.shape) != (hc.shape[1],):
        shape = tuple(agg.shape) if isinstance(agg, Tensor) else type(agg).__name__
        raise ValueError(f"Expected the `aggregation` to return a vector of shape [{hc.shape[1]}] but got {shape}")
    return torch.linalg.vector_norm(agg.to(hc.dtype) - hc.mean(dim=0))


_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def check_search(search: Any) -> str:
    """Return ``search`` or raise naming it unless it is one of :data:`LS_SEARCHES`."""
    if not isinstance(search, str):
        raise TypeError(f"Expected argument `search` to be a string, one of {LS_SEARCHES}, but got {search!r}")
    return check_choice("search", search, LS_SEARCHES)


def check_sign(sign: Any) -> int:
    """Return ``sign`` or raise naming it unless it is one of :data:`LS_SIGNS` (an int, not a bool)."""
    if isinstance(sign, bool) or not isinstance(sign, int) or sign not in LS_SIGNS:
        raise ValueError(f"Expected argument `sign` to be one of {LS_SIGNS} (0: both signs) but got {sign!r}")
    return sign


def _default_factor(attack: str, h: int, num_copies: int) -> float | None:
    if attack == "foe":
        return FOE_EPS
    try:
        return alie_z(h + num_copies, num_copies)
    except ValueError:
        return None  # ALIE's default z does not exist for this (n, f): the grid alone


def _rank(value: float) -> float:
    """A deviation as the searches compare it: NaN is the least, +inf the most damaging."""
    return -math.inf if math.isnan(value) else value


class _Objective:
    """The deviation of one attack family (``foe`` in ``eps``, ``alie`` in ``z``) on fixed honest vectors.

    Every evaluated factor is remembered (the same factor is never aggregated twice) and its vector is
    bit for bit the one :func:`foe` / :func:`alie` return for it.
    """

    def __init__(self, attack: str, honest: Tensor, num_copies: int, aggregation: Aggregation,
                 correction: int) -> None:
        self.attack, self.honest, self.num_copies, self.aggregation = attack, honest, num_copies, aggregation
        self.mean = honest.mean(dim=0)
        self.std = honest_std(honest, correction) if attack == "alie" else None
        self.values: dict[float, float] = {}

    def vector(self, factor: float) -> Tensor:
        return -factor * self.mean if self.std is None else self.mean - factor * self.std

    def __call__(self, factor: float) -> float:
        if factor not in self.values:
            vec = self.vector(factor)
            if bool(torch.isfinite(vec).all()):
                self.values[factor] = _rank(float(attack_deviation(self.honest, vec, self.num_copies,
                                                                   self.aggregation)))
            else:  # the factor overflows the vector: not an attack of this family
                self.values[factor] = -math.inf
        return self.values[factor]


def _grows(new: float, old: float, rtol: float) -> bool:
    return new > old * (1.0 + rtol) if old > 0 else new > old


def _search_ours(obj: _Objective, grid: tuple[float, ...], default: float | None, refine: int,
                 keep_sign: int = 0) -> float:
    mags = sorted({abs(g) for g in grid} - {0.0})
    points = {0.0, *mags, *(-m for m in mags)} | ({default} if default is not None else set())
    if keep_sign:
        points = {x for x in points if x * keep_sign >= 0}
    for x in sorted(points, key=lambda x: (abs(x), x < 0)):
        obj(x)
    for sign in ((1.0, -1.0) if keep_sign == 0 else (float(keep_sign),)):  # grow each side whose top is its best
        side = [x for x in obj.values if x * sign > 0]
        if not side:
            continue
        top = max(side, key=abs)
        if obj(top) < max(obj(x) for x in side):
            continue
        x, y = top, obj(top)
        while math.isfinite(2.0 * x):
            ny = obj(2.0 * x)
            if not _grows(ny, y, LS_GROWTH_RTOL):
                break
            x, y = 2.0 * x, ny
    best = max(obj.values, key=lambda x: (obj.values[x], -abs(x), x > 0))
    best_y = obj(best)
    evaluated = sorted(obj.values)
    i = evaluated.index(best)
    if refine == 0 or len(evaluated) == 1:
        return best
    lo, hi = evaluated[max(i - 1, 0)], evaluated[min(i + 1, len(evaluated) - 1)]
    c, d = hi - _GOLDEN * (hi - lo), lo + _GOLDEN * (hi - lo)
    fc: float | None = None
    fd: float | None = None
    for _ in range(refine):
        if fc is None:
            fc = obj(c)
            x, y = c, fc
        elif fd is None:
            fd = obj(d)
            x, y = d, fd
        elif fc > fd:  # the maximum is in [lo, d]
            hi, d, fd = d, c, fc
            c = hi - _GOLDEN * (hi - lo)
            fc = obj(c)
            x, y = c, fc
        else:  # the maximum is in [c, hi]
            lo, c, fc = c, d, fd
            d = lo + _GOLDEN * (hi - lo)
            fd = obj(d)
            x, y = d, fd
        if y > best_y:
            best, best_y = x, y
    return best


def _search_byzfl(obj: _Objective, sign: float) -> float:
    """ByzFL's expansion-contraction search over its factor ``tau`` (``factor = sign * tau``); returns ``tau``."""
    start, delta, ratio, evals = (BYZFL_SEARCH[k] for k in ("start", "delta", "ratio", "evals"))
    best_x = float(start)
    best_y = obj(sign * best_x)
    delta = float(delta)
    remaining = int(evals) - 1
    while remaining > 0:  # expansion: double the step while the deviation grows
        prop_x = best_x + delta
        prop_y = obj(sign * prop_x)
        remaining -= 1
        if prop_y > best_y:
            best_x, best_y = prop_x, prop_y
            delta *= 2
        else:
            delta *= ratio
            break
    while remaining > 0:  # contraction: shrink the step, keep what improves
        prop_x = best_x + delta
        prop_y = obj(sign * prop_x)
        remaining -= 1
        if prop_y > best_y:
            best_x, best_y = prop_x, prop_y
        delta *= ratio
    return best_x


@dataclass(frozen=True)
class LineSearch:
    """The outcome of :func:`line_search`.

    Attributes:
        factor: ``eps`` of :func:`~lightning_clip.sim.attacks.foe` or ``z`` of
            :func:`~lightning_clip.sim.attacks.alie`.
        correction: The std correction the ALIE vector uses (``0`` population, ``1`` sample; ``0`` for FOE).
        deviation: :func:`attack_deviation` of the chosen vector (NaN counted as ``-inf``).
        search: ``"ours"`` or ``"byzfl"``: the search that found it.
        evaluations: How many factors were aggregated in all (both searches, each factor once).
    """

    factor: float
    correction: int
    deviation: float
    search: str
    evaluations: int = 0

    def vector(self, attack: str, honest: Tensor) -> Tensor:
        """The attack vector of this factor (``attack``: ``"foe"`` or ``"alie"``)."""
        if attack == "foe":
            return foe(honest, eps=self.factor)
        return alie(honest, z=self.factor, correction=self.correction)


def line_search(
    attack: str,
    honest: Tensor,
    num_copies: int,
    aggregation: Aggregation,
    grid: Sequence[float] | None = None,
    refine: int = LS_REFINE,
    correction: int = 0,
    search: str = "both",
    sign: int = 0,
) -> LineSearch:
    """Return the factor of ``attack`` that maximises :func:`attack_deviation`, and which search found it.

    ``search="ours"`` runs :func:`search_factor`'s search, ``"byzfl"`` ByzFL's (ALIE on the sample std
    with ``z = -tau``, ``tau`` searched upward from 0; FOE with ``eps = tau``), ``"both"`` runs both and
    keeps the larger deviation (ties: ours). With one honest row ALIE has no sample std, so ``"both"``
    runs ours alone. Deterministic; cost: about ``2 len(grid) + 2 + refine`` (ours, plus one per
    doubling) and 20 (ByzFL's) aggregations of ``[h + num_copies, d]``.

    Args:
        attack: ``"foe"`` or ``"alie"``.
        honest: The honest workers' vectors ``[h, d]``.
        num_copies: Number of Byzantine workers sending the attack vector.
        aggregation: The server's aggregation, a callable ``[n, d] -> [d]`` with its pre-aggregation,
            rule and ``f`` (see :func:`attack_deviation`).
        grid: Our search's magnitudes (each tried with both signs); default :data:`FOE_LS_GRID` /
            :data:`ALIE_LS_GRID`. FOE's must be positive, ALIE's finite.
        refine: Number of golden-section evaluations of our search after the grid and the doubling.
        correction: The std of our ALIE search: ``0`` population, ``1`` sample (ByzFL's is always ``1``).
        search: One of :data:`LS_SEARCHES`.
        sign: Our search's side, one of :data:`LS_SIGNS`: ``0`` both signs, ``1`` / ``-1`` the factors of that
            sign only (ByzFL's search is one-sided anyway: ``eps >= 0``, ``z <= 0``).
    """
    check_choice("attack", attack, ("foe", "alie"))
    hc = _honest(honest)
    aggregation = check_aggregation(aggregation)
    num_copies = check_copies(num_copies)
    if grid is None:
        grid = FOE_LS_GRID if attack == "foe" else ALIE_LS_GRID
    grid = check_grid("grid", grid, positive=attack == "foe")
    check_non_negative_int("refine", refine)
    correction = check_correction(correction)
    search = check_search(search)
    sign = check_sign(sign)
    objectives: dict[int, _Objective] = {}  # by std correction: the searches share their evaluations

    def objective(corr: int) -> _Objective:
        corr = corr if attack == "alie" else 0
        if corr not in objectives:
            objectives[corr] = _Objective(attack, hc, num_copies, aggregation, corr)
        return objectives[corr]

    found: list[LineSearch] = []
    if search in ("both", "ours"):
        obj = objective(correction)
        x = _search_ours(obj, grid, _default_factor(attack, hc.shape[0], num_copies), refine, sign)
        found.append(LineSearch(x, correction if attack == "alie" else 0, obj(x), "ours"))
    if search == "byzfl" or (search == "both" and (attack == "foe" or hc.shape[0] >= 2)):
        if attack == "alie" and hc.shape[0] < 2:
            raise ValueError("ByzFL's ALIE search uses the sample std: it needs at least 2 honest rows but got 1")
        obj = objective(1)
        side = -1.0 if attack == "alie" else 1.0
        x = side * _search_byzfl(obj, side)
        found.append(LineSearch(x, 1 if attack == "alie" else 0, obj(x), "byzfl"))
    evaluations = sum(len(o.values) for o in objectives.values())
    found = [replace(r, evaluations=evaluations) for r in found]
    return max(found, key=lambda r: r.deviation)  # the first maximum: ours on a tie


def search_factor(
    attack: str,
    honest: Tensor,
    num_copies: int,
    aggregation: Aggregation,
    grid: Sequence[float] | None = None,
    refine: int = LS_REFINE,
    correction: int = 0,
    sign: int = 0,
) -> float:
    """Return the factor (``eps`` of :func:`foe`, ``z`` of :func:`alie`) our search finds (both signs, no cap).

    1. Evaluate ``0``, ``+g`` and ``-g`` for every magnitude ``g`` of ``grid``, and the attack's default
       (``FOE_EPS``; ALIE's :func:`alie_z` of ``n = h + num_copies``, ``f = num_copies`` when it exists).
    2. On each side (positive, negative) whose largest factor is the best of that side, double the
       factor while the deviation grows by more than :data:`LS_GROWTH_RTOL` (relative): the factor has
       no upper bound other than the vector overflowing.
    3. Golden-section search with ``refine`` more evaluations between the evaluated neighbours of the
       best factor; a refined factor is kept only if it is strictly better.

    Ties go to the smaller ``|factor|``, then to the positive one. NaN deviations count as ``-inf``, ``+inf`` as
    the largest; a factor whose vector overflows is never chosen.

    Args:
        attack, honest, num_copies, aggregation, grid, refine, correction, sign: as in :func:`line_search`.
    """
    return line_search(attack, honest, num_copies, aggregation, grid=grid, refine=refine, correction=correction,
                       search="ours", sign=sign).factor


def foe_ls(
    honest: Tensor,
    num_copies: int,
    aggregation: Aggregation,
    grid: Sequence[float] | None = None,
    refine: int = LS_REFINE,
    search: str = "both",
    sign: int = 0,
) -> Tensor:
    """Return :func:`foe` with ``eps`` chosen by :func:`line_search` against ``aggregation``."""
    res = line_search("foe", honest, num_copies, aggregation, grid=grid, refine=refine, search=search, sign=sign)
    return res.vector("foe", honest)


def alie_ls(
    honest: Tensor,
    num_copies: int,
    aggregation: Aggregation,
    grid: Sequence[float] | None = None,
    refine: int = LS_REFINE,
    correction: int = 0,
    search: str = "both",
    sign: int = 0,
) -> Tensor:
    """Return :func:`alie` with ``z`` (and the std) chosen by :func:`line_search` against ``aggregation``."""
    res = line_search("alie", honest, num_copies, aggregation, grid=grid, refine=refine, correction=correction,
                      search=search, sign=sign)
    return res.vector("alie", honest)


#: Adaptive attacks by name: they take the honest vectors and, for the line-searched ones, the
#: server's aggregation. Kept apart from :data:`ATTACKS`, whose functions take the
#: worker's own vector or the honest vectors only.
ADAPTIVE_ATTACKS: dict[str, Callable[..., Tensor]] = {
    "mimic": mimic,
    "foe_ls": foe_ls,
    "alie_ls": alie_ls,
}
