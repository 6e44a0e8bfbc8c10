"""One pass over a set of gradients: per-tensor norms, total norm in fp32 and a finite flag.

Pure torch. The total norm is computed the way :func:`torch.nn.utils.get_total_norm` computes it
(per-tensor ``torch._foreach_norm`` grouped by device and dtype, then the norm of the stacked norms),
so for fp32 gradients the result is bit-identical to torch's and Lightning's clipping; for bf16/fp16
gradients every norm is accumulated in fp32 (no fp16 overflow, no bf16 rounding of the sum). Sharded
gradients (``DTensor``) are measured whole, with one all-reduce per mesh dimension
(:mod:`lightning_clip.core.dtensor_norms`), so every rank gets the same norms.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

from lightning_clip.core.dtensor_norms import is_dtensor, reduce_shard_norms, sharded_norms

__all__ = ["GradientStats", "collect_grads", "gradient_stats"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class GradientStats:
    """Statistics of one set of gradients, all tensors on the gradients' device.

    Attributes:
        norms: 1-D fp32 tensor of per-tensor L2 norms, in the order of the input gradients.
        total_norm: 0-d tensor, the L2 norm of all gradients viewed as one vector: fp32 (fp64
            when any gradient is fp64, as in torch). bf16/fp16 gradients are accumulated in fp32,
            so fp16 cannot overflow; bf16 shares fp32's range, so entries above ~1e19 overflow
            the accumulation exactly as fp32 gradients do in torch's own clipping.
        num_tensors: number of gradient tensors measured.
    """

    norms: Tensor
    total_norm: Tensor
    num_tensors: int

    @property
    def finite(self) -> Tensor:
        """0-d bool tensor: True when every gradient entry is finite (read off the total norm)."""
        return torch.isfinite(self.total_norm)


def collect_grads(params: Iterable[Tensor]) -> tuple[list[Tensor], list[int]]:
    """Return the ``.grad`` tensors of ``params`` that have one, and their positions in ``params``."""
    grads: list[Tensor] = []
    index: list[int] = []
    for i, p in enumerate(params):
        if p.grad is not None:
            grads.append(p.grad)
            index.append(i)
    return grads, index


@torch.no_grad()
def gradient_stats(grads: Sequence[Tensor], shard_group: Any = None,
                   sharded: Sequence[bool] | None = None) -> GradientStats:
    """Measure ``grads`` in one foreach pass.

    Args:
        grads: gradient tensors (plain or DTensor), e.g. from :func:`collect_grads`.
        shard_group: a process group over which the plain gradients are disjoint shards (FSDP1's
            flat-parameter shards): their norms are summed over it in one all-reduce, so every rank
            gets the whole norms. Every rank must pass the same layout (a gradient with no local shard
            as an empty tensor). ``None``: plain gradients are whole (DDP, one device).
        sharded: with ``shard_group``, which of ``grads`` are shards (the others are replicated and not
            summed); ``None``: all of them.

    Returns:
        The per-tensor norms (fp32, input order), the total norm (fp32) and, through
        :attr:`GradientStats.finite`, whether all entries are finite.
    """
    n = len(grads)
    if n == 0:
        empty = torch.zeros(0, dtype=torch.float32)
        return GradientStats(norms=empty, total_norm=torch.zeros((), dtype=torch.float32), num_tensors=0)
    first_device = grads[0].device
    plain_idx: list[int] = []
    dtensor_idx: list[int] = []
    for i, g in enumerate(grads):
        (dtensor_idx if is_dtensor(g) else plain_idx).append(i)
    plain: list[Tensor | None] = [grads[i] for i in plain_idx]  # torch's grouping accepts None entries

    order: list[int] = []
    parts: list[Tensor] = []
    if plain:
        # torch's own grouping, so groups come in the order get_total_norm stacks them
        grouped = _group_tensors_by_device_and_dtype([plain], with_indices=True)
        for (_device, dtype), ([group], idx) in grouped.items():
            tensors = cast(list[Tensor], group)  # no None went in, none comes out
            if dtype in _LOW_PRECISION:
                norms = torch._foreach_norm(tensors, 2.0, dtype=torch.float32)
            else:
                norms = torch._foreach_norm(tensors, 2.0)
            order.extend(plain_idx[j] for j in idx)
            parts.extend(n_.to(first_device) for n_ in norms)
    # Grouped order and dtype promotion exactly as torch.nn.utils.get_total_norm stacks them
    # (fp64 when any gradient is fp64), so the total of plain gradients is bit-identical to torch's.
    chunks = [torch.stack(parts)] if parts else []
    if dtensor_idx:  # norms of the whole sharded gradients: one all-reduce per mesh dimension
        order.extend(dtensor_idx)
        chunks.append(sharded_norms([grads[i] for i in dtensor_idx]).to(first_device))
    stacked = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
    total = torch.linalg.vector_norm(stacked, 2.0)
    stacked = stacked.float()
    if order == list(range(n)):
        norms_in_order = stacked
    else:
        inverse = torch.empty(n, dtype=torch.long)
        inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(n)
        norms_in_order = stacked[inverse.to(first_device)]
    if shard_group is not None:  # FSDP1 shards: whole norms from one all-reduce, then the total from those
        mask = torch.ones(n, dtype=torch.bool) if sharded is None else torch.tensor(list(sharded), dtype=torch.bool)
        if mask.numel() != n:
            raise ValueError(f"Expected `sharded` to have one entry per gradient ({n}) but got {mask.numel()}")
        mask[dtensor_idx] = False  # DTensors are whole already
        norms_in_order = reduce_shard_norms(norms_in_order, shard_group, mask)
        total = torch.linalg.vector_norm(norms_in_order, 2.0)
    return GradientStats(norms=norms_in_order, total_norm=total, num_tensors=n)
