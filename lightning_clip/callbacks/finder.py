"""ClipThresholdFinder: a range test over clipping thresholds at the start of ``fit`` (like ``LearningRateFinder``)."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers.logger import DummyLogger
from lightning.pytorch.loops.loop import _Loop
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_clip import tags
from lightning_clip.callbacks.clipping import GradientClipping
from lightning_clip.callbacks.step import check_strategy, step_state
from lightning_clip.core.search import (
    CHOICES,
    SearchResult,
    SearchRule,
    candidate_grid,
    check_candidates,
    divergence_step,
    probe_median,
    schedule_steps,
    search,
)
from lightning_clip.exceptions import check_bool, check_choice, check_positive_float, check_positive_int

__all__ = ["ClipThresholdFinder", "plot_search"]

#: File name of the plot written next to the logs (``_epoch<m>`` added for a milestone's search).
PLOT_NAME = "clip_threshold_finder"
#: How many probe steps with a non-finite norm (a GradScaler finding its scale) the probe may take on top.
PROBE_EXTRA_STEPS = 32


class ClipThresholdFinder(Callback):
    """Pick the clipping threshold with a short range test when ``fit`` starts; set it on ``GradientClipping``.

    In ``on_fit_start`` (and at the start of each epoch in ``milestones``) the finder saves the weights,
    the gradients, the optimizer, scheduler and precision-plugin (AMP scaler) states, the loop progress,
    the RNG states and the training dataloaders' generators. It then

    1. measures ``m0``, the median total gradient norm of ``num_probe_batches`` optimizer steps whose update
       is dropped (every one at the starting weights), unless ``candidates`` are given; steps whose norm is
       not finite (a GradScaler lowering its scale) do not count, up to ``PROBE_EXTRA_STEPS`` more steps;
    2. runs ``num_batches`` optimizer steps per candidate ``c_k = m0 * 10**(-3 + k/2)``,
       ``k = 0..num_candidates-1``, each from the saved state and on the same batches (Lightning's own
       training loop: AMP, gradient accumulation and data parallelism as configured), under the schedulers'
       first steps (or, with ``compress_schedule``, the whole remaining schedule compressed into the run),
       clipping the total norm at ``c_k``, and records each step's training loss (averaged over the ranks);
    3. chooses with :func:`lightning_clip.core.search.search`: among the near-ties (the thresholds whose mean
       loss is within ``tolerance`` standard errors of the best), with ``choice="middle"`` the one nearest the
       geometric middle of the contiguous near-tie band around the best (the band's largest when the band
       reaches the largest or the smallest candidate), with ``choice="largest"`` the largest; refined at
       ``c * 10**(+-1/4)`` with ``refine``;
    4. restores everything it saved, so training continues exactly as a fit started with the chosen
       threshold would, and sets the threshold on the trainer's :class:`GradientClipping`
       (:meth:`GradientClipping.set_threshold`; after the fit-start search, at ``on_train_start``).

    What the chosen value sets, per policy of the ``GradientClipping``: ``FixedThreshold``: the threshold
    (``max_norm``); ``PercentileThreshold`` and ``WarmupThreshold``: the ``warmup_threshold`` (for
    ``PercentileThreshold(history="clipped")`` also the cap it never exceeds; ``WarmupThreshold``'s ``then``
    keeps its own settings); ``ZScoreThreshold``: ``max_norm``, the threshold during warmup and the cap
    afterwards; ``QuantileThreshold``: ``initial`` (and the threshold in force). Per-group thresholds
    (``GradientClipping(groups=...)``) and ``mode="value"`` are refused at setup: the search clips the
    total norm.

    During the search only the finder's own callbacks run (the trainer's others, its loggers, validation and
    checkpointing are off); the LightningModule's hooks run as in training. After the search
    ``finder.threshold`` (float) and ``finder.results`` (a :class:`~lightning_clip.core.search.SearchResult`:
    candidates, per-step losses, scores, chosen index) hold the outcome; the table is printed on rank 0,
    ``grad_clip/finder_threshold`` is logged, and with ``plot`` a PNG of loss against threshold is written to
    ``trainer.log_dir`` (needs matplotlib: ``pip install 'lightning-clip[plot]'``).

    Every rank reaches the same threshold: each step's loss is averaged over the ranks before scoring, and
    rank 0's result is broadcast. The threshold, the results and the epochs already searched are saved in
    the checkpoint: a resumed run does not search again. (Strategies that restore a checkpoint only after
    ``on_fit_start``, such as FSDP, still run the fit-start search on resume; the checkpoint's threshold then
    replaces its result.) The ``GradientClipping``'s checkpoint entry is stored under the key of its
    configured threshold, so a run resumes with the callbacks it was started with.

    Refused at setup, with the reason: no ``GradientClipping`` (or several) in the callbacks, manual
    optimization (the search steps the optimizer through Lightning's automatic optimization; several
    optimizers need manual optimization), ``GradientClipping(groups=...)`` or ``mode="value"``, DeepSpeed.
    At the start of the search, before any step: training data too short for one run (``num_batches`` or
    ``num_probe_batches`` optimizer steps; a run may cross epochs, up to ``max_epochs``). Two finders share
    one state key, so the ``Trainer`` refuses them at construction. Skipped with a warning under
    ``fast_dev_run``.

    Args:
        candidates: the thresholds to try (positive numbers); default: the grid from ``m0``.
        num_candidates: size of the default grid (ignored with ``candidates``).
        num_batches: optimizer steps per candidate run (>= 2).
        num_probe_batches: optimizer steps (updates dropped) that measure ``m0``.
        tolerance: near-tie width, in standard errors of the best run's mean loss (>= 0).
        refine: two more runs at ``c * 10**(+-1/4)`` around the first choice.
        choice: which near-tie is chosen: ``"middle"`` or ``"largest"`` (see step 3). A short run rewards
            early progress, so its largest near-tie sits where a longer training turns unstable; the
            middle of the band keeps away from both of the band's edges.
        milestones: epochs (>= 1) at whose start the search runs again from the current weights.
        plot: write the loss-vs-threshold PNG next to the logs.
        compress_schedule: step ``t`` of a run takes the learning rate the schedulers give at step
            ``floor(t * T / num_batches)`` of the ``T`` optimizer steps left in the fit
            (:func:`~lightning_clip.core.search.schedule_steps`), so a run sees the whole schedule's decay.
            Off by default: a run that reaches the small late rates within a few dozen steps rates larger
            thresholds safe than the fit's long stretch at high rates tolerates. The rates are read by
            stepping the schedulers ahead and putting them back: step-interval schedulers after every
            ``frequency`` optimizer steps, epoch-interval ones at each epoch's end; ``ReduceLROnPlateau``
            (which reads metrics) keeps its rate. Without schedulers, with a fit no longer than a run or of
            unknown length (``max_steps=-1`` and ``max_epochs=-1``), or with ``False``: the schedulers' own
            first steps.

    Example::

        trainer = Trainer(callbacks=[ClipThresholdFinder(), GradientClipping(), SpikeGuard(scale="log")])
        trainer.fit(model, datamodule=dm)
    """

    def __init__(
        self,
        candidates: Sequence[float] | None = None,
        num_candidates: int = 9,
        num_batches: int = 50,
        num_probe_batches: int = 8,
        tolerance: float = 2.0,
        refine: bool = True,
        milestones: Sequence[int] = (),
        plot: bool = True,
        compress_schedule: bool = False,
        choice: str = "middle",
    ) -> None:
        self.candidates = None if candidates is None else check_candidates(candidates)
        self.num_candidates = check_positive_int("num_candidates", num_candidates)
        self.num_batches = check_positive_int("num_batches", num_batches)
        if self.num_batches < 2:
            raise ValueError(f"Expected argument `num_batches` to be an integer >= 2 (the choice needs the spread of "
                             f"a run's losses) but got {num_batches}")
        self.num_probe_batches = check_positive_int("num_probe_batches", num_probe_batches)
        self.tolerance = check_positive_float("tolerance", tolerance, allow_zero=True)
        self.refine = check_bool("refine", refine)
        self.milestones = _check_milestones(milestones)
        self.plot = check_bool("plot", plot)
        self.compress_schedule = check_bool("compress_schedule", compress_schedule)
        self.choice = check_choice("choice", choice, CHOICES)
        self.rule = SearchRule(tolerance=self.tolerance, refine=self.refine, choice=self.choice)
        #: The optimizer steps the compressed schedule spans (``None``: those left in the fit); set by
        #: :func:`lightning_clip.tools.finder.find_clip_threshold`, which searches outside the fit.
        self.fit_steps: int | None = None
        #: The threshold chosen by the last search (``None`` before it).
        self.threshold: float | None = None
        #: The last search's candidates, losses, scores and choice (``None`` before it).
        self.results: SearchResult | None = None
        #: The probe's median total gradient norm of the last search (``None`` with ``candidates``).
        self.initial_norm: float | None = None
        self._searched: set[int] = set()  # epochs searched at (0: the fit-start search)
        self._pending = False  # a threshold waits to be set at on_train_start
        self._clipping: GradientClipping | None = None
        self._clipping_key: str | None = None  # the clipping callback's state key before any threshold was set
        self._can_plot = plot
        #: Print the table and the plot's path on rank 0 (``find_clip_threshold`` prints them itself).
        self.verbose = True

    # ------------------------------------------------------------------------------------------------
    # Setup: every refusal happens here or at the very start of the search, before any step.

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        callbacks = trainer.callbacks  # type: ignore[attr-defined]
        clippers = [cb for cb in callbacks if isinstance(cb, GradientClipping)]
        if not clippers:
            raise ValueError("ClipThresholdFinder sets the threshold of a GradientClipping callback, but "
                             "`Trainer(callbacks=...)` has none: add lightning_clip.GradientClipping() to the "
                             "callbacks.")
        if len(clippers) > 1:
            raise ValueError(f"ClipThresholdFinder sets the threshold of one GradientClipping callback, but "
                             f"`Trainer(callbacks=...)` has {len(clippers)}: keep one.")
        clipping = clippers[0]
        if clipping.mode != "norm":
            raise ValueError(f"ClipThresholdFinder searches a threshold for the total gradient norm, but the "
                             f"GradientClipping has mode={clipping.mode!r}: use mode='norm' or drop the finder.")
        if clipping.groups:
            raise ValueError("ClipThresholdFinder searches one threshold for the total gradient norm, but the "
                             "GradientClipping has per-group thresholds (`groups`), each clipping its own norm: "
                             "drop `groups` or the finder.")
        check_strategy(trainer, "ClipThresholdFinder")
        if not pl_module.automatic_optimization:
            raise ValueError("ClipThresholdFinder needs automatic optimization: the search runs the training loop "
                             "once per candidate and steps the optimizer itself, which a `training_step` that steps "
                             "its optimizers (manual optimization, also the only way to several optimizers) "
                             "does not allow.")
        if self._clipping is not clipping:
            self._clipping, self._clipping_key = clipping, clipping.state_key
        if self.plot and self._can_plot:  # on every rank: they all take part in finding the log directory
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                self._can_plot = False
                rank_zero_warn("ClipThresholdFinder(plot=True) writes its plot with matplotlib, which is not "
                               "installed: `pip install 'lightning-clip[plot]'` (or pass plot=False). The search "
                               "runs without it.")

    # ------------------------------------------------------------------------------------------------
    # When to search, and setting the result.

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if 0 in self._searched:  # restored from a checkpoint: no second search
            self._pending = self.threshold is not None
            return
        if getattr(trainer, "fast_dev_run", False):
            rank_zero_warn("ClipThresholdFinder: skipping the search under `fast_dev_run`; the GradientClipping "
                           "keeps its configured threshold.")
            return
        self._search(trainer, pl_module, epoch=0)
        self._pending = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending and self.threshold is not None:
            self._apply(trainer)
        self._pending = False

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if epoch in self.milestones and epoch not in self._searched and not getattr(trainer, "fast_dev_run", False):
            self._search(trainer, pl_module, epoch=epoch)
            self._apply(trainer)

    def _apply(self, trainer: pl.Trainer) -> None:
        assert self._clipping is not None and self.threshold is not None  # set in setup / by the search
        self._clipping.set_threshold(self.threshold)
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        for logger in trainer.loggers:
            logger.log_metrics({tags.FINDER_THRESHOLD: self.threshold}, step=step)

    # ------------------------------------------------------------------------------------------------
    # The search.

    def _search(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> None:
        at_fit_start = epoch == 0
        loop = trainer.fit_loop
        with isolate_rng(), quiet_max_steps():
            # What the fit's first batches are drawn with: at fit start the dataloaders are not requested yet
            # (the source's own generators count), at a milestone the epoch's iterator is not created yet.
            start = _DataStart(trainer, reload=at_fit_start)
            try:
                if at_fit_start:
                    loop.setup_data()
                self._check_data(trainer)
                result = self._runs(trainer, pl_module, start)
            finally:
                start.restore()
        result = trainer.strategy.broadcast(result, src=0)
        if not result.found:
            raise RuntimeError(f"ClipThresholdFinder: every candidate threshold diverged, so none can be chosen. "
                               f"Lower the learning rate or pass smaller `candidates`.\n{result.table()}")
        self.results, self.threshold = result, float(result.threshold)
        self._searched.add(epoch)
        if not self.verbose:
            return
        head = "" if self.initial_norm is None else (
            f"probe: median total gradient norm {self.initial_norm:.4g} over {self.num_probe_batches} steps\n")
        rank_zero_info(f"[lightning_clip] {'at fit start' if at_fit_start else f'at epoch {epoch}'}: {head}"
                       f"{result.table()}")
        if self.plot and self._can_plot:
            log_dir = trainer.log_dir or trainer.default_root_dir  # every rank: `log_dir` is a broadcast
            if trainer.is_global_zero:
                name = PLOT_NAME + ("" if at_fit_start else f"_epoch{epoch}") + ".png"
                out = plot_search(result, Path(log_dir) / name)
                rank_zero_info(f"[lightning_clip] clip-threshold search plot: {out}")

    def _runs(self, trainer: pl.Trainer, pl_module: pl.LightningModule, start: _DataStart) -> SearchResult:
        """The probe and the candidate runs, each from the state saved here, which is put back at the end."""
        # The optimizer steps left in the fit, read before the runs change the loop's step limit.
        left = trainer.estimated_stepping_batches - trainer.global_step if self.fit_steps is None else self.fit_steps
        total = int(left) if self.compress_schedule and math.isfinite(left) else None
        session = _Session(trainer, _TrainerState(trainer, pl_module), start)
        try:
            self.initial_norm = None
            if self.candidates is None:
                norms = session.probe(self.num_probe_batches)
                self.initial_norm = float(trainer.strategy.broadcast(probe_median(norms), src=0))
                grid = candidate_grid(self.initial_norm, self.num_candidates)
            else:
                grid = list(self.candidates)

            rates: dict[int, list[list[float]] | None] = {}  # per run length: each step's learning rates

            def run(threshold: float, num_steps: int) -> list[float]:
                if num_steps not in rates:
                    rates[num_steps] = session.learning_rates(schedule_steps(total, num_steps), total)
                losses = session.run(threshold, num_steps, self.rule.divergence_factor, rates[num_steps])
                if len(losses) < num_steps and divergence_step(losses, self.rule.divergence_factor) is None:
                    raise ValueError(
                        f"ClipThresholdFinder: the training data ran out after {len(losses)} optimizer steps but a "
                        f"run needs {num_steps}: lower `num_batches` or give the dataloader more batches")
                return losses

            return search(run, grid, self.num_batches, self.rule)
        finally:
            session.close()

    def _check_data(self, trainer: pl.Trainer) -> None:
        """Refuse a run longer than the training data allows (a run may cross epochs, up to ``max_epochs``)."""
        batches = trainer.num_training_batches
        accumulate = trainer.accumulate_grad_batches
        max_epochs = trainer.max_epochs
        epochs = math.inf if max_epochs is None or max_epochs < 0 else max_epochs - trainer.current_epoch
        steps_per_epoch = math.ceil(batches / accumulate) if math.isfinite(batches) else math.inf
        available = steps_per_epoch * epochs if steps_per_epoch else 0
        needs = [("num_batches", self.rule.max_steps(self.num_batches))]
        if self.candidates is None:
            needs.append(("num_probe_batches", self.num_probe_batches))
        for name, steps in needs:
            if steps > available:
                raise ValueError(
                    f"Expected argument `{name}` ({getattr(self, name)}) to fit the training data: a run takes "
                    f"{steps} optimizer steps but the training data allow {available} ({batches} batches per epoch "
                    f"with limit_train_batches, accumulate_grad_batches={accumulate}, {epochs} epochs left of "
                    f"max_epochs={max_epochs}). Lower `{name}`, or use more batches or epochs.")

    # ------------------------------------------------------------------------------------------------
    # Checkpoints.

    def state_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "searched": sorted(self._searched),
            "initial_norm": self.initial_norm,
            "results": None if self.results is None else self.results.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        threshold = state_dict.get("threshold")
        self.threshold = None if threshold is None else float(threshold)
        self._searched = {int(e) for e in state_dict.get("searched", [])}
        self.initial_norm = state_dict.get("initial_norm")
        results = state_dict.get("results")
        self.results = None if results is None else SearchResult.from_state_dict(results)
        self._pending = self.threshold is not None

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # Setting the threshold changes the GradientClipping's state key (it names the threshold): store its
        # state under the key of its configured threshold, which is the key it has when a resumed run loads it.
        states = checkpoint.get("callbacks")
        if self._clipping is None or self._clipping_key is None or not isinstance(states, dict):
            return
        key = self._clipping.state_key
        if key != self._clipping_key and key in states:
            states[self._clipping_key] = states.pop(key)


def _check_milestones(milestones: Any) -> tuple[int, ...]:
    if isinstance(milestones, (str, bytes)) or not isinstance(milestones, Sequence):
        raise TypeError(f"Expected argument `milestones` to be a sequence of epochs (integers >= 1) but got "
                        f"{milestones!r}")
    out = []
    for m in milestones:
        if not isinstance(m, int) or isinstance(m, bool) or m < 1:
            raise ValueError(f"Expected argument `milestones` to hold epochs >= 1 (epoch 0 is searched at fit start) "
                             f"but got {milestones!r}")
        out.append(m)
    return tuple(sorted(set(out)))


# ----------------------------------------------------------------------------------------------------
# Saving and restoring the trainer's state around the runs.


def _loaders(obj: Any) -> list[DataLoader[Any]]:
    """The DataLoaders in ``obj`` (a DataLoader, a CombinedLoader or a collection of them; a module: none)."""
    if isinstance(obj, DataLoader):
        return [obj]
    if isinstance(obj, Mapping):
        return [dl for v in obj.values() for dl in _loaders(v)]
    if isinstance(obj, (list, tuple)):
        return [dl for v in obj for dl in _loaders(v)]
    flattened = getattr(obj, "flattened", None)  # CombinedLoader
    if isinstance(flattened, list):
        return [dl for v in flattened for dl in _loaders(v)]
    return []


def _generator_states(loaders: list[DataLoader[Any]]) -> list[tuple[torch.Generator, Tensor]]:
    """The state of every torch.Generator a loader draws from (its own, its sampler's, its batch sampler's)."""
    gens: dict[int, torch.Generator] = {}
    for dl in loaders:
        batch_sampler = getattr(dl, "batch_sampler", None)
        for holder in (dl, getattr(dl, "sampler", None), batch_sampler, getattr(batch_sampler, "sampler", None)):
            g = getattr(holder, "generator", None)
            if isinstance(g, torch.Generator):
                gens[id(g)] = g
    return [(g, g.get_state()) for g in gens.values()]


def _set_generator_states(states: list[tuple[torch.Generator, Tensor]]) -> None:
    for g, state in states:
        g.set_state(state)


def _loops(loop: _Loop) -> Iterator[_Loop]:
    yield loop
    for v in vars(loop).values():
        if isinstance(v, _Loop):
            yield from _loops(v)


class _DataStart:
    """The RNG and dataloader-generator states the next training batches are drawn with, and putting them back.

    With ``reload`` (fit start) the training dataloaders are dropped on :meth:`restore`, so that the loop
    requests them again, as a fit does: every run, and the fit after the search, then draws the same batches
    (and the same random numbers in the steps) as a fit without the search.
    """

    def __init__(self, trainer: pl.Trainer, reload: bool) -> None:
        loop = trainer.fit_loop
        self.loop, self.reload = loop, reload
        self.rng = _collect_rng_states(include_cuda=torch.cuda.is_available())
        source = loop._data_source.instance if reload else loop._combined_loader
        self.generators = _generator_states(_loaders(source))

    def restore(self) -> None:
        _set_rng_states(self.rng)
        _set_generator_states(self.generators)
        if self.reload:
            if self.loop._data_fetcher is not None:
                self.loop._data_fetcher.teardown()
            self.loop._data_fetcher = None
            self.loop._combined_loader = None


_LOOP_FLAGS = ("_restarting", "_loaded_from_state_dict", "_resuming_from_checkpoint", "_restart_stage")
_METRICS = ("_progress_bar_metrics", "_logged_metrics", "_callback_metrics")


class _TrainerState:
    """Everything a run changes and a fit started afresh would not have: saved once, put back before every run."""

    def __init__(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.trainer, self.pl_module = trainer, pl_module
        self.tensors = [t for t in [*pl_module.parameters(), *pl_module.buffers()]]
        self.values = [t.detach().clone() for t in self.tensors]
        self.params = list(pl_module.parameters())
        self.grads = [None if p.grad is None else p.grad.detach().clone() for p in self.params]
        self.optimizers = [copy.deepcopy(opt.state_dict()) for opt in trainer.optimizers]
        self.schedulers = [copy.deepcopy(cfg.scheduler.state_dict()) for cfg in trainer.lr_scheduler_configs]
        self.precision = copy.deepcopy(trainer.precision_plugin.state_dict())
        loop = trainer.fit_loop
        self.loop = copy.deepcopy(loop.state_dict())
        self.flags = [(lp, {f: getattr(lp, f) for f in _LOOP_FLAGS if hasattr(lp, f)}) for lp in _loops(loop)]
        self.batches_that_stepped = loop.epoch_loop._batches_that_stepped
        self.global_step = trainer.global_step
        self.max_steps = loop.epoch_loop.max_steps
        self.should_stop = trainer.should_stop
        self.callbacks = trainer.callbacks  # type: ignore[attr-defined]
        self.loggers = trainer.loggers
        self.limit_val_batches = trainer.limit_val_batches
        connector = trainer._logger_connector
        self.metrics = {name: dict(getattr(connector, name)) for name in _METRICS}

    @torch.no_grad()
    def restore(self, fresh: bool) -> None:
        """Put the saved state back; ``fresh``: loop flags as in a new fit (for a run), else as saved (the end)."""
        trainer = self.trainer
        for t, v in zip(self.tensors, self.values):
            t.copy_(v)
        for p, g in zip(self.params, self.grads):
            p.grad = None if g is None else g.clone()
        for opt, state in zip(trainer.optimizers, self.optimizers):
            opt.load_state_dict(copy.deepcopy(state))
        for cfg, state in zip(trainer.lr_scheduler_configs, self.schedulers):
            cfg.scheduler.load_state_dict(copy.deepcopy(state))
        trainer.precision_plugin.load_state_dict(copy.deepcopy(self.precision))
        loop = trainer.fit_loop
        loop.load_state_dict(copy.deepcopy(self.loop))
        for lp, flags in self.flags:
            for name, value in flags.items():
                if fresh and name != "_restart_stage":
                    value = False
                setattr(lp, name, value)
            if fresh and hasattr(lp, "reset_restart_stage"):
                lp.reset_restart_stage()
        loop.epoch_loop._batches_that_stepped = self.batches_that_stepped
        loop.epoch_loop.max_steps = self.max_steps
        trainer.should_stop = self.should_stop

    def restore_trainer(self) -> None:
        """Put back the callbacks, loggers and validation limit the runs replaced, and the logged metrics."""
        trainer = self.trainer
        trainer.callbacks = self.callbacks  # type: ignore[attr-defined]
        trainer.loggers = self.loggers
        trainer.limit_val_batches = self.limit_val_batches
        connector = trainer._logger_connector
        connector.reset_results()
        for name, value in self.metrics.items():
            setattr(connector, name, dict(value))


class _Session:
    """Runs the training loop for a few steps at a time from the saved state, with the finder's callbacks only."""

    def __init__(self, trainer: pl.Trainer, saved: _TrainerState, start: _DataStart) -> None:
        self.trainer, self.saved, self.start = trainer, saved, start
        trainer.loggers = [DummyLogger()] if trainer.loggers else []
        trainer.limit_val_batches = 0

    def _run(self, callbacks: list[Callback], num_steps: int) -> None:
        trainer, loop = self.trainer, self.trainer.fit_loop
        self.saved.restore(fresh=True)
        self.start.restore()  # the same batches and random numbers as the fit's first steps
        trainer.callbacks = callbacks  # type: ignore[attr-defined]
        loop.epoch_loop.max_steps = self.saved.global_step + num_steps
        trainer.should_stop = False
        loop.run()

    def probe(self, num_norms: int) -> list[float]:
        probe = _NormProbe(num_norms)
        self._run([probe], num_norms + PROBE_EXTRA_STEPS)
        return probe.norms[:num_norms]

    def run(self, threshold: float, num_steps: int, divergence_factor: float,
            rates: list[list[float]] | None = None) -> list[float]:
        recorder = _LossRecorder(divergence_factor)
        callbacks: list[Callback] = [GradientClipping(threshold, log=False, summary=False), recorder]
        if rates is not None:
            callbacks.insert(0, _LearningRates(rates))
        self._run(callbacks, num_steps)
        return recorder.losses

    def learning_rates(self, steps: list[int], total: int | None) -> list[list[float]] | None:
        """Each param group's learning rate at each of ``steps`` (optimizer steps from the saved state), read by
        stepping the schedulers ahead as the fit would; ``None`` when the run takes the schedulers' own steps
        (``steps`` is ``0, 1, ...``, or no scheduler can be stepped ahead)."""
        trainer = self.trainer
        configs = [c for c in trainer.lr_scheduler_configs if not c.reduce_on_plateau]
        if total is None or steps == list(range(len(steps))) or not configs:
            return None
        batches, accumulate = trainer.num_training_batches, trainer.accumulate_grad_batches
        per_epoch = math.ceil(batches / accumulate) if math.isfinite(batches) and batches > 0 else None
        epoch = trainer.current_epoch
        wanted = set(steps)
        found: dict[int, list[float]] = {}
        self.saved.restore(fresh=True)
        groups = [g for opt in trainer.optimizers for g in opt.param_groups]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()"
            for step in range(max(steps) + 1):
                if step in wanted:
                    found[step] = [float(g["lr"]) for g in groups]
                done = step + 1  # optimizer steps taken once this one is
                end_of_epoch = per_epoch is not None and done % per_epoch == 0
                if end_of_epoch:
                    epoch += 1
                for c in configs:
                    due = done if c.interval == "step" else (epoch if end_of_epoch else None)
                    if due is not None and due % c.frequency == 0:
                        c.scheduler.step()  # type: ignore[call-arg]  # not a ReduceLROnPlateau: filtered above
        self.saved.restore(fresh=True)  # the optimizers' rates and the schedulers as saved
        return [found[step] for step in steps]

    def close(self) -> None:
        self.saved.restore(fresh=False)
        self.saved.restore_trainer()


class _NormProbe(Callback):
    """Records the total gradient norm of each optimizer step, then drops the step (no update); stops the run
    once ``num_norms`` norms were finite (the same decision on every rank: the norms are global)."""

    def __init__(self, num_norms: int) -> None:
        self.num_norms = num_norms
        self.norms: list[float] = []

    @torch.no_grad()
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        state = step_state(trainer, pl_module, optimizer)
        norm = float(state.stats.total_norm)
        if math.isfinite(norm):
            self.norms.append(norm)
        if len(self.norms) >= self.num_norms:
            trainer.should_stop = True
        state.skip()
        # The runs restart the step counters, so a later step can carry this step's counters: the shared
        # state must not be taken for that step's.
        state.token = ()


class _LearningRates(Callback):
    """Sets every param group's learning rate before each optimizer step of a run: ``rates[t]`` at step ``t``
    (the optimizers' groups in order), overriding what the schedulers set."""

    def __init__(self, rates: list[list[float]]) -> None:
        self.rates = rates
        self._step = 0

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self._step < len(self.rates):
            groups = [g for opt in trainer.optimizers for g in opt.param_groups]
            for group, lr in zip(groups, self.rates[self._step]):
                group["lr"] = lr
        self._step += 1


class _LossRecorder(Callback):
    """Each optimizer step's training loss, averaged over the ranks; stops the run once it diverged."""

    def __init__(self, divergence_factor: float) -> None:
        self.divergence_factor = divergence_factor
        self.losses: list[float] = []
        self._pending: Tensor | None = None
        self._step = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, Tensor):  # divided by accumulate_grad_batches: the window's sum is its mean
            loss = loss.detach().to(torch.float64)
            self._pending = loss if self._pending is None else self._pending + loss
        if trainer.global_step == self._step or self._pending is None:
            return  # within an accumulation window (or a step whose training_step returned None)
        self._step = trainer.global_step
        value = trainer.strategy.reduce(self._pending.reshape(1), reduce_op="mean")
        self._pending = None
        self.losses.append(float(value))
        if divergence_step(self.losses, self.divergence_factor) is not None:
            trainer.should_stop = True  # the same decision on every rank: the losses are the ranks' mean

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._step = trainer.global_step


class _DropMaxStepsInfo(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "stopped: `max_steps=" not in record.getMessage()


@contextlib.contextmanager
def quiet_max_steps() -> Iterator[None]:
    """Drop Lightning's "`Trainer.fit` stopped: `max_steps=...` reached" line (every search run would print it)."""
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    flt = _DropMaxStepsInfo()
    logger.addFilter(flt)
    try:
        yield
    finally:
        logger.removeFilter(flt)


# ----------------------------------------------------------------------------------------------------
# The plot.


def plot_search(result: SearchResult, path: str | os.PathLike[str]) -> Path:
    """Write a PNG: each threshold's score (log x) with the choice and the near-tie band, and the loss curves.

    Needs matplotlib (``pip install 'lightning-clip[plot]'``).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    cands = np.asarray(result.candidates)
    scores = np.asarray(result.scores)
    ok = np.isfinite(scores)
    left.plot(cands[ok], scores[ok], "o-", color="tab:blue", label="score (mean loss)")
    if (~ok).any():
        top = float(scores[ok].max()) if ok.any() else 1.0
        left.plot(cands[~ok], np.full((~ok).sum(), top), "x", color="tab:red", markersize=9, label="diverged")
    if result.found and result.best is not None:
        band = result.scores[result.best] + result.rule.tolerance * result.error
        left.axhline(band, color="gray", linestyle=":", label=f"best + {result.rule.tolerance:g} SE")
        left.axvline(result.threshold, color="tab:green", linewidth=2, label=f"chosen {result.threshold:.3g}")
    left.set_xscale("log")
    left.set_xlabel("clipping threshold (total norm)")
    left.set_ylabel("score")
    left.set_title("Score per threshold")
    left.legend(fontsize=7)
    for c, run in zip(result.candidates, result.losses):
        arr = np.asarray(run, dtype=np.float64)
        good = np.isfinite(arr)
        bold = result.found and c == result.threshold
        right.plot(np.flatnonzero(good), arr[good], linewidth=2.2 if bold else 0.8,
                   label=f"{c:.3g}" + (" (chosen)" if bold else ""))
    if right.has_data():
        losses = np.concatenate([np.asarray(r, dtype=np.float64) for r in result.losses])
        if (losses[np.isfinite(losses)] > 0).all():
            right.set_yscale("log")
        right.legend(fontsize=6, ncol=2)
    right.set_xlabel("optimizer step")
    right.set_ylabel("training loss")
    right.set_title("Loss per run, from the same weights")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out
