"""Simulated Byzantine ranks as send transforms, and the single-process runner of a chain of transforms.

:class:`ByzantineTransform` replaces what a Byzantine rank sends by its attack; the ``ddp_arc``
strategy appends it to the hook's chain (``byzantine=``). :func:`simulate_sends` runs the same chains
for ``n`` simulated ranks in one process, with the gathers answered from the rows it holds, so a
simulation and a real DDP run send the same bits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from lightning_clip.exceptions import check_non_negative_int
from lightning_clip.robust.transforms import SendBuffers, SendContext, SendTransform
from lightning_clip.sim.byzantine import ByzantineSpec

__all__ = ["ByzantineTransform", "simulate_sends"]


class ByzantineTransform:
    """Send the attack of ``spec`` from the Byzantine ranks; the honest ranks send what they hold.

    An omniscient attack (``spec.needs_honest``) gathers every rank's vector first; every rank takes
    part in that gather, so the ranks call the same collectives. Each Byzantine rank computes the
    attack from the same gathered rows, so they all send the same vector. The ``gaussian`` attack
    draws from a generator seeded by ``(seed, rank, step)``: a resumed run replays the same noise.

    Args:
        spec: The Byzantine ranks and their attack.
        seed: Seed of the ``gaussian`` attack.
    """

    __slots__ = ("seed", "spec")

    def __init__(self, spec: ByzantineSpec, seed: int = 0) -> None:
        if not isinstance(spec, ByzantineSpec):
            raise TypeError(f"Expected argument `spec` to be a ByzantineSpec but got {type(spec).__name__}")
        self.spec = spec
        self.seed = check_non_negative_int("seed", seed)

    def generator(self, rank: int, step: int) -> torch.Generator:
        """The generator of rank ``rank``'s ``gaussian`` draw at ``step`` (a fresh seed per pair)."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + rank * 1_009 + step * 7_919 + 1)

    def __call__(self, sent: SendBuffers, ctx: SendContext) -> None:
        spec = self.spec
        byzantine = spec.is_byzantine(ctx.rank)
        if not (byzantine or spec.needs_honest):
            return
        flat = sent.flatten()
        honest: Tensor | None = None
        if spec.needs_honest:  # every rank takes part in the gather
            honest = ctx.gather(flat)[spec.honest_ranks(ctx.world_size)]
        if not byzantine:
            return
        aggregation = ctx.aggregation if spec.needs_aggregation else None
        sent.write_(spec.apply(flat, honest, generator=self.generator(ctx.rank, ctx.step), aggregation=aggregation))

    def __repr__(self) -> str:
        return f"ByzantineTransform({self.spec!r}, seed={self.seed})"


def simulate_sends(
    chains: Sequence[Sequence[SendTransform]],
    sends: Sequence[SendBuffers],
    step: int,
    aggregation: Callable[[Tensor], Tensor],
) -> Tensor:
    """Run rank ``r``'s chain ``chains[r]`` on ``sends[r]`` for every rank, as the hook does; return ``[n, d]``.

    Transform ``i`` runs on every rank before transform ``i + 1`` on any; a gather inside transform
    ``i`` returns the rows every rank held before it, as the all-gather in DDP does.

    Args:
        chains: One chain per rank, all of the same length (rank ``r``'s state, e.g. its momentum, lives
            in its own transforms).
        sends: What each rank sends (changed in place).
        step: The step counter the transforms see.
        aggregation: The server's pipeline ``[n, d] -> [d]`` (for attacks that search against it).
    """
    n = len(sends)
    if len(chains) != n:
        raise ValueError(f"Expected one chain per rank ({n}) but got {len(chains)}")
    depths = {len(chain) for chain in chains}
    if len(depths) > 1:
        raise ValueError(f"Expected chains of one length but got lengths {sorted(depths)}")
    for i in range(depths.pop() if depths else 0):
        held = torch.stack([s.flatten() for s in sends])

        def gather(flat: Tensor, held: Tensor = held) -> Tensor:
            return held

        for rank in range(n):
            chains[rank][i](sends[rank], SendContext(rank, n, step, gather, aggregation))
    return torch.stack([s.flatten() for s in sends])
