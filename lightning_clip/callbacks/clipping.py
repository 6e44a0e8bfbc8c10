"""GradientClipping: clip each optimizer's gradients by norm or by value, fixed or adaptive."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.optim import Optimizer

from lightning_clip import tags
from lightning_clip.callbacks.step import log_values, should_log, step_state
from lightning_clip.core.functional import clip_grads_by_value_, clip_grads_with_norm_
from lightning_clip.core.grads import gradient_stats
from lightning_clip.core.thresholds import FixedThreshold, ThresholdPolicy, as_policy
from lightning_clip.exceptions import check_choice

__all__ = ["GradientClipping"]


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
        if log_every_n_steps is not None and (not isinstance(log_every_n_steps, int) or log_every_n_steps < 1):
            raise ValueError(f"Expected argument `log_every_n_steps` to be a positive integer or None but got "
                             f"{log_every_n_steps!r}")
        self.log = bool(log)
        self.log_every_n_steps = log_every_n_steps
        self.summary = bool(summary)
        self._policies: dict[int, ThresholdPolicy] = {}
        self._loaded_policies: dict[int, dict[str, Any]] = {}
        self.steps: dict[int, int] = {}
        self._clipped: dict[int, Tensor] = {}
        self._norm_sum: dict[int, Tensor] = {}
        self._norm_max: dict[int, Tensor] = {}
        self._nonfinite: dict[int, Tensor] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(mode=self.mode, threshold=repr(self.policy))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        clip_val = getattr(trainer, "gradient_clip_val", None)
        if clip_val:
            raise ValueError(
                f"GradientClipping is in `Trainer(callbacks=...)` and the Trainer also has "
                f"`gradient_clip_val={clip_val}`: gradients would be clipped twice. Remove one of them."
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning_clip.callbacks.tb_layout import write_layout

        write_layout(trainer)  # TensorBoard custom-scalars layout, once per logger

    def policy_for(self, optimizer_idx: int) -> ThresholdPolicy:
        """The threshold policy of optimizer ``optimizer_idx`` (created on first use)."""
        policy = self._policies.get(optimizer_idx)
        if policy is None:
            policy = self.policy if optimizer_idx == 0 else self.policy.fresh()
            if optimizer_idx in self._loaded_policies:
                policy.load_state_dict(self._loaded_policies.pop(optimizer_idx))
            self._policies[optimizer_idx] = policy
        return policy

    def clip_rate(self, optimizer_idx: int = 0) -> float:
        """Fraction of optimizer ``optimizer_idx``'s steps that were clipped so far."""
        steps = self.steps.get(optimizer_idx, 0)
        return float(self._clipped[optimizer_idx]) / steps if steps else 0.0

    def _counter(self, table: dict[int, Tensor], idx: int, like: Tensor, dtype: torch.dtype) -> Tensor:
        t = table.get(idx)
        if t is None or t.device != like.device:
            t = (t if t is not None else torch.zeros((), dtype=dtype)).to(like.device, dtype)
            table[idx] = t
        return t

    @torch.no_grad()
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        state = step_state(trainer, pl_module, optimizer)
        if not state.grads:
            return
        idx = state.optimizer_idx
        total = state.stats.total_norm
        threshold = self.policy_for(idx)(total)
        finite = torch.isfinite(total)
        if self.mode == "norm":
            coef = clip_grads_with_norm_(state.grads, threshold, total)
            clipped_total = total * coef
            was_clipped = finite & (coef < 1.0)
        else:
            max_abs = torch.stack(torch._foreach_norm(state.grads, float("inf"))).max().float()
            clip_grads_by_value_(state.grads, float(self.policy.max_norm))  # type: ignore[attr-defined]
            was_clipped = finite & (max_abs > threshold)
            clipped_total = None
        state.threshold = threshold
        self.steps[idx] = self.steps.get(idx, 0) + 1
        self._clipped[idx] = self._counter(self._clipped, idx, total, torch.long) + was_clipped.long()
        finite_total = torch.where(finite, total, torch.zeros_like(total))
        self._norm_sum[idx] = self._counter(self._norm_sum, idx, total, torch.float64) + finite_total.double()
        self._norm_max[idx] = torch.maximum(self._counter(self._norm_max, idx, total, torch.float32), finite_total)
        self._nonfinite[idx] = self._counter(self._nonfinite, idx, total, torch.long) + (~finite).long()
        if not (self.log and should_log(trainer, self.log_every_n_steps)):
            return
        if clipped_total is None:  # value mode: one extra norm pass, on logging steps only
            clipped_total = gradient_stats(state.grads).total_norm
        state.clipped_total = clipped_total
        rate = self._clipped[idx].double() / self.steps[idx]
        log_values(
            trainer,
            state,
            {
                tags.GRAD_NORM_TOTAL: total,
                tags.CLIP_THRESHOLD: threshold,
                tags.GRAD_NORM_CLIPPED: clipped_total,
                tags.CLIP_RATE: rate,
            },
        )

    def health(self) -> dict[int, dict[str, float]]:
        """Per optimizer: steps, clip rate, mean and max finite norm, non-finite steps."""
        out: dict[int, dict[str, float]] = {}
        for idx, steps in sorted(self.steps.items()):
            nonfinite = int(self._nonfinite[idx]) if idx in self._nonfinite else 0
            finite_steps = max(steps - nonfinite, 1)
            out[idx] = {
                "steps": float(steps),
                "clip_rate": self.clip_rate(idx),
                "mean_norm": float(self._norm_sum[idx]) / finite_steps if idx in self._norm_sum else 0.0,
                "max_norm": float(self._norm_max[idx]) if idx in self._norm_max else 0.0,
                "nonfinite_steps": float(nonfinite),
            }
        return out

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.summary:
            return
        from lightning_clip.tools.report import clip_rate_advice

        for idx, h in self.health().items():
            name = f"optimizer {idx}" if len(self.steps) > 1 else "gradients"
            rank_zero_info(
                f"[lightning_clip] {name}: {int(h['steps'])} steps, clip rate {h['clip_rate']:.1%} "
                f"({clip_rate_advice(h['clip_rate'])}), mean norm {h['mean_norm']:.4g}, max norm "
                f"{h['max_norm']:.4g}, non-finite steps {int(h['nonfinite_steps'])}"
            )

    def state_dict(self) -> dict[str, Any]:
        policies = {i: p.state_dict() for i, p in self._policies.items()}
        policies.update({i: s for i, s in self._loaded_policies.items() if i not in policies})
        return {
            "policies": policies,
            "steps": dict(self.steps),
            "clipped": {i: int(v) for i, v in self._clipped.items()},
            "norm_sum": {i: float(v) for i, v in self._norm_sum.items()},
            "norm_max": {i: float(v) for i, v in self._norm_max.items()},
            "nonfinite": {i: int(v) for i, v in self._nonfinite.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._policies = {}
        self._loaded_policies = {int(i): s for i, s in state_dict.get("policies", {}).items()}
        self.steps = {int(i): int(v) for i, v in state_dict.get("steps", {}).items()}
        self._clipped = {int(i): torch.tensor(int(v)) for i, v in state_dict.get("clipped", {}).items()}
        self._norm_sum = {int(i): torch.tensor(float(v), dtype=torch.float64)
                          for i, v in state_dict.get("norm_sum", {}).items()}
        self._norm_max = {int(i): torch.tensor(float(v)) for i, v in state_dict.get("norm_max", {}).items()}
        self._nonfinite = {int(i): torch.tensor(int(v)) for i, v in state_dict.get("nonfinite", {}).items()}
