"""Send transforms: what a rank does to its local gradient before it is aggregated (pure torch).

The ``ddp_arc`` hook (:mod:`lightning_clip.distributed.hook`) hands every transform of its chain, in
order, the vector this rank is about to send (:class:`SendBuffers`, DDP's bucket buffers, changed in
place) and a :class:`SendContext`. The hook itself is transport only; behaviour is added by wrapping
what is sent, as torch's ``fp16_compress_wrapper`` wraps a communication hook:

* :class:`WorkerMomentum` (production): send the rank's momentum instead of its gradient;
* simulated attacks (:mod:`lightning_clip.sim.byzantine`, injected by the strategy for experiments).

A transform never calls ``torch.distributed`` itself: when it needs the other ranks' vectors it calls
``ctx.gather``, which the hook implements with one all-gather and a single-process simulation
(:func:`lightning_clip.sim.byzantine.simulate_sends`) with the rows it already holds, so the same
code gives the same bits in both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from lightning_clip.exceptions import check_fraction
from lightning_clip.robust.checks import compute_dtype

__all__ = ["SendBuffers", "SendContext", "SendTransform", "WorkerMomentum", "split_vector"]


@dataclass
class SendBuffers:
    """What this rank sends this step, laid out as DDP's gradient buckets.

    Attributes:
        buffers: One flat buffer per bucket; transforms change them in place.
        params: The parameters of each bucket, in the buffer's order (``bucket.parameters()``).
    """

    buffers: list[Tensor]
    params: list[list[Tensor]]

    def flatten(self) -> Tensor:
        """A new 1-D tensor: every buffer back to back (their common dtype, float32 when they differ)."""
        dtypes = {b.dtype for b in self.buffers}
        dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        if len(self.buffers) == 1:
            return self.buffers[0].to(dtype).clone()
        return torch.cat([b.reshape(-1).to(dtype) for b in self.buffers])

    def write_(self, flat: Tensor) -> None:
        """Copy the 1-D ``flat`` (laid out as :meth:`flatten` makes it) back into the buffers."""
        offset = 0
        for b in self.buffers:
            numel = b.numel()
            b.copy_(flat[offset : offset + numel].view_as(b))
            offset += numel


@dataclass(frozen=True)
class SendContext:
    """Where a transform runs.

    Attributes:
        rank: This rank in the group.
        world_size: Number of ranks ``n``.
        step: The hook's step counter (synchronised backward passes so far).
        gather: ``gather(flat) -> [n, d]``, every rank's flat vector. A collective: when one rank's
            transform calls it, every rank's must, in the same order.
        aggregation: The server's whole pipeline ``[n, d] -> [d]`` (pre-aggregation and rule), for
            attacks that search against it.
    """

    rank: int
    world_size: int
    step: int
    gather: Callable[[Tensor], Tensor]
    aggregation: Callable[[Tensor], Tensor]


class SendTransform(Protocol):
    """Changes, in place, what a rank sends: ``transform(sent, ctx) -> None``.

    A transform whose class sets ``bucketwise = True`` changes each coordinate from this rank's own values
    only and never calls ``ctx.gather``: the hook may then apply it to one bucket at a time, as backward
    makes the buckets, and start sending at once. Without it the hook holds every bucket until the last.
    """

    def __call__(self, sent: SendBuffers, ctx: SendContext) -> None: ...


def split_vector(vector: Tensor, params: Sequence[Tensor],
                 dtype_of: Callable[[torch.dtype], torch.dtype] = lambda dtype: dtype) -> dict[int, Tensor]:
    """Cut a flat per-rank state vector into one tensor per parameter (keyed by ``id``), on each parameter's
    device, in ``dtype_of(p.dtype)``: the inverse of flattening it in the order of ``params``.

    Raises:
        ValueError: If ``vector`` is not a 1-D tensor of the parameters' total size.
    """
    params = list(params)
    total = sum(p.numel() for p in params)
    if not isinstance(vector, Tensor) or vector.ndim != 1 or vector.numel() != total:
        shape = tuple(vector.shape) if isinstance(vector, Tensor) else type(vector).__name__
        raise ValueError(
            f"Expected argument `vector` to be a 1-D tensor of {total} elements (the parameters' total size) "
            f"but got shape {shape}"
        )
    pieces: dict[int, Tensor] = {}
    offset = 0
    for p in params:
        numel = p.numel()
        pieces[id(p)] = vector[offset : offset + numel].to(device=p.device, dtype=dtype_of(p.dtype)).clone()
        offset += numel
    return pieces


class WorkerMomentum:
    r"""Send the momentum of the local gradient instead of the gradient (worker momentum of Robust D-SHB).

    ``m_t = beta * m_{t-1} + (1 - beta) * g_t`` with ``m_0 = 0`` (so ``m_1 = (1 - beta) g_1``, no bias
    correction: the convention of the ARC paper's library ByzFL). One buffer per parameter, keyed by
    the parameter (DDP reorders its buckets after the first step; the keys survive that), in float32
    (float64 for float64 parameters) on the gradients' device: one extra copy of the gradients.

    Pair it with a momentum-free optimizer (``SGD(momentum=0)``), as the paper does; a momentum
    optimizer on top averages a second time.

    Args:
        beta: The momentum factor, in ``[0, 1)``.
    """

    __slots__ = ("beta", "buffers")
    #: Per coordinate and per rank: applied bucket by bucket (see :class:`SendTransform`).
    bucketwise = True

    def __init__(self, beta: float) -> None:
        self.beta = check_fraction("worker_momentum", beta, low=0.0, high=1.0, open_high=True)
        self.buffers: dict[int, Tensor] = {}

    def __call__(self, sent: SendBuffers, ctx: SendContext) -> None:
        ms: list[Tensor] = []
        gs: list[Tensor] = []
        for buffer, bucket_params in zip(sent.buffers, sent.params):
            offset = 0
            for p in bucket_params:
                numel = p.numel()
                g = buffer.narrow(0, offset, numel)
                offset += numel
                m = self.buffers.get(id(p))
                if m is None or m.numel() != numel:
                    m = torch.zeros(numel, dtype=compute_dtype(g.dtype), device=g.device)
                    self.buffers[id(p)] = m
                ms.append(m)
                gs.append(g)
            if offset != buffer.numel():
                raise RuntimeError(
                    f"A gradient bucket of {buffer.numel()} elements holds parameters of {offset} elements; "
                    "worker momentum needs dense, unpadded buckets"
                )
        torch._foreach_mul_(ms, self.beta)
        torch._foreach_add_(ms, gs, alpha=1.0 - self.beta)
        for g, m in zip(gs, ms):
            g.copy_(m)

    def vector(self, params: Sequence[Tensor]) -> Tensor:
        """This rank's momentum flattened in the order of ``params`` (zeros where no buffer exists yet).

        The dtype is float64 if any parameter is float64, else float32; the device is the first
        parameter's. Give the order every rank and the resuming run share (e.g. ``named_parameters()``).
        """
        params = list(params)
        if not params:
            return torch.zeros(0)
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
        device = params[0].device
        pieces = []
        for p in params:
            m = self.buffers.get(id(p))
            if m is None or m.numel() != p.numel():
                pieces.append(torch.zeros(p.numel(), dtype=dtype, device=device))
            else:
                pieces.append(m.reshape(-1).to(device=device, dtype=dtype))
        return torch.cat(pieces)

    def load_vector(self, vector: Tensor, params: Sequence[Tensor]) -> None:
        """Set the buffers from ``vector``, laid out as :meth:`vector` makes it for the same ``params``.

        Raises:
            ValueError: If ``vector`` is not a 1-D tensor of the parameters' total size.
        """
        self.buffers = split_vector(vector, params, compute_dtype)

    def reset(self) -> None:
        """Forget the buffers: the next step starts from ``m_0 = 0``."""
        self.buffers = {}

    def __getstate__(self) -> dict[str, Any]:
        """Only ``beta``: the buffers are keyed by live parameters (save them with :meth:`vector`)."""
        return {"beta": self.beta}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.beta = state["beta"]
        self.buffers = {}

    def __repr__(self) -> str:
        return f"WorkerMomentum(beta={self.beta})"
