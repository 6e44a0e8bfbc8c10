"""Byzantine behaviours for simulations and tests (pure torch, deterministic given a generator or seed).

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
``foe``       :func:`foe`                   ``-eps * mean(honest)``, ``eps = 10`` (large: FOE)
``ipm``       :func:`ipm`                   ``-eps * mean(honest)``, ``eps = 0.1`` (small: IPM)
============= ============================= =================================================

Adaptive (omniscient) attacks, :data:`ADAPTIVE_ATTACKS`, also take the honest vectors; the
line-searched ones also know the server's aggregation, a callable ``[n, d] -> [d]`` (this module
stays free of the aggregators: pass e.g. ``functools.partial(aggregate, name="cwtm", num_byzantine=1,
nnm=True, arc=True)``):

============= ============================= =================================================
name          function                      Byzantine vector
============= ============================= =================================================
``mimic``     :func:`mimic`                 a copy of one honest vector (default: the first
                                            honest rank's; ``target="farthest"``: the honest
                                            vector farthest from the honest mean)
``foe_ls``    :func:`foe_ls`                :func:`foe` with ``eps`` line-searched
``alie_ls``   :func:`alie_ls`               :func:`alie` with ``z`` line-searched
============= ============================= =================================================

The line search (:func:`search_factor`) picks the factor that maximises
``|| server(honest + num_copies copies of the attack vector) - mean(honest) ||`` -- the server's
actual pre-aggregation (ARC, NNM) and rule with its ``f`` -- over a grid (plus the attack's default
factor, so the searched attack never deviates less than the fixed one), then refines it by a few
golden-section steps around the best grid point. Everything is deterministic: no randomness, ties
go to the smallest factor. The evaluated stack puts the honest rows first, then the copies.

Data-level attacks (label flipping, gradient ascent on the negated loss, seed ``001``) corrupt the
gradient itself, not the vector sent; they are switches of
:class:`~lightning_clip.tools.demo.DigitsClassifier` (``label_flip``, ``gradient_ascent`` with
``byzantine_ranks``), keyed on the module's ``global_rank`` so they work per DDP rank.

:class:`ByzantineSpec` says which ranks misbehave and how; :func:`fixed_clip_defence` is the
fixed-norm clipping of known-Byzantine vectors described in seed ``001`` (a baseline for ARC).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_clip.exceptions import check_choice, check_non_negative_int, check_positive_float

__all__ = [
    "ADAPTIVE_ATTACKS",
    "ALIE_LS_GRID",
    "ATTACKS",
    "ATTACK_NAMES",
    "FIXED_CLIP_MAX_NORM",
    "FOE_EPS",
    "FOE_LS_GRID",
    "GAUSSIAN_STD",
    "IPM_EPS",
    "LS_REFINE",
    "Aggregation",
    "ByzantineSpec",
    "alie",
    "alie_ls",
    "alie_z",
    "attack_deviation",
    "fixed_clip_defence",
    "foe",
    "foe_ls",
    "gaussian",
    "inf_attack",
    "ipm",
    "mimic",
    "nan_attack",
    "scale",
    "search_factor",
    "sign_flip",
    "zero",
]

#: Default attack factor of :func:`foe` (Fall of Empires, large epsilon: a big reversed mean).
FOE_EPS = 10.0
#: Default attack factor of :func:`ipm` (inner product manipulation, small epsilon).
IPM_EPS = 0.1
#: Default standard deviation of :func:`gaussian` (the Gaussian Byzantine vectors of Blanchard et al. 2017).
GAUSSIAN_STD = 200.0
#: Default norm bound of :func:`fixed_clip_defence` (seed 001's ``adversary_clip_factor``).
FIXED_CLIP_MAX_NORM = 2.0
#: Default search grid of :func:`foe_ls` (``eps``; :data:`FOE_EPS` is always added).
FOE_LS_GRID: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0, 100.0)
#: Default search grid of :func:`alie_ls` (``z``; ALIE's default ``z`` is added when it exists).
ALIE_LS_GRID: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0)
#: Default number of golden-section evaluations that refine the best grid factor.
LS_REFINE = 8


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_own(own: Tensor) -> Tensor:
    if not isinstance(own, Tensor):
        raise TypeError(f"Expected argument `own` to be a torch.Tensor but got {type(own).__name__}")
    if not own.is_floating_point():
        raise TypeError(f"Expected argument `own` to have a floating dtype but got {own.dtype}")
    return own


def _check_honest(honest: Tensor) -> Tensor:
    """Validate ``honest`` as a floating ``[h, d]`` tensor with ``h >= 1``; return it in the compute dtype."""
    if not isinstance(honest, Tensor):
        raise TypeError(f"Expected argument `honest` to be a torch.Tensor but got {type(honest).__name__}")
    if honest.ndim != 2 or honest.shape[0] < 1:
        raise ValueError(
            f"Expected argument `honest` to be a 2-D tensor [h, d] with h >= 1 but got shape {tuple(honest.shape)}"
        )
    if not honest.is_floating_point():
        raise TypeError(f"Expected argument `honest` to have a floating dtype but got {honest.dtype}")
    return honest.to(_compute_dtype(honest.dtype))


def _finite_float(name: str, value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"Expected argument `{name}` to be a number but got {value!r} of type {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"Expected argument `{name}` to be a finite number but got {value!r}")
    return float(value)


def sign_flip(own: Tensor) -> Tensor:
    """Return ``-own``."""
    return -_check_own(own)


def scale(own: Tensor, factor: float) -> Tensor:
    """Return ``factor * own`` (``factor`` finite, any sign)."""
    factor = _finite_float("factor", factor)
    return _check_own(own) * factor


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
    own = _check_own(own)
    std = check_positive_float("std", std)
    mean = _finite_float("mean", mean)
    cdt = _compute_dtype(own.dtype)
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
    return torch.full_like(_check_own(own), float("nan"))


def inf_attack(own: Tensor) -> Tensor:
    """Return a vector shaped like ``own`` filled with +Inf."""
    return torch.full_like(_check_own(own), float("inf"))


def zero(own: Tensor) -> Tensor:
    """Return a vector of zeros shaped like ``own``."""
    return torch.zeros_like(_check_own(own))


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


def alie(honest: Tensor, num_byzantine: int | None = None, z: float | None = None) -> Tensor:
    """Return "A Little Is Enough": ``mean(honest) - z * std(honest)`` coordinate-wise.

    The standard deviation is the population one (``correction=0``), so one honest row is enough.

    Args:
        honest: The honest workers' vectors ``[h, d]``.
        num_byzantine: Number ``f`` of Byzantine workers; with ``z`` unset it gives the default
            ``z = alie_z(h + f, f)``.
        z: The number of standard deviations (finite); overrides the default.

    Raises:
        ValueError: If neither ``num_byzantine`` nor ``z`` is given.
    """
    hc = _check_honest(honest)
    if z is None:
        if num_byzantine is None:
            raise ValueError("Expected argument `num_byzantine` or `z` to be given to `alie` but got neither")
        z = alie_z(hc.shape[0] + num_byzantine, num_byzantine)
    z = _finite_float("z", z)
    out = hc.mean(dim=0) - z * hc.std(dim=0, correction=0)
    return out.to(honest.dtype)


def foe(honest: Tensor, eps: float = FOE_EPS) -> Tensor:
    """Return "Fall of Empires" with a large factor: ``-eps * mean(honest)`` (``eps`` positive)."""
    hc = _check_honest(honest)
    eps = check_positive_float("eps", eps)
    return (-eps * hc.mean(dim=0)).to(honest.dtype)


def ipm(honest: Tensor, eps: float = IPM_EPS) -> Tensor:
    """Return inner product manipulation with a small factor: ``-eps * mean(honest)`` (``eps`` positive)."""
    return foe(honest, eps=eps)


def fixed_clip_defence(own: Tensor, max_norm: float = FIXED_CLIP_MAX_NORM) -> Tensor:
    """Return ``own`` clipped to L2 norm ``max_norm``, as seed 001 clips only the known-Byzantine ranks.

    Seed 001's experiment applies ``torch.nn.utils.clip_grad_norm_(params, max_norm=2.0)`` to the
    adversarial clients only (honest clients are never clipped), with the absolute bound
    ``adversary_clip_factor = 2.0``. This reproduces that scaling on one vector:
    ``own * min(1, max_norm / (||own|| + 1e-6))``, the norm taken in float32 (float64 for
    float64). It is a baseline, not a defence one can deploy: it needs to know who is Byzantine,
    and like torch's function it does not neutralise NaN/Inf (a non-finite input gives NaN).

    Args:
        own: The Byzantine worker's vector (any shape).
        max_norm: The norm bound (positive).
    """
    own = _check_own(own)
    max_norm = check_positive_float("max_norm", max_norm)
    cdt = _compute_dtype(own.dtype)
    norm = torch.linalg.vector_norm(own, dtype=cdt)
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    return (own.to(cdt) * coef).to(own.dtype)


# ---------------------------------------------------------------------------------------------------
# Adaptive attacks: mimic and the line-searched FOE / ALIE.


#: The server's aggregation as the line-searched attacks see it: ``[n, d] -> [d]``.
Aggregation = Callable[[Tensor], Tensor]


def _check_aggregation(aggregation: Any) -> Aggregation:
    if not callable(aggregation):
        raise TypeError(
            "Expected argument `aggregation` to be a callable [n, d] -> [d] (e.g. functools.partial(aggregate, "
            f"name='cwtm', num_byzantine=1, nnm=True, arc=True)) but got {type(aggregation).__name__}"
        )
    return aggregation


def _check_copies(num_copies: Any) -> int:
    if not isinstance(num_copies, int) or isinstance(num_copies, bool) or num_copies < 1:
        raise ValueError(f"Expected argument `num_copies` to be a positive integer but got {num_copies!r}")
    return num_copies


def _check_grid(name: str, grid: Any, positive: bool) -> tuple[float, ...]:
    """Validate a non-empty sequence of finite (positive) numbers; return it as a tuple of floats."""
    if isinstance(grid, (str, bytes)) or not isinstance(grid, Sequence):
        raise TypeError(f"Expected argument `{name}` to be a sequence of numbers but got {grid!r}")
    if len(grid) == 0:
        raise ValueError(f"Expected argument `{name}` to hold at least one factor but got an empty sequence")
    check = check_positive_float if positive else _finite_float
    return tuple(check(f"{name}[{i}]", v) for i, v in enumerate(grid))


def _check_target(name: str, target: Any) -> int | str:
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
    hc = _check_honest(honest)
    target = _check_target("target", target)
    if target == "farthest":
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
            ``functools.partial(aggregate, name="cwtm", num_byzantine=f, nnm=True, arc=True)``.
    """
    hc = _check_honest(honest)
    aggregation = _check_aggregation(aggregation)
    num_copies = _check_copies(num_copies)
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
    hc = _check_honest(honest)
    aggregation = _check_aggregation(aggregation)
    num_copies = _check_copies(num_copies)
    if grid is None:
        grid = FOE_LS_GRID if attack == "foe" else ALIE_LS_GRID
    grid = _check_grid("grid", grid, positive=attack == "foe")
    check_non_negative_int("refine", refine)
    h = hc.shape[0]
    mean = hc.mean(dim=0)
    std = hc.std(dim=0, correction=0) if attack == "alie" else None

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

#: Adaptive attacks by name: they take the honest vectors and, for the line-searched ones, the
#: server's aggregation. Kept apart from :data:`ATTACKS`, whose functions take the
#: worker's own vector or the honest vectors only.
ADAPTIVE_ATTACKS: dict[str, Callable[..., Tensor]] = {
    "mimic": mimic,
    "foe_ls": foe_ls,
    "alie_ls": alie_ls,
}

#: Every attack name :class:`ByzantineSpec` accepts: :data:`ATTACKS` then :data:`ADAPTIVE_ATTACKS`.
ATTACK_NAMES: tuple[str, ...] = (*ATTACKS, *ADAPTIVE_ATTACKS)

_NEEDS_HONEST = frozenset({"alie", "foe", "ipm", "mimic", "foe_ls", "alie_ls"})
_NEEDS_AGGREGATION = frozenset({"foe_ls", "alie_ls"})


def _foe_grid(name: str, value: Any) -> tuple[float, ...]:
    return _check_grid(name, value, positive=True)


def _alie_grid(name: str, value: Any) -> tuple[float, ...]:
    return _check_grid(name, value, positive=False)


# Parameters each attack accepts in a spec, with their validators (name, value) -> value.
_PARAMS: dict[str, dict[str, Callable[[str, Any], Any]]] = {
    "sign_flip": {},
    "scale": {"factor": _finite_float},
    "gaussian": {"std": check_positive_float, "mean": _finite_float},
    "nan": {},
    "inf": {},
    "zero": {},
    "alie": {"z": _finite_float},
    "foe": {"eps": check_positive_float},
    "ipm": {"eps": check_positive_float},
    "mimic": {"target": _check_target},
    "foe_ls": {"grid": _foe_grid, "refine": check_non_negative_int},
    "alie_ls": {"grid": _alie_grid, "refine": check_non_negative_int},
}
_REQUIRED: dict[str, tuple[str, ...]] = {"scale": ("factor",)}


@dataclass(frozen=True, init=False)
class ByzantineSpec:
    """Which ranks are Byzantine and what they send; validated on construction.

    Example:
        ``ByzantineSpec(ranks=[1], attack="scale", factor=-100.0)`` or, from YAML,
        ``ByzantineSpec.from_config({"ranks": [1], "attack": "sign_flip"})``.

    Attributes:
        ranks: The Byzantine ranks, sorted, unique, non-negative.
        attack: One of :data:`ATTACK_NAMES` (a key of :data:`ATTACKS` or :data:`ADAPTIVE_ATTACKS`).
        params: Keyword arguments of the attack (see the attack functions); a ``grid`` is stored as
            a tuple of floats.
        fixed_clip: If set, the Byzantine vector is then clipped to this norm with
            :func:`fixed_clip_defence` (seed 001's baseline); ``None`` disables it.
    """

    ranks: tuple[int, ...]
    attack: str
    params: dict[str, Any]
    fixed_clip: float | None

    def __init__(
        self, ranks: Sequence[int], attack: str, fixed_clip: float | None = None, **params: Any
    ) -> None:
        if isinstance(ranks, (str, bytes)) or not isinstance(ranks, Sequence):
            raise TypeError(f"Expected argument `ranks` to be a sequence of integers but got {ranks!r}")
        for r in ranks:
            if not isinstance(r, int) or isinstance(r, bool) or r < 0:
                raise ValueError(f"Expected argument `ranks` to hold non-negative integers but got {list(ranks)!r}")
        if not ranks:
            raise ValueError("Expected argument `ranks` to name at least one rank but got []")
        if len(set(ranks)) != len(ranks):
            raise ValueError(f"Expected argument `ranks` to hold distinct ranks but got {list(ranks)!r}")
        if not isinstance(attack, str):
            raise TypeError(f"Expected argument `attack` to be a string but got {attack!r}")
        check_choice("attack", attack, ATTACK_NAMES)
        allowed = _PARAMS[attack]
        checked: dict[str, Any] = {}
        for key, value in params.items():
            if key not in allowed:
                names = ", ".join(f"`{k}`" for k in allowed) or "none"
                raise ValueError(
                    f"Attack {attack!r} got an unexpected parameter `{key}` = {value!r}; allowed: {names}"
                )
            checked[key] = allowed[key](key, value)
        for key in _REQUIRED.get(attack, ()):
            if key not in checked:
                raise ValueError(f"Attack {attack!r} needs the parameter `{key}` but it was not given")
        if fixed_clip is not None:
            fixed_clip = check_positive_float("fixed_clip", fixed_clip)
        object.__setattr__(self, "ranks", tuple(sorted(ranks)))
        object.__setattr__(self, "attack", attack)
        object.__setattr__(self, "params", checked)
        object.__setattr__(self, "fixed_clip", fixed_clip)

    def __hash__(self) -> int:
        return hash((self.ranks, self.attack, tuple(sorted(self.params.items())), self.fixed_clip))

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ByzantineSpec:
        """Build a spec from a plain mapping such as YAML's ``{ranks: [1], attack: sign_flip}``.

        Keys other than ``ranks``, ``attack`` and ``fixed_clip`` are attack parameters; they may
        also be nested under ``params``.
        """
        if not isinstance(config, Mapping):
            raise TypeError(f"Expected argument `config` to be a mapping but got {type(config).__name__}")
        missing = [key for key in ("ranks", "attack") if key not in config]
        if missing:
            raise ValueError(f"Expected argument `config` to have the keys `ranks` and `attack` but {missing} missing")
        rest = {k: v for k, v in config.items() if k not in ("ranks", "attack", "fixed_clip", "params")}
        nested = config.get("params") or {}
        if not isinstance(nested, Mapping):
            raise TypeError(f"Expected `params` in argument `config` to be a mapping but got {nested!r}")
        both = sorted(set(rest) & set(nested))
        if both:
            raise ValueError(f"Expected each attack parameter once in argument `config` but {both} given twice")
        ranks = config["ranks"]
        if isinstance(ranks, int) and not isinstance(ranks, bool):
            ranks = [ranks]
        return cls(ranks=ranks, attack=config["attack"], fixed_clip=config.get("fixed_clip"), **rest, **nested)

    def to_config(self) -> dict[str, Any]:
        """Return the flat plain-value mapping :meth:`from_config` reads back."""
        params = {k: list(v) if isinstance(v, tuple) else v for k, v in self.params.items()}
        config: dict[str, Any] = {"ranks": list(self.ranks), "attack": self.attack, **params}
        if self.fixed_clip is not None:
            config["fixed_clip"] = self.fixed_clip
        return config

    @property
    def needs_honest(self) -> bool:
        """Whether :meth:`apply` needs the honest vectors (``alie``, ``foe``, ``ipm`` and the adaptive attacks)."""
        return self.attack in _NEEDS_HONEST

    @property
    def needs_aggregation(self) -> bool:
        """Whether :meth:`apply` needs the server's aggregation (``foe_ls``, ``alie_ls``)."""
        return self.attack in _NEEDS_AGGREGATION

    @property
    def num_byzantine(self) -> int:
        """The number of Byzantine ranks."""
        return len(self.ranks)

    def is_byzantine(self, rank: int) -> bool:
        """Return whether ``rank`` is one of the Byzantine ranks."""
        return rank in self.ranks

    def check_world_size(self, world_size: int) -> None:
        """Raise ``ValueError`` unless every rank exists and the attack can run with ``world_size`` workers."""
        if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
            raise ValueError(f"Expected argument `world_size` to be a positive integer but got {world_size!r}")
        if self.ranks[-1] >= world_size:
            raise ValueError(
                f"Expected the Byzantine `ranks` to be in [0, world_size) = [0, {world_size}) but got "
                f"{list(self.ranks)}"
            )
        if self.needs_honest and self.num_byzantine >= world_size:
            raise ValueError(
                f"Attack {self.attack!r} needs at least one honest rank but all {world_size} ranks are Byzantine"
            )
        if self.attack == "alie" and "z" not in self.params:
            alie_z(world_size, self.num_byzantine)
        target = self.params.get("target")
        if self.attack == "mimic" and isinstance(target, int) and target >= world_size - self.num_byzantine:
            raise ValueError(
                f"Expected the mimic `target` to index an honest rank, 0 <= target < "
                f"{world_size - self.num_byzantine} (world size {world_size}, {self.num_byzantine} Byzantine), "
                f"but got {target}"
            )

    def apply(
        self,
        own: Tensor,
        honest: Tensor | None = None,
        generator: torch.Generator | int | None = None,
        aggregation: Aggregation | None = None,
    ) -> Tensor:
        """Return the vector a Byzantine worker sends instead of ``own``.

        The line-searched attacks assume all :attr:`num_byzantine` Byzantine workers send the same
        vector (what every Byzantine rank computes from the same inputs).

        Args:
            own: The worker's own (honest) vector; the result has its shape, dtype and device.
            honest: The honest workers' vectors ``[h, *own.shape]``; required when :attr:`needs_honest`.
            generator: Randomness of ``gaussian`` (a ``torch.Generator``, an int seed, or ``None``).
            aggregation: The server's aggregation, a callable ``[n, d] -> [d]``; required when
                :attr:`needs_aggregation`. A ``fixed_clip`` applies after the attack and is not seen
                by the line search.
        """
        own = _check_own(own)
        if self.needs_aggregation and aggregation is None:
            raise ValueError(
                f"Attack {self.attack!r} line-searches against the server's aggregation: pass `aggregation`, "
                "a callable [n, d] -> [d] such as functools.partial(aggregate, name='cwtm', num_byzantine=1, "
                "nnm=True, arc=True)"
            )
        if self.needs_honest:
            if honest is None:
                raise ValueError(f"Attack {self.attack!r} needs the honest vectors: pass `honest` of shape [h, d]")
            if not isinstance(honest, Tensor) or tuple(honest.shape[1:]) != tuple(own.shape) or honest.ndim < 2:
                shape = tuple(honest.shape) if isinstance(honest, Tensor) else type(honest).__name__
                raise ValueError(
                    f"Expected argument `honest` to have shape [h, *own.shape] = [h, {', '.join(map(str, own.shape))}]"
                    f" but got {shape}"
                )
            flat = honest.reshape(honest.shape[0], -1)
            if self.attack == "alie":
                out = alie(flat, num_byzantine=self.num_byzantine, **self.params)
            elif self.attack == "mimic":
                out = mimic(flat, **self.params)
            elif self.needs_aggregation:
                fn = foe_ls if self.attack == "foe_ls" else alie_ls
                out = fn(flat, self.num_byzantine, _check_aggregation(aggregation), **self.params)
            else:
                out = ATTACKS[self.attack](flat, **self.params)
            out = out.reshape(own.shape).to(device=own.device, dtype=own.dtype)
        elif self.attack == "gaussian":
            out = gaussian(own, generator=generator, **self.params)
        else:
            out = ATTACKS[self.attack](own, **self.params)
        if self.fixed_clip is not None:
            out = fixed_clip_defence(out, self.fixed_clip)
        return out
