"""Norms of sharded gradients with one all-reduce per process group: ``DTensor`` (FSDP2, tensor parallel),
and plain tensors that are disjoint shards of a flat parameter (FSDP1).

The one module of ``core/`` that issues a collective. Each rank takes the sum of squares of its local
shard of every gradient (``torch._foreach_norm`` over the local shards, fp32 accumulation), then, for
each mesh dimension (process group) over which any gradient is sharded, ONE ``all_reduce`` of the vector
of those sums over that group sums the shards of every such gradient at once.
Dimensions a gradient is replicated over are not summed (the replicas hold the same values). So a
300-tensor FSDP2 model costs one all-reduce of 300 floats per step, where reducing each gradient's norm
on its own (``DTensor.full_tensor()``) costs 300 collectives.

Every rank ends with the same norms: the all-reduce returns the same sums everywhere, and every rank
issues the same collectives in the same order because the placements are the same on every rank.
Gradients with a ``Partial`` placement (not yet reduced) fall back to torch's own DTensor norm.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

__all__ = ["is_dtensor", "reduce_shard_norms", "sharded_norms"]


def is_dtensor(t: Tensor) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor``."""
    return type(t).__name__ == "DTensor" and hasattr(t, "full_tensor")


def _shard_dims(g: Any) -> tuple[int, ...] | None:
    """The mesh dimensions ``g`` is sharded over; ``None`` when a placement is ``Partial``.

    Any placement that is neither replicated nor partial splits the tensor into disjoint pieces: ``Shard``
    and FSDP2's ``_StridedShard`` on a 2-D mesh (for which ``is_shard()`` is False).
    """
    dims = []
    for d, placement in enumerate(g.placements):
        if placement.is_partial():
            return None
        if not placement.is_replicate():
            dims.append(d)
    return tuple(dims)


def _local_sq_norms(locals_: list[Tensor]) -> Tensor:
    """Sum of squares of each local tensor, fp32, ``[len(locals_)]``, in input order."""
    grouped = _group_tensors_by_device_and_dtype([list(locals_)], with_indices=True)  # type: ignore[list-item]
    parts: list[Tensor] = []
    order: list[int] = []
    for (_device, _dtype), ([group], idx) in grouped.items():
        parts.extend(torch._foreach_norm([t for t in group if t is not None], 2.0, dtype=torch.float32))
        order.extend(idx)
    device = locals_[0].device
    sq = torch.stack([p.to(device) for p in parts]).square()
    if order == list(range(len(locals_))):
        return sq
    return sq[torch.argsort(torch.tensor(order)).to(device)]


def _sum_over_group(sq: Tensor, mask: Tensor, group: Any) -> Tensor:
    """``sq`` with its entries where ``mask`` holds summed over ``group`` (one ``all_reduce``), the rest kept."""
    summed = torch.where(mask, sq, torch.zeros_like(sq))
    dist.all_reduce(summed, group=group)
    return torch.where(mask, summed, sq)


def _full_norm(g: Any) -> Tensor:
    norm = torch.linalg.vector_norm(g, 2.0, dtype=torch.float32)
    return norm.full_tensor() if is_dtensor(norm) else norm


@torch.no_grad()
def sharded_norms(grads: Sequence[Tensor]) -> Tensor:
    """Return the L2 norms (fp32 ``[len(grads)]``, on the first local shard's device) of whole ``DTensor`` s.

    One ``all_reduce`` per process group that shards any of them: a mesh dimension, shared by every mesh
    that has it (a 2-D data x tensor mesh and its data-parallel sub-mesh reduce their data-parallel shards
    together). The groups are taken in the order the gradients first need them, the same on every rank.
    """
    dims = [_shard_dims(g) for g in grads]
    sharded = [i for i, d in enumerate(dims) if d is not None]
    sq = _local_sq_norms([grads[i].to_local() for i in sharded]) if sharded else None  # type: ignore[attr-defined]
    if sq is not None:
        groups: dict[tuple[int, ...], tuple[Any, list[int]]] = {}
        for pos, i in enumerate(sharded):
            mesh = grads[i].device_mesh  # type: ignore[attr-defined]
            for mesh_dim in dims[i] or ():
                group = mesh.get_group(mesh_dim)
                groups.setdefault(tuple(dist.get_process_group_ranks(group)), (group, []))[1].append(pos)
        for group, positions in groups.values():
            if len(positions) == len(sharded):  # every gradient: reduce the whole vector
                dist.all_reduce(sq, group=group)
                continue
            mask = torch.zeros(len(sharded), dtype=torch.bool)
            mask[positions] = True
            sq = _sum_over_group(sq, mask.to(sq.device), group)
    if len(sharded) == len(grads):
        return sq.sqrt() if sq is not None else torch.zeros(0)
    # Some gradients are Partial: torch's own norm for those, then everything back in input order.
    device = grads[0].to_local().device  # type: ignore[attr-defined]
    norms = torch.empty(len(grads), dtype=torch.float32, device=device)
    if sq is not None:
        norms[torch.tensor(sharded, device=device)] = sq.sqrt().to(device)
    for i, shard_dims in enumerate(dims):
        if shard_dims is None:
            norms[i] = _full_norm(grads[i]).to(device)
    return norms


@torch.no_grad()
def reduce_shard_norms(local_norms: Tensor, group: Any, sharded: Tensor | None = None) -> Tensor:
    """Whole norms from the norms of disjoint local shards (FSDP1's flat-parameter shards): one ``all_reduce``.

    Returns ``sqrt(sum over the ranks of group of local_norms ** 2)`` (fp32) for the entries where
    ``sharded`` is true (every entry when ``None``); the other entries (replicated tensors) are returned as
    they are. Every rank of ``group`` must pass the same layout (the same number of entries, in the same
    order; a tensor with no local shard on a rank counts with norm 0), and gets the same result.
    """
    sq = local_norms.to(torch.float32).square()
    if sharded is None:
        dist.all_reduce(sq, group=group)
        return sq.sqrt()
    mask = sharded.to(device=sq.device, dtype=torch.bool)
    return torch.where(mask, _sum_over_group(sq, mask, group).sqrt(), local_norms.to(torch.float32))
