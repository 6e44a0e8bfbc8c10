"""NonFiniteGradientGuard: catch NaN/Inf gradients before the optimizer steps."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_clip import tags
from lightning_clip.callbacks.step import (
    Stage,
    StepCallback,
    StepState,
    check_strategy,
    should_log,
    uses_grad_scaler,
)
from lightning_clip.exceptions import NonFiniteGradientError, check_choice, check_positive_int

__all__ = ["NonFiniteGradientGuard"]

FINITE = "finite"
"""The flag every non-finite guard reads: ``1.0`` when every gradient entry of the step is finite."""


class NonFiniteGradientGuard(StepCallback):
    """Check the gradients of every optimizer for NaN/Inf before it steps.

    Actions:

    - ``"warn"``: one warning per affected step naming the first ``max_names`` offending parameters.
    - ``"skip"``: the optimizer step becomes a no-op: the gradients of that optimizer are set to
      ``None``, so neither the weights nor the optimizer state (momenta, step counts) move. Skipped
      steps are counted and logged as ``grad_nonfinite/skipped``.
    - ``"raise"``: raise :class:`~lightning_clip.NonFiniteGradientError` naming the parameters.

    ``max_consecutive_skips`` makes ``"skip"`` raise after that many skipped steps in a row.

    Under fp16 mixed precision with a ``GradScaler`` the scaler already skips steps with non-finite
    gradients and lowers its scale; the guard then stays out of the way (it does nothing), so infs
    are not handled twice. The check reads one boolean from the device per step, in the same read as
    :class:`~lightning_clip.SpikeGuard`'s decision when both are used.

    It decides before any callback clips, wherever it is in ``Trainer(callbacks=...)``: a step it skips never
    reaches a clipping policy (see :mod:`lightning_clip.callbacks.step`).

    Args:
        action: ``"warn"``, ``"skip"`` or ``"raise"``.
        max_consecutive_skips: raise after this many consecutive skipped steps (``None``: never).
        max_names: how many parameter names a message lists.
    """

    step_stage = Stage.GUARD

    def __init__(self, action: str = "warn", max_consecutive_skips: int | None = None, max_names: int = 5) -> None:
        self.action = check_choice("action", action, ("warn", "skip", "raise"))
        if max_consecutive_skips is not None:
            max_consecutive_skips = check_positive_int("max_consecutive_skips", max_consecutive_skips)
        self.max_consecutive_skips = max_consecutive_skips
        self.max_names = check_positive_int("max_names", max_names)
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.nonfinite_steps = 0
        self._defer_to_scaler = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(action=self.action)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer, "NonFiniteGradientGuard")
        super().setup(trainer, pl_module, stage)
        self._defer_to_scaler = uses_grad_scaler(trainer)
        if self._defer_to_scaler:
            rank_zero_info(
                "NonFiniteGradientGuard: a GradScaler (fp16 mixed precision) handles non-finite gradients "
                "itself (it skips the step and lowers its scale); the guard stays inactive."
            )

    def _describe(self, state: StepState) -> str:
        bad = [n for n, v in zip(state.names, state.stats.norms.tolist()) if not math.isfinite(v)]
        shown = ", ".join(bad[: self.max_names])
        more = f" and {len(bad) - self.max_names} more" if len(bad) > self.max_names else ""
        opt = f" of optimizer {state.optimizer_idx}" if state.num_optimizers > 1 else ""
        return f"{len(bad)} parameter(s){opt} have NaN/Inf gradients: {shown}{more}"

    def step_flags(self, trainer: pl.Trainer, pl_module: pl.LightningModule, state: StepState) -> dict[str, Tensor]:
        """Whether every gradient entry is finite (nothing under a GradScaler, which handles those steps)."""
        return {} if self._defer_to_scaler else {FINITE: state.stats.finite}

    def skips(self, host: Mapping[str, float]) -> bool:
        """Whether this step has NaN/Inf gradients and ``action="skip"``."""
        return self.action == "skip" and not self._defer_to_scaler and host[FINITE] <= 0.0

    def on_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, state: StepState) -> None:
        if self._defer_to_scaler:
            return
        if state.host[FINITE] > 0.0:  # the one read of the step, shared with SpikeGuard
            self.consecutive_skips = 0
        else:
            self.nonfinite_steps += 1
            step = trainer.global_step
            if self.action == "raise":
                raise NonFiniteGradientError(
                    f"Step {step}: {self._describe(state)}. Lower the learning rate, add GradientClipping, "
                    f"or use NonFiniteGradientGuard(action='skip') to drop such steps."
                )
            if self.action == "warn":
                rank_zero_warn(f"Step {step}: {self._describe(state)}. The optimizer steps anyway.")
            else:  # the runner dropped the step already (skips())
                self.skipped_steps += 1
                self.consecutive_skips += 1
                if self.max_consecutive_skips is not None and self.consecutive_skips > self.max_consecutive_skips:
                    raise NonFiniteGradientError(
                        f"Step {step}: {self.consecutive_skips} consecutive optimizer steps skipped "
                        f"(max_consecutive_skips={self.max_consecutive_skips}); last: {self._describe(state)}."
                    )
                rank_zero_warn(f"Step {step}: {self._describe(state)}. Optimizer step skipped.")
        if self.action == "skip" and should_log(trainer):
            state.log({tags.NONFINITE_SKIPPED: float(self.skipped_steps)})

    def state_dict(self) -> dict[str, Any]:
        return {
            "skipped_steps": self.skipped_steps,
            "consecutive_skips": self.consecutive_skips,
            "nonfinite_steps": self.nonfinite_steps,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        self.consecutive_skips = int(state_dict.get("consecutive_skips", 0))
        self.nonfinite_steps = int(state_dict.get("nonfinite_steps", 0))
