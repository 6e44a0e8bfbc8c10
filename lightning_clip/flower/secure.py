"""Secure aggregation for :class:`~lightning_clip.flower.FedARC`: a round of Flower's SecAgg+ on the mean path.

Flower's ``SecAggPlusWorkflow`` runs the SecAgg+ protocol (key setup, key sharing, masked vectors, unmasking)
against a strategy of Flower's legacy API; :func:`run_secure_round` runs one such round inside FedARC's
``configure_train`` for the sites FedAvg's sampling chose. Every site clips its update ``u_i`` to
``C = static_clip`` and sends it masked (``secaggplus_mod``); the server learns only

    ``mean_i u_i``  (each site reports the same weight, so the protocol's weighted mean is the plain mean),

up to the protocol's stochastic quantization: ``clipping_range`` over ``quantization_range`` levels, an error
below ``2 clipping_range / quantization_range`` per coordinate. Since ``|u_ij| <= ||u_i|| <= C <= clipping_range``,
the quantization never clips a coordinate.

No robust rule can read masked updates: ARC, NNM, bucketing and every rule but the mean need the individual
updates, so :func:`check_secure_aggregation` refuses them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import FitIns, FitRes, Parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from torch import Tensor

from lightning_clip.flower.records import SECURE_WEIGHT_KEY, Layout
from lightning_clip.robust.options import ARCConfig

if TYPE_CHECKING:
    from flwr.app import ArrayRecord

    from lightning_clip.flower.strategy import FedARC

__all__ = ["check_secure_aggregation", "run_secure_round"]


def check_secure_aggregation(config: ARCConfig, workflow: Any) -> None:
    """Raise unless ``workflow`` is Flower's ``SecAggPlusWorkflow`` and ``config`` is the mean path it can compute.

    Raises:
        TypeError: If ``workflow`` is not a ``SecAggPlusWorkflow``.
        ValueError: For ARC, NNM, bucketing or a robust rule (none can read masked updates), without
            ``static_clip`` (the bound every site clips to), with ``static_clip`` above the workflow's
            ``clipping_range``, a ``max_weight`` that is not a whole number, or with DP noise.
    """
    if not isinstance(workflow, SecAggPlusWorkflow):
        raise TypeError("Expected argument `secure_aggregation` to be Flower's SecAggPlusWorkflow but got "
                        f"{workflow!r}")
    robust = [f"{name}={getattr(config, name)!r}" for name, plain in
              (("aggregator", "mean"), ("arc", False), ("nnm", False), ("bucket_size", 1))
              if getattr(config, name) != plain]
    if robust:
        raise ValueError(
            f"secure_aggregation (SecAgg+) cannot run with {', '.join(robust)}: the server sees only the sum of the "
            "masked updates, never an individual one, and no robust rule, ARC, NNM or bucketing can be computed "
            "from a sum. Use aggregator='mean', arc=False, nnm=False, bucket_size=1 with secure aggregation (each "
            "site clips its own update to static_clip), or drop secure aggregation to use the robust pipeline"
        )
    if config.static_clip is None:
        raise ValueError("secure_aggregation needs `static_clip`: the L2 bound every site clips its update to before "
                         "masking it (the server cannot clip what it cannot see)")
    if config.static_clip > workflow.clipping_range:
        raise ValueError(
            f"Expected the SecAggPlusWorkflow's `clipping_range` to be at least static_clip = {config.static_clip:g} "
            f"but got {workflow.clipping_range:g}: a clipped update's coordinates lie in [-static_clip, static_clip], "
            "and the quantization would cut the larger ones"
        )
    if float(workflow.max_weight) != int(workflow.max_weight):
        raise ValueError(f"Expected the SecAggPlusWorkflow's `max_weight` to be a whole number (every site reports "
                         f"it as its weight) but got {workflow.max_weight!r}")
    if config.dp_noise_multiplier > 0.0:
        raise ValueError("secure_aggregation with dp_noise_multiplier > 0 is not supported: Flower's DP wrappers "
                         "add their noise to replies the server can read")


class _Round(LegacyStrategy):
    """The legacy-API strategy SecAgg+ talks to for one round: FedAvg's sampled instructions in, the mean out."""

    def __init__(self, instructions: list[tuple[ClientProxy, FitIns]]) -> None:
        self.instructions = instructions
        self.mean: list[np.ndarray] | None = None
        self.results: list[tuple[ClientProxy, FitRes]] = []

    def initialize_parameters(self, client_manager: Any) -> Parameters | None:
        return None

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: Any) -> list[tuple[ClientProxy, FitIns]]:
        return self.instructions

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Any]]:
        # SecAgg+ sets every result's parameters to the unmasked mean it reconstructed
        self.results = results
        if results:
            self.mean = parameters_to_ndarrays(results[0][1].parameters)
            return results[0][1].parameters, {}
        return None, {}

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: Any) -> list[Any]:
        return []

    def aggregate_evaluate(self, server_round: int, results: list[Any],
                           failures: list[Any]) -> tuple[float | None, dict[str, Any]]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Any]] | None:
        return None


def _numeric(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def run_secure_round(strategy: FedARC, server_round: int, arrays: ArrayRecord, messages: list[Message],
                     grid: Grid) -> tuple[Tensor, MetricRecord | None] | None:
    """One SecAgg+ round with the sites of ``messages`` (FedAvg's sampling): the mean update ``[d]`` and the
    aggregated train metrics, or ``None`` when the protocol halted (too few sites answered)."""
    workflow = strategy.secure_aggregation
    assert workflow is not None and strategy.arc_config.static_clip is not None
    config: dict[str, Any] = {}
    if messages:
        config.update(next(iter(messages[0].content.config_records.values())))
    config[KEY_CLIPPING_NORM] = float(strategy.arc_config.static_clip)
    config[SECURE_WEIGHT_KEY] = int(workflow.max_weight)
    fitins = FitIns(compat.arrayrecord_to_parameters(arrays, keep_input=True), config)
    run_id = 0
    bridge = _Round([(GridClientProxy(msg.metadata.dst_node_id, grid, run_id), fitins) for msg in messages])
    context = LegacyContext(Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            config=ServerConfig(num_rounds=server_round), strategy=bridge)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: server_round})
    context.state.array_records[MAIN_PARAMS_RECORD] = arrays
    workflow(grid, context)
    if bridge.mean is None:
        return None
    layout = Layout(arrays)
    keys = list(arrays.keys())
    mean = torch.cat([torch.from_numpy(np.asarray(bridge.mean[keys.index(key)], dtype=np.float64)).reshape(-1)
                      for key in layout.keys])
    records = [RecordDict({"metrics": MetricRecord(_numeric(res.metrics))}) for _, res in bridge.results]
    metrics = strategy.train_metrics_aggr_fn(records, strategy.weighted_by_key) if records else None
    return mean, metrics
