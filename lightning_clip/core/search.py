"""The pure parts of the clip-threshold search: candidate grid, scoring, selection, refinement and a driver.

A search trains a model once per candidate threshold, every run from the same weights, the same
optimizer state and the same batches, clipping the total gradient norm at the candidate, and
records each optimizer step's training loss. The rule (:class:`SearchRule`) turns those loss
sequences into one threshold:

- score: ``S_k`` = the mean loss of the last ``score_fraction`` of run ``k`` (the whole run at the
  default 1.0); a run whose loss is not finite or above ``divergence_factor`` times its first loss,
  or that stopped before its last step, scores ``+inf``;
- selection: ``k*`` = argmin ``S``; ``SE`` = sample standard deviation (``ddof=1``) of the last
  ``se_fraction`` of run ``k*``'s losses over the square root of their count; the near-ties are the
  candidates with ``S_k <= S_k* + tolerance * SE``. With ``choice="middle"`` (the default) the threshold is
  the candidate nearest the geometric middle of the near-tie band around ``k*`` (the contiguous near-ties,
  :func:`near_tie_band`), or the band's largest candidate when the band reaches the largest or the
  smallest one tried (an edge not measured);
  with ``choice="largest"``, the largest near-tie;
- refinement (``refine=True``): two more runs at ``c * 10**(+-refine_exponent)`` around the chosen
  ``c``, then the same selection over every run.

Each run takes the learning rates of the training's first steps; optionally (``ClipThresholdFinder(
compress_schedule=True)``) a run of ``K`` steps follows the schedule of the whole training compressed into
it instead (its step ``t`` takes the learning rate of training step ``floor(t * T / K)``,
:func:`schedule_steps`).

Nothing here imports Lightning: :func:`search` takes a callable ``run(threshold, num_steps)`` that
trains from the common starting point and returns the per-step losses
(it may stop early once the loss diverges). ``ClipThresholdFinder`` (the Lightning callback) and
``lightning-clip find-threshold`` call it; so can a plain PyTorch or Fabric loop::

    import copy, torch
    from lightning_clip.core.search import candidate_grid, probe_median, search

    start = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    rng = torch.get_rng_state()

    def run(threshold: float, num_steps: int) -> list[float]:
        model.load_state_dict(start[0])                       # the same weights,
        optimizer.load_state_dict(copy.deepcopy(start[1]))    # a fresh copy of the optimizer state,
        torch.set_rng_state(rng)                              # the same batches (a shuffling loader)
        losses = []
        for _, (x, y) in zip(range(num_steps), loader):
            loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), threshold)
            optimizer.step()
            losses.append(loss.item())
        return losses

    m0 = probe_median(norms_of_a_few_batches)   # total gradient norms at the starting weights
    result = search(run, candidate_grid(m0), num_steps=50)
    print(result)                               # the table
    model.load_state_dict(start[0]); optimizer.load_state_dict(start[1]); torch.set_rng_state(rng)
    ...  # train, clipping at result.threshold

Under data parallelism every rank must pass the same loss sequences (e.g. the losses averaged over
the ranks): then every rank computes the same threshold.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from lightning_clip.core.thresholds import (
    FixedThreshold,
    PercentileThreshold,
    QuantileThreshold,
    ThresholdPolicy,
    WarmupThreshold,
    ZScoreThreshold,
)
from lightning_clip.exceptions import check_bool, check_choice, check_fraction, check_positive_float, check_positive_int

__all__ = [
    "DIVERGENCE_FACTOR",
    "RunFn",
    "SearchResult",
    "SearchRule",
    "apply_threshold",
    "candidate_grid",
    "CHOICES",
    "check_candidates",
    "divergence_step",
    "near_tie_band",
    "probe_median",
    "refine_candidates",
    "schedule_steps",
    "score_run",
    "search",
    "select_threshold",
    "standard_error",
]

#: A run diverged when a loss is not finite or above this multiple of its first loss.
DIVERGENCE_FACTOR = 1e3

#: ``run(threshold, num_steps) -> the loss of each optimizer step`` (fewer when it stopped early).
RunFn = Callable[[float, int], Sequence[float]]


def candidate_grid(initial_norm: float, num_candidates: int = 9, first_exponent: float = -3.0,
                   exponent_step: float = 0.5) -> list[float]:
    """``c_k = initial_norm * 10**(first_exponent + k * exponent_step)`` for ``k = 0..num_candidates-1``.

    At the defaults: 9 half-decade steps from ``initial_norm / 1000`` to ``10 * initial_norm``.
    """
    initial_norm = check_positive_float("initial_norm", initial_norm)
    num_candidates = check_positive_int("num_candidates", num_candidates)
    check_positive_float("exponent_step", exponent_step)
    if not math.isfinite(first_exponent):
        raise ValueError(f"Expected argument `first_exponent` to be a finite number but got {first_exponent!r}")
    grid = [initial_norm * 10.0 ** (first_exponent + k * exponent_step) for k in range(num_candidates)]
    if not all(math.isfinite(c) and c > 0 for c in grid):
        raise ValueError(f"The candidate grid from `initial_norm`={initial_norm!r} leaves the positive finite floats: "
                         f"{grid}")
    return grid


def check_candidates(candidates: Any, name: str = "candidates") -> list[float]:
    """``candidates`` as an ascending list of distinct positive finite floats, or an error naming ``name``."""
    if isinstance(candidates, (str, bytes)) or not isinstance(candidates, (Sequence, np.ndarray)):
        raise TypeError(f"Expected argument `{name}` to be a non-empty sequence of positive numbers but got "
                        f"{candidates!r}")
    values = [check_positive_float(name, c.item() if isinstance(c, np.generic) else c) for c in candidates]
    if not values:
        raise ValueError(f"Expected argument `{name}` to be a non-empty sequence of positive numbers but got "
                         f"{candidates!r}")
    return sorted(set(values))


def probe_median(norms: Sequence[float]) -> float:
    """The median of the finite ``norms`` (the starting scale ``m0`` of the grid).

    Raises ``ValueError`` when no norm is finite or the median is not positive (no scale to start from).
    """
    arr = np.asarray(list(norms), dtype=np.float64).reshape(-1)
    fin = arr[np.isfinite(arr)]
    median = float(np.median(fin)) if fin.size else float("nan")
    if not (math.isfinite(median) and median > 0):
        raise ValueError(f"The total gradient norms of the starting weights are {arr.tolist()}: no finite positive "
                         "median to scale the candidate thresholds by; pass `candidates` explicitly")
    return median


def schedule_steps(total_steps: int | None, num_steps: int) -> list[int]:
    """The training step whose learning rate each step of a ``num_steps``-step candidate run takes.

    ``floor(t * total_steps / num_steps)`` for ``t = 0..num_steps-1``: the schedule of the whole training
    (``total_steps`` optimizer steps from the search's starting point) compressed into the run. When the
    training is no longer than a run, or its length is unknown (``None``), the run takes the schedule's
    own first steps, ``0..num_steps-1``.
    """
    num_steps = check_positive_int("num_steps", num_steps)
    if total_steps is None or total_steps <= num_steps:
        return list(range(num_steps))
    total_steps = check_positive_int("total_steps", total_steps)
    return [t * total_steps // num_steps for t in range(num_steps)]


def divergence_step(losses: Sequence[float], factor: float = DIVERGENCE_FACTOR) -> int | None:
    """The first step whose loss is not finite or above ``factor`` times the first loss (``None``: none).

    The ratio test applies only when the first loss is finite and positive.
    """
    arr = np.asarray(list(losses), dtype=np.float64).reshape(-1)
    if not arr.size:
        return None
    bad = ~np.isfinite(arr)
    if math.isfinite(arr[0]) and arr[0] > 0:
        bad |= arr > factor * arr[0]
    hits = np.flatnonzero(bad)
    return int(hits[0]) if hits.size else None


def _tail(losses: Sequence[float], fraction: float) -> np.ndarray:
    arr = np.asarray(list(losses), dtype=np.float64).reshape(-1)
    count = max(1, math.ceil(fraction * arr.size - 1e-9))
    return arr[-count:]


def score_run(losses: Sequence[float], num_steps: int, fraction: float = 1.0,
              divergence_factor: float = DIVERGENCE_FACTOR) -> float:
    """The mean of the last ``fraction`` of ``losses`` (``ceil(fraction * len)`` values, at least one).

    ``+inf`` when the run diverged (:func:`divergence_step`) or has fewer than ``num_steps`` losses
    (it stopped early).
    """
    if len(losses) < num_steps or not len(losses) or divergence_step(losses, divergence_factor) is not None:
        return math.inf
    return float(np.mean(_tail(losses, fraction)))


def standard_error(losses: Sequence[float], fraction: float = 0.5) -> float:
    """``std(tail, ddof=1) / sqrt(len(tail))`` of the last ``fraction`` of ``losses`` (0.0 for a single value)."""
    tail = _tail(losses, fraction)
    if tail.size < 2 or not np.isfinite(tail).all():
        return 0.0
    return float(np.std(tail, ddof=1) / math.sqrt(tail.size))


#: The ways :func:`select_threshold` picks one threshold among the near-ties of the best score.
CHOICES = ("largest", "middle")


def near_tie_band(candidates: Sequence[float], scores: Sequence[float], error: float,
                  tolerance: float) -> tuple[int, int] | None:
    """The indices of the smallest and largest candidate of the near-tie band around the lowest score.

    The band is the longest run of candidates, in ascending order of value, that contains the lowest
    score and in which every score is finite and within ``tolerance * error`` of it. ``None`` when no
    score is finite.
    """
    s, c = _scores_and_candidates(scores, candidates)
    return _band(s, c, error, tolerance)


def _band(s: np.ndarray, c: np.ndarray, error: float, tolerance: float) -> tuple[int, int] | None:
    if not np.isfinite(s).any():
        return None
    order = np.argsort(c)
    ss = s[order]
    best = int(np.argmin(np.where(np.isfinite(ss), ss, np.inf)))
    limit = ss[best] + tolerance * error
    lo = hi = best
    while lo > 0 and np.isfinite(ss[lo - 1]) and ss[lo - 1] <= limit:
        lo -= 1
    while hi < ss.size - 1 and np.isfinite(ss[hi + 1]) and ss[hi + 1] <= limit:
        hi += 1
    return int(order[lo]), int(order[hi])


def select_threshold(candidates: Sequence[float], scores: Sequence[float], error: float,
                     tolerance: float, choice: str = "largest") -> int | None:
    """The index of the threshold chosen among the near-ties of the lowest score (``None``: no finite score).

    ``choice="largest"``: the largest candidate whose score is within ``tolerance * error`` of the lowest.
    ``choice="middle"``: within the near-tie band around the lowest score (:func:`near_tie_band`), the
    candidate nearest the band's geometric middle ``sqrt(c_lo * c_hi)`` in ``log c`` (the larger on a tie),
    when a smaller and a larger candidate than the band's scored worse; when the band reaches the largest
    or the smallest candidate (one of its edges not measured), the band's largest.
    ``candidates`` need not be sorted; ties in value cannot occur (the driver keeps them distinct).
    """
    check_choice("choice", choice, CHOICES)
    s, c = _scores_and_candidates(scores, candidates)
    if not np.isfinite(s).any():
        return None
    if choice == "largest":
        best = float(np.min(s[np.isfinite(s)]))
        ok = np.flatnonzero(np.isfinite(s) & (s <= best + tolerance * error))
        return int(ok[np.argmax(c[ok])])
    band = _band(s, c, error, tolerance)
    assert band is not None
    lo, hi = band
    if _open_edge(c, lo, hi) is not None:  # an edge not measured: the band's largest
        return hi
    inside = np.flatnonzero((c >= c[lo]) & (c <= c[hi]))
    middle = 0.5 * (math.log(c[lo]) + math.log(c[hi]))
    distance = np.abs(np.log(c[inside]) - middle)
    near = inside[distance <= distance.min() * (1 + 1e-9) + 1e-12]
    return int(near[np.argmax(c[near])])


def _open_edge(c: np.ndarray, lo: int, hi: int) -> str | None:
    """``"largest"`` / ``"smallest"`` when the band ``c[lo]..c[hi]`` reaches that end of the candidates tried
    (no threshold beyond it scored worse), else ``None``."""
    if c[hi] == np.max(c):
        return "largest"
    if c[lo] == np.min(c):
        return "smallest"
    return None


def _scores_and_candidates(scores: Sequence[float], candidates: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(list(scores), dtype=np.float64)
    c = np.asarray(list(candidates), dtype=np.float64)
    if s.size != c.size:
        raise ValueError(f"Expected one score per candidate but got {s.size} scores for {c.size} candidates")
    return s, c


def refine_candidates(threshold: float, exponent: float = 0.25) -> tuple[float, float]:
    """``(threshold * 10**-exponent, threshold * 10**exponent)``."""
    threshold = check_positive_float("threshold", threshold)
    return threshold * 10.0 ** -exponent, threshold * 10.0 ** exponent


@dataclass(frozen=True)
class SearchRule:
    """How the runs are scored and one threshold is chosen (see the module docstring).

    Attributes:
        tolerance: near-tie width in standard errors of the best run (>= 0).
        refine: two more runs around the chosen threshold, then the same selection over all runs.
        score_fraction: the last fraction of each run that its score averages, in ``(0, 1]``.
        se_fraction: the last fraction of the best run whose spread gives ``SE``, in ``(0, 1]``.
        refine_exponent: the refinement runs sit at ``c * 10**(+-refine_exponent)`` (> 0).
        divergence_factor: a loss above this multiple of the run's first loss is a divergence (> 1).
        choice: which near-tie is chosen, one of :data:`CHOICES` (see :func:`select_threshold`):
            ``"middle"``, the candidate nearest the geometric middle of the near-tie band (the band's
            largest when the band reaches the largest or the smallest candidate), or ``"largest"``, the
            largest near-tie.
    """

    tolerance: float = 2.0
    refine: bool = True
    score_fraction: float = 1.0
    se_fraction: float = 0.5
    refine_exponent: float = 0.25
    divergence_factor: float = DIVERGENCE_FACTOR
    choice: str = "middle"

    def __post_init__(self) -> None:
        check_positive_float("tolerance", self.tolerance, allow_zero=True)
        check_bool("refine", self.refine)
        check_fraction("score_fraction", self.score_fraction, open_low=True)
        check_fraction("se_fraction", self.se_fraction, open_low=True)
        check_positive_float("refine_exponent", self.refine_exponent)
        if not (isinstance(self.divergence_factor, (int, float)) and self.divergence_factor > 1
                and math.isfinite(self.divergence_factor)):
            raise ValueError(f"Expected argument `divergence_factor` to be a finite number > 1 but got "
                             f"{self.divergence_factor!r}")
        check_choice("choice", self.choice, CHOICES)

    def max_steps(self, num_steps: int) -> int:
        """The longest run :func:`search` asks for when called with ``num_steps`` (what the data must hold)."""
        return num_steps

    def max_runs(self, num_candidates: int) -> int:
        """The most runs :func:`search` makes for ``num_candidates`` candidates."""
        return num_candidates + (2 if self.refine else 0)

    def score(self, losses: Sequence[float], num_steps: int) -> float:
        """One run's score (lower is better; ``+inf`` for a divergence or an early stop)."""
        return score_run(losses, num_steps, self.score_fraction, self.divergence_factor)

    def error(self, losses: Sequence[float]) -> float:
        """The standard error that sets the near-tie width, from the best run's losses."""
        return standard_error(losses, self.se_fraction)

    def select(self, candidates: Sequence[float], scores: Sequence[float], runs: Sequence[Sequence[float]]
               ) -> tuple[int | None, int | None, float]:
        """``(chosen index, best index, SE)`` over the runs so far (``None, None, nan`` when all diverged)."""
        s = np.asarray(list(scores), dtype=np.float64)
        if not np.isfinite(s).any():
            return None, None, math.nan
        best = int(np.argmin(s))
        error = self.error(runs[best])
        return select_threshold(candidates, scores, error, self.tolerance, self.choice), best, error


@dataclass
class SearchResult:
    """What :func:`search` measured and chose.

    Attributes:
        candidates: every threshold tried, ascending (the refinement runs included).
        losses: per candidate, the loss of each optimizer step it ran.
        num_steps: per candidate, the optimizer steps its run was asked for.
        scores: per candidate, its score (``inf``: diverged or stopped early).
        best: index of the lowest score (``None`` when every run diverged).
        chosen: index of the chosen threshold (``None`` when every run diverged).
        threshold: ``candidates[chosen]`` (``nan`` when every run diverged).
        error: the standard error of the best run that set the near-tie width.
        refined: the refinement runs' thresholds (empty without refinement).
        rule: the rule that scored and chose.
    """

    candidates: list[float]
    losses: list[list[float]]
    num_steps: list[int]
    scores: list[float]
    best: int | None
    chosen: int | None
    threshold: float
    error: float
    refined: list[float] = field(default_factory=list)
    rule: SearchRule = field(default_factory=SearchRule)

    @property
    def found(self) -> bool:
        """Whether a threshold was chosen (some run did not diverge)."""
        return self.chosen is not None

    @property
    def total_steps(self) -> int:
        """Optimizer steps the runs took, all together."""
        return sum(len(run) for run in self.losses)

    def state_dict(self) -> dict[str, Any]:
        """Plain values (lists, floats, ints): what a checkpoint stores."""
        out = {k: v for k, v in asdict(self).items() if k != "rule"}
        out["rule"] = asdict(self.rule)
        return out

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> SearchResult:
        """The result :meth:`state_dict` returned."""
        values = dict(state)
        values["rule"] = SearchRule(**values.get("rule", {}))
        return cls(**values)

    def table(self) -> str:
        """The candidates, their scores and the choice, as text."""
        steps = sorted(set(self.num_steps))
        what = "mean loss" if self.rule.score_fraction == 1.0 else f"mean of last {self.rule.score_fraction:.0%}"
        lines = [f"Clip-threshold search: {len(self.candidates)} thresholds, "
                 f"{'/'.join(str(s) for s in steps)} optimizer steps each, from the same weights and batches",
                 f"  {'threshold':<12}{what}"]
        for i, (c, s) in enumerate(zip(self.candidates, self.scores)):
            if math.isfinite(s):
                row = f"  {c:<12.4g}{s:.6g}"
            else:
                step = divergence_step(self.losses[i], self.rule.divergence_factor)
                row = f"  {c:<12.4g}" + (f"diverged at step {step}" if step is not None else
                                         f"stopped after {len(self.losses[i])} of {self.num_steps[i]} steps")
            marks = [m for m, hit in (("best", i == self.best), ("chosen", i == self.chosen)) if hit]
            if c in self.refined:
                marks.append("refinement")
            if marks:
                row += "   <- " + ", ".join(marks)
            lines.append(row)
        if not self.found:
            lines.append("  every run diverged: no threshold; lower the learning rate or pass smaller `candidates`")
            return "\n".join(lines)
        assert self.best is not None
        within = (f"within {self.rule.tolerance:g} standard errors ({self.rule.tolerance * self.error:.3g}) of the "
                  f"best score {self.scores[self.best]:.6g}")
        band = near_tie_band(self.candidates, self.scores, self.error, self.rule.tolerance)
        edge = None if band is None else _open_edge(np.asarray(self.candidates, dtype=np.float64), *band)
        if self.rule.choice == "largest":
            lines.append(f"  chosen: {self.threshold:.4g}, the largest threshold {within}")
        elif edge is not None:
            lines.append(f"  chosen: {self.threshold:.4g}, the largest of the near-tie band {within} (the band "
                         f"reaches the {edge} threshold tried)")
        elif band is not None:
            lines.append(f"  chosen: {self.threshold:.4g}, the middle of the near-tie band "
                         f"{self.candidates[band[0]]:.4g}-{self.candidates[band[1]]:.4g} {within}")
        if len(self.candidates) > 1 and self.chosen == len(self.candidates) - 1:
            lines.append("  the largest threshold was chosen: clipping may not be needed; larger ones were not tried")
        elif len(self.candidates) > 1 and self.chosen == 0:
            lines.append("  the smallest threshold was chosen: smaller ones were not tried")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def search(run: RunFn, candidates: Sequence[float], num_steps: int = 50, rule: SearchRule | None = None
           ) -> SearchResult:
    """Run every candidate, score the runs and choose a threshold (refining around it with ``rule.refine``).

    Args:
        run: ``run(threshold, num_steps)`` trains ``num_steps`` optimizer steps from the common starting
            point, clipping the total gradient norm at ``threshold``, and returns each step's loss; it may
            return fewer once the loss diverged.
        candidates: the thresholds to try (positive; sorted and de-duplicated here).
        num_steps: optimizer steps per run (>= 2).
        rule: scoring and selection (default :class:`SearchRule()`).

    Returns:
        A :class:`SearchResult`; ``threshold`` is ``nan`` when every run diverged.
    """
    rule = SearchRule() if rule is None else rule
    grid = check_candidates(candidates)
    num_steps = _check_num_steps(num_steps)
    runs: dict[float, tuple[list[float], int]] = {}

    def do(c: float) -> None:
        if c not in runs:
            runs[c] = ([float(v) for v in run(c, num_steps)], num_steps)

    for c in grid:
        do(c)
    result = _result(runs, rule, [])
    if rule.refine and result.found:
        refined = [c for c in refine_candidates(result.threshold, rule.refine_exponent) if c not in runs]
        for c in refined:
            do(c)
        result = _result(runs, rule, refined)
    return result


def _check_num_steps(num_steps: Any) -> int:
    num_steps = check_positive_int("num_steps", num_steps)
    if num_steps < 2:
        raise ValueError(f"Expected argument `num_steps` to be an integer >= 2 (a standard error needs two losses) "
                         f"but got {num_steps}")
    return num_steps


def _result(runs: dict[float, tuple[list[float], int]], rule: SearchRule, refined: list[float]) -> SearchResult:
    cands = sorted(runs)
    losses = [runs[c][0] for c in cands]
    steps = [runs[c][1] for c in cands]
    scores = [rule.score(r, n) for r, n in zip(losses, steps)]
    chosen, best, error = rule.select(cands, scores, losses)
    threshold = cands[chosen] if chosen is not None else math.nan
    return SearchResult(candidates=cands, losses=losses, num_steps=steps, scores=scores, best=best, chosen=chosen,
                        threshold=threshold, error=error, refined=list(refined), rule=rule)


def apply_threshold(policy: ThresholdPolicy, value: float) -> str:
    """Give ``policy`` the threshold scale ``value``, keeping what it observed; return the attribute set.

    ========================= ==================================================================
    policy                    what ``value`` becomes
    ========================= ==================================================================
    ``FixedThreshold``        ``max_norm``: the threshold
    ``PercentileThreshold``   ``warmup_threshold``: the threshold while warming up (and, with
                              ``history="clipped"``, the cap the threshold never exceeds)
    ``WarmupThreshold``       ``warmup_threshold``: the threshold while warming up (``then`` keeps its own)
    ``ZScoreThreshold``       ``max_norm``: the threshold while warming up and the cap afterwards
    ``QuantileThreshold``     ``initial``, and the threshold in force now (the tracker starts there)
    ========================= ==================================================================

    The policy's state (history, EMA, step count) is kept.
    """
    value = check_positive_float("value", value)
    state = dict(policy.state_dict())
    if isinstance(policy, (FixedThreshold, ZScoreThreshold)):
        attr = "max_norm"
        policy.max_norm = value
        if isinstance(policy, FixedThreshold):
            state["max_norm"] = value
    elif isinstance(policy, (PercentileThreshold, WarmupThreshold)):
        attr = "warmup_threshold"
        policy.warmup_threshold = value
    elif isinstance(policy, QuantileThreshold):
        attr = "initial"
        policy.initial = value
        state["threshold"] = value
    else:
        raise TypeError(f"Expected a FixedThreshold, PercentileThreshold, WarmupThreshold, ZScoreThreshold or "
                        f"QuantileThreshold but got {policy!r}: no known place for a searched threshold")
    policy.load_state_dict(state)  # rebuilds the device state (cached tensors) with the new value
    return attr
