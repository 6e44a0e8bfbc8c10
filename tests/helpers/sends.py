"""A :class:`~lightning_clip.robust.transforms.SendContext` for one-process tests of send transforms."""

from __future__ import annotations

import torch

from lightning_clip.robust.transforms import SendContext


def context(rank: int = 0, n: int = 1, step: int = 0, rows: torch.Tensor | None = None) -> SendContext:
    """Rank ``rank`` of ``n`` at ``step``; ``ctx.gather`` answers ``rows`` (and fails when ``rows`` is ``None``)."""

    def gather(flat: torch.Tensor) -> torch.Tensor:
        if rows is None:
            raise AssertionError("this transform must not gather")
        return rows

    return SendContext(rank, n, step, gather, lambda x: x.mean(0))
