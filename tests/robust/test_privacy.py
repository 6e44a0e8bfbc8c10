"""Client-level DP: the pure maths (robust/privacy.py) and the settings' validation (ARCConfig, ARCDDPStrategy)."""

from __future__ import annotations

import math
import sys
import warnings

import numpy as np
import pytest
import torch

from lightning_clip.robust import privacy
from lightning_clip.robust.options import ARCConfig
from lightning_clip.robust.pipeline import preaggregation_stats, static_clip
from lightning_clip.robust.privacy import (
    COUNT_STREAM,
    adaptive_noise_multiplier,
    bound_stats,
    gaussian_noise,
    noise_seed,
    update_clip_bound,
)
from tests.helpers.reference import exact_gaussian_epsilon

# ---------------------------------------------------------------------------------------------------
# Noise


def test_noise_is_a_function_of_seed_step_and_stream():
    a = gaussian_noise(100, 1.0, seed=3, step=5)
    assert torch.equal(a, gaussian_noise(100, 1.0, seed=3, step=5))
    for other in (gaussian_noise(100, 1.0, 3, 6), gaussian_noise(100, 1.0, 4, 5),
                  gaussian_noise(100, 1.0, 3, 5, stream=COUNT_STREAM)):
        assert not torch.allclose(a, other)
    seeds = {noise_seed(s, t, k) for s in range(4) for t in range(50) for k in range(2)}
    assert len(seeds) == 4 * 50 * 2 and all(0 <= x < 2**63 for x in seeds)
    # seeds equal modulo 2^32 would share their noise: refused instead of wrapped around
    assert noise_seed(2**32 - 1, 0) != noise_seed(0, 0)
    with pytest.raises(ValueError, match=r"`seed` to be an integer in \[0, 2\*\*32\) but got 4294967296"):
        noise_seed(2**32, 0)
    # std may be a 0-d tensor (the adaptive bound): the same draw scaled.
    torch.testing.assert_close(gaussian_noise(100, torch.tensor(2.5), 3, 5), 2.5 * a)


def test_noisy_minus_noiseless_mean_has_mean_zero_and_variance_sigma_c_over_n_squared():
    # DP-FedAvg by hand: clip each row to C (torch's clip_grad_norm_ coefficient), sum, add the step's noise
    # N(0, sigma^2 C^2) once, divide by n; against the noiseless mean of the clipped rows.
    n, d, sigma, c, steps = 5, 400, 0.8, 1.5, 150
    gen = torch.Generator().manual_seed(0)
    diffs = []
    for step in range(steps):
        x = torch.randn(n, d, generator=gen) * 3.0
        coef = torch.clamp(c / (x.norm(dim=1, keepdim=True) + 1e-6), max=1.0)
        clipped = x * coef
        torch.testing.assert_close(clipped, static_clip(x, c))
        noisy = (clipped.sum(0) + gaussian_noise(d, sigma * privacy.sum_sensitivity(c), 11, step)) / n
        diffs.append((noisy - clipped.mean(0)).double().numpy())
    samples = np.concatenate(diffs)
    var = (sigma * c / n) ** 2
    m = samples.size
    assert abs(samples.mean()) < 4.0 * math.sqrt(var / m)
    assert abs(samples.var() - var) < 4.0 * var * math.sqrt(2.0 / m)


# ---------------------------------------------------------------------------------------------------
# Adaptive clip bound


def test_adaptive_noise_multiplier_is_andrew_et_al_theorem_1():
    z, sb = 1.0, 2.0
    z_v = adaptive_noise_multiplier(z, sb)
    # The two Gaussian mechanisms compose like one of multiplier z: z^-2 = z_v^-2 + (2 sb)^-2.
    assert z_v ** -2 + (2 * sb) ** -2 == pytest.approx(z ** -2)
    assert z_v > z
    with pytest.raises(ValueError, match="dp_clipped_count_stddev"):
        adaptive_noise_multiplier(1.0, 0.5)


def test_bound_update_is_the_geometric_step_on_the_noisy_count():
    norms = torch.tensor([0.5, 1.0, 2.0, 4.0])
    bound = torch.tensor(1.5)
    # Without count noise: 2 of 4 norms at or under 1.5.
    new = update_clip_bound(bound, norms, quantile=0.8, learning_rate=0.2, clipped_count_stddev=0.0, seed=0, step=0)
    assert float(new) == pytest.approx(1.5 * math.exp(-0.2 * (2 / 4 - 0.8)), rel=1e-6)
    # With it: the count gets the seeded draw of the count stream.
    noise = float(gaussian_noise(1, 0.7, 9, 3, stream=COUNT_STREAM)[0])
    new = update_clip_bound(bound, norms, 0.8, 0.2, 0.7, seed=9, step=3)
    assert float(new) == pytest.approx(1.5 * math.exp(-0.2 * ((2 + noise) / 4 - 0.8)), rel=1e-6)


def test_bound_tracks_the_quantile_of_the_norms():
    gen = torch.Generator().manual_seed(1)
    bound = torch.tensor(0.01)
    all_norms = []
    for step in range(600):
        norms = torch.exp(torch.randn(20, generator=gen))  # log-normal norms
        all_norms.append(norms)
        bound = update_clip_bound(bound, norms, 0.7, 0.2, 1.0, seed=2, step=step)
    target = float(np.quantile(torch.cat(all_norms[-200:]).numpy(), 0.7))
    assert float(bound) == pytest.approx(target, rel=0.25)


def test_bound_stats_is_the_static_clip_with_a_tensor_bound():
    norms = torch.tensor([0.5, 1.0, 3.0, float("nan"), 10.0])
    for arc in (False, True):
        want = preaggregation_stats(norms, 1, arc=arc, static_clip=1.2)
        got = bound_stats(preaggregation_stats(norms, 1, arc=arc), torch.tensor(1.2), arc)
        torch.testing.assert_close(got.scales, want.scales, equal_nan=True)
        assert torch.equal(got.clipped, want.clipped)
        torch.testing.assert_close(got.threshold, want.threshold)


# ---------------------------------------------------------------------------------------------------
# Accounting


def _accountant_epsilon(z: float, q: float, steps: int, delta: float) -> float:
    import dp_accounting

    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize(("z", "steps", "delta"), [(1.0, 200, 1e-5), (1.1, 500, 1e-5), (0.5, 10, 1e-6),
                                                   (4.0, 1, 1e-5), (2.0, 10_000, 1e-8), (0.3, 1000, 1e-5)])
def test_full_participation_is_the_exact_gaussian_epsilon(z, steps, delta):
    exact = exact_gaussian_epsilon(z, steps, delta)
    got = privacy.epsilon(z, 1.0, steps, delta)
    assert got == pytest.approx(exact, rel=1e-9) and got >= exact * (1 - 1e-9)
    assert got <= privacy.epsilon(z, 1.0, steps, delta, accountant="rdp")  # RDP is looser (1.9-8.3% here)


def test_sampled_epsilon_is_tight_between_opacus_prv_bounds_and_below_both_rdp_accountants():
    pytest.importorskip("dp_accounting")
    opacus = pytest.importorskip("opacus")
    from opacus.accountants import PRVAccountant
    from opacus.accountants.analysis import rdp as opacus_rdp

    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    delta = 1e-5
    for z, q, steps in [(0.5, 0.1, 1000), (0.8, 0.5, 100), (1.0, 0.01, 10_000), (1.0, 0.1, 1000),
                        (2.0, 0.05, 2000), (0.7, 0.02, 500)]:
        got = privacy.epsilon(z, q, steps, delta)
        acc = PRVAccountant()
        acc.history = [(z, q, steps)]
        dprv = acc._get_dprv(eps_error=0.01, delta_error=delta / 1000)
        lower, estimate, upper = dprv.compute_epsilon(delta, delta / 1000, 0.01)
        assert lower <= got <= upper + 1e-9, (z, q, steps, lower, got, upper)  # sound and tight
        assert got == pytest.approx(estimate, rel=0.01)
        rdp = opacus_rdp.get_privacy_spent(orders=orders, rdp=opacus_rdp.compute_rdp(
            q=q, noise_multiplier=z, steps=steps, orders=orders), delta=delta)[0]
        assert got <= rdp and got <= privacy.epsilon(z, q, steps, delta, accountant="rdp")
    assert opacus.__version__


def test_rdp_accountant_on_request_is_dp_accountings():
    pytest.importorskip("dp_accounting")
    for z, q, steps, delta in ((1.0, 1.0, 200, 1e-5), (0.5, 0.1, 1000, 1e-6), (2.0, 0.01, 10, 0.5)):
        assert privacy.epsilon(z, q, steps, delta, accountant="rdp") == _accountant_epsilon(z, q, steps, delta)


def test_epsilon_edges_and_order():
    assert privacy.epsilon(1.0, 1.0, 0, 1e-5) == 0.0
    assert privacy.epsilon(0.0, 1.0, 10, 1e-5) == math.inf
    assert privacy.epsilon(100.0, 1.0, 1, 0.5) == 0.0  # delta(0) is below 0.5 already
    # More noise, fewer steps, a larger delta: less epsilon.
    eps = [privacy.epsilon(z, 1.0, t, 1e-5) for z, t in ((2.0, 100), (1.0, 100), (1.0, 200))]
    assert eps[0] < eps[1] < eps[2]
    assert privacy.epsilon(1.0, 1.0, 100, 1e-3) < eps[1]
    with pytest.raises(ValueError, match="dp_delta"):
        privacy.epsilon(1.0, 1.0, 10, 1.0)
    with pytest.raises(ValueError, match=r"`dp_accountant` to be one of 'pld', 'rdp' but got 'prv'"):
        privacy.epsilon(1.0, 1.0, 10, 1e-5, accountant="prv")


def test_missing_accountant_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "dp_accounting", None)  # import raises ImportError
    with pytest.raises(ImportError, match=r"lightning-clip\[dp\]"):
        privacy.epsilon(1.0, 0.5, 10, 1e-5)
    with pytest.raises(ImportError, match=r"lightning-clip\[dp\]"):
        privacy.epsilon(1.0, 1.0, 10, 1e-5, accountant="rdp")
    assert privacy.epsilon(1.0, 1.0, 10, 1e-5) > 0  # exact without it
    from lightning_clip import ARCDDPStrategy

    for needs_it in ({"dp_sampling_rate": 0.5}, {"dp_accountant": "rdp"}):
        with pytest.raises(ImportError, match=r"lightning-clip\[dp\]"):
            ARCDDPStrategy(arc=False, static_clip=1.0, dp_noise_multiplier=1.0, **needs_it)
    # every rank in every step: epsilon is exact without the extra; without noise nothing is accounted
    assert ARCDDPStrategy(arc=False, static_clip=1.0, dp_noise_multiplier=1.0).dp_epsilon(10) > 0
    ARCDDPStrategy(arc=False, static_clip=1.0)


# ---------------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"dp_noise_multiplier": -0.5, "static_clip": 1.0}, "dp_noise_multiplier"),
    ({"dp_noise_multiplier": float("nan"), "static_clip": 1.0}, "dp_noise_multiplier"),
    ({"dp_noise_multiplier": 1.0}, "static_clip"),
    ({"dp_delta": 0.0}, "dp_delta"),
    ({"dp_delta": 1.0}, "dp_delta"),
    ({"dp_delta": -1e-5}, "dp_delta"),
    ({"dp_sampling_rate": 0.0}, "dp_sampling_rate"),
    ({"dp_sampling_rate": 1.5}, "dp_sampling_rate"),
    ({"dp_seed": -1}, "dp_seed"),
    ({"dp_clip_quantile": 1.0, "static_clip": 1.0}, "dp_clip_quantile"),
    ({"dp_clip_quantile": 0.5}, "static_clip"),
    ({"dp_clip_quantile": 0.5, "static_clip": 1.0, "aggregator": "cwtm"}, "aggregator"),
    ({"dp_clip_quantile": 0.5, "static_clip": 1.0, "dp_clip_learning_rate": 0.0}, "dp_clip_learning_rate"),
    ({"dp_clip_quantile": 0.5, "static_clip": 1.0, "dp_noise_multiplier": 1.0, "dp_clipped_count_stddev": 0.4},
     "dp_clipped_count_stddev"),
    ({"dp_clipped_count_stddev": -1.0}, "dp_clipped_count_stddev"),
])
def test_bad_settings_are_rejected_at_construction_naming_the_option(kwargs, name):
    from lightning_clip import ARCDDPStrategy

    for build in (ARCConfig, ARCDDPStrategy):
        with pytest.raises((ValueError, TypeError), match=name):
            build(arc=False, **kwargs)


def test_count_noise_default_is_checked_against_the_world_size():
    config = ARCConfig(arc=False, static_clip=1.0, dp_noise_multiplier=1.0, dp_clip_quantile=0.5)
    assert config.dp_count_stddev(100) == 5.0  # n / 20
    config.check_world_size(100)
    with pytest.raises(ValueError, match="dp_clipped_count_stddev"):
        config.check_world_size(10)  # 10 / 20 = 0.5 is not more than sigma / 2


def test_robust_rules_and_arc_warn_that_the_guarantee_is_not_established():
    for kwargs in ({"arc": True}, {"arc": False, "aggregator": "cwtm"}, {"arc": False, "nnm": True}):
        with pytest.warns(UserWarning, match="DP guarantee"):
            ARCConfig(static_clip=1.0, dp_noise_multiplier=1.0, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ARCConfig(arc=False, static_clip=1.0, dp_noise_multiplier=1.0)  # DP-FedAvg: no warning
        ARCConfig(static_clip=1.0, dp_noise_multiplier=0.0)  # no noise: no warning


def test_dp_state_is_shared_and_round_trips_the_adaptive_bound():
    config = ARCConfig(arc=False, static_clip=1.5, dp_noise_multiplier=1.0, dp_clip_quantile=0.5,
                       dp_clipped_count_stddev=0.6)
    state = privacy.DPState(config)
    assert not privacy.DPState.per_rank and float(state.bound) == 1.5  # starts at static_clip
    norms = torch.tensor([0.5, 1.0, 4.0])
    state.update_bound(norms, step=3)
    # The geometric update of the noisy unclipped fraction (2 of 3 below 1.5, plus the count's noise of step 3).
    below = (2.0 + 0.6 * float(gaussian_noise(1, 1.0, 0, 3, stream=COUNT_STREAM)[0])) / 3
    assert float(state.bound) == pytest.approx(1.5 * math.exp(-0.2 * (below - 0.5)), rel=1e-6)
    other = privacy.DPState(config)
    other.load_state_dict(state.state_dict())
    assert torch.equal(other.bound, state.bound)
    assert privacy.DPState(ARCConfig(arc=False, static_clip=1.0, dp_noise_multiplier=1.0)).state_dict() == {}
