"""The ``ddp_arc`` communication hook: ARC across the ranks' local gradients before they are aggregated.

Usage with plain PyTorch (:class:`~lightning_clip.distributed.strategy.ARCDDPStrategy` does this for you)::

    state = ARCHookState(ARCConfig(num_byzantine=1))
    ddp_model.register_comm_hook(state, arc_hook)

The hook is transport only. DDP calls it once per gradient bucket and waits on the returned futures at
the end of backward; ARC needs the norm of each rank's *whole* gradient, so the hook returns pending
futures until the last bucket (``bucket.is_last()``), and then:

1. runs the chain of send transforms on this rank's buckets (worker momentum, a simulated attack:
   :mod:`lightning_clip.robust.transforms`);
2. with ``"mean"`` (no NNM): all-gathers the ``n`` local norms (``n`` floats), computes the
   pre-aggregation scales (:func:`~lightning_clip.robust.pipeline.preaggregation_stats`, identical
   on every rank), scales its buckets by ``scale[rank] / n`` and all-reduces them: plain DDP's traffic;
3. with a robust rule or NNM: the robust pipeline (:func:`lightning_clip.robust.pipeline.run`), by default
   on coordinate shards (:class:`~lightning_clip.distributed.exchange.ShardedExchange`: one all-to-all,
   all-reduces of at most ``n^2`` floats, one all-gather; about ``2 (n - 1) d / n`` elements sent per rank,
   as an all-reduce); with ``robust_comm="gather"`` on the all-gathered flat vectors ``[n, d]``, identically
   on every rank (about ``(n - 1) d`` elements received per rank; ``n`` times a gradient's memory);
4. writes the result back and completes every held future (or fails them all).

On the sharded path the exchange does not wait for the last bucket (:attr:`ARCHookState.overlaps`): the
all-to-all needs no norm, every step after it scales rows, so each bucket is transformed and its
all-to-all started in its own hook call, overlapping the backward pass as DDP's all-reduce does; the
norms, the rule and the all-gathers follow at the last bucket. Transforms that need the whole local
vector or the other ranks' (the simulated attacks) keep the held path: everything at the last bucket.

The scaling and the rule cannot start before the last bucket: ARC's scale of a rank depends on its whole
gradient and every other rank's norm. Replicas stay identical because
every rank runs the same deterministic arithmetic on the same gathered tensors (same hardware and
library versions). Sparse gradients are not supported. When a collective fails (typically a peer rank
died), the hook raises :class:`~lightning_clip.exceptions.PeerFailureError` naming the step.
"""

# No `from __future__ import annotations`: DDP checks the hook's annotations at registration
# (`bucket: dist.GradBucket`, return `torch.futures.Future[torch.Tensor]`) against the real objects.

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_clip.distributed.exchange import ShardedExchange, Transport, sharded_reduce_
from lightning_clip.robust import pipeline
from lightning_clip.robust.arc import ARCStats
from lightning_clip.robust.checks import compute_dtype
from lightning_clip.robust.options import ARCConfig
from lightning_clip.robust.privacy import DPState
from lightning_clip.robust.transforms import (
    CenterState,
    SendBuffers,
    SendContext,
    SendTransform,
    Stateful,
    WorkerMomentum,
)

__all__ = ["ARCHookState", "arc_hook", "check_transforms", "check_world_size", "reduce_robust"]


def check_transforms(transforms: Sequence[SendTransform]) -> None:
    """Raise ``TypeError`` unless ``transforms`` is a sequence of callables ``(sent, ctx) -> None``."""
    if isinstance(transforms, (str, bytes)) or not isinstance(transforms, Sequence):
        raise TypeError(f"Expected argument `transforms` to be a sequence of callables but got {transforms!r}")
    for t in transforms:
        if not callable(t):
            raise TypeError(f"Expected argument `transforms` to hold callables (sent, ctx) -> None but got {t!r}")


def check_world_size(config: ARCConfig, transforms: Sequence[SendTransform], world_size: int) -> None:
    """Raise unless ``config`` and every transform that can check it (``check_world_size(world_size,
    num_byzantine)``) accept ``world_size`` ranks."""
    config.check_world_size(world_size)
    for t in transforms:
        check = getattr(t, "check_world_size", None)
        if check is not None:
            check(world_size, config.num_byzantine)


class ARCHookState:
    """Configuration, transport state and statistics of :func:`arc_hook` (one per DDP model).

    Modelled on torch's ``PowerSGDState``: the validated configuration is one object, and the state is
    picklable without its process group.

    Args:
        config: The settings (default ``ARCConfig()``: ``num_byzantine=1``, the mean).
        process_group: The group the gradients are aggregated over; ``None`` for the default group.
        transforms: Send transforms after the configuration's own (worker momentum), e.g. a simulated attack.

    Attributes:
        transforms: The whole chain, :meth:`ARCConfig.send_chain` of ``transforms``.
        iter: Synchronised backward passes so far (advanced on the last bucket).
        held: ``(buffer, future, parameters)`` of the buckets held in the current backward pass.
        last_stats: :class:`~lightning_clip.robust.arc.ARCStats` of the last synchronised step (norms of
            every rank before clipping, threshold, combined scales, clipped mask), on the gradients' device.
        last_step: ``iter`` at that step (``-1`` before the first).
        last_num_buckets: How many buckets were held and reduced at that step.
        last_comm_bytes: Payload bytes of the collectives this rank issued at that step,
            ``{"all_reduce": ..., "all_gather": ...}`` (all-gather: the gathered outputs), plus
            ``"all_to_all"`` (its input) on the sharded robust path.
        center: The centre of a rule that starts from one (centered clipping: the previous aggregate, per
            parameter), ``None`` for other rules.
        dp: The differential-privacy state (:class:`~lightning_clip.robust.privacy.DPState`: the adaptive
            clip bound, the noise's layout), ``None`` without ``dp_*`` settings.
        exchange: The sharded step in progress (all-to-alls started bucket by bucket), ``None`` between steps.
        workspace: On the sharded path, this rank's flat copy of what it sent last step (one gradient of
            memory, kept like DDP's own buckets so that no step allocates it afresh), ``None`` before.
    """

    __slots__ = [
        "process_group",
        "config",
        "transforms",
        "iter",
        "held",
        "last_stats",
        "last_step",
        "last_num_buckets",
        "last_comm_bytes",
        "dp",
        "center",
        "exchange",
        "workspace",
    ]

    def __init__(
        self,
        config: ARCConfig | None = None,
        process_group: dist.ProcessGroup | None = None,
        transforms: Sequence[SendTransform] = (),
    ) -> None:
        if config is None:
            config = ARCConfig()
        if not isinstance(config, ARCConfig):
            raise TypeError(f"Expected argument `config` to be an ARCConfig but got {type(config).__name__}")
        check_transforms(transforms)
        self.process_group = process_group
        self.config = config
        self.transforms = config.send_chain(transforms)
        self.center: CenterState | None = CenterState() if config.rule.uses_center else None
        self.dp: DPState | None = DPState(config) if config.uses_dp else None
        if dist.is_available() and dist.is_initialized():  # fail here, not in the first backward
            check_world_size(config, self.transforms, dist.get_world_size(self.group()))
        self.iter = 0
        self.held: list[tuple[Tensor, torch.futures.Future, list[Tensor]]] = []
        self.last_stats: ARCStats | None = None
        self.last_step = -1
        self.last_num_buckets = 0
        self.last_comm_bytes: dict[str, int] = {"all_reduce": 0, "all_gather": 0}
        self.exchange: _Overlap | None = None
        self.workspace: Tensor | None = None

    @property
    def overlaps(self) -> bool:
        """Whether the all-to-all starts bucket by bucket during backward (the sharded robust path).

        It does unless the reduction is the mean (an all-reduce), ``robust_comm="gather"``, or a send
        transform needs the whole local vector (a simulated attack): those hold every bucket until the last.
        """
        c = self.config
        return (not c.uses_all_reduce and c.robust_comm == "sharded"
                and all(getattr(t, "bucketwise", False) for t in self.transforms))

    @property
    def worker_momentum(self) -> WorkerMomentum | None:
        """The worker-momentum transform of the chain (its buffers are this rank's state), or ``None``."""
        return next((t for t in self.transforms if isinstance(t, WorkerMomentum)), None)

    @property
    def stateful(self) -> dict[str, Stateful]:
        """Everything whose state changes the outcome, by checkpoint name: the stateful send transforms
        (``worker_momentum``, per rank), ``center`` and ``dp``."""
        out: dict[str, Stateful] = {}
        for i, t in enumerate(self.transforms):
            if hasattr(t, "state_dict") and hasattr(t, "load_state_dict"):
                out["worker_momentum" if isinstance(t, WorkerMomentum) else f"transforms.{i}"] = t  # type: ignore
        if self.center is not None:
            out["center"] = self.center
        if self.dp is not None:
            out["dp"] = self.dp
        return out

    def state_dict(self, params: Sequence[Tensor]) -> dict[str, dict[str, Any]]:
        """``{"shared": {name: state}, "per_rank": {name: state}}`` of :attr:`stateful` for the parameter
        order ``params``: ``shared`` is the same on every rank, ``per_rank`` this rank's own."""
        out: dict[str, dict[str, Any]] = {"shared": {}, "per_rank": {}}
        for name, part in self.stateful.items():
            out["per_rank" if part.per_rank else "shared"][name] = part.state_dict(params)
        return out

    def load_state_dict(self, state: Mapping[str, Mapping[str, Any]], params: Sequence[Tensor]) -> None:
        """Restore each part of :attr:`stateful` found in ``state`` (``{name: state}``) for the order ``params``."""
        for name, part in self.stateful.items():
            if name in state:
                part.load_state_dict(state[name], params)

    def group(self) -> dist.ProcessGroup:
        """The process group in use (the default group when ``process_group`` is ``None``)."""
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        if group is None:
            raise RuntimeError("ARCHookState.group(): torch.distributed is not initialised")
        return group

    def __getstate__(self) -> dict[str, Any]:
        """Everything but the process group and the held buckets (per-parameter buffers reset: keyed by live
        parameters, they travel by :meth:`state_dict`)."""
        return {slot: getattr(self, slot) for slot in self.__slots__
                if slot not in ("process_group", "held", "exchange", "workspace")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore ``state``; ``process_group`` becomes ``None`` (the default group)."""
        self.process_group = None
        self.held = []
        self.exchange = None
        self.workspace = None
        for slot, value in state.items():
            setattr(self, slot, value)


def _local_norm(buffers: list[Tensor]) -> Tensor:
    """L2 norm of the buffers viewed as one vector, accumulated in float32 (float64 if all are float64)."""
    dtype = compute_dtype(*(b.dtype for b in buffers))
    if len(buffers) == 1:
        return torch.linalg.vector_norm(buffers[0], dtype=dtype)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(b, dtype=dtype) for b in buffers]))


def _scale_(buffers: list[Tensor], coeff: Tensor, finite: Tensor, zero_non_finite: bool) -> None:
    """``buffers *= coeff``; with ``zero_non_finite``, zero them when the local vector is not finite.

    ARC gives a non-finite vector ``coeff = 0``, but ``NaN * 0`` is NaN: the zeroing makes it exact.
    """
    torch._foreach_mul_(buffers, coeff)
    if not zero_non_finite:
        return
    if buffers[0].device.type == "cpu":
        if not bool(finite):  # reading a CPU tensor costs nothing
            for b in buffers:
                b.zero_()
    else:  # no host-device sync: NaN/Inf can only remain where coeff is 0
        for b in buffers:
            b.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


def _reduce_mean(config: ARCConfig, sent: SendBuffers, comm: Transport, dp: DPState | None = None) -> ARCStats:
    """Scale this rank's buffers by its pre-aggregation factor ``/ n``, then all-reduce them as DDP does.

    With ``dp``: the clip bound may be adaptive, and rank 0 adds the step's noise ``/ n`` to its buffers
    before the all-reduce, so the sum carries it once at no extra traffic; then the bound is updated.
    """
    norms = comm.gather_rows(_local_norm(sent.buffers).reshape(1)).reshape(comm.n)
    adaptive = dp is not None and dp.bound is not None
    stats = pipeline.preaggregation_stats(norms, config.num_byzantine, arc=config.arc,
                                          static_clip=None if adaptive else config.static_clip)
    if dp is not None:
        stats = dp.stats(stats, norms.device)
    coeff = stats.scales[comm.rank] * (1.0 / comm.n)  # a Python 1/n: plain DDP's `grad * (1/n)` when the scale is 1
    _scale_(sent.buffers, coeff, torch.isfinite(norms[comm.rank]), zero_non_finite=config.arc)
    if dp is not None and comm.rank == 0:
        dp.add_noise_(sent, comm.step, comm.n)
    comm.all_reduce_(sent.buffers)
    if dp is not None:
        dp.update_bound(stats.norms, comm.step)
    return stats


def reduce_robust(state: ARCHookState, sent: SendBuffers, comm: Transport,
                  exchange: ShardedExchange | None = None) -> ARCStats:
    """A robust rule or NNM on every rank's ``sent``, the aggregate written into ``sent`` (a collective).

    By coordinate shards (:mod:`~lightning_clip.distributed.exchange`): ``exchange`` when its buckets were
    already sent during backward, else all at once; with ``robust_comm="gather"`` on the all-gathered flat
    vectors ``[n, d]``, identically on every rank. The centre of a rule that starts from one becomes the new
    aggregate.
    """
    config, center = state.config, state.center
    if exchange is not None:
        stats = exchange.finish(sent, config, step=comm.step, center=center)
        state.workspace = exchange.workspace  # reused next step, as DDP reuses its buckets
    elif config.robust_comm == "sharded":
        stats = sharded_reduce_(sent, config, comm, step=comm.step, center=center)
    else:
        x = comm.gather_rows(sent.flatten())
        agg, stats = pipeline.aggregate_with(x, config, center=None if center is None else center.flat(sent),
                                             step=comm.step)
        del x
        sent.write_(agg)
    if center is not None:
        center.store(sent)
    return stats


def _context(config: ARCConfig, comm: Transport) -> SendContext:
    return SendContext(rank=comm.rank, world_size=comm.n, step=comm.step, gather=comm.gather_rows,
                       aggregation=pipeline.server_aggregation(config))


class _Overlap:
    """A step of the sharded path begun at the first bucket: each bucket transformed and its all-to-all started."""

    def __init__(self, state: ARCHookState) -> None:
        self.comm = Transport(state.group(), state.iter)
        self.ctx = _context(state.config, self.comm)
        self.transforms = state.transforms
        self.exchange = ShardedExchange(self.comm, state.workspace)

    def send(self, buffer: Tensor, params: list[Tensor]) -> None:
        one = SendBuffers([buffer], [params])
        for transform in self.transforms:  # bucket-wise by construction (ARCHookState.overlaps)
            transform(one, self.ctx)
        self.exchange.send(buffer)


def _reduce(state: ARCHookState, sent: SendBuffers, overlap: _Overlap | None = None) -> None:
    config = state.config
    if overlap is None:
        comm = Transport(state.group(), state.iter)
        ctx = _context(config, comm)
        for transform in state.transforms:
            transform(sent, ctx)
    else:  # transformed and sent bucket by bucket already
        comm = overlap.comm
    if config.uses_all_reduce:
        state.last_stats = _reduce_mean(config, sent, comm, state.dp)
    else:
        state.last_stats = reduce_robust(state, sent, comm, None if overlap is None else overlap.exchange)
        if state.dp is not None:  # every rank adds the same noise of the step to the same aggregate
            state.dp.add_noise_(sent, comm.step, comm.n)
    state.last_step = state.iter
    state.last_num_buckets = len(sent.buffers)
    state.last_comm_bytes = comm.bytes


def _future(value: Tensor | None, device: torch.device) -> torch.futures.Future:
    fut: torch.futures.Future = torch.futures.Future(devices=[device] if device.type == "cuda" else None)
    if value is not None:
        fut.set_result(value)
    return fut


def arc_hook(state: ARCHookState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """DDP communication hook: ARC across the ranks' local gradients, then the mean or a robust rule.

    Register it with ``ddp_model.register_comm_hook(ARCHookState(...), arc_hook)``. Earlier buckets get
    a pending future; the last bucket's call does the work and completes them all.

    Args:
        state: The hook's :class:`ARCHookState`.
        bucket: The gradient bucket DDP hands over.

    Returns:
        A future holding the reduced bucket buffer (completed for the last bucket).
    """
    buffer = bucket.buffer()
    if bucket.index() == 0:  # a new backward pass: forget the buckets of an aborted one
        state.held = []
        state.exchange = _Overlap(state) if state.overlaps else None
    overlap = state.exchange
    if overlap is not None:
        try:
            overlap.send(buffer, bucket.parameters())
        except BaseException as exc:
            held, state.held, state.exchange = state.held, [], None
            for _, fut, _ in held:
                fut.set_exception(exc)
            raise
    if not bucket.is_last():
        fut = _future(None, buffer.device)
        state.held.append((buffer, fut, bucket.parameters()))
        return fut
    held, state.held, state.exchange = state.held, [], None
    sent = SendBuffers([b for b, _, _ in held] + [buffer], [ps for _, _, ps in held] + [bucket.parameters()])
    try:
        _reduce(state, sent, overlap)
    except BaseException as exc:
        for _, fut, _ in held:
            fut.set_exception(exc)
        raise
    state.iter += 1
    for b, fut, _ in held:
        fut.set_result(b)
    return _future(buffer, buffer.device)
