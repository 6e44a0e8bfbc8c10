"""Byzantine attacks, the seed-001 fixed clipping baseline and ByzantineSpec."""

from __future__ import annotations

import dataclasses
import math
from statistics import NormalDist

import numpy as np
import pytest
import torch

from lightning_clip.sim.attacks import (
    ATTACKS,
    FOE_EPS,
    IPM_EPS,
    alie,
    alie_z,
    fixed_clip_defence,
    foe,
    gaussian,
    honest_std,
    inf_attack,
    ipm,
    nan_attack,
    scale,
    sign_flip,
    zero,
)
from lightning_clip.sim.byzantine import ByzantineSpec

OWN = torch.tensor([3.0, -4.0, 0.5])
HONEST = torch.tensor([[1.0, 2.0, 0.0], [3.0, 2.0, 1.0], [2.0, 5.0, -1.0], [2.0, 3.0, 0.0]])


# ----------------------------------------------------------------------------- simple attacks


def test_simple_attacks():
    assert torch.equal(sign_flip(OWN), -OWN)
    assert torch.equal(scale(OWN, -100.0), OWN * -100)
    assert torch.equal(scale(OWN, 2), OWN * 2)
    assert torch.isnan(nan_attack(OWN)).all() and nan_attack(OWN).shape == OWN.shape
    assert torch.equal(inf_attack(OWN), torch.full((3,), math.inf))
    assert torch.equal(zero(OWN), torch.zeros(3))
    x16 = OWN.to(torch.bfloat16)
    for fn in (sign_flip, nan_attack, inf_attack, zero):
        assert fn(x16).dtype == torch.bfloat16
    assert torch.equal(OWN, torch.tensor([3.0, -4.0, 0.5]))  # input untouched


def test_scale_validation():
    with pytest.raises(ValueError, match=r"`factor` to be a finite number but got inf"):
        scale(OWN, math.inf)
    with pytest.raises(TypeError, match=r"`factor` to be a number"):
        scale(OWN, True)
    with pytest.raises(TypeError, match=r"`own` to be a torch.Tensor"):
        sign_flip([1.0])  # type: ignore[arg-type]


def test_gaussian_is_deterministic_given_a_seed_or_generator():
    own = torch.zeros(1000, dtype=torch.float64)
    a = gaussian(own, std=2.0, generator=123)
    b = gaussian(own, std=2.0, generator=torch.Generator().manual_seed(123))
    assert torch.equal(a, b)
    assert not torch.equal(a, gaussian(own, std=2.0, generator=124))
    assert a.dtype == torch.float64 and a.shape == own.shape
    big = gaussian(torch.zeros(200_000), std=3.0, mean=1.0, generator=0)
    assert abs(big.mean().item() - 1.0) < 0.05
    assert abs(big.std().item() - 3.0) < 0.05
    assert gaussian(torch.zeros(4, 5, dtype=torch.bfloat16), generator=0).shape == (4, 5)
    assert gaussian(OWN).shape == OWN.shape  # global generator


def test_gaussian_validation():
    with pytest.raises(ValueError, match=r"`std` to be a positive finite number but got 0.0"):
        gaussian(OWN, std=0.0)
    with pytest.raises(TypeError, match=r"`generator` to be a torch.Generator, an int seed or None"):
        gaussian(OWN, generator="seed")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- ALIE


@pytest.mark.parametrize(
    ("n", "f", "expected"),
    [(50, 24, 1.7506860712521692), (10, 2, 0.2533471031357997), (11, 3, 0.6045853465832371)],
)
def test_alie_z_hand_values(n, f, expected):
    # n=50, f=24: s = 26 - 24 = 2, Phi^-1(48/50); n=10, f=2: s = 4, Phi^-1(0.6); n=11, f=3: s = 3, Phi^-1(8/11).
    assert alie_z(n, f) == pytest.approx(expected, rel=1e-12)


def test_alie_z_matches_normal_quantile():
    for n in range(3, 60):
        for f in range(1, n // 2 + 1):
            s = math.floor(n / 2 + 1) - f
            if 1 <= s <= n - 1:
                assert alie_z(n, f) == pytest.approx(NormalDist().inv_cdf((n - s) / n), rel=1e-9, abs=1e-12)


def test_alie_z_rejects_infinite_quantile():
    with pytest.raises(ValueError, match=r"s = floor\(n/2 \+ 1\) - num_byzantine to satisfy 1 <= s <= n - 1"):
        alie_z(4, 3)  # s = 0
    with pytest.raises(ValueError, match=r"got s = 2"):
        alie_z(2, 0)  # s = n


def test_alie_vector():
    f = 2
    z = alie_z(HONEST.shape[0] + f, f)  # n = 6: s = 2, Phi^-1(4/6)
    assert z == pytest.approx(NormalDist().inv_cdf(4 / 6))
    h = HONEST.numpy()
    expected = h.mean(axis=0) - z * h.std(axis=0)  # population std
    np.testing.assert_allclose(alie(HONEST, num_byzantine=f).numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(alie(HONEST, z=1.5).numpy(), h.mean(axis=0) - 1.5 * h.std(axis=0), rtol=1e-6)
    assert torch.equal(alie(HONEST[:1], z=1.0), HONEST[0])  # one honest row: std 0
    assert alie(HONEST.double(), z=1.0).dtype == torch.float64
    with pytest.raises(ValueError, match=r"`num_byzantine` or `z`"):
        alie(HONEST)
    with pytest.raises(ValueError, match=r"`honest` to be a 2-D tensor \[n, d\]"):
        alie(OWN, z=1.0)


def test_alie_either_sign_and_either_std():
    h = HONEST.double().numpy()
    # z < 0 moves above the mean; correction = 1 is the sample std (numpy's ddof=1): mean + tau * sample std
    np.testing.assert_allclose(alie(HONEST.double(), z=-2.5, correction=1).numpy(),
                               h.mean(axis=0) + 2.5 * h.std(axis=0, ddof=1), rtol=1e-12)
    np.testing.assert_allclose(alie(HONEST.double(), z=-2.5).numpy(), h.mean(axis=0) + 2.5 * h.std(axis=0),
                               rtol=1e-12)
    np.testing.assert_allclose(honest_std(HONEST.double(), 1).numpy(), h.std(axis=0, ddof=1), rtol=1e-12)
    assert torch.equal(alie(HONEST, z=0.0, correction=1), HONEST.mean(dim=0))
    with pytest.raises(ValueError, match=r"at least 2 honest rows for the sample std"):
        alie(HONEST[:1], z=1.0, correction=1)
    for bad in (2, -1, True, 0.5):
        with pytest.raises(ValueError, match=r"`correction` to be 0 \(population std\) or 1 \(sample std\)"):
            alie(HONEST, z=1.0, correction=bad)


# ----------------------------------------------------------------------------- FOE / IPM


def test_foe_and_ipm():
    m = HONEST.mean(dim=0)
    assert FOE_EPS == 10.0 and IPM_EPS == 0.1
    torch.testing.assert_close(foe(HONEST), -10.0 * m)
    torch.testing.assert_close(ipm(HONEST), -0.1 * m)
    torch.testing.assert_close(foe(HONEST, eps=3.0), -3.0 * m)
    torch.testing.assert_close(foe(HONEST, eps=-3.0), 3.0 * m)  # either sign
    with pytest.raises(ValueError, match=r"`eps` to be a finite number but got inf"):
        foe(HONEST, eps=math.inf)
    with pytest.raises(ValueError, match=r"`eps` to be a positive finite number but got -1.0"):
        ipm(HONEST, eps=-1.0)


# ----------------------------------------------------------------------------- fixed clipping of Byzantine vectors


def test_fixed_clip_defence_matches_torch_clip_grad_norm():
    for g in [torch.tensor([30.0, -40.0]), torch.tensor([0.3, 0.4]), torch.tensor([1.2, 1.6])]:
        p = torch.nn.Parameter(torch.zeros(2))
        p.grad = g.clone()
        torch.nn.utils.clip_grad_norm_([p], max_norm=2.0)
        torch.testing.assert_close(fixed_clip_defence(g), p.grad, rtol=0, atol=0)
    out = fixed_clip_defence(torch.tensor([30.0, -40.0]), max_norm=5.0)
    assert torch.linalg.vector_norm(out).item() == pytest.approx(5.0, rel=1e-6)
    assert torch.equal(fixed_clip_defence(torch.tensor([0.3, 0.4])), torch.tensor([0.3, 0.4]))
    assert fixed_clip_defence(OWN.to(torch.bfloat16)).dtype == torch.bfloat16


def test_fixed_clip_defence_does_not_stop_non_finite():
    # Like torch's clip_grad_norm_: a baseline, not a NaN guard (ARC is).
    assert torch.isnan(fixed_clip_defence(torch.tensor([math.nan, 1.0]))).any()
    assert torch.isnan(fixed_clip_defence(torch.tensor([math.inf, 1.0]))).any()
    with pytest.raises(ValueError, match=r"`max_norm` to be a positive finite number"):
        fixed_clip_defence(OWN, max_norm=0.0)


# ----------------------------------------------------------------------------- ByzantineSpec


def test_registry_names():
    assert list(ATTACKS) == ["sign_flip", "scale", "gaussian", "nan", "inf", "zero", "alie", "foe", "ipm"]


def test_spec_basics():
    spec = ByzantineSpec([3, 1], "scale", factor=-10)
    assert spec.ranks == (1, 3) and spec.num_byzantine == 2
    assert spec.params == {"factor": -10.0}
    assert spec.is_byzantine(3) and not spec.is_byzantine(0)
    assert not spec.needs_honest
    assert ByzantineSpec([0], "alie").needs_honest and ByzantineSpec([0], "foe").needs_honest
    assert ByzantineSpec([0], "ipm").needs_honest
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.attack = "zero"  # type: ignore[misc]
    assert spec == ByzantineSpec((1, 3), "scale", factor=-10.0)
    assert hash(spec) == hash(ByzantineSpec((1, 3), "scale", factor=-10.0))


@pytest.mark.parametrize(
    ("args", "kwargs", "exc", "match"),
    [
        (([1], "flip"), {}, ValueError, r"`attack` to be one of 'sign_flip', 'scale', .* but got 'flip'"),
        (([1], "sign_flip"), {"factor": 2.0}, ValueError, r"unexpected parameter `factor` = 2.0; allowed: none"),
        (([1], "foe"), {"z": 2.0}, ValueError, r"allowed: `eps`"),
        (([1], "alie"), {"correction": 3}, ValueError, r"`correction` to be 0 \(population std\) or 1"),
        (([1], "ipm"), {"eps": -1.0}, ValueError, r"`eps` to be a positive finite number"),
        (([1], "scale"), {}, ValueError, r"needs the parameter `factor`"),
        (([1], "gaussian"), {"std": -1.0}, ValueError, r"`std` to be a positive finite number"),
        (([1], "alie"), {"z": math.nan}, ValueError, r"`z` to be a finite number"),
        (([], "zero"), {}, ValueError, r"at least one rank"),
        (([1, 1], "zero"), {}, ValueError, r"distinct ranks"),
        (([-1], "zero"), {}, ValueError, r"non-negative integers"),
        (([1.0], "zero"), {}, ValueError, r"non-negative integers"),
        (("1", "zero"), {}, TypeError, r"`ranks` to be a sequence of integers"),
        (([1], 3), {}, TypeError, r"`attack` to be a string"),
        (([1], "zero"), {"fixed_clip": 0.0}, ValueError, r"`fixed_clip` to be a positive finite number"),
    ],
)
def test_spec_validation(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ByzantineSpec(*args, **kwargs)


def test_spec_from_config_and_back():
    spec = ByzantineSpec.from_config({"ranks": [1], "attack": "sign_flip"})
    assert spec == ByzantineSpec([1], "sign_flip")
    flat = ByzantineSpec.from_config({"ranks": [2, 0], "attack": "gaussian", "std": 5.0, "fixed_clip": 2.0})
    nested = ByzantineSpec.from_config({"ranks": [0, 2], "attack": "gaussian", "params": {"std": 5}, "fixed_clip": 2})
    assert flat == nested
    assert flat.to_config() == {"ranks": [0, 2], "attack": "gaussian", "std": 5.0, "fixed_clip": 2.0}
    assert ByzantineSpec.from_config(flat.to_config()) == flat
    assert ByzantineSpec.from_config({"ranks": 1, "attack": "zero"}).ranks == (1,)


def test_spec_from_config_errors():
    with pytest.raises(ValueError, match=r"keys `ranks` and `attack` but \['attack'\] missing"):
        ByzantineSpec.from_config({"ranks": [1]})
    with pytest.raises(TypeError, match=r"`config` to be a mapping"):
        ByzantineSpec.from_config([("ranks", [1])])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"given twice"):
        ByzantineSpec.from_config({"ranks": [1], "attack": "foe", "eps": 1.0, "params": {"eps": 2.0}})
    with pytest.raises(ValueError, match=r"unexpected parameter `rank`"):
        ByzantineSpec.from_config({"ranks": [1], "attack": "zero", "rank": 3})


def test_spec_apply_every_attack():
    m = HONEST.mean(dim=0)
    cases = {
        "sign_flip": ({}, -OWN),
        "scale": ({"factor": 3.0}, 3.0 * OWN),
        "zero": ({}, torch.zeros(3)),
        "inf": ({}, torch.full((3,), math.inf)),
        "foe": ({}, -10.0 * m),
        "ipm": ({"eps": 0.5}, -0.5 * m),
        "alie": ({}, alie(HONEST, num_byzantine=2)),
    }
    for attack, (params, expected) in cases.items():
        spec = ByzantineSpec([4, 5], attack, **params)
        torch.testing.assert_close(spec.apply(OWN, HONEST), expected)
    torch.testing.assert_close(ByzantineSpec([4], "foe", eps=-2.0).apply(OWN, HONEST), 2.0 * m)
    torch.testing.assert_close(ByzantineSpec([4], "alie", z=-1.0, correction=1).apply(OWN, HONEST),
                               m + HONEST.std(dim=0, correction=1))
    assert torch.isnan(ByzantineSpec([0], "nan").apply(OWN)).all()
    g = ByzantineSpec([0], "gaussian", std=1.0)
    assert torch.equal(g.apply(OWN, generator=7), gaussian(OWN, std=1.0, generator=7))


def test_spec_apply_shapes_dtypes_and_errors():
    spec = ByzantineSpec([0], "foe")
    with pytest.raises(ValueError, match=r"needs the honest vectors"):
        spec.apply(OWN)
    with pytest.raises(ValueError, match=r"`honest` to have shape \[h, \*own.shape\] = \[h, 3\] but got \(4, 2\)"):
        spec.apply(OWN, HONEST[:, :2])
    own = torch.zeros(2, 3, dtype=torch.bfloat16)
    out = spec.apply(own, torch.ones(4, 2, 3))
    assert out.shape == (2, 3) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out, torch.full((2, 3), -10.0, dtype=torch.bfloat16))


def test_spec_fixed_clip_applies_after_the_attack():
    spec = ByzantineSpec([1], "scale", factor=100.0, fixed_clip=2.0)
    out = spec.apply(OWN)
    assert torch.linalg.vector_norm(out).item() == pytest.approx(2.0, rel=1e-5)
    torch.testing.assert_close(out / torch.linalg.vector_norm(out), OWN / torch.linalg.vector_norm(OWN))


def test_spec_check_world_size():
    ByzantineSpec([0, 3], "sign_flip").check_world_size(4)
    with pytest.raises(ValueError, match=r"\[0, world_size\) = \[0, 4\) but got \[0, 4\]"):
        ByzantineSpec([0, 4], "sign_flip").check_world_size(4)
    with pytest.raises(ValueError, match=r"at least one honest rank"):
        ByzantineSpec([0, 1], "foe").check_world_size(2)
    with pytest.raises(ValueError, match=r"pass `z` explicitly"):
        ByzantineSpec([0, 1, 2], "alie").check_world_size(4)
    ByzantineSpec([0, 1, 2], "alie", z=1.0).check_world_size(4)
    with pytest.raises(ValueError, match=r"`world_size` to be a positive integer"):
        ByzantineSpec([0], "zero").check_world_size(0)
