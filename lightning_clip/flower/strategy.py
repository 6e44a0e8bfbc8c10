"""``FedARC``: Flower's ``FedAvg`` whose aggregation of the sites' updates is the library's robust pipeline.

Each round the server sends the global arrays ``g`` to the sampled sites; site ``i`` replies with its locally
trained arrays ``w_i``. FedARC stacks the updates ``u_i = w_i - g`` (the floating-point arrays, flattened in the
record's key order; rows in the order of the sites' node ids) into ``x [n, d]`` and applies
``g <- g + aggregate_with(x, arc_config)``, the same pipeline ``rule(NNM(bucket(clip_C(ARC(x)))))`` that
``ddp_arc`` runs on the ranks' gradients
(:func:`lightning_clip.robust.pipeline.aggregate_with`; the round ``r`` is pipeline step ``r - 1``, which seeds
bucketing; centered clipping starts from the previous round's aggregate). Integer arrays (counters) keep the
global value. Sampling, evaluation, the metrics and the reply checks are FedAvg's.

Differences from Flower's strategies by definition: every site counts once (the ``num-examples`` weights of
FedAvg apply to the metrics only: a Byzantine site could claim any weight); the rules read *updates*, not
the returned arrays (the same for FedAvg and the coordinate-wise rules in exact arithmetic, rounding apart);
Krum's score sums the ``n - f - 1`` nearest squared distances (Flower's, ``n - f - 2``) and Multi-Krum averages
the ``n - f`` best updates unweighted.

A round whose replies are too few for ``num_byzantine`` (``n <= 2 f``, after failures) is skipped with a
warning, and the global arrays stay as they are (as Flower's Bulyan does).

Logged in the round's train metrics (with ``arc=True``): ``arc/threshold`` and ``arc/clipped_ranks`` (the number
of sites ARC clipped).

With ``secure_aggregation=`` (Flower's ``SecAggPlusWorkflow``) the server never sees an individual update:
each site clips its update to ``static_clip`` and the protocol reveals only the mean (:mod:`.secure`). Only the
mean can be computed that way, so ARC, NNM, bucketing and robust rules are refused with it.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from flwr.supercore import log
from torch import Tensor

from lightning_clip.flower.records import Layout
from lightning_clip.flower.secure import check_secure_aggregation, run_secure_round
from lightning_clip.robust.arc import ARCStats
from lightning_clip.robust.options import ARCConfig
from lightning_clip.robust.pipeline import aggregate_with
from lightning_clip.tags import ARC_CLIPPED_RANKS, ARC_THRESHOLD

__all__ = ["FedARC", "check_federated", "fewest_updates"]


def check_federated(config: ARCConfig) -> None:
    """Raise ``ValueError`` for a setting of ``config`` that has no meaning for a server aggregating sites' updates.

    ``worker_momentum`` (a rank's momentum of its gradients) and ``robust_comm`` (how DDP ranks move vectors) are
    DDP settings; ``dp_seed`` and ``dp_clip_quantile`` are not used by Flower's DP wrappers (they draw their noise
    from numpy's generator and clip at a fixed bound here).
    """
    if config.worker_momentum != 0.0:
        raise ValueError(
            f"FedARC got worker_momentum={config.worker_momentum:g}: worker momentum is a DDP rank's momentum of its "
            "gradients; a federated site sends one update per round. Use worker_momentum=0.0 (for server momentum "
            "use Flower's FedAvgM)"
        )
    if config.robust_comm != "sharded":
        raise ValueError(f"FedARC got robust_comm={config.robust_comm!r}: it chooses how DDP ranks exchange vectors "
                         "and has no effect on a Flower server, which holds every update; leave it at 'sharded'")
    if config.dp_clip_quantile is not None:
        raise ValueError(f"FedARC got dp_clip_quantile={config.dp_clip_quantile:g}: the adaptive clip bound is not "
                         "wired to Flower's DP wrappers here; use a fixed bound (static_clip) with "
                         "dp_clip_quantile=None")
    if config.dp_seed != 0:
        raise ValueError(f"FedARC got dp_seed={config.dp_seed}: Flower's DP wrappers draw the noise from numpy's "
                         "global generator, so the seed would have no effect; leave dp_seed=0")


def fewest_updates(config: ARCConfig) -> int:
    """The fewest updates ``config``'s pipeline can aggregate: ``2 f + 1`` (``s 2 f + 1`` with buckets of ``s``), at
    least 2 (FedAvg's default)."""
    f, s = config.num_byzantine, config.bucket_size
    return max(2, 2 * f * s + 1 if f else 1)


def _fedavg_parameters() -> set[str]:
    return {name for name in inspect.signature(FedAvg.__init__).parameters if name != "self"}


def _check_fedavg_kwargs(kwargs: dict[str, Any]) -> None:
    known = _fedavg_parameters()
    for name in kwargs:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known | set(ARCConfig.field_names())), n=1)
            hint = f"; did you mean `{close[0]}`?" if close else ""
            raise TypeError(f"FedARC got an unexpected keyword argument `{name}`{hint}")


class FedARC(FedAvg):
    """Flower's ``FedAvg`` with the sites' updates aggregated by ``rule(NNM(bucket(clip_C(ARC(x)))))``.

    Example::

        strategy = FedARC(num_byzantine=2, aggregator="cwtm", nnm=True, fraction_evaluate=0.0,
                          min_train_nodes=10, min_available_nodes=10)
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=20)

    Args:
        num_byzantine, aggregator, nnm, arc, static_clip, worker_momentum, dp_noise_multiplier, dp_seed,
            dp_delta, dp_sampling_rate, dp_clip_quantile, dp_clip_learning_rate, dp_clipped_count_stddev,
            dp_accountant, robust_comm, bucket_size, bucket_seed, cclip_tau, cclip_iters: The fields of
            :class:`~lightning_clip.robust.options.ARCConfig` (documented there; this signature is generated from
            them), or ``arc_config``, not both. ``num_byzantine`` is the number of sites that may misbehave; it
            must stay below half of ``min_train_nodes``. With ``dp_noise_multiplier > 0`` run the strategy inside
            :func:`~lightning_clip.flower.differential_privacy`, which adds the noise with Flower's own wrapper.
        arc_config: The whole configuration as one object.
        secure_aggregation: Flower's ``SecAggPlusWorkflow``: train each round through SecAgg+ (the sites need
            ``secaggplus_mod``). Needs the mean path (``aggregator="mean"``, ``arc=False``, ``nnm=False``,
            ``bucket_size=1``) and ``static_clip``, the bound each site clips its update to, at most the
            workflow's ``clipping_range``.
        **kwargs: Flower's ``FedAvg`` arguments (``fraction_train``, ``min_train_nodes``,
            ``min_available_nodes``, ``weighted_by_key``, ``train_metrics_aggr_fn``, ...); unknown names raise.
            ``min_train_nodes`` defaults to the fewest updates the pipeline can aggregate (:func:`fewest_updates`,
            ``2 num_byzantine + 1``) and ``min_available_nodes`` to at least that.

    Attributes:
        arc_config: The validated configuration.
        last_stats: ARC's statistics of the last aggregated round (norms of the updates, threshold, scales).
        last_aggregate: The last aggregated update ``[d]``.
        last_node_ids: The node id of each row of the last round's stacked updates.
    """

    def __init__(self, *, arc_config: ARCConfig | None = None, secure_aggregation: Any | None = None,
                 **kwargs: Any) -> None:
        config = ARCConfig.from_keywords("FedARC", arc_config, kwargs)
        check_federated(config)
        _check_fedavg_kwargs(kwargs)
        fewest = fewest_updates(config)
        kwargs.setdefault("min_train_nodes", fewest)
        kwargs.setdefault("min_available_nodes", max(fewest, kwargs["min_train_nodes"]))
        super().__init__(**kwargs)
        self.arc_config = config
        self._check_min_train_nodes()
        self.secure_aggregation = secure_aggregation
        if secure_aggregation is not None:
            check_secure_aggregation(config, secure_aggregation)
        self.current_arrays: ArrayRecord | None = None
        self.last_stats: ARCStats | None = None
        self.last_aggregate: Tensor | None = None
        self.last_node_ids: list[int] = []
        self._center: Tensor | None = None  # centered clipping's starting point: the previous aggregate
        self._secure_mean: tuple[Tensor, MetricRecord | None] | None = None

    def _check_min_train_nodes(self) -> None:
        f, n = self.arc_config.num_byzantine, self.min_train_nodes
        if self.fraction_train == 0.0:
            return
        if 2 * f >= n:
            raise ValueError(
                f"Expected argument `num_byzantine` to be below min_train_nodes / 2 = {n / 2:g} but got {f}: a round "
                f"may aggregate as few as min_train_nodes = {n} updates, and the pipeline needs a strict honest "
                f"majority. Use num_byzantine <= {(n - 1) // 2} or min_train_nodes >= {2 * f + 1}"
            )
        self.arc_config.check_rows(n)

    # -- Flower's hooks ------------------------------------------------------------------------------

    def summary(self) -> None:
        """Log the pipeline's settings, then FedAvg's."""
        cfg = self.arc_config
        log(INFO, "\t├──> FedARC pipeline: rule(NNM(bucket(clip(ARC(updates))))):")
        log(INFO, "\t│\t├── aggregator=%r, num_byzantine=%d, nnm=%s, arc=%s", cfg.aggregator, cfg.num_byzantine,
            cfg.nnm, cfg.arc)
        log(INFO, "\t│\t└── static_clip=%s, bucket_size=%d, secure aggregation: %s", cfg.static_clip,
            cfg.bucket_size, "SecAgg+" if self.secure_aggregation is not None else "no")
        super().summary()

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None) -> Result:
        """Flower's ``Strategy.start``, after checking that this strategy can run as configured.

        Raises:
            ValueError: With ``dp_noise_multiplier > 0`` (the noise is added by the DP wrapper: start
                :func:`~lightning_clip.flower.differential_privacy` instead), or when ``initial_arrays`` holds no
                floating-point array.
        """
        if self.arc_config.dp_noise_multiplier > 0.0:
            raise ValueError(
                f"FedARC got dp_noise_multiplier={self.arc_config.dp_noise_multiplier:g}, but FedARC adds no noise "
                "itself: Flower's DP wrapper does. Start `lightning_clip.flower.differential_privacy(strategy, "
                "num_sampled_clients=...)` instead of the strategy"
            )
        self.check_arrays(initial_arrays)
        return super().start(grid, initial_arrays, num_rounds, timeout, train_config, evaluate_config, evaluate_fn)

    @staticmethod
    def check_arrays(arrays: ArrayRecord) -> None:
        """Raise ``ValueError`` unless ``arrays`` holds at least one floating-point array (what is aggregated)."""
        if not isinstance(arrays, ArrayRecord):
            raise TypeError(f"Expected argument `initial_arrays` to be an ArrayRecord but got {type(arrays).__name__}")
        if not Layout(arrays).keys:
            raise ValueError("Expected argument `initial_arrays` to hold at least one floating-point array, the "
                             f"model's weights, but got the keys {list(arrays.keys())}")

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """FedAvg's sampling and messages; the global ``arrays`` are kept to form the updates.

        With secure aggregation the whole SecAgg+ round runs here (it needs the grid) and no message is returned.
        """
        self.current_arrays = arrays
        if self.secure_aggregation is None:
            return super().configure_train(server_round, arrays, config, grid)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._secure_mean = run_secure_round(self, server_round, arrays, messages, grid)
        return []

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The global arrays plus the pipeline's aggregate of the valid replies' updates, and FedAvg's metrics."""
        if self.current_arrays is None:
            raise RuntimeError("FedARC.aggregate_train ran before configure_train: the global arrays of the round "
                               "are unknown")
        layout = Layout(self.current_arrays)
        if self.secure_aggregation is not None:
            secure, self._secure_mean = self._secure_mean, None
            if secure is None:
                return None, None
            mean, metrics = secure
            self.last_aggregate = mean
            return layout.record(layout.global_flat + mean.to(layout.dtype)), metrics
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        valid = sorted(valid, key=lambda msg: msg.metadata.src_node_id)
        contents = [msg.content for msg in valid]
        n, f = len(valid), self.arc_config.num_byzantine
        if 2 * f >= n or (self.arc_config.bucket_size > 1 and 2 * f >= -(-n // self.arc_config.bucket_size)):
            log(WARNING, "FedARC: %d valid replies are too few for num_byzantine=%d (bucket_size=%d); round %d "
                "is skipped and the global arrays stay as they are", n, f, self.arc_config.bucket_size, server_round)
            return None, None
        updates = self.stack_updates(layout, contents)
        aggregate, stats = aggregate_with(updates, self.arc_config, center=self._center, step=server_round - 1)
        if self.arc_config.rule.uses_center:
            self._center = aggregate
        self.last_stats, self.last_aggregate = stats, aggregate
        self.last_node_ids = [msg.metadata.src_node_id for msg in valid]
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        if self.arc_config.arc:
            metrics[ARC_THRESHOLD] = float(stats.threshold)
            metrics[ARC_CLIPPED_RANKS] = int(stats.clipped.sum())
        return layout.record(layout.global_flat + aggregate), metrics

    @staticmethod
    def stack_updates(layout: Layout, contents: list[Any]) -> Tensor:
        """The updates ``[n, d]`` of the replies' contents (each with one ``ArrayRecord``) against ``layout``."""
        rows = []
        for content in contents:
            (record,) = content.array_records.values()
            rows.append(layout.flatten(record) - layout.global_flat)
        return torch.stack(rows)


FedARC.__init__.__signature__ = ARCConfig.signature_with_fields(FedARC.__init__)  # type: ignore[attr-defined]
