"""The sharded robust pipeline of ``ddp_arc``: robust aggregation at about an all-reduce's cost.

Every step of ``rule(NNM(bucket(clip_C(ARC(x)))))`` is either coordinate-wise or needs only sums over
the coordinates of small quantities, so the ranks can split the coordinates between them. The first
``n q_b`` coordinates of each of DDP's gradient buckets (``q_b = d_b // n``) are cut into ``n`` equal
chunks and rank ``r`` owns chunk ``r`` of every bucket, about ``d / n`` coordinates in all; the last
``d_b - n q_b < n`` coordinates of each bucket (its tail) are aggregated on every rank. One step
(:class:`ShardedExchange`):

1. as soon as a bucket is ready (in its hook call, during the backward pass), this rank's values are
   copied to a workspace kept across steps and an asynchronous ``all_to_all_single`` from there gives
   rank ``r`` every rank's chunk ``r`` of the bucket, a block ``[n, q_b]`` received into DDP's bucket
   buffer itself;
2. after the last bucket every rank all-gathers the ``n`` norms of the local vectors (``n`` floats) and
   the tails: ARC's and the static clip's factors
   (:func:`~lightning_clip.robust.aggregators.preaggregation_stats`), identical everywhere;
3. rank ``r`` scales the rows of its blocks in place and runs the rest of the pipeline on them
   (:func:`~lightning_clip.robust.aggregators.aggregate_shard` on column chunks, or its steps): NNM and
   (Multi-)Krum all-reduce the partial ``n x n`` squared distances (``n^2`` floats) and take the same
   selections on every rank; the geometric median all-reduces the rows' ``n x n`` Gram matrix once and
   iterates on ``n``-vectors (:func:`_weiszfeld_blocks`); centered clipping all-reduces ``n`` partial
   distances per iteration;
4. one asynchronous ``all_gather_single`` per bucket writes the aggregate back into DDP's bucket in
   place, started as soon as that bucket's aggregate is ready. A coordinate-wise rule without NNM
   streams: bucket ``b`` is reduced while the later buckets' all-to-alls may still be in flight.

Per rank that sends about ``2 (n - 1) d / n`` elements, as a ring all-reduce, plus ``O(n^2)`` floats.
Extra memory: the workspace (one gradient, kept between steps like DDP's own buckets, so that no step
allocates it afresh), the ``d / n`` aggregated coordinates and chunk-sized temporaries (the geometric
median and centered clipping: a few ``d / n`` vectors more).

Exactness: the local norm is taken of the whole flat vector in the workspace, as
:func:`~lightning_clip.robust.aggregators.aggregate` takes a row's norm, so ARC's factors have the same
bits. The coordinate-wise steps (ARC and static scaling, bucketing, ``mean``/``cwtm``/``median``/
``meamed``) compute each coordinate from its own column, so the result equals ``aggregate`` on the
gathered vectors bit for bit; the rules run on column chunks (:data:`CHUNK`) to bound their
temporaries. The distance-based steps add their partial sums in another order, a relative difference
of about ``1e-7`` in the distances (tie-free selections are the same); the geometric median iterates in
float64 and lands within ~2e-7 of the largest coordinate of the float64 pipeline (the float32
one-process iterations: within ~4e-7).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from lightning_clip.robust.aggregators import (
    COORDINATE_RULES,
    RuleOptions,
    _bucketing,
    _centered_clipping_blocks,
    _krum_selection,
    _mean_rows,
    _nnm_weights,
    _sum_rows,
    bucket_permutation,
    preaggregation_stats,
)
from lightning_clip.robust.arc import ARCStats, scale_rows
from lightning_clip.robust.checks import compute_dtype
from lightning_clip.robust.transforms import SendBuffers, split_vector

__all__ = [
    "CHUNK",
    "COORDINATE_WISE",
    "CenterState",
    "Collectives",
    "ShardedExchange",
    "partial_squared_distances",
    "sharded_reduce_",
]

#: Rules computed from each coordinate's own column (exact under any split of the coordinates).
COORDINATE_WISE = frozenset(COORDINATE_RULES)
#: Columns per chunk when a coordinate-wise pipeline runs on a block (bounds the temporaries).
CHUNK = 1 << 17

#: Waits for a collective started asynchronously (raises if it failed).
Wait = Callable[[], None]


class Collectives(Protocol):
    """The collectives the sharded pipeline issues (the hook's transport implements them)."""

    n: int
    rank: int

    def gather_rows(self, x: Tensor) -> Tensor:
        """Every rank's ``x`` stacked into ``[n, *x.shape]``."""
        ...

    def all_to_all_start(self, out: Tensor, inp: Tensor, out_splits: list[int], in_splits: list[int]) -> Wait:
        """Start sending chunk ``j`` of the 1-D ``inp`` (``in_splits[j]`` elements) to rank ``j``; chunk ``i``
        of ``out`` (``out_splits[i]`` elements) comes from rank ``i``."""
        ...

    def all_gather_start(self, out: Tensor, inp: Tensor) -> Wait:
        """Start gathering every rank's 1-D ``inp`` back to back into ``out`` (``n`` times its size)."""
        ...

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        """``t`` summed over the ranks (a small tensor)."""
        ...


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

    def ranges(self, sent: SendBuffers, ranges: Sequence[tuple[int, int]], dtype: torch.dtype) -> Tensor | None:
        """The centre's coordinates ``[lo, lo + length)`` of each range, in the flat layout of ``sent``, joined.

        ``None`` before the first step.
        """
        pieces = self._pieces(sent)
        if pieces is None:
            return None
        out = torch.zeros(sum(length for _, length in ranges), dtype=dtype, device=sent.buffers[0].device)
        offset = 0
        for lo, length in ranges:
            _copy_range_(out[offset : offset + length], pieces, lo)
            offset += length
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
                value = buffer[offset : offset + numel]
                kept = self.buffers.get(id(p))
                if kept is not None and kept.shape == value.shape and kept.dtype == value.dtype:
                    kept.copy_(value)  # no allocation per step
                else:
                    self.buffers[id(p)] = value.clone()
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


def _common_dtype(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """``a`` if the dtypes agree, else float32 (as :meth:`SendBuffers.flatten` joins mixed buckets)."""
    return a if a == b else torch.float32


@dataclasses.dataclass
class _Bucket:
    """One bucket in flight.

    Attributes:
        buffer: DDP's buffer (1-D): it receives this rank's block, then the aggregate.
        send: This rank's values of it, in the workspace (keeps that storage alive while the send is in flight).
        block: ``[n, q]``: chunk ``rank`` of every rank's bucket, ``None`` once consumed.
        wait: Waits for the all-to-all (``None`` when there is nothing to wait for).
        q: Chunk length ``d_b // n``; the last ``d_b - n q`` coordinates (the tail) travel by :meth:`finish`.
        offset: Where the bucket starts in the flat vector.
    """

    buffer: Tensor
    send: Tensor
    block: Tensor | None
    wait: Wait | None
    q: int
    offset: int



class ShardedExchange:
    """One step of the sharded pipeline, its all-to-alls started bucket by bucket.

    Call :meth:`send` with every bucket as soon as it is final (the DDP hook does so in each bucket's
    call, overlapping the exchange with the rest of the backward pass), then :meth:`finish` once. A
    collective: every rank sends buckets of the same sizes in the same order.

    Each bucket's first ``n q`` coordinates (``q = d_b // n``) are split into ``n`` equal chunks: the
    all-to-all lands in DDP's buffer itself (this rank's values were copied to the workspace first) and the
    aggregate's all-gather writes into it in place. The last ``d_b - n q < n`` coordinates of every bucket
    (the tails) are all-gathered once, in :meth:`finish`, and aggregated on every rank.

    Args:
        comm: The collectives.
        workspace: A flat tensor to reuse for this rank's copy of its vector (the previous step's
            :attr:`workspace`); a fresh one is made when it is too small or of another dtype.

    Attributes:
        workspace: This rank's flat vector as sent (its norm is taken of it as one row, as
            :func:`~lightning_clip.robust.aggregators.aggregate` takes a row's norm): keep it for the next step.
    """

    def __init__(self, comm: Collectives, workspace: Tensor | None = None) -> None:
        self.comm = comm
        self.workspace = workspace
        self.buckets: list[_Bucket] = []
        self.numel = 0

    def _reserve(self, end: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """The workspace, grown to ``end`` elements (and to ``dtype``), keeping the first :attr:`numel` values."""
        ws = self.workspace
        if self.buckets and ws is not None:
            dtype = _common_dtype(ws.dtype, dtype)
        if ws is None or ws.numel() < end or ws.dtype != dtype or ws.device != device:
            new = torch.empty(end, dtype=dtype, device=device)
            if self.numel and ws is not None:
                new[: self.numel].copy_(ws[: self.numel])
            ws = self.workspace = new
        return ws

    def send(self, buffer: Tensor) -> None:
        """Start the all-to-all of ``buffer`` (1-D, final until :meth:`finish` writes the aggregate into it)."""
        n = self.comm.n
        flat = buffer.view(-1)
        end = self.numel + flat.numel()
        ws = self._reserve(end, flat.dtype, flat.device)
        send = ws[self.numel : end]
        send.copy_(flat)
        q = flat.numel() // n
        wait: Wait | None = None
        # Received in place when it can be: the buffer's own values are in the workspace now.
        block = flat[: n * q].view(n, q) if flat.dtype == send.dtype else send.new_empty((n, q))
        if q:
            wait = self.comm.all_to_all_start(block.view(-1), send[: n * q], [q] * n, [q] * n)
        self.buckets.append(_Bucket(flat, send, block, wait, q, self.numel))
        self.numel = end

    def _received(self, bucket: _Bucket, dtype: torch.dtype) -> Tensor:
        if bucket.wait is not None:
            bucket.wait()
            bucket.wait = None
        block, bucket.block = bucket.block, None
        if block is None:
            raise RuntimeError("ShardedExchange: a bucket's block was used twice")
        return block.to(dtype)

    def _gather_start(self, bucket: _Bucket, out: Tensor) -> Wait | None:
        """Start the all-gather of this rank's chunk ``out`` of ``bucket`` straight into DDP's buffer."""
        if not bucket.q:
            return None
        n = self.comm.n
        return self.comm.all_gather_start(bucket.buffer[: n * bucket.q], out.to(bucket.buffer.dtype))

    def finish(self, sent: SendBuffers, options: RuleOptions, *, step: int = 0,
               center: CenterState | None = None) -> ARCStats:
        """Aggregate the sent buckets with ``options`` and write the aggregate into them.

        Args:
            sent: The buckets passed to :meth:`send`, in that order, with their parameters.
            options: The rule and its pre-aggregation.
            step: Step counter (the bucketing permutation).
            center: Centered clipping's state (``"cclip"`` only): the starting point, then the new aggregate.

        Returns:
            :func:`~lightning_clip.robust.aggregators.preaggregation_stats` of the ``n`` norms.
        """
        comm, n = self.comm, self.comm.n
        if len(sent.buffers) != len(self.buckets) or self.workspace is None:
            raise RuntimeError(f"ShardedExchange.finish: {len(sent.buffers)} buffers for {len(self.buckets)} sent")
        local = self.workspace[: self.numel]
        dtype, cdt = local.dtype, compute_dtype(local.dtype)
        norm = torch.linalg.vector_norm(local.unsqueeze(0), dim=1, dtype=cdt)
        tails = [local[b.offset + n * b.q : b.offset + b.buffer.numel()] for b in self.buckets]
        # One all-gather for the norms and the tails (the tails pass through the compute dtype exactly).
        rows = comm.gather_rows(torch.cat([norm, *(t.to(cdt) for t in tails)]))
        norms = rows[:, 0].contiguous()
        tail_block = rows[:, 1:].to(dtype) if rows.shape[1] > 1 else None
        stats = preaggregation_stats(norms, options.num_byzantine, arc=options.arc, static_clip=options.static_clip)
        scaling = None
        if options.arc or options.static_clip is not None:
            scaling = Scaling.of(stats.scales, norms if options.arc else None)
        permutation = bucket_permutation(n, options.bucket_seed, step) if options.bucket_size > 1 else None
        rest = dataclasses.replace(options, arc=False, static_clip=None, bucket_size=1)

        waits: list[Wait | None] = []
        if options.rule in COORDINATE_WISE and not options.nnm:  # stream bucket by bucket
            for bucket in self.buckets:
                block = self._received(bucket, dtype)
                out = _coordinate_wise(block, rest, scaling, options.bucket_size, permutation)
                del block
                waits.append(self._gather_start(bucket, out))
            if tail_block is not None:
                self._write_tails(_coordinate_wise(tail_block, rest, scaling, options.bucket_size,
                                                   permutation))
        else:
            blocks = [self._received(bucket, dtype) for bucket in self.buckets]
            if tail_block is not None:
                blocks.append(tail_block)
            for i, block in enumerate(blocks):
                blocks[i] = _prepared(block, scaling, options.bucket_size, permutation)

            def emit(i: int, out: Tensor) -> None:  # a block's aggregate is ready: start sending it back
                if i < len(self.buckets):
                    waits.append(self._gather_start(self.buckets[i], out))
                else:
                    self._write_tails(out)

            self._joint(blocks, tail_block is not None, rest, norms, step, sent, center, emit)
            del blocks
        for wait in waits:
            if wait is not None:
                wait()
        self.buckets = []
        if options.rule == "cclip" and center is not None:
            center.store(sent)
        return stats

    def _write_tails(self, out: Tensor) -> None:
        offset = 0
        for bucket in self.buckets:
            tail = bucket.buffer[self.comm.n * bucket.q :]
            tail.copy_(out[offset : offset + tail.numel()])
            offset += tail.numel()

    def _joint(self, blocks: list[Tensor], has_tail: bool, rest: RuleOptions, norms: Tensor, step: int,
               sent: SendBuffers, center: CenterState | None, emit: Callable[[int, Tensor], None]) -> None:
        """NNM and the rules whose steps need sums over every block; ``emit(i, out)`` each block's aggregate.

        Every rank holds the same tail block; its partial sums are counted on rank 0 only.
        """
        comm = self.comm
        dtype = blocks[0].dtype
        cdt = compute_dtype(dtype)
        f = rest.num_byzantine
        counted = [True] * len(blocks)
        if has_tail:
            counted[-1] = comm.rank == 0

        def distances() -> Tensor:
            d2 = torch.zeros((blocks[0].shape[0],) * 2, dtype=cdt, device=blocks[0].device)
            for block, count in zip(blocks, counted):
                if count:
                    d2 += partial_squared_distances(block)
            return comm.all_reduce_sum(d2)

        weights = _nnm_weights(distances(), f) if rest.nnm else None  # one all-reduce of n x n distances
        rest = dataclasses.replace(rest, nnm=False)
        if rest.rule in COORDINATE_WISE:  # mixed chunk by chunk on the way into the rule
            for i, block in enumerate(blocks):
                emit(i, _coordinate_wise(block, rest, mix=weights))
            return
        if weights is not None:  # mixing in place by column chunks
            for block in blocks:
                for a in range(0, block.shape[1], CHUNK):
                    block[:, a : a + CHUNK] = (weights @ block[:, a : a + CHUNK].to(cdt)).to(dtype)
        if rest.rule in ("krum", "multikrum"):
            rows = blocks[0].shape[0]
            chosen = _krum_selection(distances(), f, 1 if rest.rule == "krum" else rows - f)
            for i, block in enumerate(blocks):
                out = block.new_empty(block.shape[1])
                for a in range(0, block.shape[1], CHUNK):
                    out[a : a + CHUNK] = _mean_rows(block[chosen, a : a + CHUNK].to(cdt)).to(dtype)
                emit(i, out)
            return
        if rest.rule == "geomed":
            for i, out in enumerate(_weiszfeld_blocks(blocks, counted, comm.all_reduce_sum)):
                emit(i, out.to(dtype))
            return
        # Centered clipping, block by block from the centre's matching coordinates.
        n, rank = comm.n, comm.rank
        start = None
        if center is not None:
            ranges = [(b.offset + rank * b.q, b.q) for b in self.buckets]
            if has_tail:
                ranges += [(b.offset + n * b.q, b.buffer.numel() - n * b.q) for b in self.buckets]
            start = center.ranges(sent, ranges, dtype)
        centres = None if start is None else list(start.split([b.shape[1] for b in blocks]))
        outs = _centered_clipping_blocks(blocks, counted, centres, rest.cclip_tau, rest.cclip_iters,
                                         comm.all_reduce_sum, DIST_CHUNK)
        for i, out in enumerate(outs):
            emit(i, out.to(dtype))


@dataclasses.dataclass(frozen=True)
class Scaling:
    """ARC's and the static clip's factors: row ``i`` times ``scales[i]``, zeroed where ``norms[i]`` is not finite.

    On the CPU, where reading a value costs nothing, only the rows that change are touched (:meth:`of`):
    ``x * 1`` is ``x``, so the other rows keep their bits. On an accelerator every row is multiplied,
    with no host-device synchronisation.
    """

    scales: Tensor
    norms: Tensor | None
    changed: tuple[tuple[int, bool], ...] | None = None

    @classmethod
    def of(cls, scales: Tensor, norms: Tensor | None) -> Scaling:
        """The scaling, with the rows that change ``(row, zeroed)`` listed when on the CPU."""
        if scales.device.type != "cpu":
            return cls(scales, norms)
        finite = torch.ones_like(scales, dtype=torch.bool) if norms is None else torch.isfinite(norms)
        rows = torch.nonzero((scales != 1) | ~finite).flatten().tolist()
        return cls(scales, norms, tuple((i, not bool(finite[i])) for i in rows))

    def apply_(self, block: Tensor) -> None:
        """Scale the rows of ``block`` in place (the products of :func:`~lightning_clip.robust.arc.scale_rows`)."""
        if self.changed is None:
            _scale_rows_(block, self.scales, self.norms)
            return
        cdt = compute_dtype(block.dtype)
        for i, zeroed in self.changed:
            if zeroed:
                block[i].zero_()
            elif block.dtype == cdt:
                block[i].mul_(self.scales[i].to(cdt))
            else:
                block[i] = (block[i].to(cdt) * self.scales[i].to(cdt)).to(block.dtype)


#: Columns per chunk of :func:`partial_squared_distances` and of the geometric median's sweeps (small
#: enough that fp32 partial sums stay accurate and a chunk of every row stays in the cache).
DIST_CHUNK = 1 << 15
#: The geometric median's settings in the pipeline (:func:`~lightning_clip.robust.aggregators.aggregate_shard`).
GEOMED_EPS, GEOMED_MAX_ITER, GEOMED_TOL = 1e-8, 100, 1e-6


def partial_squared_distances(block: Tensor) -> Tensor:
    """``[n, n]`` squared Euclidean distances between the rows of ``block`` (compute dtype), from differences.

    The same quantity as the one-process pipeline's distances, by another route: ``pdist`` on column
    chunks of :data:`DIST_CHUNK` (one pass over the block, no ``[n, m]`` temporaries), each chunk's
    distances squared and added. About 10 times faster on the CPU; relative differences ~1e-7.
    """
    n, m = block.shape
    cdt = compute_dtype(block.dtype)
    upper = torch.zeros(n * (n - 1) // 2, dtype=cdt, device=block.device)
    for a in range(0, m, DIST_CHUNK):
        upper += torch.nn.functional.pdist(block[:, a : a + DIST_CHUNK].to(cdt)).square()
    out = torch.zeros((n, n), dtype=cdt, device=block.device)
    i, j = torch.triu_indices(n, n, 1, device=block.device)
    out[i, j] = upper
    out[j, i] = upper
    return out


def _weiszfeld_blocks(blocks: list[Tensor], counted: list[bool], reduce: Callable[[Tensor], Tensor]
                      ) -> list[Tensor]:
    """The pipeline's geometric median (smoothed Weiszfeld from the mean, :data:`GEOMED_EPS` / ``_MAX_ITER`` /
    ``_TOL``, as :func:`~lightning_clip.robust.aggregators.geometric_median`) over this rank's blocks.

    Every iterate is a weighted mean of the rows, ``z = X^T v``, so every quantity an iteration needs (the
    distances ``||x_i - z||^2 = (e_i - v)^T G (e_i - v)``, the move, the norm) is a quadratic form in the
    Gram matrix ``G = X X^T`` of the ``n`` rows. One pass over the blocks computes this rank's part of
    ``G`` (float64, by column chunks), one ``reduce`` of ``n^2`` floats sums it over the ranks, the
    iterations run on ``n``-vectors only, and a last pass forms ``z = sum_i w_i x_i / sum_i w_i`` with the
    one-process formula. Blocks not ``counted`` (the tail every rank holds) are left out of ``G``. Returns
    the estimate of each block in the compute dtype.
    """
    n = blocks[0].shape[0]
    device = blocks[0].device
    cdt = compute_dtype(blocks[0].dtype)
    gram = torch.zeros((n, n), dtype=torch.float64, device=device)
    for block, count in zip(blocks, counted):
        if count:
            for a in range(0, block.shape[1], DIST_CHUNK):
                x = block[:, a : a + DIST_CHUNK].to(torch.float64)
                gram += x @ x.T
    gram = reduce(gram)
    eye = torch.eye(n, dtype=torch.float64, device=device)

    def forms(u: Tensor) -> Tensor:  # u^T G u for every row u of u
        return ((u @ gram) * u).sum(dim=1).clamp(min=0.0)

    v = torch.full((n,), 1.0 / n, dtype=torch.float64, device=device)
    d2 = forms(eye - v).to(cdt)
    w = torch.ones(n, dtype=cdt, device=device)
    for _ in range(GEOMED_MAX_ITER):
        w = 1.0 / torch.clamp(d2.sqrt(), min=GEOMED_EPS)
        v_new = w.to(torch.float64) / w.to(torch.float64).sum()
        d2 = forms(eye - v_new).to(cdt)
        moved = forms(torch.stack([v_new - v, v_new]))
        v = v_new
        if bool(moved[0].sqrt() <= GEOMED_TOL * torch.clamp(moved[1].sqrt(), min=1.0)):
            break
    total = w.sum()
    out = []
    for block in blocks:
        z = torch.empty(block.shape[1], dtype=cdt, device=device)
        for a in range(0, block.shape[1], DIST_CHUNK):
            z[a : a + DIST_CHUNK] = _sum_rows(w.unsqueeze(1) * block[:, a : a + DIST_CHUNK].to(cdt)) / total
        out.append(z)
    return out


def _prepared(block: Tensor, scaling: Scaling | None, bucket_size: int, permutation: Tensor | None) -> Tensor:
    """``block`` scaled in place, then bucketed (a new ``[ceil(n / s), m]``) when ``permutation`` is given."""
    if scaling is not None:
        scaling.apply_(block)
    if permutation is not None:
        cdt = compute_dtype(block.dtype)
        return _bucketing(block.to(cdt), bucket_size, permutation).to(block.dtype)
    return block


def _coordinate_wise(block: Tensor, rest: RuleOptions, scaling: Scaling | None = None,
                     bucket_size: int = 1, permutation: Tensor | None = None, mix: Tensor | None = None) -> Tensor:
    """A coordinate-wise rule on column chunks, each scaled, bucketed and mixed (NNM's ``mix @ rows``) on the way
    in: one pass over the block, and the same bits as the whole block's steps one after the other (but ``mix``)."""
    out = block.new_empty(block.shape[1])
    cdt = compute_dtype(block.dtype)
    rule = COORDINATE_RULES[rest.rule]
    for a in range(0, block.shape[1], CHUNK):
        chunk = _prepared(block[:, a : a + CHUNK], scaling, bucket_size, permutation)
        if mix is not None:
            chunk = (mix @ chunk.to(cdt)).to(block.dtype)
        out[a : a + CHUNK] = rule(chunk.to(cdt), rest.num_byzantine).to(block.dtype)
    return out


def sharded_reduce_(
    sent: SendBuffers,
    options: RuleOptions,
    comm: Collectives,
    *,
    step: int = 0,
    center: CenterState | None = None,
    workspace: Tensor | None = None,
) -> ARCStats:
    """Aggregate every rank's ``sent`` with ``options`` by coordinate shards, writing the aggregate into ``sent``.

    :class:`ShardedExchange` with every bucket sent at once (the DDP hook sends them as backward makes them).
    A collective: every rank calls it with the same ``options`` and buckets of the same sizes.

    Args:
        sent: This rank's vector as DDP's bucket buffers; overwritten with the aggregate.
        options: The rule and its pre-aggregation.
        comm: The collectives.
        step: Step counter (the bucketing permutation).
        center: Centered clipping's state (``"cclip"`` only): the starting point, then the new aggregate.
        workspace: A flat tensor to reuse for this rank's copy of its vector (see :class:`ShardedExchange`).

    Returns:
        :func:`~lightning_clip.robust.aggregators.preaggregation_stats` of the ``n`` norms.
    """
    exchange = ShardedExchange(comm, workspace)
    for buffer in sent.buffers:
        exchange.send(buffer)
    return exchange.finish(sent, options, step=step, center=center)
