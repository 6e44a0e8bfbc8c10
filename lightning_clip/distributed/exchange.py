"""The transport of ``ddp_arc``: the collectives of one step, and the sharded exchange of the robust pipeline.

:class:`Transport` issues this step's collectives over one process group, counts their payload bytes and
turns a failure into :class:`~lightning_clip.exceptions.PeerFailureError` naming the step.

:class:`ShardedExchange` moves the vectors so that each rank runs the robust pipeline
(:func:`lightning_clip.robust.pipeline.run`) on about ``d / n`` coordinates of every rank's vector. The
first ``n q_b`` coordinates of each of DDP's gradient buckets (``q_b = d_b // n``) are cut into ``n`` equal
chunks and rank ``r`` owns chunk ``r`` of every bucket; the last ``d_b - n q_b < n`` coordinates of each
bucket (its tail) are aggregated on every rank. One step:

1. as soon as a bucket is ready (in its hook call, during the backward pass), this rank's values are
   copied to a workspace kept across steps and an asynchronous ``all_to_all_single`` from there gives
   rank ``r`` every rank's chunk ``r`` of the bucket, a block ``[n, q_b]`` received into DDP's bucket
   buffer itself;
2. after the last bucket one all-gather brings every rank's norm (of its whole flat vector, as
   :func:`~lightning_clip.robust.pipeline.aggregate` takes a row's norm) and the tails;
3. the pipeline runs on the blocks (the tail block counted on rank 0 only) with an all-reduce as its
   ``reduce``;
4. one asynchronous ``all_gather_single`` per bucket writes the aggregate back into DDP's bucket in
   place, started as soon as the pipeline emits that bucket's aggregate.

Per rank that sends about ``2 (n - 1) d / n`` elements, as a ring all-reduce, plus the pipeline's
``O(n^2)``-float all-reduces. Extra memory: the workspace (one gradient, kept between steps like DDP's own
buckets), the ``d / n`` aggregated coordinates and the pipeline's chunk-sized temporaries.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_clip.exceptions import PeerFailureError
from lightning_clip.robust import pipeline
from lightning_clip.robust.arc import ARCStats
from lightning_clip.robust.checks import compute_dtype
from lightning_clip.robust.options import ARCConfig
from lightning_clip.robust.transforms import CenterState, SendBuffers

__all__ = ["ShardedExchange", "Transport", "sharded_reduce_"]

#: Waits for a collective started asynchronously (raises if it failed).
Wait = Callable[[], None]


class Transport:
    """This step's collectives over one group, their payload bytes counted and their failures explained.

    Args:
        group: The process group.
        step: The step counter (named in failures).

    Attributes:
        bytes: Payload bytes per kind of collective (``"all_reduce"``, ``"all_gather"``, ``"all_to_all"``).
    """

    def __init__(self, group: dist.ProcessGroup, step: int) -> None:
        self.group = group
        self.step = step
        self.n = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.bytes = {"all_reduce": 0, "all_gather": 0}

    def _run(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except RuntimeError as exc:  # DistBackendError included
            cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            waited = re.search(r"[Tt]imed out (?:waiting |after )?(\d+)\s*ms", cause)
            if waited is not None or "timeout" in cause.lower() or "timed out" in cause.lower():
                after = f" after {int(waited.group(1)) / 1000:g} s" if waited else ""
                raise PeerFailureError(
                    f"ddp_arc: the {what} of step {self.step} timed out{after} on rank {self.rank} of {self.n}: a "
                    "peer rank did not take part in time, so it is hung (blocked, or far slower than the others) "
                    "rather than dead; the limit is the process group's timeout (DDPStrategy(timeout=...)). "
                    f"Cause: {cause}"
                ) from exc
            raise PeerFailureError(
                f"ddp_arc: the {what} of step {self.step} failed on rank {self.rank} of {self.n}: a peer rank "
                f"has probably died (look for its own traceback above) or the connection broke. Cause: {cause}"
            ) from exc

    def _count(self, kind: str, t: Tensor) -> None:
        self.bytes[kind] = self.bytes.get(kind, 0) + t.numel() * t.element_size()

    def gather_rows(self, x: Tensor) -> Tensor:
        """Every rank's ``x`` (same shape everywhere) stacked into ``[n, *x.shape]``."""
        out = x.new_empty((self.n, *x.shape))
        self._run("all-gather", lambda: dist.all_gather(list(out.unbind(0)), x.contiguous(), group=self.group))
        self._count("all_gather", out)
        return out

    def _started(self, what: str, work: Any) -> Wait:
        return lambda: self._run(what, work.wait)

    def all_to_all_start(self, out: Tensor, inp: Tensor, out_splits: list[int], in_splits: list[int]) -> Wait:
        """Start sending chunk ``j`` of the 1-D ``inp`` to rank ``j``, chunk ``i`` of ``out`` from rank ``i``."""
        work = self._run("all-to-all", lambda: dist.all_to_all_single(out, inp, out_splits, in_splits,
                                                                       group=self.group, async_op=True))
        self._count("all_to_all", inp)
        return self._started("all-to-all", work)

    def all_gather_start(self, out: Tensor, inp: Tensor) -> Wait:
        """Start gathering every rank's 1-D ``inp`` back to back into ``out``; returns the wait."""
        work = self._run("all-gather", lambda: dist.all_gather_single(out, inp, group=self.group, async_op=True))
        self._count("all_gather", out)
        return self._started("all-gather", work)

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        """A copy of the small tensor ``t`` summed over the ranks."""
        out = t.clone()
        self._run("all-reduce", lambda: dist.all_reduce(out, group=self.group))
        self._count("all_reduce", out)
        return out

    def all_reduce_(self, buffers: list[Tensor]) -> None:
        """Sum ``buffers`` over the ranks in place (asynchronously, then wait for all)."""

        def run() -> None:
            works = [dist.all_reduce(b, group=self.group, async_op=True) for b in buffers]
            for w in works:
                w.wait()

        self._run("all-reduce", run)
        for b in buffers:
            self._count("all_reduce", b)


@dataclasses.dataclass
class _Bucket:
    """One bucket in flight.

    Attributes:
        buffer: DDP's buffer (1-D): it receives this rank's block, then the aggregate.
        send: This rank's values of it, in the workspace (keeps that storage alive while the send is in flight).
        block: ``[n, q]``: chunk ``rank`` of every rank's bucket, ``None`` once consumed.
        wait: Waits for the all-to-all (``None`` when there is nothing to wait for).
        q: Chunk length ``d_b // n``; the last ``d_b - n q`` coordinates (the tail) travel in :meth:`finish`.
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

    Args:
        comm: The collectives.
        workspace: A flat tensor to reuse for this rank's copy of its vector (the previous step's
            :attr:`workspace`); a fresh one is made when it is too small or of another dtype.

    Attributes:
        workspace: This rank's flat vector as sent: keep it for the next step.
    """

    def __init__(self, comm: Transport, workspace: Tensor | None = None) -> None:
        self.comm = comm
        self.workspace = workspace
        self.buckets: list[_Bucket] = []
        self.numel = 0

    def _reserve(self, end: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """The workspace, grown to ``end`` elements (and to ``dtype``), keeping the first :attr:`numel` values."""
        ws = self.workspace
        if self.buckets and ws is not None and ws.dtype != dtype:
            dtype = torch.float32  # mixed bucket dtypes join in float32, as SendBuffers.flatten does
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

    def _received(self, dtype: torch.dtype) -> Iterator[Tensor]:
        """Each bucket's block ``[n, q]`` once its all-to-all has landed, in order."""
        for bucket in self.buckets:
            if bucket.wait is not None:
                bucket.wait()
                bucket.wait = None
            block, bucket.block = bucket.block, None
            if block is None:
                raise RuntimeError("ShardedExchange: a bucket's block was used twice")
            yield block.to(dtype)

    def finish(self, sent: SendBuffers, options: ARCConfig, *, step: int = 0,
               center: CenterState | None = None) -> ARCStats:
        """Aggregate the sent buckets with ``options`` and write the aggregate into them.

        Args:
            sent: The buckets passed to :meth:`send`, in that order, with their parameters.
            options: The pipeline's settings.
            step: Step counter (the bucketing permutation).
            center: The centre of a rule that starts from one (centered clipping), or ``None``.

        Returns:
            :func:`~lightning_clip.robust.pipeline.preaggregation_stats` of the ``n`` norms.
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
        has_tail = rows.shape[1] > 1
        counted = [True] * len(self.buckets) + ([comm.rank == 0] if has_tail else [])

        def parts() -> Iterator[Tensor]:
            yield from self._received(dtype)
            if has_tail:
                yield rows[:, 1:].to(dtype)

        starts = None
        if center is not None and options.rule.uses_center:
            ranges = [(b.offset + comm.rank * b.q, b.q) for b in self.buckets]
            if has_tail:  # then the tails, bucket by bucket
                ranges += [(b.offset + n * b.q, b.buffer.numel() - n * b.q) for b in self.buckets]
            start = center.ranges(sent, ranges, dtype)
            sizes = [b.q for b in self.buckets] + ([rows.shape[1] - 1] if has_tail else [])
            starts = None if start is None else list(start.split(sizes))

        waits: list[Wait] = []

        def emit(i: int, out: Tensor) -> None:  # a block's aggregate is ready: send it back at once
            if i < len(self.buckets):
                bucket = self.buckets[i]
                if bucket.q:
                    waits.append(comm.all_gather_start(bucket.buffer[: n * bucket.q], out.to(bucket.buffer.dtype)))
                return
            offset = 0
            for bucket in self.buckets:  # the tails, which every rank aggregated
                tail = bucket.buffer[n * bucket.q :]
                tail.copy_(out[offset : offset + tail.numel()])
                offset += tail.numel()

        stats = pipeline.run(parts(), counted, norms, options, emit, reduce=comm.all_reduce_sum, step=step,
                             center=starts)
        for wait in waits:
            wait()
        self.buckets = []
        return stats


def sharded_reduce_(sent: SendBuffers, options: ARCConfig, comm: Transport, *, step: int = 0,
                    center: CenterState | None = None, workspace: Tensor | None = None) -> ARCStats:
    """Aggregate every rank's ``sent`` with ``options`` by coordinate shards, writing the aggregate into ``sent``.

    :class:`ShardedExchange` with every bucket sent at once (the DDP hook sends them as backward makes them).
    A collective: every rank calls it with the same ``options`` and buckets of the same sizes.
    """
    exchange = ShardedExchange(comm, workspace)
    for buffer in sent.buffers:
        exchange.send(buffer)
    return exchange.finish(sent, options, step=step, center=center)
