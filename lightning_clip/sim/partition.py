"""Heterogeneous data splits for robustness experiments (pure torch, deterministic by seed)."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_clip.exceptions import check_positive_float, check_positive_int

__all__ = ["dirichlet_split", "extreme_split"]


def dirichlet_split(labels: Tensor, num_shards: int, alpha: float, seed: int = 0) -> list[Tensor]:
    """Split sample indices into ``num_shards`` label-skewed shards.

    For every class, the class's samples are divided among the shards in proportions drawn from
    ``Dirichlet(alpha, ..., alpha)``: small ``alpha`` gives each shard few classes. Every shard gets
    at least one sample.

    Returns:
        One 1-D ``long`` tensor of indices per shard.
    """
    check_positive_int("num_shards", num_shards)
    check_positive_float("alpha", alpha)
    g = torch.Generator().manual_seed(seed)
    dist = torch.distributions.Dirichlet(torch.full((num_shards,), float(alpha)))
    shards: list[list[int]] = [[] for _ in range(num_shards)]
    torch.manual_seed(seed)  # Dirichlet.sample has no generator argument
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        props = dist.sample()
        cuts = (torch.cumsum(props, 0) * len(idx)).round().long().clamp(max=len(idx))
        start = 0
        for s in range(num_shards):
            end = int(cuts[s])
            shards[s].extend(idx[start:end].tolist())
            start = end
    out = [torch.tensor(sorted(s), dtype=torch.long) for s in shards]
    for s in range(num_shards):  # never leave a shard empty
        if len(out[s]) == 0:
            donor = max(range(num_shards), key=lambda i: len(out[i]))
            out[s], out[donor] = out[donor][-1:], out[donor][:-1]
    return out


def extreme_split(labels: Tensor, num_shards: int) -> list[Tensor]:
    """Sort the samples by label and cut them into ``num_shards`` contiguous chunks (1-2 classes each)."""
    check_positive_int("num_shards", num_shards)
    order = torch.argsort(labels, stable=True)
    return [chunk.clone() for chunk in torch.tensor_split(order, num_shards)]
