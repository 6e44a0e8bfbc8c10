"""The clip-threshold search outside ``fit``: ``lightning-clip find-threshold`` and :func:`find_clip_threshold`.

:func:`find_clip_threshold` runs :class:`~lightning_clip.ClipThresholdFinder`, the same search and the same
rule as the callback (:mod:`lightning_clip.core.search`), on a temporary Trainer, and returns its
:class:`~lightning_clip.core.search.SearchResult`; the model's weights and the RNG states are put back::

    result = find_clip_threshold(trainer, model, datamodule=dm)
    print(result)                                   # the candidates, their scores and the choice
    plot_search(result, "search.png")              # lightning_clip.callbacks.finder.plot_search
    trainer = Trainer(callbacks=[GradientClipping(result.threshold)])

Inside ``fit``, ``ClipThresholdFinder()`` next to a ``GradientClipping`` does the same and sets the threshold.
:func:`measure_gradient_norms` records the pre-clip norms of unclipped steps (percentiles and a histogram):
a description of the norms, not a threshold.

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
from collections.abc import Iterator, Sequence
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
from lightning_clip.callbacks.finder import ClipThresholdFinder, quiet_max_steps
from lightning_clip.callbacks.step import optimizer_index, unwrap_optimizer
from lightning_clip.core.grads import gradient_stats
from lightning_clip.core.search import SearchResult
from lightning_clip.exceptions import check_bool, check_fraction, check_positive_int

__all__ = ["GradientNormStats", "find_clip_threshold", "measure_gradient_norms"]


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
                         "so late norms inflate every percentile; for a threshold, run the search "
                         "(ClipThresholdFinder, or find_clip_threshold)")
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


def find_clip_threshold(
    trainer: pl.Trainer,
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule | None = None,
    train_dataloaders: Any = None,
    num_batches: int = 50,
    candidates: Sequence[float] | None = None,
    num_candidates: int = 9,
    num_probe_batches: int = 8,
    tolerance: float = 2.0,
    refine: bool = True,
    compress_schedule: bool = False,
    fit_steps: int | None = None,
    choice: str = "middle",
) -> SearchResult:
    """The search of :class:`~lightning_clip.ClipThresholdFinder` on a temporary Trainer; the result, not a fit.

    Args:
        trainer: the user's trainer; only its accelerator, precision and ``accumulate_grad_batches``
            are read. It is not modified, and none of its callbacks runs.
        model: the LightningModule; its weights (``state_dict``) and the RNG states are put back afterwards.
        datamodule: where the training batches come from (or ``train_dataloaders``).
        train_dataloaders: a dataloader (or what ``Trainer.fit`` accepts) instead of ``datamodule``.
        num_batches, candidates, num_candidates, num_probe_batches, tolerance, refine, compress_schedule,
            choice: as for :class:`~lightning_clip.ClipThresholdFinder`.
        fit_steps: with ``compress_schedule``, the optimizer steps of the fit the threshold is for, whose
            schedule each run follows compressed, as the callback does at fit start (default:
            ``trainer.max_steps`` when positive, else the schedule's first steps).

    Returns:
        The :class:`~lightning_clip.core.search.SearchResult` (``threshold`` is the choice).

    Raises:
        RuntimeError: every candidate diverged (the message holds the table).
    """
    _check_fit_arguments(trainer, model, datamodule, train_dataloaders)
    finder = ClipThresholdFinder(candidates=candidates, num_candidates=num_candidates, num_batches=num_batches,
                                 num_probe_batches=num_probe_batches, tolerance=tolerance, refine=refine, plot=False,
                                 choice=choice)
    finder.verbose = False
    finder.compress_schedule = check_bool("compress_schedule", compress_schedule)
    if fit_steps is None and trainer.max_steps > 0:
        fit_steps = trainer.max_steps
    finder.fit_steps = None if fit_steps is None else check_positive_int("fit_steps", fit_steps)
    if finder.fit_steps is None:
        finder.compress_schedule = False
    clipping = GradientClipping(log=False, summary=False)
    with quiet_max_steps():  # 0 steps: the search only
        _short_fit(trainer, model, datamodule, train_dataloaders, 0, [finder, clipping])
    assert finder.results is not None  # the search ran in on_fit_start (or raised)
    return finder.results
