"""Send transforms and the per-parameter state of the robust pipeline (pure torch).

The ``ddp_arc`` hook (:mod:`lightning_clip.distributed.hook`) hands every transform of its chain, in
order, the vector this rank is about to send (:class:`SendBuffers`, DDP's bucket buffers, changed in
place) and a :class:`SendContext`. The hook itself is transport only; behaviour is added by wrapping
what is sent, as torch's ``fp16_compress_wrapper`` wraps a communication hook:

* :class:`WorkerMomentum`: send the rank's momentum instead of its gradient;
* any other callable ``(sent, ctx) -> None`` given to the strategy's ``send_transforms``, e.g. the simulated
  attacks of :mod:`lightning_clip.sim.byzantine`.

A transform never calls ``torch.distributed`` itself: when it needs the other ranks' vectors it calls
``ctx.gather``, which the hook implements with one all-gather and a single-process simulation
(:func:`lightning_clip.sim.byzantine.simulate_sends`) with the rows it already holds, so the same
code gives the same bits in both.

State that changes a run's outcome follows one protocol, :class:`Stateful`: :class:`WorkerMomentum` (per
rank), :class:`CenterState` (centered clipping's centre, the same on every rank) and
:class:`~lightning_clip.robust.privacy.DPState` (the adaptive clip bound). Per-parameter vectors are keyed
by the parameter object (DDP rebuilds its buckets after the first step, which changes the flat layout) and
flattened in a given parameter order for checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor

from lightning_clip.exceptions import check_fraction
from lightning_clip.robust.checks import compute_dtype

__all__ = ["CenterState", "ParameterBuffers", "SendBuffers", "SendContext", "SendTransform", "Stateful",
           "WorkerMomentum", "split_vector"]


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
    A transform may define ``check_world_size(world_size, num_byzantine)``, called before training starts,
    to refuse (raise) or warn about a world size, and the :class:`Stateful` protocol to be checkpointed.
    """

    def __call__(self, sent: SendBuffers, ctx: SendContext) -> None: ...


class Stateful(Protocol):
    """State that changes a run's outcome and is saved in checkpoints.

    ``state_dict(params)`` returns plain values and CPU tensors; ``load_state_dict(state, params)`` restores
    them. ``params`` is the parameter order every rank and a resumed run share (the module's trainable
    parameters). ``per_rank`` says whether every rank holds its own state (saved one per rank) or the same
    state (saved once).
    """

    per_rank: ClassVar[bool]

    def state_dict(self, params: Sequence[Tensor]) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any], params: Sequence[Tensor]) -> None: ...


def split_vector(vector: Tensor, params: Sequence[Tensor],
                 dtype_of: Callable[[torch.dtype], torch.dtype] = lambda dtype: dtype) -> dict[int, Tensor]:
    """Cut a flat state vector into one tensor per parameter (keyed by ``id``), on each parameter's device, in
    ``dtype_of(p.dtype)``: the inverse of flattening it in the order of ``params``.

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


class ParameterBuffers:
    """One vector per parameter (keyed by the parameter object), flattened in a given order for checkpoints.

    :meth:`vector` and :meth:`load_vector` are inverse; :meth:`state_dict` / :meth:`load_state_dict` are the
    :class:`Stateful` protocol on top of them.
    """

    __slots__ = ("buffers",)
    #: Whether every rank holds its own buffers.
    per_rank: ClassVar[bool] = False
    #: Whether a parameter without a buffer counts as zeros (``True``) or makes the whole state unset.
    zeros_when_unset: ClassVar[bool] = False

    def __init__(self) -> None:
        self.buffers: dict[int, Tensor] = {}

    def buffer_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype a buffer of a parameter of ``dtype`` is kept in."""
        return dtype

    def vector(self, params: Sequence[Tensor]) -> Tensor | None:
        """The buffers flattened in the order of ``params`` (float64 if any parameter is float64, else float32),
        on the first parameter's device; ``None`` when a buffer is missing (zeros if :attr:`zeros_when_unset`).

        Give the order every rank and the resuming run share (e.g. ``named_parameters()``).
        """
        params = list(params)
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
        device = params[0].device if params else torch.device("cpu")
        pieces = []
        for p in params:
            b = self.buffers.get(id(p))
            if b is None or b.numel() != p.numel():
                if not self.zeros_when_unset:
                    return None
                b = torch.zeros(p.numel(), dtype=dtype, device=device)
            pieces.append(b.reshape(-1).to(device=device, dtype=dtype))
        return torch.cat(pieces) if pieces else torch.zeros(0)

    def load_vector(self, vector: Tensor, params: Sequence[Tensor]) -> None:
        """Set the buffers from ``vector``, laid out as :meth:`vector` makes it for the same ``params``.

        Raises:
            ValueError: If ``vector`` is not a 1-D tensor of the parameters' total size.
        """
        self.buffers = split_vector(vector, params, self.buffer_dtype)

    def state_dict(self, params: Sequence[Tensor]) -> dict[str, Any]:
        """``{"vector": [D]}`` on the CPU in the order of ``params`` (``{}`` while unset)."""
        vec = self.vector(params)
        return {} if vec is None else {"vector": vec.detach().cpu()}

    def load_state_dict(self, state: Mapping[str, Any], params: Sequence[Tensor]) -> None:
        """Restore :meth:`state_dict`'s output for the same ``params`` (an empty state keeps the buffers)."""
        if state.get("vector") is not None:
            self.load_vector(state["vector"], params)

    def reset(self) -> None:
        """Forget the buffers."""
        self.buffers = {}

    def __getstate__(self) -> dict[str, Any]:
        """No buffers: they are keyed by live parameters (save them with :meth:`state_dict`)."""
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.buffers = {}


class WorkerMomentum(ParameterBuffers):
    r"""Send the momentum of the local gradient instead of the gradient (worker momentum of Robust D-SHB).

    ``m_t = beta * m_{t-1} + (1 - beta) * g_t`` with ``m_0 = 0`` (so ``m_1 = (1 - beta) g_1``, no bias
    correction: the convention of the ARC paper's library ByzFL). One buffer per parameter in float32
    (float64 for float64 parameters) on the gradients' device: one extra copy of the gradients. Per rank.

    Pair it with a momentum-free optimizer (``SGD(momentum=0)``), as the paper does; a momentum
    optimizer on top averages a second time.

    Args:
        beta: The momentum factor, in ``[0, 1)``.
    """

    __slots__ = ("beta",)
    per_rank = True
    zeros_when_unset = True  # m_0 = 0
    #: Per coordinate and per rank: applied bucket by bucket (see :class:`SendTransform`).
    bucketwise = True

    def __init__(self, beta: float) -> None:
        super().__init__()
        self.beta = check_fraction("worker_momentum", beta, low=0.0, high=1.0, open_high=True)

    def buffer_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return compute_dtype(dtype)

    def state_dict(self, params: Sequence[Tensor]) -> dict[str, Any]:
        """``{"beta", "vector": [D]}``: this rank's momentum on the CPU in the order of ``params``."""
        return {"beta": self.beta, **super().state_dict(params)}

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
        """This rank's momentum flattened in the order of ``params`` (zeros where no buffer exists yet)."""
        vec = super().vector(params)
        assert vec is not None  # zeros_when_unset
        return vec

    def __getstate__(self) -> dict[str, Any]:
        """Only ``beta``: the buffers are keyed by live parameters (save them with :meth:`state_dict`)."""
        return {"beta": self.beta}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.beta = state["beta"]
        self.buffers = {}

    def __repr__(self) -> str:
        return f"WorkerMomentum(beta={self.beta})"


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


class CenterState(ParameterBuffers):
    """Centered clipping's centre, the previous step's aggregate, kept per parameter.

    Every rank holds the same values (the aggregate is the same everywhere): saved once.
    """

    __slots__ = ()

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
