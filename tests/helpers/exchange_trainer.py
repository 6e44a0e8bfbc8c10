"""Lightning runs of the sharded-exchange tests (imported inside the spawned workers only: it loads Lightning).

``ddp_arc`` with centered clipping and bucketing on 5 ranks: an uninterrupted run that checkpoints every
2 steps, then a run resumed from step 2.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from lightning_clip import ARCDDPStrategy
from tests.helpers import ddp as h

#: The strategy's settings: centered clipping from the previous aggregate, buckets of 2 of the 5 ranks.
STRATEGY = {"num_byzantine": 1, "aggregator": "cclip", "cclip_tau": 0.05, "cclip_iters": 2, "bucket_size": 2,
            "bucket_seed": 5}
TOTAL = 4  # optimizer steps


def rank_loss(net: nn.Module, rank: int, step: int) -> Tensor:
    """Rank ``rank``'s loss at ``step``: its own batch, scaled by ``1 + rank`` (distinct gradient norms)."""
    x, y = h.rank_batch(rank, step)
    return nn.functional.mse_loss(net(x), y) * (1.0 + rank)


class ShardedModule(h.RecordingModule):
    """``RecordingModule`` of ``tests.helpers.ddp`` with this module's :func:`rank_loss`; saves the cclip centre."""

    def loss(self, rank: int, step: int) -> Tensor:
        return rank_loss(self.net, rank, step)

    def on_train_end(self) -> None:
        self.save(center=self.trainer.strategy.arc_state.center.vector(list(self.parameters())))


def fit(root: Path, tag: str, n: int, ckpt_dir: Path | None = None, ckpt_path: Path | None = None) -> None:
    h.fit_resumable(ShardedModule(str(root), tag, num_samples=100), ARCDDPStrategy(**STRATEGY), n, TOTAL, root,
                    ckpt_dir=ckpt_dir, ckpt_path=ckpt_path)
