"""AdaGCClipping: per-tensor adaptive clipping against each tensor's own EMA of clipped norms (AdaGC)."""

from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_clip import tags
from lightning_clip.callbacks.step import Stage, StepCallback, StepState, check_strategy, should_log
from lightning_clip.core.adagc import adagc_coefficients
from lightning_clip.core.grads import GradientStats
from lightning_clip.exceptions import (
    check_bool,
    check_fraction,
    check_optional_positive_int,
    check_positive_float,
    check_positive_int,
    check_threshold,
)

__all__ = ["AdaGCClipping"]


class AdaGCClipping(StepCallback):
    """Per-tensor adaptive gradient clipping (AdaGC, arXiv 2502.11034) in ``on_before_optimizer_step``.

    Each gradient tensor is clipped relative to an EMA of its own past clipped norms: for the first
    ``warmup_steps`` optimizer steps all gradients are clipped globally to ``absolute`` and each tensor's
    ``gamma`` is the smallest clipped norm seen; afterwards tensor ``i`` is scaled by
    ``min(1, relative * gamma_i / ||g_i||)`` and ``gamma_i <- beta * gamma_i + (1 - beta) * ||clipped g_i||``
    (see :mod:`lightning_clip.core.adagc`). The per-tensor norms are the shared gradient pass's; nothing
    synchronises the host with the device except on logging steps. A step with a NaN/Inf norm leaves
    ``gamma`` unchanged. ``gamma`` is saved in the checkpoint, per optimizer.

    Wherever it is in ``Trainer(callbacks=...)``, it clips after every guard decided (never on a skipped
    step), after :class:`AdaptiveGradientClipping` and before :class:`GradientClipping` (see
    :mod:`lightning_clip.callbacks.step`).

    Logged per optimizer step (suffix ``_opt<i>`` with several optimizers): ``grad_norm/total`` (before any
    clipping) and ``grad_norm/clipped_total`` (after all clipping).

    Args:
        warmup_steps: steps of global clipping that initialise ``gamma`` (>= 1).
        absolute: positive global threshold during warmup.
        relative: positive allowed ratio of a tensor's norm to its ``gamma`` (> 1 lets ``gamma`` grow).
        beta: EMA factor of ``gamma``, in ``(0, 1)``.
        log: log the tags above.
        log_every_n_steps: override the trainer's ``log_every_n_steps`` for these tags.
    """

    step_stage = Stage.CLIP_TENSORS

    def __init__(self, warmup_steps: int = 100, absolute: float = 1.0, relative: float = 1.05, beta: float = 0.98,
                 log: bool = True, log_every_n_steps: int | None = None) -> None:
        self.warmup_steps = check_positive_int("warmup_steps", warmup_steps)
        self.absolute = check_threshold("absolute", absolute)
        self.relative = check_positive_float("relative", relative)
        self.beta = check_fraction("beta", beta, open_low=True, open_high=True)
        if self.relative < 1.0:
            warnings.warn(
                f"AdaGCClipping(relative={self.relative:g}): below 1, every clipped tensor is pulled under its EMA "
                f"gamma, which then shrinks by a factor beta + (1 - beta) relative = "
                f"{self.beta + (1 - self.beta) * self.relative:.4g} per clipped step, so the gradients fade away; "
                "AdaGC uses relative=1.05", UserWarning, stacklevel=2)
        check_bool("log", log)
        check_optional_positive_int("log_every_n_steps", log_every_n_steps)
        self.log = log
        self.log_every_n_steps = log_every_n_steps
        #: per optimizer index: steps seen, the parameter names in gradient order, gamma
        self._optimizers: dict[int, dict[str, Any]] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(warmup_steps=self.warmup_steps, absolute=self.absolute,
                                        relative=self.relative, beta=self.beta)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer, "AdaGCClipping")
        super().setup(trainer, pl_module, stage)

    def gamma(self, optimizer_idx: int = 0) -> Tensor | None:
        """The per-tensor EMA of clipped norms of optimizer ``optimizer_idx`` (``None`` before its first step)."""
        st = self._optimizers.get(optimizer_idx)
        return None if st is None else st["gamma"]

    def on_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, state: StepState) -> None:
        current = state.current()  # what AdaptiveGradientClipping left, if it ran
        norms, total = current.norms, current.total_norm
        st = self._optimizers.get(state.optimizer_idx)
        if st is None:
            st = self._optimizers[state.optimizer_idx] = {
                "steps": 0, "names": list(state.names), "gamma": torch.full_like(norms, float("inf"))}
        if st["names"] != list(state.names):
            raise ValueError(
                "AdaGCClipping keeps one clipping history per gradient tensor, but the parameters with a gradient "
                f"changed between steps (had {len(st['names'])}, now {len(state.names)}); give every parameter a "
                "gradient at every step (or leave the unused ones out of the optimizer)."
            )
        gamma = st["gamma"].to(norms.device)
        coef, st["gamma"] = adagc_coefficients(norms, total, gamma, st["steps"], warmup_steps=self.warmup_steps,
                                               absolute=self.absolute, relative=self.relative, beta=self.beta)
        st["steps"] += 1
        torch._foreach_mul_(state.grads, [c.to(g.dtype) for c, g in zip(coef.unbind(), state.grads)])
        clipped = norms * coef
        state.clipped(GradientStats(norms=clipped, total_norm=torch.linalg.vector_norm(clipped),
                                    num_tensors=current.num_tensors))  # GradientClipping clips what is left
        if self.log and should_log(trainer, self.log_every_n_steps):
            state.log({tags.GRAD_NORM_TOTAL: state.stats.total_norm}, clipped_total=True)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": {i: {"steps": st["steps"], "names": list(st["names"]),
                                   "gamma": st["gamma"].detach().cpu().clone()}
                               for i, st in self._optimizers.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._optimizers = {
            int(i): {"steps": int(st["steps"]), "names": list(st["names"]),
                     "gamma": torch.as_tensor(st["gamma"], dtype=torch.float32).detach().cpu().clone()}
            for i, st in state_dict.get("optimizers", {}).items()
        }
