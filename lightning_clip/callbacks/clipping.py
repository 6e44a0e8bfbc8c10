"""GradientClipping: clip each optimizer's gradients by norm or by value, fixed or adaptive."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.optim import Optimizer

from lightning_clip import tags
from lightning_clip.callbacks.step import check_strategy, log_values, should_log, step_state
from lightning_clip.core.functional import clip_grads_by_value_, clip_grads_with_norm_
from lightning_clip.core.grads import gradient_stats
from lightning_clip.core.thresholds import FixedThreshold, ThresholdPolicy, as_policy
from lightning_clip.exceptions import check_choice, check_optional_positive_int

__all__ = ["CLIP_RATE_BANDS", "GradientClipping", "OptimizerClipState", "clip_rate_advice"]

_COUNTERS = ("clipped", "norm_sum", "norm_max", "nonfinite")

#: How to read a clip rate: ``(upper bound, reading)``; a rate takes the first band it is below.
CLIP_RATE_BANDS: tuple[tuple[float, str], ...] = (
    (0.01, "threshold may be too high"),
    (0.05, "rare clipping"),
    (0.25, "healthy"),
    (0.50, "frequent: consider a lower learning rate"),
    (1.01, "excessive: clipped on most steps; if the loss is not falling, the threshold is too low or the "
           "learning rate too high (recurrent nets often train best clipped on most steps)"),
)


def clip_rate_advice(rate: float) -> str:
    """Return the reading of a clip rate in ``[0, 1]`` (<1% too high, 5-25% healthy, >50% excessive)."""
    for upper, text in CLIP_RATE_BANDS:
        if rate < upper:
            return text
    return CLIP_RATE_BANDS[-1][1]


@dataclass
class OptimizerClipState:
    """What :class:`GradientClipping` keeps for one optimizer: its policy and its counters.

    The counters are 0-d tensors on the gradients' device (moved there at the first update), so
    counting never synchronises the host with the device; reading them (:meth:`clip_rate`,
    :meth:`health`, :meth:`state_dict`) does.

    Attributes:
        policy: this optimizer's threshold policy.
        steps: optimizer steps seen.
        clipped: steps whose gradients were clipped (int64).
        norm_sum: sum of the finite pre-clip norms (fp64).
        norm_max: largest finite pre-clip norm (the norms' dtype, at least fp32).
        nonfinite: steps whose norm was NaN or Inf (int64).
    """

    policy: ThresholdPolicy
    steps: int = 0
    clipped: Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.long))
    norm_sum: Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))
    norm_max: Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float32))
    nonfinite: Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.long))

    def update(self, total: Tensor, finite: Tensor, was_clipped: Tensor) -> None:
        """Count one step with pre-clip norm ``total`` (0-d tensors; nothing is read on the host)."""
        if self.clipped.device != total.device:
            for k in _COUNTERS:
                setattr(self, k, getattr(self, k).to(total.device))
        finite_total = torch.where(finite, total, torch.zeros_like(total))
        self.steps += 1
        self.clipped = self.clipped + was_clipped.long()
        self.norm_sum = self.norm_sum + finite_total.double()
        self.norm_max = torch.maximum(self.norm_max, finite_total)
        self.nonfinite = self.nonfinite + (~finite).long()

    def clip_rate(self) -> float:
        """Fraction of the steps that were clipped (0 before the first step)."""
        return float(self.clipped) / self.steps if self.steps else 0.0

    def health(self) -> dict[str, float]:
        """Steps, clip rate, mean and max finite norm, non-finite steps."""
        nonfinite = int(self.nonfinite)
        return {
            "steps": float(self.steps),
            "clip_rate": self.clip_rate(),
            "mean_norm": float(self.norm_sum) / max(self.steps - nonfinite, 1),
            "max_norm": float(self.norm_max),
            "nonfinite_steps": float(nonfinite),
        }

    def state_dict(self) -> dict[str, Any]:
        """The policy's state and the counters (CPU tensors, dtypes kept, so resume is exact)."""
        counters = {k: getattr(self, k).detach().cpu().clone() for k in _COUNTERS}
        return {"policy": self.policy.state_dict(), "steps": self.steps, **counters}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (missing entries keep their current value)."""
        if "policy" in state:
            self.policy.load_state_dict(state["policy"])
        self.steps = int(state.get("steps", self.steps))
        for k in _COUNTERS:
            if k in state:
                setattr(self, k, torch.as_tensor(state[k]).detach().cpu().clone())


class GradientClipping(Callback):
    """Clip the gradients of every optimizer in ``on_before_optimizer_step``.

    With a fixed threshold the result equals Lightning's ``Trainer(gradient_clip_val=...,
    gradient_clip_algorithm=...)``; a :class:`~lightning_clip.ThresholdPolicy` makes it adaptive.
    Each optimizer gets its own copy of the policy (its own history). The gradient norms are shared
    with :class:`GradientNormMonitor` and :class:`NonFiniteGradientGuard`: stacking all three costs one
    norm pass and one scale pass. Nothing synchronises the host with the device except on logging
    steps.

    Logged per optimizer step (suffix ``_opt<i>`` with several optimizers):

    ============================ ===================================================
    ``grad_norm/total``          norm before clipping (unless a monitor logs it)
    ``grad_clip/threshold``      threshold in force
    ``grad_norm/clipped_total``  norm after clipping
    ``grad_clip/clip_rate``      fraction of this optimizer's steps clipped so far
    ============================ ===================================================

    Args:
        threshold: a positive number (fixed) or a threshold policy.
        mode: ``"norm"`` scales all gradients by ``min(1, threshold / total_norm)``; ``"value"``
            clamps each entry to ``[-threshold, threshold]`` (fixed thresholds only).
        log: log the tags above.
        log_every_n_steps: override the trainer's ``log_every_n_steps`` for these tags.
        summary: print a one-line gradient-health summary per optimizer at the end of ``fit``.
    """

    def __init__(
        self,
        threshold: ThresholdPolicy | float = 1.0,
        mode: str = "norm",
        log: bool = True,
        log_every_n_steps: int | None = None,
        summary: bool = True,
    ) -> None:
        self.mode = check_choice("mode", mode, ("norm", "value"))
        self.policy = as_policy(threshold)
        if self.mode == "value" and not isinstance(self.policy, FixedThreshold):
            raise ValueError(
                f"Expected argument `threshold` to be a positive number or FixedThreshold when "
                f"mode='value' (adaptive policies track norms) but got {self.policy!r}"
            )
        check_optional_positive_int("log_every_n_steps", log_every_n_steps)
        self.log = bool(log)
        self.log_every_n_steps = log_every_n_steps
        self.summary = bool(summary)
        self._optimizers: dict[int, OptimizerClipState] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(mode=self.mode, threshold=repr(self.policy))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer, "GradientClipping")
        clip_val = getattr(trainer, "gradient_clip_val", None)
        if clip_val:
            raise ValueError(
                f"GradientClipping is in `Trainer(callbacks=...)` and the Trainer also has "
                f"`gradient_clip_val={clip_val}`: gradients would be clipped twice. Remove one of them."
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning_clip.callbacks.tb_layout import write_layout

        write_layout(trainer)  # TensorBoard custom-scalars layout, once per logger

    def optimizer_state(self, optimizer_idx: int) -> OptimizerClipState:
        """The policy and counters of optimizer ``optimizer_idx`` (created on first use).

        Optimizer 0 uses ``self.policy`` itself; the others get a fresh copy of it.
        """
        state = self._optimizers.get(optimizer_idx)
        if state is None:
            policy = self.policy if optimizer_idx == 0 else self.policy.fresh()
            state = self._optimizers[optimizer_idx] = OptimizerClipState(policy)
        return state

    def policy_for(self, optimizer_idx: int) -> ThresholdPolicy:
        """The threshold policy of optimizer ``optimizer_idx`` (created on first use)."""
        return self.optimizer_state(optimizer_idx).policy

    def clip_rate(self, optimizer_idx: int = 0) -> float:
        """Fraction of optimizer ``optimizer_idx``'s steps that were clipped so far."""
        state = self._optimizers.get(optimizer_idx)
        return state.clip_rate() if state is not None else 0.0

    @property
    def steps(self) -> dict[int, int]:
        """Optimizer steps seen so far, per optimizer index (optimizers that stepped only)."""
        return {i: s.steps for i, s in sorted(self._optimizers.items()) if s.steps}

    @torch.no_grad()
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        state = step_state(trainer, pl_module, optimizer)
        if not state.grads or state.skipped:  # a guard placed before this callback dropped the step
            return
        opt = self.optimizer_state(state.optimizer_idx)
        total = state.stats.total_norm
        threshold = opt.policy(total)
        finite = torch.isfinite(total)
        if self.mode == "norm":
            coef = clip_grads_with_norm_(state.grads, threshold, total)
            clipped_total: Tensor | None = total * coef
            was_clipped = finite & (coef < 1.0)
        else:
            max_abs = torch.stack(torch._foreach_norm(state.grads, float("inf"))).max().float()
            clip_grads_by_value_(state.grads, cast(FixedThreshold, opt.policy).max_norm)  # checked in __init__
            was_clipped = finite & (max_abs > threshold)
            clipped_total = None
        state.threshold = threshold
        opt.update(total, finite, was_clipped)
        if not (self.log and should_log(trainer, self.log_every_n_steps)):
            return
        if clipped_total is None:  # value mode: one extra norm pass, on logging steps only
            clipped_total = gradient_stats(state.grads).total_norm
        state.clipped_total = clipped_total
        log_values(
            trainer,
            state,
            {
                tags.GRAD_NORM_TOTAL: total,
                tags.CLIP_THRESHOLD: threshold,
                tags.GRAD_NORM_CLIPPED: clipped_total,
                tags.CLIP_RATE: opt.clipped.double() / opt.steps,
            },
        )

    def health(self) -> dict[int, dict[str, float]]:
        """Per optimizer that stepped: steps, clip rate, mean and max finite norm, non-finite steps."""
        return {i: s.health() for i, s in sorted(self._optimizers.items()) if s.steps}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.summary:
            return
        for idx, h in self.health().items():
            name = f"optimizer {idx}" if len(self.steps) > 1 else "gradients"
            rank_zero_info(
                f"[lightning_clip] {name}: {int(h['steps'])} steps, clip rate {h['clip_rate']:.1%} "
                f"({clip_rate_advice(h['clip_rate'])}), mean norm {h['mean_norm']:.4g}, max norm "
                f"{h['max_norm']:.4g}, non-finite steps {int(h['nonfinite_steps'])}"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": {i: s.state_dict() for i, s in self._optimizers.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._optimizers = {}
        self.policy.reset()
        for i, state in state_dict.get("optimizers", {}).items():
            self.optimizer_state(int(i)).load_state_dict(state)
