"""Lightning runs of the sharded-pipeline tests (imported inside the spawned workers only: it loads Lightning).

``ddp_arc`` with centered clipping and bucketing on 5 ranks: an uninterrupted run that checkpoints every
2 steps, then a run resumed from step 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import _ddp_helpers as h
import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_clip import ARCDDPStrategy

#: The strategy's settings: centered clipping from the previous aggregate, buckets of 2 of the 5 ranks.
STRATEGY = {"num_byzantine": 1, "aggregator": "cclip", "cclip_tau": 0.05, "cclip_iters": 2, "bucket_size": 2,
            "bucket_seed": 5}
TOTAL = 4  # optimizer steps


def rank_loss(net: nn.Module, rank: int, step: int) -> Tensor:
    """Rank ``rank``'s loss at ``step``: its own batch, scaled by ``1 + rank`` (distinct gradient norms)."""
    x, y = h.rank_batch(rank, step)
    return nn.functional.mse_loss(net(x), y) * (1.0 + rank)


class ShardedModule(pl.LightningModule):
    """The MLP of ``make_net``; records the weights after every step and centered clipping's centre at the end."""

    def __init__(self, out_dir: str, tag: str) -> None:
        super().__init__()
        self.net = h.make_net()
        self.out_dir = out_dir
        self.tag = tag
        self.records: list[tuple[int, Tensor]] = []

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return rank_loss(self.net, self.global_rank, self.global_step)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.records.append((self.global_step, h.param_vector(self.net).clone()))

    def on_train_end(self) -> None:
        center = self.trainer.strategy.arc_state.center.vector(list(self.parameters()))
        path = Path(self.out_dir) / f"{self.tag}_rank{self.global_rank}.pt"
        torch.save({"records": self.records, "center": center}, path)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=h.LR)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.zeros(100, 1)), batch_size=1)


def fit(root: Path, tag: str, n: int, ckpt_dir: Path | None = None, ckpt_path: Path | None = None) -> None:
    callbacks = []
    if ckpt_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=str(ckpt_dir), filename="{step}", every_n_train_steps=2,
                                         save_top_k=-1))
    trainer = pl.Trainer(
        accelerator="cpu", devices=n, max_steps=TOTAL, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=ckpt_dir is not None, callbacks=callbacks,
        strategy=ARCDDPStrategy(**STRATEGY), default_root_dir=str(root),
    )
    trainer.fit(ShardedModule(str(root), tag), ckpt_path=None if ckpt_path is None else str(ckpt_path))
