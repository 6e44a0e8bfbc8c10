"""Clip-threshold finder: a range test over candidate thresholds, like Lightning's ``lr_find``.

:func:`find_clip_threshold` trains the model for ``num_batches`` optimizer steps once per candidate
threshold, every run from the same initial weights (and RNG state, so the same batches), clipping the
total gradient norm at that candidate, and records the training loss of every step. Each candidate is
scored by its loss decrease: the first step's loss (shared by every run) minus the mean loss over the
run, so that both a fast start and a low end count. A run whose loss is not finite or exceeds 1000x
its first value diverged and ranks last. The suggestion is the candidate with the largest loss
decrease. Afterwards the model's weights and the RNG states are put back exactly::

    result = find_clip_threshold(trainer, model, datamodule=dm)
    print(result)                      # the candidates, their loss decrease, and the suggestion
    result.plot("range_test.png")      # loss curves per candidate
    trainer = Trainer(callbacks=[GradientClipping(result.suggestion)])

Without ``candidates``, the grid is ``num_candidates`` geometric steps from 1/1000 to 10 times the
median gradient norm of the initial weights (:func:`measure_gradient_norms` with ``step=False``).
:func:`measure_gradient_norms` alone records the pre-clip norms of unclipped steps (percentiles and a
histogram): a description of the norms, not a threshold.

The temporary Trainers copy the given trainer's accelerator, precision and ``accumulate_grad_batches``
and run on one device, with no logger, no checkpointing, no validation and none of the given
trainer's callbacks. The given trainer is not touched (nor its optimizers, which each temporary
Trainer creates afresh from ``configure_optimizers``).
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch.callbacks import Callback

from lightning_clip.callbacks.clipping import GradientClipping
from lightning_clip.callbacks.step import optimizer_index, unwrap_optimizer
from lightning_clip.core.grads import gradient_stats
from lightning_clip.exceptions import check_bool, check_fraction, check_positive_float, check_positive_int

__all__ = ["DIVERGENCE_FACTOR", "ClipRangeResult", "GradientNormStats", "default_candidates", "find_clip_threshold",
           "measure_gradient_norms"]

#: A candidate's run diverged when its loss is not finite or above this multiple of its first loss.
DIVERGENCE_FACTOR = 1e3


@dataclass
class GradientNormStats:
    """The pre-clip gradient norms :func:`measure_gradient_norms` recorded, and their percentiles.

    Attributes:
        norms: pre-clip total gradient norm of each optimizer step of optimizer 0 (float64 numpy,
            NaN/Inf kept).
        percentile: the percentile ``suggestion`` was taken at.
        suggestion: ``numpy.percentile(finite norms, percentile)``; ``nan`` if no norm was finite. A
            percentile of unclipped norms describes them; it is not a tested threshold (see
            :func:`find_clip_threshold`).
        median: median of the finite norms.
        p90: 90th percentile of the finite norms.
        p99: 99th percentile of the finite norms.
        max: largest finite norm.
        num_nonfinite: number of steps whose norm was NaN/Inf.
        optimizer_norms: the norms of every optimizer, by index (optimizer 0's are ``norms``).
    """

    norms: np.ndarray
    percentile: float
    suggestion: float
    median: float
    p90: float
    p99: float
    max: float
    num_nonfinite: int
    optimizer_norms: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    @classmethod
    def from_norms(cls, norms: Any, percentile: float = 90.0,
                   optimizer_norms: dict[int, np.ndarray] | None = None) -> GradientNormStats:
        """Summarise ``norms`` (any 1-D array-like) at ``percentile``."""
        percentile = check_fraction("percentile", percentile, low=0.0, high=100.0)
        arr = np.asarray(norms, dtype=np.float64).reshape(-1)
        fin = arr[np.isfinite(arr)]

        def pct(q: float) -> float:
            return float(np.percentile(fin, q)) if fin.size else float("nan")

        return cls(
            norms=arr,
            percentile=percentile,
            suggestion=pct(percentile),
            median=pct(50.0),
            p90=pct(90.0),
            p99=pct(99.0),
            max=float(fin.max()) if fin.size else float("nan"),
            num_nonfinite=int(arr.size - fin.size),
            optimizer_norms=dict(optimizer_norms) if optimizer_norms is not None else {0: arr},
        )

    @property
    def diverged(self) -> bool:
        """True when the last finite norms are over 1000x the first ones (unclipped training blew up)."""
        fin = self.norms[np.isfinite(self.norms)]
        if fin.size < 4:
            return self.num_nonfinite > 0 and fin.size > 0
        k = max(1, fin.size // 10)
        head, tail = float(np.median(fin[:k])), float(np.median(fin[-k:]))
        return self.num_nonfinite > 0 or (head > 0 and tail > 1000.0 * head)

    def suggestion_for(self, optimizer_idx: int) -> float:
        """The suggestion for optimizer ``optimizer_idx`` (same percentile)."""
        if optimizer_idx not in self.optimizer_norms:
            raise ValueError(f"Expected argument `optimizer_idx` to be one of {sorted(self.optimizer_norms)} "
                             f"but got {optimizer_idx!r}")
        norms = self.optimizer_norms[optimizer_idx]
        fin = norms[np.isfinite(norms)]
        return float(np.percentile(fin, self.percentile)) if fin.size else float("nan")

    def __str__(self) -> str:
        lines = [
            f"Gradient norms over {self.norms.size} unclipped optimizer steps:",
            f"  median {self.median:.4g}, p90 {self.p90:.4g}, p99 {self.p99:.4g}, max {self.max:.4g}, "
            f"non-finite steps {self.num_nonfinite}",
            f"  p{self.percentile:g}: {self.suggestion:.4g}",
        ]
        if len(self.optimizer_norms) > 1:
            for i in sorted(self.optimizer_norms):
                lines.append(f"  optimizer {i}: p{self.percentile:g} {self.suggestion_for(i):.4g}")
        if self.num_nonfinite:
            lines.append("  warning: some steps had NaN/Inf gradients; consider a lower learning rate or "
                         "NonFiniteGradientGuard('skip')")
        if not math.isfinite(self.suggestion):
            lines.append("  no finite gradient norm was recorded")
        elif self.diverged:
            lines.append("  warning: the norms grew by more than 1000x over the run: unclipped training diverges, "
                         "so late norms inflate every percentile; for a threshold, run the range test "
                         "(find_clip_threshold)")
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike[str]) -> Path:
        """Write a PNG histogram of the finite norms (log-spaced bins) with the suggestion marked."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(8, 4))
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        fin = self.norms[np.isfinite(self.norms) & (self.norms > 0)]
        if fin.size:
            lo, hi = float(fin.min()), float(fin.max())
            log_bins = hi > 10 * lo
            bins: int | list[float] = np.geomspace(lo, hi * (1 + 1e-9), 40).tolist() if log_bins and lo > 0 else 40
            ax.hist(fin, bins=bins, color="tab:blue", alpha=0.75, label=f"{fin.size} finite norms")
            if log_bins:
                ax.set_xscale("log")
            for value, style, label in ((self.median, ":", "median"), (self.p99, "-.", "p99")):
                ax.axvline(value, color="gray", linestyle=style, label=f"{label} {value:.3g}")
            ax.axvline(self.suggestion, color="tab:red", linewidth=2,
                       label=f"p{self.percentile:g} {self.suggestion:.3g}")
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no finite gradient norm recorded", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("pre-clip total gradient norm")
        ax.set_ylabel("optimizer steps")
        ax.set_title(f"Gradient norms of {self.norms.size} unclipped steps")
        fig.tight_layout()
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100)
        return out


@dataclass
class ClipRangeResult:
    """What :func:`find_clip_threshold` measured: one short run per candidate threshold.

    Attributes:
        candidates: the thresholds tried, ascending.
        losses: per candidate, the training loss of every step it ran (a diverged run stops early).
        start_loss: the first step's loss (the same weights and batch for every candidate).
        mean_loss: per candidate, the mean loss over its run; ``inf`` when it diverged.
        diverged_step: per candidate, the step its loss diverged at, ``-1`` when it did not.
        best: index of the candidate with the largest loss decrease (the lowest mean loss).
        suggestion: ``candidates[best]`` (``nan`` when every candidate diverged).
        num_batches: optimizer steps per candidate.
    """

    candidates: np.ndarray
    losses: list[np.ndarray]
    start_loss: float
    mean_loss: np.ndarray
    diverged_step: np.ndarray
    best: int
    suggestion: float
    num_batches: int

    @property
    def decrease(self) -> np.ndarray:
        """Per candidate, ``start_loss - mean_loss`` (``-inf`` for a diverged run): larger is better."""
        return np.asarray(self.start_loss - self.mean_loss)

    @classmethod
    def from_losses(cls, candidates: Sequence[float] | np.ndarray, losses: Sequence[Any],
                    num_batches: int | None = None) -> ClipRangeResult:
        """Score the recorded ``losses`` of each of ``candidates`` (ascending) and pick the suggestion."""
        cand = np.asarray(candidates, dtype=np.float64)
        runs = [np.asarray(v, dtype=np.float64).reshape(-1) for v in losses]
        if cand.ndim != 1 or not cand.size or len(runs) != cand.size:
            raise ValueError(f"Expected one loss sequence per candidate but got {len(runs)} for {cand.size}")
        start = next((float(r[0]) for r in runs if r.size), float("nan"))
        mean = np.full(cand.size, np.inf)
        diverged = np.full(cand.size, -1, dtype=np.int64)
        for i, r in enumerate(runs):
            step = _divergence_step(r)
            if step is not None:
                diverged[i] = step
            elif r.size:
                mean[i] = float(r.mean())
        steps = num_batches or max(r.size for r in runs)
        if not np.isfinite(mean).any():
            return cls(cand, runs, start, mean, diverged, 0, float("nan"), steps)
        best = int(np.argmin(mean))
        return cls(cand, runs, start, mean, diverged, best, float(cand[best]), steps)

    def __str__(self) -> str:
        lines = [f"Range test: {self.candidates.size} clipping thresholds, {self.num_batches} optimizer steps each, "
                 f"all from the same initial weights (first-step loss {self.start_loss:.4g})",
                 "  threshold   mean loss   loss decrease"]
        for i, c in enumerate(self.candidates):
            if self.diverged_step[i] >= 0:
                row = f"  {c:<11.4g} diverged at step {self.diverged_step[i]}"
            else:
                row = f"  {c:<11.4g} {self.mean_loss[i]:<11.4g} {self.decrease[i]:.4g}"
            if math.isfinite(self.suggestion) and i == self.best:
                row += "   <- largest decrease: suggested"
            lines.append(row)
        if not math.isfinite(self.suggestion):
            lines.append("  every candidate diverged: no suggestion; lower the learning rate or try smaller thresholds")
            return "\n".join(lines)
        lines.append(f"  suggested threshold: {self.suggestion:.4g} (mean loss {self.mean_loss[self.best]:.4g} over "
                     f"{self.num_batches} steps, the largest decrease)")
        if self.candidates.size > 1 and self.best == self.candidates.size - 1:
            lines.append("  the largest candidate trains best: clipping may not be needed; try larger ones")
        elif self.candidates.size > 1 and self.best == 0:
            lines.append("  the smallest candidate trains best: try smaller ones too")
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike[str]) -> Path:
        """Write a PNG of the loss curves (log y), one per candidate, the suggestion's in bold."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(8, 4.5))
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        for c, run in zip(self.candidates, self.losses):
            ok = np.isfinite(run) & (run > 0)
            bold = math.isfinite(self.suggestion) and c == self.suggestion
            ax.plot(np.flatnonzero(ok), run[ok], linewidth=2.2 if bold else 0.9,
                    label=f"threshold {c:.3g}" + (" (suggested)" if bold else ""))
        if ax.has_data():
            ax.set_yscale("log")
            ax.legend(fontsize=7)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss")
        ax.set_title(f"Clipping range test: {self.candidates.size} thresholds from the same initial weights")
        fig.tight_layout()
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100)
        return out


def _divergence_step(losses: np.ndarray) -> int | None:
    """The first index whose loss is not finite or above ``DIVERGENCE_FACTOR`` times the first (``None``)."""
    if not losses.size:
        return None
    bad = ~np.isfinite(losses)
    if math.isfinite(losses[0]) and losses[0] > 0:
        bad |= losses > DIVERGENCE_FACTOR * losses[0]
    hits = np.flatnonzero(bad)
    return int(hits[0]) if hits.size else None


class _NormRecorder(Callback):
    """Records each optimizer's pre-clip total norm in ``on_before_optimizer_step`` (grads unscaled).

    With ``step=False`` it then drops the gradients, so the optimizer step is a no-op (the weights
    and the optimizer state never move).
    """

    def __init__(self, step: bool = True) -> None:
        self.step = step
        self.norms: dict[int, list[float]] = {}

    @torch.no_grad()
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        opt = unwrap_optimizer(optimizer)
        grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        idx = optimizer_index(trainer, opt)
        self.norms.setdefault(idx, []).append(float(gradient_stats(grads).total_norm))
        if not self.step:
            for group in opt.param_groups:
                for p in group["params"]:
                    p.grad = None


class _LossRecorder(Callback):
    """Records the loss ``training_step`` returned, every batch; stops the run once it diverges."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        self.losses.append(float(loss.detach()))
        if _divergence_step(np.asarray(self.losses)) is not None:
            trainer.should_stop = True


def _devices_of(trainer: pl.Trainer) -> Any:
    root = trainer.strategy.root_device
    if root.type not in ("cpu", "mps") and root.index is not None:
        return [root.index]
    return 1


def _check_fit_arguments(trainer: Any, model: Any, datamodule: Any, train_dataloaders: Any) -> None:
    if not isinstance(trainer, pl.Trainer):
        raise TypeError(f"Expected argument `trainer` to be a lightning.pytorch.Trainer but got {trainer!r}")
    if not isinstance(model, pl.LightningModule):
        raise TypeError(f"Expected argument `model` to be a LightningModule but got {type(model).__name__}")
    if datamodule is not None and train_dataloaders is not None:
        raise ValueError("Pass either `datamodule` or `train_dataloaders` to the finder, not both")


@contextmanager
def _restored(model: pl.LightningModule, datamodule: pl.LightningDataModule | None) -> Iterator[None]:
    """Put the model's weights, its trainer reference, the datamodule's trainer and the RNG states back on exit."""
    state = copy.deepcopy(model.state_dict())
    rng = _collect_rng_states(include_cuda=torch.cuda.is_available())
    old_model_trainer = model._trainer
    old_dm_trainer = getattr(datamodule, "trainer", None) if datamodule is not None else None
    was_training = model.training
    try:
        yield
    finally:
        model.load_state_dict(state)
        model._trainer = old_model_trainer
        if datamodule is not None:
            datamodule.trainer = old_dm_trainer
        model.train(was_training)
        _set_rng_states(rng)


def _short_fit(trainer: pl.Trainer, model: pl.LightningModule, datamodule: pl.LightningDataModule | None,
               train_dataloaders: Any, max_steps: int, callbacks: list[Callback]) -> None:
    """``max_steps`` optimizer steps on a temporary Trainer like ``trainer``; the model is restored afterwards."""
    with _restored(model, datamodule), tempfile.TemporaryDirectory(prefix="lightning_clip_finder_") as tmp:
        tmp_trainer = pl.Trainer(
            accelerator=type(trainer.accelerator)(),
            devices=_devices_of(trainer),
            num_nodes=1,
            precision=trainer.precision,
            accumulate_grad_batches=trainer.accumulate_grad_batches,
            max_steps=max_steps,
            max_epochs=-1,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=callbacks,
            default_root_dir=tmp,
        )
        tmp_trainer.fit(model, train_dataloaders=train_dataloaders, datamodule=datamodule)


def measure_gradient_norms(
    trainer: pl.Trainer,
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule | None = None,
    train_dataloaders: Any = None,
    num_batches: int = 100,
    percentile: float = 90.0,
    step: bool = True,
) -> GradientNormStats:
    """Run ``num_batches`` unclipped optimizer steps, record the gradient norms, restore the model.

    Args:
        trainer: the user's trainer; only its accelerator, precision and ``accumulate_grad_batches``
            are read. It is not modified.
        model: the LightningModule; its weights (``state_dict``) are restored exactly afterwards.
        datamodule: where the training batches come from (or ``train_dataloaders``).
        train_dataloaders: a dataloader (or what ``Trainer.fit`` accepts) instead of ``datamodule``.
        num_batches: number of optimizer steps to measure (a positive integer).
        percentile: the percentile of the finite norms to summarise, in ``[0, 100]``.
        step: take the optimizer steps (the norms follow unclipped training). With ``False`` every
            step is a no-op and the norms are those of the initial weights on ``num_batches`` batches.

    Returns:
        A :class:`GradientNormStats` with the norms and their percentiles.
    """
    _check_fit_arguments(trainer, model, datamodule, train_dataloaders)
    num_batches = check_positive_int("num_batches", num_batches)
    percentile = check_fraction("percentile", percentile, low=0.0, high=100.0)
    check_bool("step", step)
    recorder = _NormRecorder(step=step)
    _short_fit(trainer, model, datamodule, train_dataloaders, num_batches, [recorder])
    norms = {i: np.asarray(v, dtype=np.float64) for i, v in sorted(recorder.norms.items())}
    first = norms.get(0, np.zeros(0))
    return GradientNormStats.from_norms(first, percentile, optimizer_norms=norms or {0: first})


def default_candidates(initial_norm: float, num_candidates: int = 9) -> np.ndarray:
    """``num_candidates`` thresholds in geometric steps from ``initial_norm / 1000`` to ``10 * initial_norm``."""
    initial_norm = check_positive_float("initial_norm", initial_norm)
    num_candidates = check_positive_int("num_candidates", num_candidates)
    return np.asarray(initial_norm * np.logspace(-3.0, 1.0, num_candidates), dtype=np.float64)


def find_clip_threshold(
    trainer: pl.Trainer,
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule | None = None,
    train_dataloaders: Any = None,
    num_batches: int = 50,
    candidates: Sequence[float] | None = None,
    num_candidates: int = 9,
) -> ClipRangeResult:
    """Range test: ``num_batches`` steps per candidate threshold from the same weights; suggest the best.

    Args:
        trainer: the user's trainer; only its accelerator, precision and ``accumulate_grad_batches``
            are read. It is not modified, and none of its callbacks runs.
        model: the LightningModule; its weights (``state_dict``) and the RNG states are restored
            before every candidate and at the end.
        datamodule: where the training batches come from (or ``train_dataloaders``).
        train_dataloaders: a dataloader (or what ``Trainer.fit`` accepts) instead of ``datamodule``.
        num_batches: optimizer steps per candidate (a positive integer).
        candidates: the thresholds to try (positive numbers); default :func:`default_candidates` of
            the median gradient norm of the initial weights on the first batches.
        num_candidates: size of the default grid (ignored with ``candidates``).

    Returns:
        A :class:`ClipRangeResult` with every candidate's losses, their scores and the suggestion.
    """
    _check_fit_arguments(trainer, model, datamodule, train_dataloaders)
    num_batches = check_positive_int("num_batches", num_batches)
    num_candidates = check_positive_int("num_candidates", num_candidates)
    if candidates is None:
        stats = measure_gradient_norms(trainer, model, datamodule, train_dataloaders, min(num_batches, 8), step=False)
        if not math.isfinite(stats.median) or stats.median <= 0:
            raise ValueError(f"The gradient norms of the initial weights are {stats.norms.tolist()}: no finite "
                             "positive norm to scale the candidate thresholds by; pass `candidates`")
        grid = default_candidates(stats.median, num_candidates)
    else:
        if isinstance(candidates, (str, bytes)) or not isinstance(candidates, Sequence) or not candidates:
            raise TypeError(f"Expected argument `candidates` to be a non-empty sequence of positive numbers but got "
                            f"{candidates!r}")
        grid = np.asarray(sorted({check_positive_float("candidates", c) for c in candidates}), dtype=np.float64)
    losses = []
    for c in grid:
        recorder = _LossRecorder()
        clip = GradientClipping(float(c), log=False, summary=False)
        _short_fit(trainer, model, datamodule, train_dataloaders, num_batches, [clip, recorder])
        losses.append(recorder.losses)
    return ClipRangeResult.from_losses(grid, losses, num_batches)
