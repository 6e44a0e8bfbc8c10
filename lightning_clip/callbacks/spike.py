"""SpikeGuard: skip (or flag) optimizer steps whose gradient norm or loss spikes above a rolling z-score."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from lightning_clip import tags
from lightning_clip.callbacks.step import (
    Stage,
    StepCallback,
    StepState,
    check_strategy,
    should_log,
    uses_grad_scaler,
)
from lightning_clip.core.window import RollingWindow, check_window_size
from lightning_clip.exceptions import (
    GradientSpikeError,
    check_choice,
    check_positive_float,
    check_positive_int,
)

__all__ = ["SpikeGuard"]

_MONITORS = ("grad_norm", "loss")


def _check_monitor(monitor: Any) -> tuple[str, ...]:
    names = (monitor,) if isinstance(monitor, str) else monitor
    if not isinstance(names, (tuple, list)) or not names or not all(isinstance(m, str) for m in names):
        raise TypeError(
            f"Expected argument `monitor` to be 'grad_norm', 'loss' or a tuple of both but got {monitor!r}"
        )
    for name in names:
        check_choice("monitor", name, _MONITORS)
    if len(set(names)) != len(names):
        raise ValueError(f"Expected argument `monitor` to name each value once but got {monitor!r}")
    return tuple(names)


class SpikeGuard(StepCallback):
    """Catch loss and gradient-norm spikes before the optimizer steps, identically on every rank.

    A value is a spike when ``(value - mean) / std > z_thresh`` over the last ``window`` *accepted* values
    (sample standard deviation), once ``warmup_steps`` values have been accepted (``None``: once the
    window is full). A spike's value never enters the window, so a burst cannot raise the bar it is
    measured against. A non-finite value is a spike (z = inf) at any time, except under fp16 mixed
    precision with a ``GradScaler``, which handles those steps itself.

    Monitored values:

    - ``"grad_norm"``: the optimizer's total gradient norm before clipping (the shared gradient pass;
      already the same on every rank under DDP and sharded strategies).
    - ``"loss"``: the loss of the training step (the sum of the losses passed to ``backward`` since the
      previous optimizer step, so accumulated micro-batches count as one step). Each rank keeps its own
      window; the z-scores are reduced with a max over the ranks, so one rank's bad batch is caught and
      every rank takes the same decision.
    - a tuple of both: a spike in either is a spike; neither value enters its window.

    Actions (as :class:`~lightning_clip.NonFiniteGradientGuard`):

    - ``"skip"``: the optimizer step becomes a no-op (this optimizer's gradients are set to ``None``):
      weights and optimizer state are untouched.
    - ``"warn"``: warn and step anyway.
    - ``"raise"``: raise :class:`~lightning_clip.GradientSpikeError`.

    ``max_consecutive`` raises :class:`~lightning_clip.GradientSpikeError` when more than that many steps
    in a row are spikes (a lasting shift of the loss is not a spike to skip forever).

    Cost: the decision is made on the host from one device-to-host read per step, shared with
    :class:`~lightning_clip.NonFiniteGradientGuard`'s when both are used; ``"loss"`` on several ranks adds
    one all-reduce of one float. The windows and counters are saved in the checkpoint. The guard decides on the
    pre-clip values before any callback clips, wherever it is in ``Trainer(callbacks=...)``: a step it skips
    never reaches a clipping policy's history, and a step another guard skips enters none of its windows (see
    :mod:`lightning_clip.callbacks.step`).

    ========================= ============================================================
    ``grad_spike/skipped``    number of spikes so far (steps skipped, with ``"skip"``)
    ``grad_spike/zscore``     this step's z-score (the largest of the monitored values)
    ========================= ============================================================

    Args:
        monitor: ``"grad_norm"``, ``"loss"`` or ``("grad_norm", "loss")``.
        z_thresh: the z-score above which a value is a spike (> 0).
        window: how many accepted values the mean and standard deviation are taken over (>= 2).
        warmup_steps: how many values must have been accepted before a spike can be declared (>= 2);
            ``None`` waits for a full window.
        action: ``"skip"``, ``"warn"`` or ``"raise"``.
        max_consecutive: raise after more than this many spikes in a row (``None``: never).
        scale: ``"linear"`` scores the values themselves; ``"log"`` scores their logarithms (values below
            ``1e-30`` count as ``1e-30``), for heavy-tailed values such as the small-batch loss of a nearly
            converged classifier, where a rare hard batch is many linear standard deviations out.
    """

    step_stage = Stage.GUARD

    def __init__(
        self,
        monitor: str | tuple[str, ...] = "grad_norm",
        z_thresh: float = 6.0,
        window: int = 128,
        warmup_steps: int | None = None,
        action: str = "skip",
        max_consecutive: int | None = None,
        scale: str = "linear",
    ) -> None:
        self.monitor = _check_monitor(monitor)
        self.z_thresh = check_positive_float("z_thresh", z_thresh)
        self.window = check_window_size(window)
        if warmup_steps is not None:
            check_positive_int("warmup_steps", warmup_steps)
            if warmup_steps < 2:
                raise ValueError(
                    f"Expected argument `warmup_steps` to be an integer >= 2 (a standard deviation needs two "
                    f"values) or None but got {warmup_steps}"
                )
        self.warmup_steps = warmup_steps
        self.action = check_choice("action", action, ("skip", "warn", "raise"))
        if max_consecutive is not None:
            check_positive_int("max_consecutive", max_consecutive)
        self.max_consecutive = max_consecutive
        self.scale = check_choice("scale", scale, ("linear", "log"))
        self.spikes = 0
        self.consecutive = 0
        self._windows: dict[str, RollingWindow] = {}
        self._loss: Tensor | None = None
        self._defer_nonfinite = False
        self._warned_no_loss = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, z_thresh=self.z_thresh, window=self.window,
                                        scale=self.scale)

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped so far (``action="skip"``)."""
        return self.spikes if self.action == "skip" else 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer, "SpikeGuard")
        self._defer_nonfinite = uses_grad_scaler(trainer)
        super().setup(trainer, pl_module, stage)

    def _window(self, monitor: str, optimizer_idx: int) -> RollingWindow:
        key = f"{monitor}/{optimizer_idx}"
        if key not in self._windows:
            self._windows[key] = RollingWindow(self.window)
        return self._windows[key]

    @property
    def _warmup(self) -> int:
        return self.window if self.warmup_steps is None else self.warmup_steps

    # -- capturing the loss ---------------------------------------------------------------------------
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if "loss" in self.monitor:
            loss = loss.detach().reshape(()).to(torch.float32)
            self._loss = loss if self._loss is None else self._loss + loss

    def _values(self, state: StepState) -> dict[str, Tensor]:
        values: dict[str, Tensor] = {}
        if "grad_norm" in self.monitor:
            values["grad_norm"] = state.stats.total_norm.detach().to(torch.float32)
        if "loss" in self.monitor and self._loss is not None:
            values["loss"] = self._loss.to(state.stats.total_norm.device)
        if self.scale == "log":  # NaN stays NaN, +inf stays +inf: still spikes
            values = {k: v.clamp_min(1e-30).log() for k, v in values.items()}
        return values

    # -- the decision (device side; read on the host with the other guards' flags) --------------------
    def _key(self, name: str) -> str:
        return f"SpikeGuard@{id(self)}/{name}"

    def step_flags(self, trainer: pl.Trainer, pl_module: pl.LightningModule, state: StepState) -> dict[str, Tensor]:
        """This step's z-score (the largest over the monitored values, max over ranks for the loss) and
        whether it is a spike, as device tensors; changes nothing."""
        device = state.stats.total_norm.device
        zmax = torch.full((), float("-inf"), device=device)
        spike = torch.zeros((), dtype=torch.bool, device=device)
        for name, value in self._values(state).items():
            window = self._window(name, state.optimizer_idx).to(device)
            z = window.zscore(value)
            if self._defer_nonfinite:  # the GradScaler skips those steps itself
                z = torch.where(torch.isfinite(value), z, torch.zeros_like(z))
            if name == "loss" and trainer.world_size > 1:  # each rank's own loss: take the worst rank's z
                z = trainer.strategy.reduce(z, reduce_op="max")
            armed = window.seen >= self._warmup
            over = z > self.z_thresh
            spike = spike | (over if armed else torch.isinf(z) & (z > 0))
            zmax = torch.maximum(zmax, z)
        zmax = torch.where(torch.isfinite(zmax) | (zmax > 0), zmax, torch.zeros_like(zmax))
        return {self._key("spike"): spike, self._key("zscore"): zmax}

    def skips(self, host: Mapping[str, float]) -> bool:
        """Whether this step is a spike and ``action="skip"``."""
        return self.action == "skip" and host[self._key("spike")] > 0.0

    def on_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, state: StepState) -> None:
        if "loss" in self.monitor and self._loss is None and not self._warned_no_loss:
            self._warned_no_loss = True
            rank_zero_warn("SpikeGuard(monitor='loss') saw no loss this step (no backward call reached it).")
        spike = state.host[self._key("spike")] > 0.0  # the one read of the step, shared with the other guards
        zscore = state.host[self._key("zscore")]
        if spike:
            self.spikes += 1
            self.consecutive += 1
            self._act(trainer, zscore)
        else:
            self.consecutive = 0
            if not state.skipped:  # accepted, unless another guard skipped the step: the values enter their windows
                for name, value in self._values(state).items():
                    self._window(name, state.optimizer_idx).push(value)
        if should_log(trainer):
            state.log({tags.SPIKE_SKIPPED: float(self.spikes), tags.SPIKE_ZSCORE: zscore})

    @torch.no_grad()
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        self._loss = None  # this step's loss is used (or the step had no gradients): the next step sums anew

    def _act(self, trainer: pl.Trainer, zscore: float) -> None:
        step = trainer.global_step
        what = " and ".join(self.monitor)
        message = f"Step {step}: {what} spike (z-score {zscore:.3g} > {self.z_thresh:g} over the last " \
                  f"{self.window} accepted steps)"
        if self.action == "raise":
            raise GradientSpikeError(f"{message}. Use SpikeGuard(action='skip') to drop such steps.")
        if self.max_consecutive is not None and self.consecutive > self.max_consecutive:
            raise GradientSpikeError(
                f"{message}: {self.consecutive} spikes in a row (max_consecutive={self.max_consecutive}). "
                "The monitored value may have shifted for good; lower the learning rate or raise `z_thresh`."
            )
        if self.action == "skip":  # the runner dropped the step already (skips())
            rank_zero_warn(f"{message}. Optimizer step skipped.")
        else:
            rank_zero_warn(f"{message}. The optimizer steps anyway.")

    def state_dict(self) -> dict[str, Any]:
        return {
            "spikes": self.spikes,
            "consecutive": self.consecutive,
            "windows": {key: w.state_dict() for key, w in self._windows.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.spikes = int(state_dict.get("spikes", 0))
        self.consecutive = int(state_dict.get("consecutive", 0))
        self._windows = {}
        for key, saved in state_dict.get("windows", {}).items():
            window = RollingWindow(self.window)
            window.load_state_dict(saved)
            self._windows[key] = window
