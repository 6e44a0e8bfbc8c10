"""Shared pieces of the Flower tests: a tiny site model and data, and replies built by hand (needs ``flwr``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from torch import nn

from lightning_clip.flower.grid import ensure_task_identity
from tests.helpers.models import TinyRegressor, make_loader


class SiteRegressor(TinyRegressor):
    """``TinyRegressor`` that logs its training and validation loss (what a site reports to the server)."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y))


def site_module(context: Context) -> SiteRegressor:
    """Every site builds the same architecture; its initial weights are overwritten by the global arrays."""
    torch.manual_seed(0)
    return SiteRegressor(lr=0.05)


def site_data(context: Context):
    """Site ``partition-id``'s own regression data (a different draw per site) and a validation split."""
    site = int(context.node_config["partition-id"])
    return make_loader(n=32, batch_size=8, seed=100 + site), make_loader(n=16, batch_size=8, seed=200 + site)


def initial_arrays() -> ArrayRecord:
    """The global model the server starts from."""
    torch.manual_seed(0)
    return ArrayRecord(SiteRegressor().state_dict())


def replies(global_arrays: ArrayRecord, updates: torch.Tensor, num_examples: Sequence[int] | None = None,
            first_node: int = 1) -> list[Message]:
    """One train reply per row of ``updates`` [n, d] (global + row, laid out like ``global_arrays``), from node
    ``first_node + i``, as a site would send it."""
    ensure_task_identity()
    keys = list(global_arrays.keys())
    shapes = [global_arrays[k].numpy().shape for k in keys]
    flat_global = np.concatenate([global_arrays[k].numpy().reshape(-1) for k in keys])
    out = []
    for i, row in enumerate(updates):
        flat = flat_global + row.numpy().astype(flat_global.dtype)
        arrays, offset = {}, 0
        for k, shape in zip(keys, shapes):
            size = int(np.prod(shape))
            arrays[k] = Array(np.ascontiguousarray(flat[offset : offset + size].reshape(shape)))
            offset += size
        instruction = Message(RecordDict({"arrays": global_arrays, "config": ConfigRecord({"server-round": 1})}),
                              dst_node_id=first_node + i, message_type=MessageType.TRAIN)
        weight = 10 if num_examples is None else num_examples[i]
        content = RecordDict({"arrays": ArrayRecord(arrays),
                              "metrics": MetricRecord({"num-examples": weight, "train_loss": float(i)})})
        out.append(Message(content, reply_to=instruction))
    return out
