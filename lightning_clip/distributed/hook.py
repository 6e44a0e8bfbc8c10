"""The DDP communication hook that runs ARC across the ranks' local gradients before they are averaged.

Usage with plain PyTorch (the :class:`~lightning_clip.distributed.strategy.ARCDDPStrategy` does this for you)::

    state = ARCHookState(process_group=None, num_byzantine=1)
    ddp_model.register_comm_hook(state, arc_hook)

How the hook works
------------------
DDP calls a communication hook once per gradient *bucket*, in bucket order, and waits on all the
returned futures only at the end of the backward pass. ARC needs the norm of each rank's *whole*
local gradient, so :func:`arc_hook` holds every bucket until the last one (``bucket.is_last()``):
it returns a not-yet-completed :class:`torch.futures.Future` for each earlier bucket, and on the
last bucket does all the work and completes every held future before returning. Bucket layouts are
never cached across steps (DDP rebuilds its buckets after the first iteration).

With ``aggregator="mean"`` (and no NNM), on the last bucket every rank:

1. applies the simulated Byzantine attack to its flat local gradient if it is one of the
   ``byzantine`` ranks (simulation only);
2. computes its local gradient norm in float32 (float64 for float64 gradients), whatever the
   gradient dtype (bf16 included);
3. all-gathers the ``n`` norms -- ``n`` floats, the only extra traffic of ARC;
4. computes the ARC scales :func:`~lightning_clip.robust.arc.arc_stats` identically on every rank;
5. multiplies its buckets by ``scale[rank] / n`` (one pass, as plain DDP divides by ``n``); a
   non-finite local gradient has scale ``0`` and is zeroed explicitly (``NaN * 0`` is NaN);
6. all-reduces (sums) every bucket, exactly the buckets plain DDP all-reduces: the gradient traffic
   equals plain DDP's.

With a robust aggregator (``"cwtm"``, ``"median"``, ``"geomed"``, ``"krum"``, ``"multikrum"``, or
``nnm=True``), on the last bucket every rank all-gathers the ``n`` flat local gradients ``[n, d]``,
ARC-clips them and applies :func:`~lightning_clip.robust.aggregators.aggregate` identically; there
is no all-reduce. This costs ``n`` times the memory of one gradient on every rank and an all-gather
of ``n x d`` elements instead of an all-reduce of ``d`` (about ``(n - 1) d`` elements received
per rank instead of ``2 (n - 1) d / n``).

Ablations and baselines (``arc`` and ``static_clip``): ``arc=False`` turns ARC off -- the ranks'
vectors reach the aggregator unclipped and a non-finite one is *not* zeroed (plain DDP's behaviour),
which is how one measures what ARC adds to a rule in real DDP. ``static_clip=C`` clips every rank's
vector to L2 norm ``C`` (``v * min(1, C / (||v|| + 1e-6))``, the ARC paper's static-clipping baseline)
after ARC, if ARC is on, and before NNM and the rule; with ``"mean"`` it stays on the all-reduce path
(each rank scales its own buffers). The pipeline is ``rule(NNM(clip_C(ARC(x))))``, each step optional,
exactly :func:`~lightning_clip.robust.aggregators.aggregate` with the same switches.

Attacks that need the honest ranks' vectors (``alie``, ``foe``, ``ipm``, ``mimic``, ``foe_ls``,
``alie_ls``) add one all-gather of the flat local gradients (``n x d`` elements) before ARC --
simulation only, never in a real run. The line-searched ones (``foe_ls``, ``alie_ls``) search their
factor against the hook's own aggregation, ``aggregate(x, aggregator, num_byzantine, nnm=nnm,
arc=arc, static_clip=static_clip)`` (:attr:`ARCHookState.server_aggregation`), on the Byzantine
ranks only. These omniscient attacks give every Byzantine rank the same vector (it depends only on
the honest vectors); on the all-gather path only the first Byzantine rank computes it and every rank
copies its row over the other Byzantine rows after the gather -- the same result, with ``f`` times
less line-search work. On the all-reduce path each Byzantine rank computes it.

Worker momentum (Robust D-SHB, as the ARC paper runs it)
--------------------------------------------------------
With ``worker_momentum = beta > 0`` every rank keeps a momentum of its own local gradient and sends
that instead of the gradient -- the worker-side momentum of Robust D-SHB (Allouah et al. 2023,
"Fixing by Mixing"), the algorithm the ARC paper (arXiv 2405.14432, seed ``004``) evaluates, with the
convention of its reference library ByzFL:

    ``m_i^t = beta * m_i^{t-1} + (1 - beta) * g_i^t`` with ``m_i^0 = 0``, so ``m_i^1 = (1 - beta) g_i^1``

(no bias correction). On the last bucket, before anything else, each rank updates its buffer from
its flat local gradient ``g`` (DDP's locally accumulated gradient, after any data-level corruption
such as label flipping or gradient ascent, see :class:`~lightning_clip.tools.demo.DigitsClassifier`) and
writes ``m`` into the buckets; the steps above then run unchanged on the momenta. A simulated
Byzantine rank transforms the momentum it *sends* (the paper's Byzantine workers send arbitrary
vectors) while its own buffer keeps the untransformed momentum (so ``scale`` does not compound over
steps); the omniscient attacks see the honest ranks' momenta; ARC clips the momenta, and the
aggregate of the momenta lands in the buckets, hence in ``param.grad``: the optimizer steps on it.

Pair it with a momentum-free optimizer, as the paper does (``SGD(momentum=0)``: the server takes a
plain step ``theta <- theta - lr * F(ARC(m_1, ..., m_n))``). A momentum optimizer on top applies a
second momentum to the aggregate (double momentum: a longer averaging window, about
``1/(1-beta) + 1/(1-mu)`` steps, and, for PyTorch's un-damped ``SGD(momentum=mu)``, a step ``1/(1-mu)``
times larger); it runs, but it is not the analysed algorithm. Adam's first moment is the same kind
of second average.

The buffer is kept per parameter, keyed by the parameter object (DDP reorders its buckets after the
first iteration; the mapping survives that), in float32 (float64 for float64 parameters) on the
gradients' device: one extra copy of the gradients per rank. ``worker_momentum=0.0`` runs exactly the
code without momentum (bitwise the same results).

Costs and limits
----------------
* Holding the buckets means no overlap of communication with the backward pass: the reduction
  starts when the last bucket is ready. That is inherent to ARC (the scale of a rank depends on its
  whole gradient and on every other rank's norm).
* The robust aggregators must give bitwise identical results on every rank for the replicas to
  stay in sync; this holds for identical hardware and library versions (all ranks run the same
  deterministic arithmetic on the same gathered tensor).
* Sparse gradients are not supported.

State and checkpoints
---------------------
ARC itself is stateless from step to step. The step counter ``iter`` only labels the statistics and
seeds the ``gaussian`` attack simulation; the strategy re-derives it from ``trainer.global_step`` when
training starts. The worker-momentum buffers are rank-local state a resume needs:
:meth:`ARCHookState.momentum_vector` flattens this rank's buffers in a parameter order the caller
gives (zeros before the first step) and :meth:`ARCHookState.load_momentum_vector` puts such a vector
back; :class:`~lightning_clip.distributed.strategy.ARCDDPStrategy` gathers every rank's vector into the
checkpoint and gives each rank its own row on resume. Pickling the state drops the buffers (they are
keyed by live parameter objects).
"""

# No `from __future__ import annotations`: DDP checks the hook's annotations at registration
# (`bucket: dist.GradBucket`, return `torch.futures.Future[torch.Tensor]`) against the real objects.

import functools
import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_clip.exceptions import check_choice, check_fraction, check_non_negative_int, check_positive_float
from lightning_clip.robust.aggregators import AGGREGATORS, _static_clip_with_scales, aggregate, static_clip_scales
from lightning_clip.robust.arc import ARCStats, arc_num_clipped, arc_stats
from lightning_clip.sim.attacks import Aggregation, ByzantineSpec

__all__ = ["ARCHookState", "arc_hook", "check_static_clip", "check_worker_momentum", "check_world_size"]

log = logging.getLogger(__name__)


def check_world_size(world_size: int, num_byzantine: int) -> None:
    """Raise ``ValueError`` unless ``0 <= num_byzantine < world_size / 2``, naming the world size."""
    if 2 * num_byzantine >= world_size:
        raise ValueError(
            f"Expected argument `num_byzantine` to satisfy 0 <= num_byzantine < world_size / 2 = {world_size / 2:g} "
            f"(world size {world_size}) but got {num_byzantine}; ARC needs a strict honest majority, so use "
            f"num_byzantine <= {(world_size - 1) // 2} or at least {2 * num_byzantine + 1} ranks"
        )


def check_worker_momentum(worker_momentum: Any) -> float:
    """Return ``float(worker_momentum)`` or raise unless it is a number with ``0 <= worker_momentum < 1``."""
    return check_fraction("worker_momentum", worker_momentum, low=0.0, high=1.0, open_high=True)


def check_static_clip(static_clip: Any) -> float | None:
    """Return ``None`` or ``float(static_clip)``; raise unless it is ``None`` or a positive finite number."""
    if static_clip is None:
        return None
    return check_positive_float("static_clip", static_clip)


def _as_spec(byzantine: Any) -> ByzantineSpec | None:
    if byzantine is None or isinstance(byzantine, ByzantineSpec):
        return byzantine
    if isinstance(byzantine, dict):
        return ByzantineSpec.from_config(byzantine)
    raise TypeError(
        f"Expected argument `byzantine` to be a ByzantineSpec, a dict or None but got {type(byzantine).__name__}"
    )


def check_arc_arguments(
    num_byzantine: int,
    aggregator: str,
    nnm: bool,
    seed: int,
    worker_momentum: float,
    arc: bool = True,
    static_clip: float | None = None,
) -> tuple[float, float | None]:
    """Validate the ARC settings shared by the hook state and the strategy.

    Returns:
        ``(worker_momentum, static_clip)`` as floats (``static_clip`` may be ``None``).
    """
    check_non_negative_int("num_byzantine", num_byzantine)
    if not isinstance(aggregator, str):
        raise TypeError(f"Expected argument `aggregator` to be a string but got {aggregator!r}")
    check_choice("aggregator", aggregator, tuple(AGGREGATORS))
    if not isinstance(nnm, bool):
        raise TypeError(f"Expected argument `nnm` to be a bool but got {nnm!r}")
    check_non_negative_int("seed", seed)
    if not isinstance(arc, bool):
        raise TypeError(f"Expected argument `arc` to be a bool but got {arc!r}")
    return check_worker_momentum(worker_momentum), check_static_clip(static_clip)


class ARCHookState:
    r"""Hyperparameters, internal state and statistics of :func:`arc_hook` (one instance per DDP model).

    Modelled on :class:`torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook.PowerSGDState`.

    Args:
        process_group: The process group the gradients are averaged over; ``None`` for the default
            (world) group. It is not pickled (see :meth:`__getstate__`).
        num_byzantine: ``f``, the number of ranks that may be Byzantine, ``0 <= f < world_size / 2``.
            ARC clips the ``floor(2 f (n - f) / n)`` largest local gradients; ``0`` is plain DDP.
        aggregator: ``"mean"`` (all-reduce, same traffic as DDP) or a robust rule of
            :data:`~lightning_clip.robust.aggregators.AGGREGATORS` (all-gather of the gradients).
        nnm: Apply nearest-neighbour mixing before the aggregator (needs the all-gather path).
        byzantine: Simulated Byzantine ranks and their attack (a
            :class:`~lightning_clip.sim.attacks.ByzantineSpec` or its ``from_config`` dict); ``None``
            in real runs.
        seed: Seed of the ``gaussian`` attack simulation (combined with the rank and the step).
        worker_momentum: ``beta`` in ``[0, 1)``: each rank sends the momentum
            ``m <- beta m + (1 - beta) g`` (``m_0 = 0``) of its local gradient instead of the gradient
            (see the module documentation); ``0.0`` (the default) sends the gradient.
        arc: Apply ARC (the default). ``False`` is the ablation without ARC: vectors reach the
            aggregator unclipped and non-finite ones are not zeroed.
        static_clip: If set, clip every rank's vector to this L2 norm (after ARC, before NNM): the
            static-clipping baseline. ``None`` (the default) skips it.

    Internal state:
        momentum: This rank's worker-momentum buffers, ``{id(parameter): flat buffer}``; empty until
            the first synchronized step with ``worker_momentum > 0``. Use :meth:`momentum_vector` and
            :meth:`load_momentum_vector` to save and restore it.

    Attributes (statistics of the last synchronized step, tensors on the gradients' device):
        last_norms: Every rank's local gradient norm before ARC, ``[n]`` (float32, or float64).
        last_threshold: ARC's threshold, 0-d; with ``arc=False`` the ``static_clip`` bound, or
            ``+inf`` when nothing clips.
        last_scales: Every rank's overall pre-aggregation scale factor (ARC's times the static
            clip's), ``[n]``.
        last_clipped: Which ranks were scaled down (or zeroed), bool ``[n]``.
        last_step: The value of ``iter`` at that step (``-1`` before the first).
        last_num_buckets: How many buckets the hook held and reduced at that step.
        last_comm_bytes: Bytes of the collectives' payloads this rank issued at that step:
            ``{"all_reduce": ..., "all_gather": ...}`` (all-reduce: the tensors reduced; all-gather: the
            gathered outputs).
    """

    __slots__ = [
        "process_group",
        # Hyperparameters.
        "num_byzantine",
        "aggregator",
        "nnm",
        "byzantine",
        "seed",
        "worker_momentum",
        "arc",
        "static_clip",
        # Internal state.
        "iter",
        "held",
        "momentum",
        # Statistics of the last synchronized step.
        "last_norms",
        "last_threshold",
        "last_scales",
        "last_clipped",
        "last_step",
        "last_num_buckets",
        "last_comm_bytes",
    ]

    def __init__(
        self,
        process_group: dist.ProcessGroup | None = None,
        num_byzantine: int = 1,
        aggregator: str = "mean",
        nnm: bool = False,
        byzantine: ByzantineSpec | dict[str, Any] | None = None,
        seed: int = 0,
        worker_momentum: float = 0.0,
        arc: bool = True,
        static_clip: float | None = None,
    ) -> None:
        worker_momentum, static_clip = check_arc_arguments(
            num_byzantine, aggregator, nnm, seed, worker_momentum, arc, static_clip
        )
        self.process_group = process_group
        self.num_byzantine = num_byzantine
        self.aggregator = aggregator
        self.nnm = nnm
        self.byzantine = _as_spec(byzantine)
        self.seed = seed
        self.worker_momentum = worker_momentum
        self.arc = arc
        self.static_clip = static_clip
        if dist.is_available() and dist.is_initialized():
            # Fail at construction, not deep in the first backward pass.
            self.check_world_size()
        self.iter = 0
        # (buffer, future, parameters) of the buckets seen so far in the current backward pass.
        self.held: list[tuple[Tensor, torch.futures.Future, list[Tensor]]] = []
        self.momentum: dict[int, Tensor] = {}
        self.last_norms: Tensor | None = None
        self.last_threshold: Tensor | None = None
        self.last_scales: Tensor | None = None
        self.last_clipped: Tensor | None = None
        self.last_step = -1
        self.last_num_buckets = 0
        self.last_comm_bytes: dict[str, int] = {"all_reduce": 0, "all_gather": 0}

    @property
    def uses_all_reduce(self) -> bool:
        """Whether the hook all-reduces (``"mean"`` without NNM) rather than all-gathering the gradients."""
        return self.aggregator == "mean" and not self.nnm

    @property
    def uses_momentum(self) -> bool:
        """Whether the ranks send worker momenta (``worker_momentum > 0``) rather than gradients."""
        return self.worker_momentum > 0.0

    @property
    def server_aggregation(self) -> Aggregation:
        """The aggregation the hook applies, ``[n, d] -> [d]``, as the line-searched attacks see it.

        ``aggregate(x, aggregator, num_byzantine, nnm=nnm, arc=arc, static_clip=static_clip)``.
        """
        return functools.partial(
            aggregate,
            name=self.aggregator,
            num_byzantine=self.num_byzantine,
            nnm=self.nnm,
            arc=self.arc,
            static_clip=self.static_clip,
        )

    def momentum_vector(self, params: Sequence[Tensor]) -> Tensor:
        """Return this rank's worker momentum flattened in the order of ``params`` (a fresh 1-D tensor).

        Parameters without a buffer yet (before the first step, or not in DDP's buckets) give zeros,
        which is what their buffer would start from (``m_0 = 0``). The dtype is float64 if any
        parameter is float64, else float32; the device is the first parameter's.

        Args:
            params: The parameters, in a canonical order shared by every rank and by the run that
                loads the vector back (e.g. the module's ``named_parameters()`` order).
        """
        params = list(params)
        if not params:
            return torch.zeros(0)
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
        device = params[0].device
        pieces = []
        for p in params:
            m = self.momentum.get(id(p))
            if m is None or m.numel() != p.numel():
                pieces.append(torch.zeros(p.numel(), dtype=dtype, device=device))
            else:
                pieces.append(m.reshape(-1).to(device=device, dtype=dtype))
        return torch.cat(pieces)

    def load_momentum_vector(self, vector: Tensor, params: Sequence[Tensor]) -> None:
        """Set this rank's worker momentum from ``vector``, laid out as :meth:`momentum_vector` makes it.

        Args:
            vector: 1-D tensor of ``sum(p.numel() for p in params)`` elements.
            params: The same parameters, in the same order, as when the vector was made.

        Raises:
            ValueError: If ``vector`` is not 1-D or its length does not match ``params``.
        """
        params = list(params)
        total = sum(p.numel() for p in params)
        if not isinstance(vector, Tensor) or vector.ndim != 1 or vector.numel() != total:
            shape = tuple(vector.shape) if isinstance(vector, Tensor) else type(vector).__name__
            raise ValueError(
                f"Expected argument `vector` to be a 1-D tensor of {total} elements (the parameters' total size) "
                f"but got shape {shape}"
            )
        momentum: dict[int, Tensor] = {}
        offset = 0
        for p in params:
            numel = p.numel()
            dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
            momentum[id(p)] = vector[offset : offset + numel].to(device=p.device, dtype=dtype).clone()
            offset += numel
        self.momentum = momentum

    def reset_momentum(self) -> None:
        """Forget the worker-momentum buffers (the next step starts from ``m_0 = 0``)."""
        self.momentum = {}

    @property
    def last_stats(self) -> ARCStats | None:
        """The statistics of the last synchronized step as :class:`~lightning_clip.robust.arc.ARCStats`."""
        if self.last_norms is None:
            return None
        n = int(self.last_norms.shape[0])
        k = arc_num_clipped(n, self.num_byzantine) if self.arc else 0
        return ARCStats(self.last_norms, self.last_threshold, self.last_scales, self.last_clipped, k)

    def group(self) -> dist.ProcessGroup:
        """The process group in use (the default group when ``process_group`` is ``None``)."""
        return self.process_group if self.process_group is not None else dist.group.WORLD

    def check_world_size(self) -> None:
        """Raise ``ValueError`` if ``num_byzantine`` or the Byzantine spec does not fit the group's size."""
        world_size = dist.get_world_size(self.group())
        check_world_size(world_size, self.num_byzantine)
        if self.byzantine is not None:
            self.byzantine.check_world_size(world_size)

    def maybe_increase_iter(self, bucket: dist.GradBucket) -> None:
        """Advance the step counter once per synchronized backward pass (on the last bucket)."""
        if bucket.is_last():
            self.iter += 1

    def __getstate__(self) -> dict[str, Any]:
        """Return the picklable state: every slot but ``process_group``, the transient held buckets and the
        momentum buffers (keyed by live parameters; save them with :meth:`momentum_vector`)."""
        skip = ("process_group", "held", "momentum")
        return {slot: getattr(self, slot) for slot in self.__slots__ if slot not in skip}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore ``state``; ``process_group`` becomes ``None`` (the default group), the momentum empty."""
        self.process_group = None
        self.held = []
        self.momentum = {}
        # Defaults for states pickled before these settings existed.
        self.worker_momentum = 0.0
        self.arc = True
        self.static_clip = None
        for slot, value in state.items():
            setattr(self, slot, value)


# ---------------------------------------------------------------------------------------------------
# Helpers (all ranks call the collectives in the same order).


def _compute_dtype(buffers: list[Tensor]) -> torch.dtype:
    return torch.float64 if all(b.dtype == torch.float64 for b in buffers) else torch.float32


def _flat_dtype(buffers: list[Tensor]) -> torch.dtype:
    dtypes = {b.dtype for b in buffers}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def _flatten(buffers: list[Tensor]) -> Tensor:
    dtype = _flat_dtype(buffers)
    if len(buffers) == 1:
        return buffers[0].to(dtype).clone()
    return torch.cat([b.reshape(-1).to(dtype) for b in buffers])


def _unflatten_into(flat: Tensor, buffers: list[Tensor]) -> None:
    offset = 0
    for b in buffers:
        numel = b.numel()
        b.copy_(flat[offset : offset + numel].view_as(b))
        offset += numel


def _local_norm(buffers: list[Tensor], dtype: torch.dtype) -> Tensor:
    """L2 norm of the concatenation of ``buffers``, accumulated in ``dtype`` (float32 for bf16/fp16)."""
    if len(buffers) == 1:
        return torch.linalg.vector_norm(buffers[0], dtype=dtype)
    per_bucket = torch.stack([torch.linalg.vector_norm(b, dtype=dtype) for b in buffers])
    return torch.linalg.vector_norm(per_bucket)


def _all_gather_rows(x: Tensor, n: int, group: dist.ProcessGroup) -> Tensor:
    """Stack every rank's ``x`` (same shape everywhere) into ``[n, *x.shape]``."""
    out = x.new_empty((n, *x.shape))
    dist.all_gather(list(out.unbind(0)), x.contiguous(), group=group)
    return out


def _attack_generator(state: ARCHookState, rank: int, step: int) -> torch.Generator:
    # One fresh seed per (seed, rank, step): a resumed run replays the same noise.
    return torch.Generator().manual_seed(state.seed * 1_000_003 + rank * 1_009 + step * 7_919 + 1)


def _shares_attack(spec: ByzantineSpec | None) -> bool:
    """Whether every Byzantine rank sends the same vector, so one of them can compute it for all."""
    return spec is not None and spec.needs_honest and spec.num_byzantine > 1


def _apply_attack(
    state: ARCHookState, flat: Tensor, rank: int, n: int, step: int, comm: dict[str, int], share: bool = False
) -> Tensor:
    """Return the flat vector this rank sends: its own, or the simulated Byzantine one.

    With ``share`` (all-gather path, :func:`_shares_attack`), only the first Byzantine rank computes an
    omniscient attack; the others return ``flat`` as a placeholder that :func:`_copy_shared_attack`
    overwrites after the gather.
    """
    spec = state.byzantine
    if spec is None:
        return flat
    honest = None
    if spec.needs_honest:
        # Every rank takes part in the gather; only the Byzantine ranks use it.
        gathered = _all_gather_rows(flat, n, state.group())
        comm["all_gather"] += gathered.numel() * gathered.element_size()
        keep = [r for r in range(n) if not spec.is_byzantine(r)]
        honest = gathered[keep]
    if not spec.is_byzantine(rank) or (share and _shares_attack(spec) and rank != spec.ranks[0]):
        return flat
    aggregation = state.server_aggregation if spec.needs_aggregation else None
    return spec.apply(flat, honest, generator=_attack_generator(state, rank, step), aggregation=aggregation)


def _copy_shared_attack(spec: ByzantineSpec | None, x: Tensor) -> None:
    """Copy the first Byzantine rank's row of the gathered ``x`` over the other Byzantine rows (in place)."""
    if _shares_attack(spec):
        first = spec.ranks[0]
        for r in spec.ranks[1:]:
            x[r].copy_(x[first])


def _momentum_into_buffers_(state: ARCHookState, buffers: list[Tensor], params: list[list[Tensor]]) -> None:
    """Update this rank's momentum ``m <- beta m + (1 - beta) g`` from the buckets and write ``m`` into them.

    ``buffers[i]`` is bucket ``i``'s flat buffer, the gradients of ``params[i]`` back to back.
    """
    beta = state.worker_momentum
    ms: list[Tensor] = []
    gs: list[Tensor] = []
    for buffer, bucket_params in zip(buffers, params):
        offset = 0
        for p in bucket_params:
            numel = p.numel()
            g = buffer.narrow(0, offset, numel)
            offset += numel
            m = state.momentum.get(id(p))
            if m is None or m.numel() != numel:
                # m_0 = 0 (the paper's and ByzFL's convention): m_1 = (1 - beta) g_1.
                dtype = torch.float64 if g.dtype == torch.float64 else torch.float32
                m = torch.zeros(numel, dtype=dtype, device=g.device)
                state.momentum[id(p)] = m
            ms.append(m)
            gs.append(g)
        if offset != buffer.numel():
            raise RuntimeError(
                f"DDP bucket of {buffer.numel()} elements holds parameters of {offset} elements in all; "
                "worker momentum needs dense, unpadded buckets"
            )
    torch._foreach_mul_(ms, beta)
    torch._foreach_add_(ms, gs, alpha=1.0 - beta)
    for g, m in zip(gs, ms):
        g.copy_(m)


def _scale_(buffers: list[Tensor], coeff: Tensor, finite: Tensor, zero_non_finite: bool) -> None:
    """``buffers *= coeff`` in place; with ``zero_non_finite``, zero them when the local vector is not finite.

    ARC gives a non-finite vector ``coeff = 0``, but ``NaN * 0`` is NaN: the zeroing makes it exact.
    Without ARC (``zero_non_finite=False``) NaN/Inf pass through, as in plain DDP.
    """
    torch._foreach_mul_(buffers, coeff)
    if not zero_non_finite:
        return
    if buffers[0].device.type == "cpu":
        # Reading a CPU tensor is free: zero only when needed.
        if not bool(finite):
            for b in buffers:
                b.zero_()
    else:
        # No host-device sync: NaN/Inf can only remain where coeff is 0, i.e. in a non-finite gradient.
        for b in buffers:
            b.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


def _no_arc_stats(norms: Tensor, static_clip: float | None) -> ARCStats:
    """Statistics with ARC off: scales 1, threshold the static bound (``+inf`` when there is none)."""
    bound = float("inf") if static_clip is None else static_clip
    threshold = torch.full((), bound, dtype=norms.dtype, device=norms.device)
    scales = torch.ones_like(norms)
    return ARCStats(norms=norms, threshold=threshold, scales=scales, clipped=scales < 1, num_clipped=0)


def _with_static_scales(stats: ARCStats, static_scales: Tensor) -> ARCStats:
    """``stats`` with the static-clip factors folded into the scales and the clipped mask."""
    scales = stats.scales * static_scales
    return stats._replace(scales=scales, clipped=scales < 1)


def _store_stats(state: ARCHookState, stats: ARCStats, step: int, num_buckets: int, comm: dict[str, int]) -> None:
    state.last_norms = stats.norms
    state.last_threshold = stats.threshold
    state.last_scales = stats.scales
    state.last_clipped = stats.clipped
    state.last_step = step
    state.last_num_buckets = num_buckets
    state.last_comm_bytes = comm


def _reduce_mean(state: ARCHookState, buffers: list[Tensor], step: int) -> None:
    """ARC (and the static clip) then average with the same all-reduces as plain DDP; ``n`` extra floats."""
    group = state.group()
    n = dist.get_world_size(group)
    rank = dist.get_rank(group)
    comm = {"all_reduce": 0, "all_gather": 0}
    spec = state.byzantine
    if spec is not None and (spec.is_byzantine(rank) or spec.needs_honest):
        sent = _apply_attack(state, _flatten(buffers), rank, n, step, comm)
        if spec.is_byzantine(rank):
            _unflatten_into(sent, buffers)
    cdt = _compute_dtype(buffers)
    local = _local_norm(buffers, cdt)
    norms = _all_gather_rows(local.reshape(1), n, group).reshape(n)
    comm["all_gather"] += norms.numel() * norms.element_size()
    stats = arc_stats(norms, state.num_byzantine) if state.arc else _no_arc_stats(norms, state.static_clip)
    if state.static_clip is not None:
        # The norm after ARC is norm * scale (0 for a vector ARC zeroes): clip it to the static bound too.
        post = norms * stats.scales
        if state.arc:
            post = torch.where(torch.isfinite(norms), post, torch.zeros_like(post))
        stats = _with_static_scales(stats, static_clip_scales(post, state.static_clip))
    # scale * (1/n) with a Python float: exactly plain DDP's `grad * (1/n)` when the scale is 1.
    coeff = stats.scales[rank] * (1.0 / n)
    _scale_(buffers, coeff, torch.isfinite(norms[rank]), zero_non_finite=state.arc)
    works = [dist.all_reduce(b, group=group, async_op=True) for b in buffers]
    for w in works:
        w.wait()
    comm["all_reduce"] += sum(b.numel() * b.element_size() for b in buffers)
    _store_stats(state, stats, step, len(buffers), comm)


def _reduce_robust(state: ARCHookState, buffers: list[Tensor], step: int) -> None:
    """All-gather the flat vectors ``[n, d]``, ARC-clip them, aggregate identically on every rank."""
    group = state.group()
    n = dist.get_world_size(group)
    rank = dist.get_rank(group)
    comm = {"all_reduce": 0, "all_gather": 0}
    flat = _apply_attack(state, _flatten(buffers), rank, n, step, comm, share=True)
    x = _all_gather_rows(flat, n, group)
    comm["all_gather"] += x.numel() * x.element_size()
    _copy_shared_attack(state.byzantine, x)
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    norms = torch.linalg.vector_norm(x, dim=1, dtype=cdt)
    if state.arc:
        stats = arc_stats(norms, state.num_byzantine)
        # The same arithmetic as arc_clip(x, f), reusing the norms.
        scaled = x.to(cdt) * stats.scales.unsqueeze(1)
        zero = torch.zeros((), dtype=cdt, device=x.device)
        clipped = torch.where(torch.isfinite(norms).unsqueeze(1), scaled, zero).to(x.dtype)
        del scaled
    else:
        stats = _no_arc_stats(norms, state.static_clip)
        clipped = x
    del x
    if state.static_clip is not None:
        # aggregate(..., static_clip=C)'s own function: the result is bitwise the pure pipeline's.
        clipped, static_scales = _static_clip_with_scales(clipped, state.static_clip)
        stats = _with_static_scales(stats, static_scales)
    agg = aggregate(clipped, state.aggregator, state.num_byzantine, nnm=state.nnm)
    _unflatten_into(agg, buffers)
    _store_stats(state, stats, step, len(buffers), comm)


def _completed(value: Tensor) -> torch.futures.Future:
    fut: torch.futures.Future = torch.futures.Future(devices=[value.device] if value.is_cuda else None)
    fut.set_result(value)
    return fut


def arc_hook(state: ARCHookState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """DDP communication hook: ARC across the ranks' local gradients, then mean or a robust aggregator.

    Register it with ``ddp_model.register_comm_hook(ARCHookState(...), arc_hook)``. Earlier buckets
    get a pending future; the last bucket's call does the work and completes them all (see the module
    documentation for the algorithm and its traffic).

    Args:
        state: The hook's :class:`ARCHookState`.
        bucket: The gradient bucket DDP hands over.

    Returns:
        A future holding the reduced bucket buffer (completed for the last bucket).
    """
    buffer = bucket.buffer()
    if bucket.index() == 0:
        # A new backward pass: forget buckets of an aborted one.
        state.held = []
    if not bucket.is_last():
        fut: torch.futures.Future = torch.futures.Future(devices=[buffer.device] if buffer.is_cuda else None)
        state.held.append((buffer, fut, bucket.parameters() if state.uses_momentum else []))
        return fut

    held, state.held = state.held, []
    buffers = [b for b, _, _ in held] + [buffer]
    step = state.iter
    try:
        if state.uses_momentum:
            # Every rank sends its momentum instead of its gradient; the rest is unchanged.
            _momentum_into_buffers_(state, buffers, [ps for _, _, ps in held] + [bucket.parameters()])
        if state.uses_all_reduce:
            _reduce_mean(state, buffers, step)
        else:
            _reduce_robust(state, buffers, step)
    except BaseException as exc:
        for _, fut, _ in held:
            fut.set_exception(exc)
        raise
    state.maybe_increase_iter(bucket)
    for b, fut, _ in held:
        fut.set_result(b)
    return _completed(buffer)
