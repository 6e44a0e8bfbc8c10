"""GradientNormMonitor: log gradient norms (total, per parameter, histograms) per optimizer step."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

from lightning_clip import tags
from lightning_clip.callbacks.step import Stage, StepCallback, StepState, is_deepspeed, should_log
from lightning_clip.exceptions import check_bool, check_optional_positive_int

__all__ = ["GradientNormMonitor"]


class GradientNormMonitor(StepCallback):
    """Log the gradient norms of every optimizer before it steps (before any clipping).

    ================================ ==========================================================
    ``grad_norm/total``              L2 norm of the optimizer's gradients (always)
    ``grad_norm/<parameter name>``   per-parameter L2 norm (``per_parameter=True``)
    ``grad_hist/<parameter name>``   TensorBoard histogram of the gradient (``histograms=True``)
    ================================ ==========================================================

    With several optimizers ``_opt<i>`` is appended. Values are logged on the trainer's logging
    steps (``log_every_n_steps``) with one device-to-host copy; other steps cost nothing beyond the
    norm pass that the clipping callbacks share. Wherever it is in ``Trainer(callbacks=...)``, it logs the
    norms and gradients of the step before any clipping, skipped steps included (see
    :mod:`lightning_clip.callbacks.step`).

    Under ``DeepSpeedStrategy`` the gradients may be partitioned (ZeRO), so the monitor makes no pass
    of its own: it logs the engine's global norm (``engine.get_global_grad_norm()``, the norm the
    engine clipped with) as ``grad_norm/total`` after each optimizer step, where the engine exposes it.

    Args:
        per_parameter: also log each parameter's norm.
        histograms: also write gradient histograms (TensorBoard loggers only).
        prog_bar: show the pre-clip total norm in the progress bar.
        log_every_n_steps: override the trainer's ``log_every_n_steps`` for these tags.
    """

    step_stage = Stage.OBSERVE

    def __init__(
        self,
        per_parameter: bool = False,
        histograms: bool = False,
        prog_bar: bool = False,
        log_every_n_steps: int | None = None,
    ) -> None:
        for name, value in (("per_parameter", per_parameter), ("histograms", histograms), ("prog_bar", prog_bar)):
            check_bool(name, value)
        check_optional_positive_int("log_every_n_steps", log_every_n_steps)
        self.per_parameter = per_parameter
        self.histograms = histograms
        self.prog_bar = prog_bar
        self.log_every_n_steps = log_every_n_steps
        self._deepspeed = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(per_parameter=self.per_parameter, histograms=self.histograms)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._deepspeed = is_deepspeed(trainer)
        if self._deepspeed and (self.per_parameter or self.histograms):
            rank_zero_warn(
                "GradientNormMonitor under DeepSpeed logs the engine's global norm only: per-parameter norms and "
                "histograms of partitioned (ZeRO) gradients would be per-rank pieces, so they are not logged."
            )
        if stage == "fit" and not trainer.loggers:
            rank_zero_warn("GradientNormMonitor: the Trainer has no logger, nothing will be logged.")
        if self.histograms and not any(isinstance(lg, TensorBoardLogger) for lg in trainer.loggers):
            rank_zero_warn("GradientNormMonitor(histograms=True) needs a TensorBoardLogger; histograms are skipped.")
        super().setup(trainer, pl_module, stage)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning_clip.callbacks.tb_layout import write_layout

        write_layout(trainer)  # TensorBoard custom-scalars layout, once per logger

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._deepspeed or not should_log(trainer, self.log_every_n_steps):
            return
        engine = getattr(trainer.strategy, "deepspeed_engine", None)
        norm = engine.get_global_grad_norm() if engine is not None else None
        if norm is None:  # not computed by this engine configuration (or before its first step)
            return
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        value = float(norm)
        for logger in trainer.loggers:
            logger.log_metrics({tags.GRAD_NORM_TOTAL: value}, step=step)

    def on_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, state: StepState) -> None:
        if self._deepspeed or not should_log(trainer, self.log_every_n_steps):
            return
        values: dict[str, Any] = {tags.GRAD_NORM_TOTAL: state.stats.total_norm}
        if self.per_parameter:
            for name, norm in zip(state.names, state.stats.norms.unbind(0)):
                values[tags.param_tag(name)] = norm
        state.log(values)
        if self.prog_bar:
            pl_module.log(
                tags.with_optimizer(tags.PROGRESS_BAR_NORM, state.optimizer_idx, state.num_optimizers),
                state.stats.total_norm, on_step=True, on_epoch=False, prog_bar=True, logger=False, batch_size=1,
            )
        if self.histograms:  # the monitor acts before any clipper: these are the step's own gradients
            step = trainer.fit_loop.epoch_loop._batches_that_stepped
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    for name, g in zip(state.names, state.grads):
                        tag = tags.with_optimizer(tags.histogram_tag(name), state.optimizer_idx,
                                                  state.num_optimizers)
                        logger.experiment.add_histogram(tag, g.detach().float().cpu(), step)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        return None
