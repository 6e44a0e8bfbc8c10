"""Gradient-health reports: read a run's logged scalars back and summarise them.

Behind the ``lightning-clip report`` command. Everything here is plain data in, plain data out, so it
is testable without a trainer:

- :func:`~lightning_clip.tools.logs.find_runs` and :func:`~lightning_clip.tools.logs.read_scalars` (in
  :mod:`lightning_clip.tools.logs`, re-exported here) read a run's TensorBoard or CSV scalars;
- :func:`summarize` turns them into a :class:`RunReport` (one :class:`OptimizerHealth` per
  optimizer, from the ``_opt<i>`` suffixes, plus :class:`ARCHealth` when ARC's tags exist);
- :func:`format_report` renders it as text and :func:`plot_report` as a PNG (matplotlib, Agg).

Tags are read with :mod:`lightning_clip.tags`. How to read a clip rate (the readings are
:class:`~lightning_clip.GradientClipping`'s own, ``CLIP_RATE_BANDS``, as in its end-of-fit summary):

=============== ================================ ==========================================
clip rate       interpretation                   action
=============== ================================ ==========================================
< 1%            clipping rarely needed           threshold may be too high
1-5%            rare clipping                    fine; the threshold only catches outliers
5-25%           healthy range                    training is stable
25-50%          frequent clipping                consider a lower learning rate
> 50%           excessive clipping               if the loss is not falling: the threshold is
                                                 too low or the learning rate too high (RNNs
                                                 often train best clipped on most steps)
=============== ================================ ==========================================
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lightning_clip import tags
from lightning_clip.callbacks.clipping import CLIP_RATE_BANDS, clip_rate_advice
from lightning_clip.core.search import DIVERGENCE_FACTOR
from lightning_clip.tools.logs import Series, find_runs, log_source, read_scalars

__all__ = [
    "CLIP_RATE_BANDS",
    "DIVERGENCE_FACTOR",
    "ARCHealth",
    "LossHealth",
    "OptimizerHealth",
    "RunReport",
    "Series",
    "clip_rate_advice",
    "clip_rate_band",
    "detect_divergence",
    "find_runs",
    "format_report",
    "load_reports",
    "plot_report",
    "read_scalars",
    "summarize",
]

#: The label of each band of ``CLIP_RATE_BANDS``.
_BAND_LABELS: tuple[str, ...] = ("< 1%", "1-5%", "5-25%", "25-50%", "> 50%")


def clip_rate_band(rate: float) -> str:
    """Return the clip-rate band (module docstring) that ``rate`` (in ``[0, 1]``) falls in, e.g. ``"5-25%"``."""
    for (upper, _), label in zip(CLIP_RATE_BANDS, _BAND_LABELS):
        if rate < upper:
            return label
    return _BAND_LABELS[-1]


# --------------------------------------------------------------------------------------------------
# Summarising.


@dataclass
class OptimizerHealth:
    """Gradient health of one optimizer, from its logged scalars.

    Attributes:
        optimizer: index ``i`` of the ``_opt<i>`` suffix, ``None`` for a single optimizer (no suffix).
        logged_steps: number of logged pre-clip total norms.
        first_step: first logged optimizer step.
        last_step: last logged optimizer step.
        clip_rate: fraction of optimizer steps clipped: the last logged clip rate (the callback
            counts every step, logged or not), else the fraction of logged steps clipped; ``None``
            without clipping tags.
        clipped_logged: fraction of logged steps whose post-clip norm is below the pre-clip norm.
        mean_norm: mean of the finite logged pre-clip norms.
        median_norm: median of the finite logged pre-clip norms.
        max_norm: maximum of the finite logged pre-clip norms.
        mean_clipped_norm: mean of the finite logged post-clip norms (``None`` without clipping).
        mean_threshold: mean logged threshold (``None`` without clipping).
        last_threshold: last logged threshold (``None`` without clipping).
        nonfinite_steps: logged steps whose pre-clip norm is NaN/Inf.
        skipped_steps: optimizer steps skipped by the guard (its last logged count), if logged.
        spikes: spikes the spike guard counted (its last logged count), if logged.
        max_spike_zscore: the largest finite logged spike z-score, if logged.
        advice: reading of ``clip_rate`` (:func:`clip_rate_advice`).
        band: the clip-rate band (:func:`clip_rate_band`).
        top_parameters: up to 5 ``(parameter name, max logged norm)``, largest first (per-parameter norms).
        tags: the logged tag behind each tag of :data:`~lightning_clip.tags.STEP_TAGS` (its ``_opt<i>`` form
            with several optimizers).
    """

    optimizer: int | None
    logged_steps: int = 0
    first_step: int | None = None
    last_step: int | None = None
    clip_rate: float | None = None
    clipped_logged: float | None = None
    mean_norm: float = float("nan")
    median_norm: float = float("nan")
    max_norm: float = float("nan")
    mean_clipped_norm: float | None = None
    mean_threshold: float | None = None
    last_threshold: float | None = None
    nonfinite_steps: int = 0
    skipped_steps: int | None = None
    spikes: int | None = None
    max_spike_zscore: float | None = None
    advice: str | None = None
    band: str | None = None
    top_parameters: list[tuple[str, float]] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return "gradients" if self.optimizer is None else f"optimizer {self.optimizer}"


@dataclass
class LossHealth:
    """The run's training loss, and whether (and where) it diverged.

    Attributes:
        tag: the loss tag read (:data:`~lightning_clip.tags.LOSS_TAGS`).
        logged_steps: number of logged values.
        first: the first logged value.
        last: the last logged value.
        minimum: the smallest finite logged value (``nan`` when none is finite).
        diverged_step: the first step whose loss is not finite or above ``DIVERGENCE_FACTOR`` times
            ``first`` (``None``: it did not diverge).
        diverged_value: the loss at ``diverged_step``.
    """

    tag: str
    logged_steps: int
    first: float
    last: float
    minimum: float
    diverged_step: int | None = None
    diverged_value: float | None = None

    @property
    def diverged(self) -> bool:
        """Whether the loss diverged."""
        return self.diverged_step is not None

    def describe(self) -> str:
        """One line: ``diverged at step N: <tag> = <value> (...)``, or empty when it did not diverge."""
        if self.diverged_step is None or self.diverged_value is None:
            return ""
        value = self.diverged_value
        why = ("not finite" if not math.isfinite(value)
               else f"over {DIVERGENCE_FACTOR:g}x its first value {self.first:.4g}")
        return f"diverged at step {self.diverged_step}: {self.tag} = {value:.4g} ({why})"


def detect_divergence(series: Series, factor: float = DIVERGENCE_FACTOR) -> tuple[int, float] | None:
    """The first ``(step, value)`` of ``series`` that is not finite or above ``factor`` times its first value.

    The ratio applies only to a positive first value (a loss that can be negative is checked for
    NaN/Inf only). ``None`` when no value qualifies.
    """
    values = np.asarray(series.values, dtype=np.float64)
    if not values.size:
        return None
    bad = ~np.isfinite(values)
    start = float(values[0])
    if math.isfinite(start) and start > 0:
        bad |= values > factor * start
    hits = np.flatnonzero(bad)
    if not hits.size:
        return None
    i = int(hits[0])
    return int(series.steps[i]), float(values[i])


def _loss_health(scalars: Mapping[str, Series]) -> LossHealth | None:
    tag = tags.loss_tag(scalars)
    if tag is None or not len(scalars[tag]):
        return None
    s = scalars[tag]
    fin = _finite(s.values)
    health = LossHealth(tag=tag, logged_steps=len(s), first=float(s.values[0]), last=s.last,
                        minimum=float(fin.min()) if fin.size else float("nan"))
    hit = detect_divergence(s)
    if hit is not None:
        health.diverged_step, health.diverged_value = hit
    return health


@dataclass
class ARCHealth:
    """What ARC did across the ranks (the ARC tags of :class:`~lightning_clip.distributed.strategy.ARCDDPStrategy`).

    Attributes:
        logged_steps: number of logged clipped-rank counts.
        mean_clipped_ranks: mean number of ranks clipped per logged step.
        max_clipped_ranks: largest number of ranks clipped in one step.
        steps_with_clipping: fraction of logged steps where ARC clipped at least one rank.
        mean_threshold: mean ARC threshold (``None`` when it was not logged).
        rank_mean_norm: per rank, mean finite local norm before ARC.
        rank_clip_fraction: per rank, fraction of logged steps whose norm exceeded the threshold
            or was non-finite (needs the logged threshold).
    """

    logged_steps: int = 0
    mean_clipped_ranks: float = 0.0
    max_clipped_ranks: float = 0.0
    steps_with_clipping: float = 0.0
    mean_threshold: float | None = None
    rank_mean_norm: dict[int, float] = field(default_factory=dict)
    rank_clip_fraction: dict[int, float] = field(default_factory=dict)


@dataclass
class RunReport:
    """The gradient-health summary of one run.

    Attributes:
        path: the run directory (or file) that was read.
        source: ``"tensorboard"`` or ``"csv"``.
        optimizers: one entry per optimizer, in index order.
        arc: ARC statistics, if the run logged ARC's tags.
        loss: the training loss and its divergence check, if the run logged a loss tag.
        scalars: every scalar tag read (for plotting or further analysis).
    """

    path: Path
    source: str
    optimizers: list[OptimizerHealth]
    arc: ARCHealth | None
    loss: LossHealth | None = None
    scalars: dict[str, Series] = field(repr=False, default_factory=dict)

    @property
    def diverged(self) -> bool:
        """Whether the run's loss diverged (see :func:`detect_divergence`)."""
        return self.loss is not None and self.loss.diverged


def _finite(values: np.ndarray) -> np.ndarray:
    return np.asarray(values[np.isfinite(values)])


def _aligned(a: Series, b: Series) -> tuple[np.ndarray, np.ndarray]:
    """Values of ``a`` and ``b`` at the steps both logged."""
    _, ia, ib = np.intersect1d(a.steps, b.steps, return_indices=True)
    return a.values[ia], b.values[ib]


def _optimizer_health(idx: int | None, named: Mapping[str, tuple[str, Series]],
                      params: Mapping[str, Series]) -> OptimizerHealth:
    h = OptimizerHealth(optimizer=idx, tags={base: tag for base, (tag, _) in named.items()})
    tagged = {base: s for base, (_, s) in named.items()}
    pre = tagged.get(tags.GRAD_NORM_TOTAL)
    post = tagged.get(tags.GRAD_NORM_CLIPPED)
    thr = tagged.get(tags.CLIP_THRESHOLD)
    rate = tagged.get(tags.CLIP_RATE)
    skipped = tagged.get(tags.NONFINITE_SKIPPED)
    spikes, zscore = tagged.get(tags.SPIKE_SKIPPED), tagged.get(tags.SPIKE_ZSCORE)
    if spikes is not None and len(spikes):
        h.spikes = int(spikes.last)
    if zscore is not None and len(zscore):
        fin = _finite(zscore.values)
        h.max_spike_zscore = float(fin.max()) if fin.size else float("nan")
    if pre is not None and len(pre):
        h.logged_steps = len(pre)
        h.first_step, h.last_step = int(pre.steps[0]), int(pre.steps[-1])
        fin = _finite(pre.values)
        h.nonfinite_steps = int(pre.values.size - fin.size)
        if fin.size:
            h.mean_norm = float(fin.mean())
            h.median_norm = float(np.median(fin))
            h.max_norm = float(fin.max())
    if post is not None and len(post):
        fin = _finite(post.values)
        h.mean_clipped_norm = float(fin.mean()) if fin.size else float("nan")
        if pre is not None:
            a, b = _aligned(pre, post)
            ok = np.isfinite(a) & np.isfinite(b)
            if a.size:
                h.clipped_logged = float(np.count_nonzero(ok & (b < a))) / a.size
    if thr is not None and len(thr):
        fin = _finite(thr.values)
        h.mean_threshold = float(fin.mean()) if fin.size else float("nan")
        h.last_threshold = thr.last
    if rate is not None and len(rate):
        h.clip_rate = rate.last
    elif h.clipped_logged is not None:
        h.clip_rate = h.clipped_logged
    if h.clip_rate is not None and math.isfinite(h.clip_rate):
        h.advice = clip_rate_advice(h.clip_rate)
        h.band = clip_rate_band(h.clip_rate)
    if skipped is not None and len(skipped):
        h.skipped_steps = int(skipped.last)
    if h.first_step is None:
        for s in (post, thr, rate, skipped, spikes, zscore):
            if s is not None and len(s):
                h.first_step, h.last_step = int(s.steps[0]), int(s.steps[-1])
                break
    tops = []
    for name, s in params.items():
        fin = _finite(s.values)
        if fin.size:
            tops.append((name, float(fin.max())))
    h.top_parameters = sorted(tops, key=lambda t: -t[1])[:5]
    return h


def _arc_health(scalars: Mapping[str, Series]) -> ARCHealth | None:
    clipped = scalars.get(tags.ARC_CLIPPED_RANKS)
    thr = scalars.get(tags.ARC_THRESHOLD)
    ranks = {rank: s for t, s in scalars.items() if (rank := tags.arc_norm_rank(t)) is not None}
    if clipped is None and thr is None and not ranks:
        return None
    a = ARCHealth()
    if clipped is not None and len(clipped):
        v = clipped.values
        a.logged_steps = len(clipped)
        a.mean_clipped_ranks = float(v.mean())
        a.max_clipped_ranks = float(v.max())
        a.steps_with_clipping = float(np.count_nonzero(v > 0)) / v.size
    if thr is not None and len(thr):
        fin = _finite(thr.values)
        a.mean_threshold = float(fin.mean()) if fin.size else float("nan")
    for rank in sorted(ranks):
        s = ranks[rank]
        fin = _finite(s.values)
        a.rank_mean_norm[rank] = float(fin.mean()) if fin.size else float("nan")
        if thr is not None and len(thr):
            norm, t = _aligned(s, thr)
            if norm.size:
                over = ~np.isfinite(norm) | (norm > t)
                a.rank_clip_fraction[rank] = float(np.count_nonzero(over)) / norm.size
    return a


def _has_optimizer_suffixes(scalars: Mapping[str, Series]) -> bool | None:
    """Whether the run's per-step tags carry ``_opt<i>`` (``None``: no per-step tag to tell)."""
    for tag in scalars:
        base, idx = tags.split_optimizer(tag)
        if idx is not None and base in tags.STEP_TAGS:
            return True
    return False if any(tag in tags.STEP_TAGS for tag in scalars) else None


def summarize(scalars: Mapping[str, Series], path: str | os.PathLike[str] = "", source: str = "tensorboard"
              ) -> RunReport:
    """Summarise one run's scalars (from :func:`read_scalars`) per optimizer, plus ARC if present.

    Optimizers are told apart by the ``_opt<i>`` suffix of the per-step tags; tags without a
    suffix belong to the single optimizer (``OptimizerHealth.optimizer is None``).
    """
    suffixed = _has_optimizer_suffixes(scalars)
    per_opt: dict[int | None, dict[str, tuple[str, Series]]] = {}
    params: dict[int | None, dict[str, Series]] = {}
    for tag, s in scalars.items():
        parsed = tags.parse(tag, suffixed)
        if parsed is None:
            continue
        if parsed.base in tags.STEP_TAGS:
            per_opt.setdefault(parsed.optimizer, {})[parsed.base] = (tag, s)
        elif parsed.base == tags.GRAD_NORM_PREFIX and parsed.param is not None:
            params.setdefault(parsed.optimizer, {})[parsed.param] = s
    if None in per_opt and len(per_opt) > 1:  # suffix-less tags next to _opt<i> ones: treat as optimizer 0
        merged = per_opt.pop(None)
        per_opt.setdefault(0, {}).update({k: v for k, v in merged.items() if k not in per_opt[0]})
    if None in params and any(i is not None for i in per_opt):
        params.setdefault(0, {}).update(params.pop(None))
    keys = sorted(per_opt, key=lambda i: -1 if i is None else i)
    optimizers = [_optimizer_health(i, per_opt[i], params.get(i, {})) for i in keys]
    loss = _loss_health(scalars)
    if loss is not None and loss.diverged:
        # A diverged run's clip rate says nothing about the threshold being too low: say what happened.
        for h in optimizers:
            if h.clip_rate is not None:
                h.advice = (f"not read: training {loss.describe()}; lower the learning rate, or clip at a "
                            "fixed or lower threshold")
    return RunReport(path=Path(path), source=source, optimizers=optimizers, arc=_arc_health(scalars), loss=loss,
                     scalars=dict(scalars))


def load_reports(root: str | os.PathLike[str]) -> list[RunReport]:
    """:func:`summarize` every run found under ``root`` (see :func:`find_runs`)."""
    reports = []
    for run in find_runs(root):
        reports.append(summarize(read_scalars(run), run, log_source(run)))
    return reports


# --------------------------------------------------------------------------------------------------
# Rendering.


_FAMILIES = ", ".join(dict.fromkeys(t.split("/")[0] + "/*" for t in (*tags.STEP_TAGS, tags.ARC_THRESHOLD)))


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def format_report(report: RunReport) -> str:
    """The gradient-health summary of ``report`` as text (one block per optimizer, then ARC)."""
    lines = [f"Run: {report.path} ({report.source})"]
    loss = report.loss
    if loss is None:
        lines.append(f"  loss: not logged (none of {', '.join(tags.LOSS_TAGS)}): divergence not checked")
    else:
        if loss.diverged:
            lines.append(f"  DIVERGED: {loss.describe()}")
        lines.append(f"  loss ({loss.tag}): first {_fmt(loss.first)}, min {_fmt(loss.minimum)}, last {_fmt(loss.last)} "
                     f"over {loss.logged_steps} logged steps{'' if loss.diverged else ', did not diverge'}")
    if not report.optimizers and report.arc is None:
        lines.append(f"  no gradient tags ({_FAMILIES}) were logged in this run")
    for h in report.optimizers:
        span = "" if h.first_step is None else f" (steps {h.first_step}..{h.last_step})"
        lines.append(f"  {h.name}: {h.logged_steps} logged steps{span}")
        if h.clip_rate is None:
            lines.append("    clip rate: n/a (no clipping tags: monitoring only)")
        else:
            lines.append(f"    clip rate: {h.clip_rate:.1%} [{h.band}] -> {h.advice}")
        lines.append(f"    pre-clip norm: mean {_fmt(h.mean_norm)}, median {_fmt(h.median_norm)}, "
                     f"max {_fmt(h.max_norm)}")
        if h.mean_clipped_norm is not None:
            lines.append(f"    post-clip norm: mean {_fmt(h.mean_clipped_norm)}; threshold: mean "
                         f"{_fmt(h.mean_threshold)}, last {_fmt(h.last_threshold)}")
        skipped = "n/a" if h.skipped_steps is None else str(h.skipped_steps)
        lines.append(f"    non-finite pre-clip norms (logged): {h.nonfinite_steps}; skipped steps: {skipped}")
        if h.spikes is not None:
            largest = "" if h.max_spike_zscore is None else f"; largest logged z-score {_fmt(h.max_spike_zscore)}"
            lines.append(f"    spike guard: {h.spikes} spike(s){largest}")
        if h.top_parameters:
            tops = ", ".join(f"{n} {v:.3g}" for n, v in h.top_parameters[:3])
            lines.append(f"    largest per-parameter norms (max): {tops}")
    if report.arc is not None:
        a = report.arc
        lines.append(f"  ARC: {a.logged_steps} logged steps, clipped ranks per step: mean {a.mean_clipped_ranks:.3g}, "
                     f"max {a.max_clipped_ranks:.0f}; steps with clipping {a.steps_with_clipping:.1%}; "
                     f"threshold mean {_fmt(a.mean_threshold)}")
        for rank, norm in a.rank_mean_norm.items():
            frac = a.rank_clip_fraction.get(rank)
            clip = "" if frac is None else f", above threshold {frac:.1%} of steps"
            lines.append(f"    rank {rank}: mean local norm {_fmt(norm)}{clip}")
    if any(h.clip_rate is not None for h in report.optimizers) and not report.diverged:
        lines.append("  clip-rate guide: <1% threshold may be too high | 5-25% healthy | 25-50% frequent, "
                     "consider a lower learning rate | >50% excessive")
    return "\n".join(lines)


def plot_report(report: RunReport, path: str | os.PathLike[str]) -> Path:
    """Write a PNG of pre-clip norm, post-clip norm and threshold over steps (log y), one panel per optimizer.

    Returns the path written: ``path``, with ``.png`` appended unless it already ends in ``.png``.

    ARC's per-rank norms and threshold get an extra panel. Uses matplotlib's Agg canvas directly
    (no pyplot, no global backend change, no display needed).
    """
    from matplotlib.axes import Axes
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels: list[OptimizerHealth | None] = list(report.optimizers)
    if report.arc is not None:
        panels.append(None)
    fig = Figure(figsize=(9, 3.2 * max(1, len(panels))))
    FigureCanvasAgg(fig)
    axes = fig.subplots(max(1, len(panels)), 1, squeeze=False)[:, 0]
    if not panels:
        axes[0].text(0.5, 0.5, "no gradient tags logged", ha="center", va="center", transform=axes[0].transAxes)

    def curve(ax: Axes, s: Series | None, style: str, label: str, **kw: Any) -> None:
        if s is not None and len(s):
            ok = np.isfinite(s.values) & (s.values > 0)
            ax.plot(s.steps[ok], s.values[ok], style, label=label, **kw)

    for ax, h in zip(axes, panels):
        if h is not None:
            for base, label, style in ((tags.GRAD_NORM_TOTAL, "pre-clip norm", "-"),
                                       (tags.GRAD_NORM_CLIPPED, "post-clip norm", "-"),
                                       (tags.CLIP_THRESHOLD, "threshold", "--")):
                tag = h.tags.get(base)
                curve(ax, report.scalars.get(tag) if tag else None, style, label, linewidth=1.0)
            ax.set_title("gradient norm" if h.optimizer is None else f"gradient norm, optimizer {h.optimizer}")
        else:
            ranks = [(r, s) for t, s in report.scalars.items() if (r := tags.arc_norm_rank(t)) is not None]
            for rank, s in sorted(ranks, key=lambda rs: rs[0]):
                curve(ax, s, "-", f"rank {rank}", linewidth=0.8)
            curve(ax, report.scalars.get(tags.ARC_THRESHOLD), "k--", "ARC threshold", linewidth=1.2)
            ax.set_title("ARC: local gradient norms per rank")
        if report.loss is not None and report.loss.diverged_step is not None:
            ax.axvline(report.loss.diverged_step, color="tab:red", linestyle=":",
                       label=f"loss diverged (step {report.loss.diverged_step})")
        if ax.has_data():
            ax.set_yscale("log")
            ax.legend(loc="best", fontsize=8)
        ax.set_ylabel("L2 norm")
        ax.set_xlabel("optimizer step")
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(str(report.path), fontsize=8)
    fig.tight_layout()
    out = Path(path)
    if out.suffix.lower() != ".png":
        out = out.with_name(out.name + ".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, format="png")
    return out
