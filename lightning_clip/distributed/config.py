"""``ARCConfig``: the settings of ARC in ``ddp_arc``, declared and validated once (no torch.distributed here)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from lightning_clip.exceptions import check_choice, check_fraction, check_non_negative_int, check_positive_float
from lightning_clip.robust.aggregators import AGGREGATORS, aggregate
from lightning_clip.robust.transforms import SendTransform, WorkerMomentum

__all__ = ["ARCConfig", "check_world_size"]


def check_world_size(world_size: int, num_byzantine: int) -> None:
    """Raise ``ValueError`` unless ``0 <= num_byzantine < world_size / 2``, naming the world size."""
    if 2 * num_byzantine >= world_size:
        raise ValueError(
            f"Expected argument `num_byzantine` to satisfy 0 <= num_byzantine < world_size / 2 = {world_size / 2:g} "
            f"(world size {world_size}) but got {num_byzantine}; ARC needs a strict honest majority, so use "
            f"num_byzantine <= {(world_size - 1) // 2} or at least {2 * num_byzantine + 1} ranks"
        )


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"Expected argument `{name}` to be a bool but got {value!r}")
    return value


@dataclass(frozen=True)
class ARCConfig:
    """How ``ddp_arc`` aggregates the ranks' local gradients: ``rule(NNM(clip_C(ARC(x))))``.

    Every rank sends its local gradient (or, with ``worker_momentum``, its local momentum); ARC clips
    the ``floor(2 f (n - f) / n)`` largest of the ``n`` vectors to the next largest norm and zeroes
    non-finite ones; then optional static clipping, NNM and the rule. Validated on construction.

    Attributes:
        num_byzantine: ``f``, the number of ranks that may misbehave, ``0 <= f < world_size / 2``
            (checked against the world size when it is known). ``0`` gives plain DDP's result.
        aggregator: ``"mean"`` (an all-reduce: plain DDP's traffic plus ``n`` floats) or a robust rule of
            :data:`~lightning_clip.robust.aggregators.AGGREGATORS`: ``"cwtm"``, ``"median"``, ``"geomed"``,
            ``"krum"``, ``"multikrum"`` (an all-gather of every rank's gradient).
        nnm: Nearest-neighbour mixing before the rule (all-gather path).
        arc: Apply ARC (the default). ``False`` is the ablation: vectors reach the rule unclipped and a
            non-finite one is not zeroed, as in plain DDP.
        static_clip: If set, clip every rank's vector to this L2 norm after ARC and before NNM (the
            static-clipping baseline); ``None`` skips it.
        worker_momentum: ``beta`` in ``[0, 1)``: each rank sends ``m <- beta m + (1 - beta) g``
            (``m_0 = 0``) instead of its gradient (Robust D-SHB, the algorithm the ARC paper runs; pair it
            with ``SGD(momentum=0)``). ``0.0`` sends the gradient.
    """

    num_byzantine: int = 1
    aggregator: str = "mean"
    nnm: bool = False
    arc: bool = True
    static_clip: float | None = None
    worker_momentum: float = 0.0

    def __post_init__(self) -> None:
        check_non_negative_int("num_byzantine", self.num_byzantine)
        if not isinstance(self.aggregator, str):
            raise TypeError(f"Expected argument `aggregator` to be a string but got {self.aggregator!r}")
        check_choice("aggregator", self.aggregator, tuple(AGGREGATORS))
        _check_bool("nnm", self.nnm)
        _check_bool("arc", self.arc)
        if self.static_clip is not None:
            object.__setattr__(self, "static_clip", check_positive_float("static_clip", self.static_clip))
        beta = check_fraction("worker_momentum", self.worker_momentum, low=0.0, high=1.0, open_high=True)
        object.__setattr__(self, "worker_momentum", beta)

    @property
    def uses_all_reduce(self) -> bool:
        """Whether the reduction is an all-reduce (``"mean"`` without NNM) rather than an all-gather."""
        return self.aggregator == "mean" and not self.nnm

    @property
    def server_aggregation(self) -> Callable[[Tensor], Tensor]:
        """The whole pipeline ``[n, d] -> [d]``: ``aggregate(x, aggregator, num_byzantine, nnm, arc, static_clip)``."""
        return functools.partial(
            aggregate, rule=self.aggregator, num_byzantine=self.num_byzantine, nnm=self.nnm, arc=self.arc,
            static_clip=self.static_clip,
        )

    def send_chain(self, extra: Sequence[SendTransform] = ()) -> list[SendTransform]:
        """The transforms a rank applies to what it sends, in order: worker momentum (if any), then ``extra``."""
        chain: list[SendTransform] = [WorkerMomentum(self.worker_momentum)] if self.worker_momentum > 0.0 else []
        return chain + list(extra)

    def check_world_size(self, world_size: int) -> None:
        """Raise ``ValueError`` unless ``num_byzantine < world_size / 2``."""
        check_world_size(world_size, self.num_byzantine)
