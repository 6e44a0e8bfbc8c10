"""Client-level DP with Flower's own DP wrappers around FedARC: the noise Flower adds, the clipping on either
side, epsilon from the library's accountant in the round's metrics, the ddp_arc warning, and the refusals."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("flwr.serverapp")

import torch  # noqa: E402
from flwr.app import Array, ArrayRecord  # noqa: E402
from flwr.server.workflow import SecAggPlusWorkflow  # noqa: E402
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping  # noqa: E402

from lightning_clip.flower import FedARC, InProcessGrid, differential_privacy, lightning_client_app  # noqa: E402
from lightning_clip.flower.privacy import ClientSideDP, ServerSideDP  # noqa: E402
from lightning_clip.tags import DP_EPSILON  # noqa: E402
from tests.helpers.flower import initial_arrays, replies, site_data, site_module  # noqa: E402

SIGMA, C, DELTA = 0.8, 0.5, 1e-5


def _strategy(**kwargs) -> FedARC:
    options = {"num_byzantine": 0, "arc": False, "static_clip": C, "dp_noise_multiplier": SIGMA, "dp_delta": DELTA,
               "min_train_nodes": 8, **kwargs}
    return FedARC(**options)


def _flat(record: ArrayRecord) -> torch.Tensor:
    return torch.cat([torch.from_numpy(record[k].numpy()).reshape(-1) for k in record]).double()


def test_flowers_server_side_wrapper_clips_and_adds_noise_of_std_sigma_c_over_m():
    m, d = 8, 40_000
    g = ArrayRecord({"w": Array(np.zeros(d, dtype=np.float32))})
    x = torch.randn(m, d, generator=torch.Generator().manual_seed(0)) * 0.01  # norms ~2 > C: every site clipped
    dp = differential_privacy(_strategy(), num_sampled_clients=m)
    assert isinstance(dp, DifferentialPrivacyServerSideFixedClipping) and isinstance(dp, ServerSideDP)
    dp.current_arrays = dp.strategy.current_arrays = g  # what configure_train keeps
    np.random.seed(0)  # Flower draws the noise from numpy's global generator
    arrays, metrics = dp.aggregate_train(1, replies(g, x))
    clipped = x.double() * (C / x.double().norm(dim=1, keepdim=True)).clamp(max=1.0)
    noise = _flat(arrays) - clipped.mean(dim=0)
    assert float(noise.std()) == pytest.approx(SIGMA * C / m, rel=0.02)
    assert abs(float(noise.mean())) < 5 * SIGMA * C / m / d**0.5
    assert metrics[DP_EPSILON] == pytest.approx(dp.dp_epsilon(1))


def test_epsilon_is_the_library_accountants_and_agrees_with_an_independent_pld_accountant():
    dp_accounting = pytest.importorskip("dp_accounting")
    dp = differential_privacy(_strategy(), num_sampled_clients=8)
    for rounds in (1, 10, 100):
        acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)  # within 1e-7 here
        acc.compose(dp_accounting.GaussianDpEvent(SIGMA), rounds)
        assert dp.dp_epsilon(rounds) == pytest.approx(acc.get_epsilon(DELTA), rel=0.01)


def test_the_rdp_accountant_is_used_when_the_config_names_it():
    dp_accounting = pytest.importorskip("dp_accounting")
    dp = differential_privacy(_strategy(dp_accountant="rdp"), num_sampled_clients=8)
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(SIGMA), 10)
    assert dp.dp_epsilon(10) == pytest.approx(acc.get_epsilon(DELTA), rel=1e-6)
    assert dp.dp_epsilon(10) > differential_privacy(_strategy(), num_sampled_clients=8).dp_epsilon(10)  # RDP is looser


def test_client_side_clipping_epsilon_per_round_and_fedavgs_sampling_in_a_run():
    norms = []

    def record(update, site):
        norms.append(float(update.norm()))
        return update

    sites = 4
    grid = InProcessGrid(lightning_client_app(site_module, site_data, steps=3, update_transform=record), sites)
    dp = differential_privacy(_strategy(min_train_nodes=sites, min_available_nodes=sites, fraction_evaluate=0.0,
                                        static_clip=0.05),
                              num_sampled_clients=sites, clipping="client")
    assert isinstance(dp, ClientSideDP)
    result = dp.start(grid=grid, initial_arrays=initial_arrays(), num_rounds=3)
    assert len(norms) == 3 * sites and max(norms) <= 0.05 * (1 + 1e-5)  # every site clipped to C itself
    eps = [result.train_metrics_clientapp[r][DP_EPSILON] for r in (1, 2, 3)]
    assert eps == pytest.approx([dp.dp_epsilon(r) for r in (1, 2, 3)]) and eps[0] < eps[1] < eps[2]
    assert dp.releases == 3


def test_dp_with_arc_or_a_robust_rule_warns_as_ddp_arc_does():
    with pytest.warns(UserWarning, match="not a guarantee for this setting"):
        strategy = _strategy(arc=True, aggregator="cwtm", nnm=True, num_byzantine=1)
    assert isinstance(differential_privacy(strategy, num_sampled_clients=8), ServerSideDP)


@pytest.mark.parametrize(("strategy_kwargs", "dp_kwargs", "error", "match"), [
    ({"dp_noise_multiplier": 0.0}, {}, ValueError, "dp_noise_multiplier"),
    ({"dp_sampling_rate": 0.1}, {}, ValueError, "dp_sampling_rate"),
    ({}, {"num_sampled_clients": 0}, ValueError, "num_sampled_clients"),
    ({}, {"clipping": "both"}, ValueError, "clipping"),
])
def test_bad_dp_settings_fail_before_any_round(strategy_kwargs, dp_kwargs, error, match):
    with pytest.raises(error, match=match):
        differential_privacy(_strategy(**strategy_kwargs), **{"num_sampled_clients": 8, **dp_kwargs})


def test_dp_needs_a_fedarc_and_secure_aggregation_refuses_noise():
    with pytest.raises(TypeError, match="FedARC"):
        differential_privacy(object(), num_sampled_clients=4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dp_noise_multiplier > 0 is not supported"):
        FedARC(num_byzantine=0, arc=False, static_clip=0.5, dp_noise_multiplier=1.0,
               secure_aggregation=SecAggPlusWorkflow(num_shares=3, reconstruction_threshold=2))
