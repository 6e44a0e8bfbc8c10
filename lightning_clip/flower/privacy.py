"""Client-level differential privacy for :class:`~lightning_clip.flower.FedARC` with Flower's own DP wrappers.

:func:`differential_privacy` wraps the strategy in Flower's ``DifferentialPrivacyServerSideFixedClipping``
(the server clips every update to ``C = static_clip``) or ``DifferentialPrivacyClientSideFixedClipping``
(each site clips; :func:`~lightning_clip.flower.lightning_client_app` does it when the round's config holds
``clipping_norm``), which add ``N(0, (sigma C / m)^2)`` noise to the aggregate, ``m = num_sampled_clients``:
DP-FedAvg. The settings are the strategy's :class:`~lightning_clip.robust.options.ARCConfig`
(``dp_noise_multiplier`` = sigma, ``static_clip`` = C, ``dp_delta``), so a DP run is declared once; the
combination with ARC, NNM or a robust rule warns there, as in ``ddp_arc`` (the sensitivity of the aggregate is
established for the mean of clipped updates only). FedARC's pipeline clips at ``static_clip`` again on the server,
which also bounds a site that skipped its own clipping.

Epsilon comes from the library's accountant (:func:`lightning_clip.robust.privacy.epsilon`, with the strategy's
``dp_accountant``): after every noisy round it is logged and added to the round's train metrics as ``dp/epsilon``.
Flower samples a fixed number of sites per round (not Poisson sampling), so no amplification by sampling is
claimed: ``dp_sampling_rate`` must be 1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import INFO
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Result,
)
from flwr.supercore import log

from lightning_clip.exceptions import check_choice, check_positive_int
from lightning_clip.flower.strategy import FedARC
from lightning_clip.robust import privacy
from lightning_clip.tags import DP_EPSILON

__all__ = ["CLIPPING_SIDES", "ClientSideDP", "ServerSideDP", "differential_privacy"]

#: Where the updates are clipped to ``static_clip``: by the server or by each site.
CLIPPING_SIDES = ("server", "client")


class _Accounted:
    """Counts the noisy releases of a Flower DP wrapper around a FedARC and reports epsilon after each."""

    strategy: Any  # the FedARC inside (Flower's wrappers declare it a Strategy)
    noise_multiplier: float
    releases: int

    def dp_epsilon(self, rounds: int | None = None) -> float:
        """Epsilon at ``dp_delta`` after ``rounds`` noisy rounds (default: the rounds released so far)."""
        cfg = self.strategy.arc_config
        return privacy.epsilon(cfg.dp_noise_multiplier, cfg.dp_sampling_rate,
                               self.releases if rounds is None else rounds, cfg.dp_delta, cfg.dp_accountant)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)  # type: ignore[misc]
        if arrays is not None:
            self.releases += 1
            eps = self.dp_epsilon()
            metrics = MetricRecord() if metrics is None else metrics
            metrics[DP_EPSILON] = eps
            log(INFO, "FedARC client-level DP: epsilon = %.4g at delta = %g after %d noisy rounds (noise multiplier "
                "%g)", eps, self.strategy.arc_config.dp_delta, self.releases, self.noise_multiplier)
        return arrays, metrics

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None) -> Result:
        """Flower's ``Strategy.start`` after the strategy's checks of ``initial_arrays``."""
        self.strategy.check_arrays(initial_arrays)
        return super().start(grid, initial_arrays, num_rounds, timeout,  # type: ignore[misc]
                             train_config, evaluate_config, evaluate_fn)


class ServerSideDP(_Accounted, DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed-clipping DP wrapper around a FedARC, with the library's epsilon."""

    def __init__(self, strategy: FedARC, noise_multiplier: float, clipping_norm: float,
                 num_sampled_clients: int) -> None:
        super().__init__(strategy, noise_multiplier, clipping_norm, num_sampled_clients)
        self.releases = 0


class ClientSideDP(_Accounted, DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed-clipping DP wrapper around a FedARC, with the library's epsilon."""

    def __init__(self, strategy: FedARC, noise_multiplier: float, clipping_norm: float,
                 num_sampled_clients: int) -> None:
        super().__init__(strategy, noise_multiplier, clipping_norm, num_sampled_clients)
        self.releases = 0


def differential_privacy(strategy: FedARC, num_sampled_clients: int, *,
                         clipping: str = "server") -> ServerSideDP | ClientSideDP:
    """``strategy`` inside Flower's fixed-clipping DP wrapper, configured from its ``arc_config``.

    Example::

        strategy = FedARC(num_byzantine=0, arc=False, static_clip=1.0, dp_noise_multiplier=1.1,
                          min_train_nodes=20, min_available_nodes=20)
        result = differential_privacy(strategy, num_sampled_clients=20).start(grid, arrays, num_rounds=50)

    Args:
        strategy: The FedARC; its ``dp_noise_multiplier`` (positive), ``static_clip`` and ``dp_delta`` set the
            mechanism.
        num_sampled_clients: The number of sites sampled each round (the ``m`` of the noise ``sigma C / m``).
        clipping: ``"server"``: the server clips each update; ``"client"``: each site clips its own.

    Raises:
        ValueError: Without noise, with ``dp_sampling_rate < 1``, or for a bad argument (a FedARC with secure
            aggregation and noise is refused when it is built).
    """
    if not isinstance(strategy, FedARC):
        raise TypeError(f"Expected argument `strategy` to be a FedARC but got {type(strategy).__name__}")
    check_positive_int("num_sampled_clients", num_sampled_clients)
    check_choice("clipping", clipping, CLIPPING_SIDES)
    cfg = strategy.arc_config
    if cfg.dp_noise_multiplier <= 0.0 or cfg.static_clip is None:
        raise ValueError(f"differential_privacy needs the strategy's `dp_noise_multiplier` > 0 (got "
                         f"{cfg.dp_noise_multiplier:g}) and `static_clip`, the clip bound C")
    if cfg.dp_sampling_rate != 1.0:
        raise ValueError(
            f"Expected `dp_sampling_rate` = 1.0 with Flower but got {cfg.dp_sampling_rate:g}: Flower samples a fixed "
            "number of sites per round, not each site independently, so the accountant's amplification by Poisson "
            "sampling does not apply; epsilon is reported for every site taking part in every round"
        )
    privacy.epsilon(cfg.dp_noise_multiplier, 1.0, 1, cfg.dp_delta, cfg.dp_accountant)  # answers before any round
    cls: Any = ServerSideDP if clipping == "server" else ClientSideDP
    return cls(strategy, cfg.dp_noise_multiplier, cfg.static_clip, num_sampled_clients)
