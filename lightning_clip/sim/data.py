"""Data for experiments that ship with the package or are generated (no downloads; pure torch).

- :func:`adding_problem`: the adding problem of Pascanu et al. (2013), generated from a seed.
- :func:`load_digits_tensors`: scikit-learn's bundled 8x8 digits.
- :class:`ShardSampler`: a fixed number of draws per epoch from a rank's own (heterogeneous) shard.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler

from lightning_clip.exceptions import check_positive_int

__all__ = ["ShardSampler", "adding_problem", "load_digits_tensors"]


def adding_problem(num_samples: int, seq_len: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Generate the adding problem: inputs ``[num_samples, seq_len, 2]`` and targets ``[num_samples, 1]``.

    One marked position is drawn from the first half and one from the second half of the sequence,
    as in Pascanu et al. (2013); the target is the sum of the two marked values (values ~ U[0, 1]).
    """
    check_positive_int("num_samples", num_samples)
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"Expected argument `seq_len` to be an integer >= 2 but got {seq_len!r}")
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(num_samples, seq_len, generator=g)
    half = seq_len // 2
    first = torch.randint(0, half, (num_samples,), generator=g)
    second = torch.randint(half, seq_len, (num_samples,), generator=g)
    markers = torch.zeros(num_samples, seq_len)
    rows = torch.arange(num_samples)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    x = torch.stack([values, markers], dim=-1)
    y = (values * markers).sum(dim=1, keepdim=True)
    return x, y


def load_digits_tensors() -> tuple[Tensor, Tensor]:
    """scikit-learn's bundled 8x8 digits as ``(x [1797, 64] in [0, 1], y [1797])``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("The digits demo needs scikit-learn: pip install 'lightning-clip[cli]'") from err
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    return x, y


class ShardSampler(DistributedSampler):
    """Draws ``num_samples`` indices per epoch, with replacement, from a dataset that is already this rank's shard.

    Every rank gets the same number of batches whatever its shard's size (ranks with unequal batch
    counts deadlock DDP at the epoch end). It is a :class:`~torch.utils.data.distributed.DistributedSampler`
    only so that Lightning's ``use_distributed_sampler`` leaves it alone: Lightning replaces a plain
    sampler by one that splits the dataset across the ranks again. Lightning calls :meth:`set_epoch`,
    so every epoch draws afresh (deterministic in ``seed`` and the epoch).

    Args:
        dataset: This rank's shard.
        num_samples: Indices per epoch (the same on every rank).
        seed: Seed of the draws (make it differ across ranks).
    """

    def __init__(self, dataset: Dataset, num_samples: int, seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=1, rank=0, shuffle=True, seed=seed)
        self.shard_size = len(dataset)  # type: ignore[arg-type]
        check_positive_int("shard size", self.shard_size)
        self.num_samples = check_positive_int("num_samples", num_samples)
        self.total_size = self.num_samples

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randint(self.shard_size, (self.num_samples,), generator=g).tolist())

    def __len__(self) -> int:
        return self.num_samples
