"""AdaptiveGradientClipping: unit-wise clipping relative to the weights (AGC, NFNets)."""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.optim import Optimizer

from lightning_clip import tags
from lightning_clip.callbacks.step import check_strategy, log_values, should_log, step_state
from lightning_clip.core.dtensor_norms import is_dtensor
from lightning_clip.core.grads import gradient_stats
from lightning_clip.core.unitwise import adaptive_clip_grads_
from lightning_clip.exceptions import check_bool, check_optional_positive_int, check_patterns, check_positive_float

__all__ = ["AdaptiveGradientClipping"]


class AdaptiveGradientClipping(Callback):
    """Adaptive gradient clipping of Brock et al. 2021 (NFNets), unit-wise, in ``on_before_optimizer_step``.

    For every parameter and every output unit (a row along dim 0; the whole tensor for 0-d and 1-d
    parameters) the gradient ``g`` of the unit is scaled by
    ``min(1, clip_factor * max(||w||, eps) / max(||g||, 1e-6))``, where ``w`` are the unit's weights.
    The paper leaves the final classifier out: pass its parameter names in ``exclude``.

    The 0-d/1-d gradients reuse the norms of the shared gradient pass. Callbacks after this one see
    the clipped gradients and their norms (it measures them again), so a :class:`GradientClipping`
    placed after it clips what AGC left. Logged, per optimizer step on logging steps (suffix
    ``_opt<i>`` with several optimizers): ``grad_norm/total`` (before AGC, unless a monitor logged it)
    and ``grad_norm/clipped_total`` (after AGC; with a ``GradientClipping`` after it, still the norm
    after AGC, since a tag is logged once per step).

    Args:
        clip_factor: positive ratio of a unit's gradient norm to its weight norm allowed (the paper
            uses 0.01 to 0.16, smaller for larger batches).
        eps: positive floor of a unit's weight norm, so zero-initialised units can still move.
        exclude: parameter-name patterns (``fnmatch`` style, e.g. ``"head.*"``) left unclipped.
        log: log the tags above.
        log_every_n_steps: override the trainer's ``log_every_n_steps`` for these tags.
    """

    def __init__(self, clip_factor: float = 0.01, eps: float = 1e-3, exclude: str | list[str] | tuple[str, ...] = (),
                 log: bool = True, log_every_n_steps: int | None = None) -> None:
        self.clip_factor = check_positive_float("clip_factor", clip_factor)
        self.eps = check_positive_float("eps", eps)
        self.exclude = check_patterns("exclude", exclude)
        check_bool("log", log)
        check_optional_positive_int("log_every_n_steps", log_every_n_steps)
        self.log = log
        self.log_every_n_steps = log_every_n_steps

    @property
    def state_key(self) -> str:
        return self._generate_state_key(clip_factor=self.clip_factor, eps=self.eps, exclude=self.exclude)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer, "AdaptiveGradientClipping")

    def excluded(self, name: str) -> bool:
        """Whether the parameter ``name`` matches one of the ``exclude`` patterns."""
        return any(fnmatchcase(name, pattern) for pattern in self.exclude)

    @torch.no_grad()
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: Optimizer) -> None:
        state = step_state(trainer, pl_module, optimizer)
        if state.skipped:  # a guard placed before this callback dropped the step
            return
        chosen = [i for i, n in enumerate(state.names) if not self.excluded(n)]
        if not chosen:
            return
        if any(is_dtensor(state.grads[i]) for i in chosen):
            raise ValueError("AdaptiveGradientClipping does not support sharded (DTensor) gradients yet: the unit "
                             "norms would be those of the local shards.")
        total = state.stats.total_norm
        adaptive_clip_grads_([state.params[i] for i in chosen], [state.grads[i] for i in chosen], self.clip_factor,
                             self.eps, grad_norms=[state.stats.norms[i] for i in chosen])
        state.stats = gradient_stats(state.grads)  # later callbacks clip and guard what AGC left
        if self.log and should_log(trainer, self.log_every_n_steps):
            log_values(trainer, state, {tags.GRAD_NORM_TOTAL: total,
                                        tags.GRAD_NORM_CLIPPED: state.stats.total_norm})

    def state_dict(self) -> dict[str, Any]:
        return {}
