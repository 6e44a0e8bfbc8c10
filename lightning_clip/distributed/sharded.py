"""The sharded robust pipeline of ``ddp_arc``: robust aggregation at about an all-reduce's cost.

Every step of ``rule(NNM(bucket(clip_C(ARC(x)))))`` is either coordinate-wise or needs only sums over
the coordinates of small quantities, so rank ``r`` of ``n`` can own a block ``S_r`` of ``m = ceil(d / n)``
coordinates (the flat gradient is zero-padded to ``n m``):

1. every rank all-gathers the ``n`` norms of the local vectors (``n`` floats): ARC's and the static
   clip's factors (:func:`~lightning_clip.robust.aggregators.preaggregation_stats`), identical everywhere;
2. one ``all_to_all_single`` gives rank ``r`` every rank's block ``S_r``: ``[n, m]``;
3. rank ``r`` runs :func:`~lightning_clip.robust.aggregators.aggregate_shard` on its block, with an
   all-reduce as its ``reduce``: NNM and (Multi-)Krum all-reduce the block's partial ``n x n`` squared
   distances (``n^2`` floats) and take the same selections on every rank; Weiszfeld's geometric median
   and centered clipping all-reduce ``n`` (``n + 2``) partial squared distances per iteration;
4. one ``all_gather_into_tensor`` of the ``m`` aggregated coordinates rebuilds the aggregate everywhere.

Per rank that sends about ``2 (n - 1) d / n`` elements, as a ring all-reduce, plus ``O(n^2)`` floats,
and holds about ``d`` elements of extra memory (the padded send buffer, reused as the all-gather's
output, and the received ``[n, m]`` block), instead of the ``n d`` of an all-gather of every vector.

Exactness: the coordinate-wise steps (ARC and static scaling, bucketing, ``mean``/``cwtm``/``median``/
``meamed``) compute each coordinate from its own column, so the result equals
:func:`~lightning_clip.robust.aggregators.aggregate` on the gathered vectors bit for bit; the rules are
applied to column chunks (:data:`CHUNK`) to bound their temporaries. The distance-based steps add
their partial sums in another order, a relative difference of about ``1e-7`` in the distances (tie-free
selections are the same).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from lightning_clip.robust.aggregators import (
    RuleOptions,
    _nnm_weights,
    _squared_distances,
    aggregate_shard,
    preaggregation_stats,
)
from lightning_clip.robust.arc import ARCStats, scale_rows
from lightning_clip.robust.checks import compute_dtype
from lightning_clip.robust.transforms import SendBuffers, split_vector

__all__ = ["CHUNK", "COORDINATE_WISE", "CenterState", "Collectives", "shard_length", "sharded_reduce_"]

#: Rules computed from each coordinate's own column (exact under any split of the coordinates).
COORDINATE_WISE = frozenset({"mean", "cwtm", "median", "meamed"})
#: Columns per chunk when a coordinate-wise pipeline runs on a block (bounds the temporaries).
CHUNK = 1 << 18


class Collectives(Protocol):
    """The collectives the sharded pipeline issues (the hook's transport implements them)."""

    n: int
    rank: int

    def gather_rows(self, x: Tensor) -> Tensor:
        """Every rank's ``x`` stacked into ``[n, *x.shape]``."""
        ...

    def all_to_all_(self, out: Tensor, inp: Tensor) -> None:
        """Chunk ``j`` of the 1-D ``inp`` to rank ``j``; chunk ``i`` of ``out`` from rank ``i``."""
        ...

    def all_gather_into_(self, out: Tensor, inp: Tensor) -> None:
        """Every rank's 1-D ``inp`` back to back into ``out``."""
        ...

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        """``t`` summed over the ranks (a small tensor)."""
        ...


def shard_length(d: int, n: int) -> int:
    """``m = ceil(d / n)`` coordinates per rank (at least 1); the flat vector is padded to ``n m``."""
    return max(1, math.ceil(d / n))


def _copy_range_(out: Tensor, pieces: Sequence[Tensor], lo: int) -> None:
    """Copy into ``out`` the coordinates ``[lo, lo + len(out))`` of the 1-D ``pieces`` laid end to end."""
    hi = lo + out.numel()
    offset = 0
    for piece in pieces:
        numel = piece.numel()
        a, b = max(lo, offset), min(hi, offset + numel)
        if a < b:
            out[a - lo : b - lo].copy_(piece.reshape(-1)[a - offset : b - offset])
        offset += numel
        if offset >= hi:
            break


class CenterState:
    """Centered clipping's centre, the previous step's aggregate, kept per parameter on every rank.

    Kept per parameter (keyed by the parameter object) because DDP rebuilds its buckets after the first
    step, which changes the flat layout. Every rank holds the same values (the aggregate is the same
    everywhere); a checkpoint needs one rank's :meth:`vector`.
    """

    __slots__ = ("buffers",)

    def __init__(self) -> None:
        self.buffers: dict[int, Tensor] = {}

    def _pieces(self, sent: SendBuffers) -> list[Tensor] | None:
        pieces = []
        for buffer, params in zip(sent.buffers, sent.params):
            for p in params:
                c = self.buffers.get(id(p))
                if c is None or c.numel() != p.numel():
                    return None
                pieces.append(c.to(buffer.dtype))
        return pieces

    def block(self, sent: SendBuffers, lo: int, length: int) -> Tensor | None:
        """Coordinates ``[lo, lo + length)`` of the centre in the layout of ``sent`` (zero-padded), or ``None``."""
        pieces = self._pieces(sent)
        if pieces is None:
            return None
        out = torch.zeros(length, dtype=sent.buffers[0].dtype, device=sent.buffers[0].device)
        _copy_range_(out, pieces, lo)
        return out

    def flat(self, sent: SendBuffers) -> Tensor | None:
        """The whole centre in the layout of ``sent``, or ``None`` before the first step."""
        pieces = self._pieces(sent)
        return None if pieces is None else torch.cat([p.reshape(-1) for p in pieces])

    def store(self, sent: SendBuffers) -> None:
        """Keep what ``sent`` holds now (the aggregate just written back) as the next centre."""
        for buffer, params in zip(sent.buffers, sent.params):
            offset = 0
            for p in params:
                numel = p.numel()
                self.buffers[id(p)] = buffer[offset : offset + numel].clone()
                offset += numel

    def vector(self, params: Sequence[Tensor]) -> Tensor | None:
        """The centre flattened in the order of ``params`` (float32, float64 for float64), or ``None`` if unset."""
        params = list(params)
        if not params or any(id(p) not in self.buffers for p in params):
            return None
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
        return torch.cat([self.buffers[id(p)].reshape(-1).to(dtype) for p in params])

    def load_vector(self, vector: Tensor, params: Sequence[Tensor]) -> None:
        """Set the centre from ``vector``, laid out as :meth:`vector` makes it for the same ``params``.

        Raises:
            ValueError: If ``vector`` is not a 1-D tensor of the parameters' total size.
        """
        self.buffers = split_vector(vector, params)

    def __getstate__(self) -> dict[str, Any]:
        """Nothing: the buffers are keyed by live parameters (save them with :meth:`vector`)."""
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.buffers = {}


def _scale_rows_(block: Tensor, scales: Tensor, norms: Tensor | None) -> None:
    """:func:`~lightning_clip.robust.arc.scale_rows` in place (the same products, so the same bits)."""
    if block.dtype == compute_dtype(block.dtype):
        block.mul_(scales.to(block.dtype).unsqueeze(1))
        if norms is not None:
            block.masked_fill_(~torch.isfinite(norms).unsqueeze(1), 0.0)
        return
    for a in range(0, block.shape[1], CHUNK):
        block[:, a : a + CHUNK] = scale_rows(block[:, a : a + CHUNK], scales, norms)


def _send_dtype(buffers: Sequence[Tensor]) -> torch.dtype:
    dtypes = {b.dtype for b in buffers}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def sharded_reduce_(
    sent: SendBuffers,
    options: RuleOptions,
    comm: Collectives,
    *,
    step: int = 0,
    center: CenterState | None = None,
) -> ARCStats:
    """Aggregate every rank's ``sent`` with ``options`` by coordinate shards, writing the aggregate into ``sent``.

    A collective: every rank calls it with the same ``options`` and vectors of the same length. Extra
    memory: the padded send buffer (none when ``sent`` is one bucket of ``n m`` elements) and the received
    block ``[n, m]``, never both with the all-gather's output; the steps run on column chunks.

    Args:
        sent: This rank's vector as DDP's bucket buffers; overwritten with the aggregate.
        options: The rule and its pre-aggregation.
        comm: The collectives.
        step: Step counter (the bucketing permutation).
        center: Centered clipping's state (``"cclip"`` only): the starting point, then the new aggregate.

    Returns:
        :func:`~lightning_clip.robust.aggregators.preaggregation_stats` of the ``n`` norms.
    """
    n, rank = comm.n, comm.rank
    d = sum(b.numel() for b in sent.buffers)
    m = shard_length(d, n)
    dtype = _send_dtype(sent.buffers)
    device = sent.buffers[0].device
    in_place = len(sent.buffers) == 1 and d == n * m and sent.buffers[0].dtype == dtype
    if in_place:  # DDP's bucket is the send buffer and receives the aggregate: no flatten copy
        send = sent.buffers[0].view(-1)
    else:
        send = torch.zeros(n * m, dtype=dtype, device=device)
        _copy_range_(send[:d], sent.buffers, 0)
    local = torch.linalg.vector_norm(send[:d].unsqueeze(0), dim=1, dtype=compute_dtype(dtype))
    norms = comm.gather_rows(local).reshape(n)
    stats = preaggregation_stats(norms, options.num_byzantine, arc=options.arc, static_clip=options.static_clip)
    block = torch.empty(n, m, dtype=dtype, device=device)
    comm.all_to_all_(block.view(-1), send)
    del send
    if options.arc or options.static_clip is not None:  # ARC and the static clip, in place
        _scale_rows_(block, stats.scales, norms if options.arc else None)
    rest = dataclasses.replace(options, arc=False, static_clip=None)
    if options.nnm and options.bucket_size == 1:  # mixing in place by column chunks (same as aggregate_shard's)
        cdt = compute_dtype(dtype)
        weights = _nnm_weights(comm.all_reduce_sum(_squared_distances(block.to(cdt))), options.num_byzantine)
        for a in range(0, m, CHUNK):
            block[:, a : a + CHUNK] = (weights @ block[:, a : a + CHUNK].to(cdt)).to(dtype)
        rest = dataclasses.replace(rest, nnm=False)
    start = None
    if options.rule == "cclip" and center is not None:
        start = center.block(sent, rank * m, m)
    if options.rule in COORDINATE_WISE and not rest.nnm:  # column chunks: same bits, small temporaries
        out = torch.empty(m, dtype=dtype, device=device)
        for a in range(0, m, CHUNK):
            out[a : a + CHUNK] = aggregate_shard(block[:, a : a + CHUNK], norms, rest, step=step)[0]
    else:
        out = aggregate_shard(block, norms, rest, step=step, center=start, reduce=comm.all_reduce_sum)[0]
    del block, start
    if in_place:
        comm.all_gather_into_(sent.buffers[0].view(-1), out)
    else:
        full = torch.empty(n * m, dtype=dtype, device=device)
        comm.all_gather_into_(full, out)
        sent.write_(full[:d])
    if options.rule == "cclip" and center is not None:
        center.store(sent)
    return stats
