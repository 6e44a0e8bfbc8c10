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

The line search (:func:`search_factor`) picks the factor that maximises
``|| server(honest + num_copies copies of the attack vector) - mean(honest) ||`` -- the server's
actual pre-aggregation (ARC, static clipping, NNM) and rule with its ``f`` -- over a grid (plus the
attack's default factor, so the searched attack never deviates less than the fixed one), then refines
it by a few golden-section steps around the best grid point. Everything is deterministic: no
randomness, ties go to the smallest factor. The evaluated stack puts the honest rows first, then the
copies.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_clip.exceptions import check_choice, check_finite_float, check_non_negative_int, check_positive_float
from lightning_clip.robust.checks import check_matrix
from lightning_clip.sim.attacks import FOE_EPS, alie, alie_z, foe

__all__ = [
    "ADAPTIVE_ATTACKS",
    "ALIE_LS_GRID",
    "FOE_LS_GRID",
    "LS_REFINE",
    "Aggregation",
    "alie_ls",
    "attack_deviation",
    "check_aggregation",
    "check_grid",
    "check_target",
    "foe_ls",
    "mimic",
    "search_factor",
]

#: Default search grid of :func:`foe_ls` (``eps``; :data:`FOE_EPS` is always added).
FOE_LS_GRID: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0, 100.0)
#: Default search grid of :func:`alie_ls` (``z``; ALIE's default ``z`` is added when it exists).
ALIE_LS_GRID: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0)
#: Default number of golden-section evaluations that refine the best grid factor.
LS_REFINE = 8


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


def _default_factor(attack: str, h: int, num_copies: int) -> float | None:
    if attack == "foe":
        return FOE_EPS
    try:
        return alie_z(h + num_copies, num_copies)
    except ValueError:
        return None  # ALIE's default z does not exist for this (n, f): the grid alone


def search_factor(
    attack: str,
    honest: Tensor,
    num_copies: int,
    aggregation: Aggregation,
    grid: Sequence[float] | None = None,
    refine: int = LS_REFINE,
) -> float:
    """Return the factor (``eps`` of :func:`foe`, ``z`` of :func:`alie`) that maximises :func:`attack_deviation`.

    1. Evaluate every factor of ``grid`` and the attack's default (``FOE_EPS``; ALIE's
       :func:`alie_z` of ``n = h + num_copies``, ``f = num_copies`` when it exists), in increasing
       order; keep the first best (ties: the smallest factor).
    2. Golden-section search with ``refine`` more evaluations in the bracket between the grid
       neighbours of the best factor (one side only at the ends of the grid); a refined factor is
       kept only if it is strictly better.

    Deterministic: the same inputs give the same factor on every machine running the same
    arithmetic. Non-finite deviations count as ``-inf``. Cost: ``len(grid) + 1 + refine`` server
    aggregations of ``[h + num_copies, d]`` (a simulation cost; real workers never run it).

    Args:
        attack: ``"foe"`` or ``"alie"``.
        honest: The honest workers' vectors ``[h, d]``.
        num_copies: Number of Byzantine workers sending the attack vector.
        aggregation: The server's aggregation, a callable ``[n, d] -> [d]`` with its pre-aggregation,
            rule and ``f`` (see :func:`attack_deviation`).
        grid: Candidate factors; default :data:`FOE_LS_GRID` / :data:`ALIE_LS_GRID`. FOE's must be
            positive, ALIE's finite.
        refine: Number of golden-section evaluations after the grid (``0``: grid only).
    """
    check_choice("attack", attack, ("foe", "alie"))
    hc = _honest(honest)
    aggregation = check_aggregation(aggregation)
    num_copies = check_copies(num_copies)
    if grid is None:
        grid = FOE_LS_GRID if attack == "foe" else ALIE_LS_GRID
    grid = check_grid("grid", grid, positive=attack == "foe")
    check_non_negative_int("refine", refine)
    h = hc.shape[0]
    mean = hc.mean(dim=0)
    std = hc.std(dim=0, correction=0)

    def score(factor: float) -> float:
        vec = -factor * mean if attack == "foe" else mean - factor * std
        value = float(attack_deviation(hc, vec, num_copies, aggregation))
        return value if math.isfinite(value) else -math.inf

    candidates = set(grid)
    default = _default_factor(attack, h, num_copies)
    if default is not None:
        candidates.add(default)
    points = sorted(candidates)
    scores = [score(x) for x in points]
    best = max(range(len(points)), key=lambda i: (scores[i], -i))  # first maximum
    best_x, best_y = points[best], scores[best]
    if refine == 0 or len(points) == 1:
        return best_x
    lo = points[max(best - 1, 0)]
    hi = points[min(best + 1, len(points) - 1)]
    c, d = hi - _GOLDEN * (hi - lo), lo + _GOLDEN * (hi - lo)
    fc: float | None = None
    fd: float | None = None
    for _ in range(refine):
        if fc is None:
            fc = score(c)
            x, y = c, fc
        elif fd is None:
            fd = score(d)
            x, y = d, fd
        elif fc > fd:  # the maximum is in [lo, d]
            hi, d, fd = d, c, fc
            c = hi - _GOLDEN * (hi - lo)
            fc = score(c)
            x, y = c, fc
        else:  # the maximum is in [c, hi]
            lo, c, fc = c, d, fd
            d = lo + _GOLDEN * (hi - lo)
            fd = score(d)
            x, y = d, fd
        if y > best_y:
            best_x, best_y = x, y
    return best_x


def foe_ls(
    honest: Tensor,
    num_copies: int,
    aggregation: Aggregation,
    grid: Sequence[float] | None = None,
    refine: int = LS_REFINE,
) -> Tensor:
    """Return :func:`foe` with ``eps`` chosen by :func:`search_factor` against ``aggregation``."""
    eps = search_factor("foe", honest, num_copies, aggregation, grid=grid, refine=refine)
    return foe(honest, eps=eps)


def alie_ls(
    honest: Tensor,
    num_copies: int,
    aggregation: Aggregation,
    grid: Sequence[float] | None = None,
    refine: int = LS_REFINE,
) -> Tensor:
    """Return :func:`alie` with ``z`` chosen by :func:`search_factor` against ``aggregation``."""
    z = search_factor("alie", honest, num_copies, aggregation, grid=grid, refine=refine)
    return alie(honest, z=z)


#: Adaptive attacks by name: they take the honest vectors and, for the line-searched ones, the
#: server's aggregation. Kept apart from :data:`ATTACKS`, whose functions take the
#: worker's own vector or the honest vectors only.
ADAPTIVE_ATTACKS: dict[str, Callable[..., Tensor]] = {
    "mimic": mimic,
    "foe_ls": foe_ls,
    "alie_ls": alie_ls,
}
