"""AdaptiveGradientClipping: unit-wise clipping relative to the weights (AGC, NFNets)."""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any

import lightning.pytorch as pl

from lightning_clip import tags
from lightning_clip.callbacks.step import Stage, StepCallback, StepState, check_strategy, should_log
from lightning_clip.core.dtensor_norms import is_dtensor
from lightning_clip.core.unitwise import adaptive_clip_grads_
from lightning_clip.exceptions import (
    check_bool,
    check_optional_positive_int,
    check_patterns,
    check_patterns_match,
    check_positive_float,
)

__all__ = ["AdaptiveGradientClipping"]


class AdaptiveGradientClipping(StepCallback):
    """Adaptive gradient clipping of Brock et al. 2021 (NFNets), unit-wise, in ``on_before_optimizer_step``.

    For every parameter and every output unit (a row along dim 0; the whole tensor for 0-d and 1-d
    parameters) the gradient ``g`` of the unit is scaled by
    ``min(1, clip_factor * max(||w||, eps) / max(||g||, 1e-6))``, where ``w`` are the unit's weights.
    The paper leaves the final classifier out: pass its parameter names in ``exclude``.

    The 0-d/1-d gradients reuse the norms of the shared gradient pass. Wherever it is in
    ``Trainer(callbacks=...)``, it clips after every guard decided (never on a skipped step) and before
    :class:`AdaGCClipping` and :class:`GradientClipping`, which clip what it left (their norms are measured
    again, once, when one of them is present or on logging steps). Logged, per optimizer step on logging
    steps (suffix ``_opt<i>`` with several optimizers): ``grad_norm/total`` (before any clipping) and
    ``grad_norm/clipped_total`` (after all clipping). See :mod:`lightning_clip.callbacks.step`.

    Args:
        clip_factor: positive ratio of a unit's gradient norm to its weight norm allowed (the paper
            uses 0.01 to 0.16, smaller for larger batches).
        eps: positive floor of a unit's weight norm, so zero-initialised units can still move.
        exclude: parameter-name patterns (``fnmatch`` style, e.g. ``"head.*"``) left unclipped.
        log: log the tags above.
        log_every_n_steps: override the trainer's ``log_every_n_steps`` for these tags.
    """

    step_stage = Stage.CLIP_UNITS

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
        check_patterns_match("exclude", self.exclude, [n for n, _ in pl_module.named_parameters()])
        super().setup(trainer, pl_module, stage)

    def excluded(self, name: str) -> bool:
        """Whether the parameter ``name`` matches one of the ``exclude`` patterns."""
        return any(fnmatchcase(name, pattern) for pattern in self.exclude)

    def on_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, state: StepState) -> None:
        chosen = [i for i, n in enumerate(state.names) if not self.excluded(n)]
        if not chosen:
            return
        if any(is_dtensor(state.grads[i]) for i in chosen):
            raise ValueError("AdaptiveGradientClipping does not support sharded (DTensor) gradients yet: the unit "
                             "norms would be those of the local shards.")
        norms = state.current().norms
        adaptive_clip_grads_([state.params[i] for i in chosen], [state.grads[i] for i in chosen], self.clip_factor,
                             self.eps, grad_norms=[norms[i] for i in chosen])
        state.clipped()  # measured again when a later clipper or the log reads the norms
        if self.log and should_log(trainer, self.log_every_n_steps):
            state.log({tags.GRAD_NORM_TOTAL: state.stats.total_norm}, clipped_total=True)

    def state_dict(self) -> dict[str, Any]:
        return {}
