"""The one robust pipeline, ``rule(NNM(bucket(clip_C(ARC(x)))))``, over blocks of coordinates and a reduce.

Each step is optional except the rule. ARC's scale factors and the static clip's
``min(1, C / (||v|| + 1e-6))`` depend on the ``n`` norms only (:func:`preaggregation_stats`), so every row is
scaled once, by the product of both; bucketing (:func:`bucketing`) averages random groups of ``s`` rows;
nearest-neighbour mixing (:func:`nearest_neighbor_mixing`) replaces each row by the mean of its ``n - f``
nearest rows; then the rule (:data:`~lightning_clip.robust.rules.RULES`).

Every step is coordinate-wise or needs only small sums over all the coordinates (NNM: the ``n x n``
distances; the rules: see :mod:`~lightning_clip.robust.rules`), so :func:`run` takes the rows as *blocks of
coordinates* and a ``reduce`` that completes such a sum over the blocks held elsewhere. In one process there
is one block and the identity (:func:`aggregate`); the sharded DDP path
(:mod:`lightning_clip.distributed.exchange`) passes the rank's shards and an all-reduce. A coordinate-wise
rule without NNM streams: block by block, column chunk by column chunk, each chunk scaled, bucketed and
reduced in one pass. Coordinate-wise pipelines compute each coordinate from its own column, so every split
gives the same bits; the others add their partial sums in another order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_clip.core.functional import clip_coefficient
from lightning_clip.exceptions import (
    check_bool,
    check_choice,
    check_non_negative_int,
    check_positive_float,
    check_positive_int,
)
from lightning_clip.robust.arc import ARCStats, arc_stats, check_num_byzantine, scale_rows
from lightning_clip.robust.checks import check_matrix, check_norms, compute_dtype
from lightning_clip.robust.options import ARCConfig
from lightning_clip.robust.rules import RULES, Blocks, Reduce, Rule, check_center, mean_rows

__all__ = [
    "CHUNK",
    "Scaling",
    "aggregate",
    "aggregate_with",
    "bucket_permutation",
    "bucketing",
    "nearest_neighbor_mixing",
    "nnm_weights",
    "preaggregate",
    "preaggregation_stats",
    "run",
    "server_aggregation",
    "static_clip",
]

#: Columns per chunk when a coordinate-wise pipeline streams through a block (bounds the temporaries).
CHUNK = 1 << 17

#: Receives the aggregate of block ``i`` (in the blocks' dtype) as soon as it is ready.
Emit = Callable[[int, Tensor], None]


def _identity(t: Tensor) -> Tensor:
    return t


# ----------------------------------------------------------------------------- the steps


def preaggregation_stats(
    norms: Tensor, num_byzantine: int, *, arc: bool = True, static_clip: float | None = None
) -> ARCStats:
    """Return the scale factors of ``clip_C(ARC(.))`` for vectors of norms ``norms [n]``.

    With ``arc``, ARC's factors (:func:`~lightning_clip.robust.arc.arc_stats`; a non-finite norm gets
    ``0``). With ``static_clip = C``, each vector's norm after ARC is then clipped to ``C``: the factor
    ``min(1, C / (norm * arc_scale + 1e-6))``, the formula of ``torch.nn.utils.clip_grad_norm_``, is
    multiplied in. Without ARC a non-finite norm gets a NaN (NaN norm) or ``0`` (infinite norm) static
    factor: static clipping does not neutralise non-finite vectors.

    Returns:
        :class:`~lightning_clip.robust.arc.ARCStats` whose ``scales`` are the combined factors and
        ``clipped`` marks factors below 1. ``threshold`` is ARC's threshold; without ARC it is ``C``
        (``+inf`` when there is no static clip either), and ``num_clipped`` is ``0``.
    """
    check_bool("arc", arc)
    bound = None if static_clip is None else check_positive_float("static_clip", static_clip)
    if arc:
        stats = arc_stats(norms, num_byzantine)
    else:
        x = check_norms("norms", norms)
        check_num_byzantine(x.shape[0], num_byzantine)
        ones = torch.ones_like(x)
        fill = float("inf") if bound is None else bound
        stats = ARCStats(norms=x, threshold=torch.full((), fill, dtype=x.dtype, device=x.device), scales=ones,
                         clipped=ones < 1, num_clipped=0)
    if bound is None:
        return stats
    post = stats.norms * stats.scales
    if arc:  # a vector ARC zeroes has norm 0 afterwards
        post = torch.where(torch.isfinite(stats.norms), post, torch.zeros_like(post))
    scales = stats.scales * clip_coefficient(bound, post)
    return stats._replace(scales=scales, clipped=scales < 1)


@dataclass(frozen=True)
class Scaling:
    """ARC's and the static clip's factors: row ``i`` times ``scales[i]``, zeroed where ``norms[i]`` is not finite.

    The products of :func:`~lightning_clip.robust.arc.scale_rows`, in place. On the CPU, where reading a value
    costs nothing, only the rows that change are touched (:meth:`of`): ``x * 1`` is ``x``, so the other rows
    keep their bits. On an accelerator every row is multiplied, with no host-device synchronisation.
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
        """Scale the rows of ``block [n, m]`` in place."""
        cdt = compute_dtype(block.dtype)
        if self.changed is not None:
            for i, zeroed in self.changed:
                if zeroed:
                    block[i].zero_()
                elif block.dtype == cdt:
                    block[i].mul_(self.scales[i].to(cdt))
                else:
                    block[i] = (block[i].to(cdt) * self.scales[i].to(cdt)).to(block.dtype)
            return
        if block.dtype != cdt:
            block.copy_(scale_rows(block, self.scales, self.norms))
            return
        block.mul_(self.scales.to(block.dtype).unsqueeze(1))
        if self.norms is not None:
            block.masked_fill_(~torch.isfinite(self.norms).unsqueeze(1), 0.0)


def bucket_permutation(n: int, seed: int, step: int) -> Tensor:
    """The row permutation of :func:`bucketing` at ``step``: the same on every rank, replayed on resume.

    Drawn on the CPU from a generator seeded by ``(seed, step)`` alone.

    Args:
        n: Number of rows (positive).
        seed: Non-negative seed.
        step: Non-negative step counter.
    """
    check_positive_int("n", n)
    check_non_negative_int("seed", seed)
    check_non_negative_int("step", step)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step * 7_919 + 17)
    return torch.randperm(n, generator=gen)


def _bucket_means(xc: Tensor, bucket_size: int, permutation: Tensor) -> Tensor:
    shuffled = xc[permutation.to(xc.device)]
    return torch.stack([mean_rows(shuffled[i : i + bucket_size]) for i in range(0, xc.shape[0], bucket_size)])


def bucketing(x: Tensor, bucket_size: int, permutation: Tensor) -> Tensor:
    """Return the means of random buckets of ``bucket_size`` rows: ``[ceil(n / s), d]`` in the dtype of ``x``.

    Bucket ``j`` averages rows ``permutation[j s : (j + 1) s]`` (the last bucket may hold fewer), in
    the compute dtype (Karimireddy et al., 2022). A robust rule on the buckets tolerates the same ``f``
    if ``f < ceil(n / s) / 2``.

    Args:
        x: Tensor ``[n, d]``.
        bucket_size: ``s``, rows per bucket (positive; ``1`` only permutes).
        permutation: A permutation of ``range(n)``, e.g. :func:`bucket_permutation`.
    """
    xc = check_matrix("x", x)
    check_positive_int("bucket_size", bucket_size)
    n = xc.shape[0]
    if not isinstance(permutation, Tensor) or permutation.ndim != 1 or permutation.shape[0] != n:
        raise ValueError(f"Expected argument `permutation` to be a 1-D tensor holding a permutation of range({n}) "
                         f"but got {permutation!r}")
    if permutation.device.type != "meta" and not torch.equal(torch.sort(permutation.cpu()).values, torch.arange(n)):
        raise ValueError(f"Expected argument `permutation` to be a permutation of range({n}) but got "
                         f"{permutation.tolist()}")
    return _bucket_means(xc, bucket_size, permutation).to(x.dtype)


def nnm_weights(d2: Tensor, f: int) -> Tensor:
    """The mixing matrix ``[n, n]`` of NNM from squared distances: row ``i`` averages its ``n - f`` nearest.

    Ties in distance are broken by the lower row index; a row always counts itself first.
    """
    n = d2.shape[0]
    d2 = d2.clone().fill_diagonal_(float("-inf"))
    nearest = torch.sort(d2, dim=1, stable=True).indices[:, : n - f]
    weights = torch.zeros((n, n), dtype=d2.dtype, device=d2.device)
    return weights.scatter_(1, nearest, 1.0 / (n - f))


def nearest_neighbor_mixing(x: Tensor, num_byzantine: int) -> Tensor:
    """Return NNM of ``x [n, d]``: each row replaced by the mean of its ``n - f`` nearest rows, itself included.

    Args:
        x: Tensor ``[n, d]``.
        num_byzantine: Number ``f`` of possibly Byzantine rows, ``0 <= f < n/2``.

    Returns:
        Tensor ``[n, d]`` of the dtype of ``x``.
    """
    xc = check_matrix("x", x)
    f = check_num_byzantine(xc.shape[0], num_byzantine)
    return (nnm_weights(Blocks([xc], [True]).squared_distances(), f) @ xc).to(x.dtype)


@dataclass(frozen=True)
class _Prepare:
    """The coordinate-wise steps before NNM, on a block (or a chunk of one): scale in place, then bucket."""

    scaling: Scaling | None
    bucket_size: int
    permutation: Tensor | None

    def __call__(self, block: Tensor) -> Tensor:
        if self.scaling is not None:
            self.scaling.apply_(block)
        if self.permutation is None:
            return block
        return _bucket_means(block.to(compute_dtype(block.dtype)), self.bucket_size, self.permutation).to(block.dtype)


def _columns(block: Tensor, rule: Rule, f: int, prepare: Callable[[Tensor], Tensor] | None = None,
             mix: Tensor | None = None) -> Tensor:
    """A coordinate-wise rule on column chunks of ``block``, each prepared and mixed (``mix @ rows``) on the way
    in: one pass over the block, the bits of the whole block's steps one after the other (mixing aside)."""
    out = block.new_empty(block.shape[1])
    cdt = compute_dtype(block.dtype)
    for a in range(0, block.shape[1], CHUNK):
        chunk = block[:, a : a + CHUNK]
        if prepare is not None:
            chunk = prepare(chunk)
        if mix is not None:
            chunk = (mix @ chunk.to(cdt)).to(block.dtype)
        out[a : a + CHUNK] = rule.columns(chunk.to(cdt), f).to(block.dtype)
    return out


# ----------------------------------------------------------------------------- the pipeline


def run(
    parts: Iterable[Tensor],
    counted: Sequence[bool],
    norms: Tensor,
    options: ARCConfig,
    emit: Emit,
    *,
    reduce: Reduce = _identity,
    step: int = 0,
    center: Sequence[Tensor] | None = None,
) -> ARCStats:
    """The pipeline on blocks of coordinates: ``emit(i, aggregate of block i)`` for every block, in order.

    The blocks are scaled (and, with NNM and a rule over blocks, mixed) in place.

    Args:
        parts: The blocks ``[n, m_i]`` of every row, in order (taken one at a time: a coordinate-wise rule
            without NNM reduces each before the next is asked for).
        counted: Per block, whether its partial sums count here (see :class:`~lightning_clip.robust.rules.Blocks`).
        norms: The L2 norms ``[n]`` of the *whole* rows, in the compute dtype.
        options: The pipeline's settings (:data:`~lightning_clip.robust.options.PIPELINE_FIELDS`), already checked
            for the ``n`` vectors (:meth:`~lightning_clip.robust.options.ARCConfig.check_rows`).
        emit: Receives each block's aggregate, in the blocks' dtype.
        reduce: Completes a small sum over the blocks held elsewhere (the identity when ``parts`` is everything).
        step: Step counter of the bucketing permutation.
        center: Per block, its part of the centre of a rule that starts from one (``None``: zeros).

    Returns:
        :func:`preaggregation_stats` of ``norms``.
    """
    n = norms.shape[0]
    f = options.num_byzantine
    stats = preaggregation_stats(norms, f, arc=options.arc, static_clip=options.static_clip)
    scaling = None
    if options.arc or options.static_clip is not None:
        scaling = Scaling.of(stats.scales, norms if options.arc else None)
    permutation = bucket_permutation(n, options.bucket_seed, step) if options.bucket_size > 1 else None
    prepare = _Prepare(scaling, options.bucket_size, permutation)
    rule = options.rule
    if rule.coordinate_wise and not options.nnm:  # stream: block by block, chunk by chunk
        for i, part in enumerate(parts):
            emit(i, _columns(part, rule, f, prepare))
        return stats
    blocks = Blocks([prepare(part) for part in parts], list(counted), reduce)
    dtype = blocks.parts[0].dtype
    mix = nnm_weights(blocks.squared_distances(), f) if options.nnm else None
    if rule.coordinate_wise:  # mixed chunk by chunk on the way into the rule
        for i, part in enumerate(blocks.parts):
            emit(i, _columns(part, rule, f, mix=mix))
        return stats
    if mix is not None:  # mixed in place by column chunks
        cdt = blocks.compute_dtype
        for part in blocks.parts:
            for a in range(0, part.shape[1], CHUNK):
                part[:, a : a + CHUNK] = (mix @ part[:, a : a + CHUNK].to(cdt)).to(dtype)
    for i, out in enumerate(rule.blocks(blocks, f, center if rule.uses_center else None)):
        emit(i, out.to(dtype))
    return stats


def aggregate_with(x: Tensor, options: ARCConfig, *, center: Tensor | None = None, step: int = 0
                   ) -> tuple[Tensor, ARCStats]:
    """The pipeline of ``options`` on ``x [n, d]`` in one process (what :func:`aggregate` runs, with the statistics
    the DDP hook reports); ``x`` is not modified.

    Returns:
        The aggregate ``[d]`` (dtype of ``x``) and :func:`preaggregation_stats` of the rows' norms.
    """
    xc = check_matrix("x", x)
    options.check_rows(xc.shape[0])
    check_non_negative_int("step", step)
    check_center(center, xc.shape[1])
    norms = torch.linalg.vector_norm(x, dim=1, dtype=compute_dtype(x.dtype))
    out: list[Tensor] = []
    stats = run([x.clone()], [True], norms, options, lambda i, agg: out.append(agg), step=step,
                center=None if center is None else [center])
    return out[0], stats


def aggregate(
    x: Tensor,
    rule: str,
    num_byzantine: int,
    nnm: bool = False,
    arc: bool = False,
    static_clip: float | None = None,
    *,
    center: Tensor | None = None,
    step: int = 0,
    **options: object,
) -> Tensor:
    """Return ``rule(NNM(bucket(clip_C(ARC(x)))))``; each pre-aggregation step only when asked.

    Args:
        x: Tensor ``[n, d]``.
        rule: One of the keys of :data:`~lightning_clip.robust.rules.RULES`.
        num_byzantine: Number ``f`` of possibly Byzantine rows, ``0 <= f < n/2``.
        nnm: Apply nearest-neighbour mixing before the rule.
        arc: Apply ARC (:func:`~lightning_clip.robust.arc.arc_clip`) first.
        static_clip: If set, clip every row to this L2 norm after ARC and before bucketing and NNM.
        center: The starting point ``[d]`` of a rule that has one (centered clipping: the previous
            aggregate); ``None`` for zeros.
        step: Step counter of the bucketing permutation.
        **options: The other pipeline settings of :class:`~lightning_clip.robust.options.ARCConfig`
            (``bucket_size``, ``bucket_seed``, ``cclip_tau``, ``cclip_iters``), documented there.

    Raises:
        ValueError: If ``rule`` is unknown, ``num_byzantine`` is out of range (for ``n`` rows, and for the
            ``ceil(n / bucket_size)`` buckets) or an option is out of its range.
        TypeError: For a keyword that is not a pipeline setting.
    """
    if not isinstance(rule, str):
        raise TypeError(f"Expected argument `rule` to be a string but got {rule!r}")
    check_choice("rule", rule, tuple(RULES))
    config = ARCConfig.of_pipeline(aggregator=rule, num_byzantine=num_byzantine, nnm=nnm, arc=arc,
                                   static_clip=static_clip, **options)
    return aggregate_with(x, config, center=center, step=step)[0]


def preaggregate(
    x: Tensor,
    num_byzantine: int,
    *,
    arc: bool = True,
    static_clip: float | None = None,
    nnm: bool = False,
    bucket_size: int = 1,
    permutation: Tensor | None = None,
) -> tuple[Tensor, ARCStats]:
    """Return ``NNM(bucket(clip_C(ARC(x))))`` (each step only when asked) and the clipping statistics.

    Args:
        x: Tensor ``[n, d]``.
        num_byzantine: Number ``f`` of possibly Byzantine rows, ``0 <= f < n/2``.
        arc: Apply ARC; its non-finite rows become zeros.
        static_clip: If set, clip every row (after ARC) to this L2 norm, a positive finite number.
        nnm: Apply nearest-neighbour mixing last.
        bucket_size: Average random buckets of this many rows before NNM (:func:`bucketing`); ``1`` skips it.
        permutation: The bucketing permutation (default :func:`bucket_permutation` ``(n, 0, 0)``).

    Returns:
        The pre-aggregated ``[ceil(n / bucket_size), d]`` (dtype of ``x``) and :func:`preaggregation_stats`
        of the rows' norms.
    """
    check_matrix("x", x)
    check_bool("nnm", nnm)
    check_positive_int("bucket_size", bucket_size)
    norms = torch.linalg.vector_norm(x, dim=1, dtype=compute_dtype(x.dtype))
    stats = preaggregation_stats(norms, num_byzantine, arc=arc, static_clip=static_clip)
    if arc or static_clip is not None:
        x = x.clone()
        Scaling.of(stats.scales, norms if arc else None).apply_(x)
    if bucket_size > 1:
        x = bucketing(x, bucket_size, bucket_permutation(x.shape[0], 0, 0) if permutation is None else permutation)
    if nnm:
        x = nearest_neighbor_mixing(x, num_byzantine)
    return x, stats


def static_clip(x: Tensor, max_norm: float) -> Tensor:
    """Return ``x`` with every row scaled to L2 norm at most ``max_norm``: ``x_i * min(1, C / (||x_i|| + 1e-6))``.

    The ARC paper's static-clipping baseline: one fixed threshold ``C`` for every input, whatever the
    inputs look like (ARC instead derives its threshold from them). A row with NaN/Inf stays
    non-finite, as with ``clip_grad_norm_``.

    Args:
        x: Tensor ``[n, d]``.
        max_norm: The norm bound ``C`` (positive, finite).
    """
    check_positive_float("max_norm", max_norm)
    return preaggregate(x, 0, arc=False, static_clip=max_norm)[0]


def server_aggregation(options: ARCConfig) -> Callable[[Tensor], Tensor]:
    """The whole pipeline ``[n, d] -> [d]`` with ``options``'s settings (for attacks that search against it).

    Stateless: bucketing draws step 0's permutation and centered clipping starts from zero.
    """
    return lambda x: aggregate_with(x, options)[0]
