"""TensorBoard custom-scalars layout: the clipping tags grouped into readable charts.

:func:`write_layout` writes, once per :class:`~lightning.pytorch.loggers.TensorBoardLogger`, a
layout for TensorBoard's *Custom Scalars* tab:

=================================== ===========================================================
category                            charts
=================================== ===========================================================
``gradient clipping``               pre-clip norm, post-clip norm and threshold in one chart
                                    (one chart per optimizer with several optimizers); clip
                                    rate; non-finite steps skipped
``per-parameter gradient norms``    every per-parameter norm tag
                                    (:data:`~lightning_clip.tags.PARAM_NORM_PATTERN`)
``ARC (robust DDP)``                ARC threshold with each rank's local norm; clipped ranks
=================================== ===========================================================

:class:`TensorBoardLayout` is a callback that calls it at train start (the ``lightning-clip`` CLI and
demo add it automatically when a TensorBoardLogger is configured).
"""

from __future__ import annotations

import weakref
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_clip import tags

__all__ = ["TensorBoardLayout", "build_layout", "write_layout"]

_WRITTEN: weakref.WeakSet[TensorBoardLogger] = weakref.WeakSet()


def _opt(tag: str, idx: int, num_optimizers: int) -> str:
    return tags.tag_regex(tags.with_optimizer(tag, idx, num_optimizers))


def build_layout(num_optimizers: int = 1, arc: bool = True) -> dict[str, dict[str, list[Any]]]:
    """The layout dict for ``SummaryWriter.add_custom_scalars``: ``{category: {chart: ["Multiline", [regex]]}}``.

    Args:
        num_optimizers: with more than one, each optimizer gets its own norm/threshold chart (tags
            with the ``_opt<i>`` suffix).
        arc: include the ARC category.
    """
    if not isinstance(num_optimizers, int) or num_optimizers < 1:
        raise ValueError(f"Expected argument `num_optimizers` to be a positive integer but got {num_optimizers!r}")
    clipping: dict[str, list[Any]] = {}
    for i in range(num_optimizers):
        suffix = "" if num_optimizers == 1 else f" (optimizer {i})"
        clipping[f"norm vs threshold{suffix}"] = [
            "Multiline",
            [_opt(t, i, num_optimizers) for t in (tags.GRAD_NORM_TOTAL, tags.GRAD_NORM_CLIPPED, tags.CLIP_THRESHOLD)],
        ]
    clipping["clip rate"] = ["Multiline", [tags.tag_regex(tags.CLIP_RATE, any_optimizer=True)]]
    clipping["non-finite steps skipped"] = ["Multiline", [tags.tag_regex(tags.NONFINITE_SKIPPED, any_optimizer=True)]]
    layout: dict[str, dict[str, list[Any]]] = {
        "gradient clipping": clipping,
        "per-parameter gradient norms": {
            "norm per parameter": ["Multiline", [tags.PARAM_NORM_PATTERN.pattern]],
        },
    }
    if arc:
        layout["ARC (robust DDP)"] = {
            "ARC threshold and local norms": ["Multiline", [tags.tag_regex(tags.ARC_THRESHOLD),
                                                               tags.ARC_NORM_RANK_PATTERN.pattern]],
            "ranks clipped": ["Multiline", [tags.tag_regex(tags.ARC_CLIPPED_RANKS)]],
        }
    return layout


def write_layout(trainer: pl.Trainer, arc: bool | None = None) -> int:
    """Write the custom-scalars layout to every TensorBoardLogger of ``trainer`` that has none yet.

    Idempotent per logger (safe to call from several callbacks' ``on_train_start``). Call it once
    the optimizers exist (``on_train_start`` or later) so that several optimizers get one chart each.
    Only the global rank 0 writes.

    Args:
        trainer: the trainer whose loggers receive the layout.
        arc: include the ARC category; ``None`` decides from the strategy (it has ``num_byzantine``).

    Returns:
        The number of loggers written to in this call.
    """
    if trainer.global_rank != 0:
        return 0
    loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger) and lg not in _WRITTEN]
    if not loggers:
        return 0
    if arc is None:
        arc = hasattr(trainer.strategy, "num_byzantine")
    layout = build_layout(max(1, len(trainer.optimizers)), arc=arc)
    for lg in loggers:
        lg.experiment.add_custom_scalars(layout)
        _WRITTEN.add(lg)
    return len(loggers)


class TensorBoardLayout(Callback):
    """Write the custom-scalars layout (:func:`write_layout`) at train start. No state, no arguments."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        write_layout(trainer)
