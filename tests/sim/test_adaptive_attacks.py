"""Adaptive attacks: mimic and the line-searched FOE / ALIE (``foe_ls``, ``alie_ls``), on small hand cases.

The hook-level runs of these attacks (real gloo processes, with and without worker momentum) are in
``test_worker_momentum.py``.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from lightning_clip.robust.pipeline import aggregate
from lightning_clip.sim.adaptive import (
    ADAPTIVE_ATTACKS,
    ALIE_LS_GRID,
    FOE_LS_GRID,
    alie_ls,
    attack_deviation,
    foe_ls,
    mimic,
    search_factor,
)
from lightning_clip.sim.attacks import ATTACKS, FOE_EPS, alie, alie_z, foe
from lightning_clip.sim.byzantine import ATTACK_NAMES, ByzantineSpec

# 5 honest workers in 3 dimensions; 2 Byzantine copies -> n = 7.
HONEST = torch.tensor(
    [[1.0, 2.0, 0.0], [3.0, 2.0, 1.0], [2.0, 5.0, -1.0], [2.0, 3.0, 0.0], [0.5, 2.5, 0.5]], dtype=torch.float64
)
COPIES = 2


def server(name: str, f: int, nnm: bool = False, arc: bool = False):
    return functools.partial(aggregate, rule=name, num_byzantine=f, nnm=nnm, arc=arc)


def fixed(attack: str) -> torch.Tensor:
    """The attack with its fixed default factor (FOE: eps = 10; ALIE: z = alie_z(n, f))."""
    return foe(HONEST) if attack == "foe" else alie(HONEST, num_byzantine=COPIES)


def searched(attack: str, aggregation, **kwargs) -> torch.Tensor:
    fn = foe_ls if attack == "foe" else alie_ls
    return fn(HONEST, COPIES, aggregation, **kwargs)


def deviation(vector: torch.Tensor, aggregation) -> float:
    return float(attack_deviation(HONEST, vector, COPIES, aggregation))


#: (server, attack) pairs where the searched factor deviates the aggregate strictly more than the default.
STRICT = [
    (("mean", 1, False, True), "foe"),
    (("mean", 1, False, True), "alie"),
    (("cwtm", 1, False, True), "foe"),
    (("cwtm", 2, False, False), "alie"),
    (("cwtm", 2, True, True), "foe"),
    (("cwtm", 2, True, True), "alie"),
    (("median", 2, False, False), "alie"),
    (("geomed", 2, False, True), "alie"),
    (("krum", 2, False, False), "alie"),
    (("multikrum", 2, True, False), "foe"),
    (("multikrum", 2, True, False), "alie"),
]
#: Every server configuration tried: ARC on/off, NNM on/off, each rule.
SERVERS = sorted({s for s, _ in STRICT} | {("cwtm", 2, False, False), ("median", 2, False, False),
                                           ("krum", 2, False, False), ("geomed", 2, False, True),
                                           ("mean", 2, True, False)})


# ----------------------------------------------------------------------------- the line search


@pytest.mark.parametrize(("cfg", "attack"), STRICT, ids=[f"{'+'.join(map(str, c))}-{a}" for c, a in STRICT])
def test_line_search_beats_the_default_factor(cfg, attack):
    agg = server(*cfg)
    assert deviation(searched(attack, agg), agg) > deviation(fixed(attack), agg) * (1 + 1e-6)


@pytest.mark.parametrize("cfg", SERVERS, ids=["+".join(map(str, c)) for c in SERVERS])
@pytest.mark.parametrize("attack", ["foe", "alie"])
def test_line_search_never_worse_than_the_default_and_the_grid(cfg, attack):
    # The default factor is one of the candidates and refinement only keeps strict improvements.
    agg = server(*cfg)
    d_ls = deviation(searched(attack, agg), agg)
    d_grid = deviation(searched(attack, agg, refine=0), agg)
    assert d_ls >= d_grid >= deviation(fixed(attack), agg)
    grid = FOE_LS_GRID if attack == "foe" else ALIE_LS_GRID
    make = (lambda x: foe(HONEST, x)) if attack == "foe" else (lambda x: alie(HONEST, z=x))
    assert d_grid == max(deviation(make(x), agg) for x in grid)


def test_line_search_against_static_clipping():
    # Static clipping (C = 1, below most honest norms) bounds every vector. FOE's direction is fixed, so once
    # its copies exceed C every eps sends the same clipped vector: the search can only tie the default there.
    # ALIE's direction changes with z: the search finds a z the clipped pipeline follows further.
    agg = functools.partial(aggregate, rule="cwtm", num_byzantine=2, nnm=True, static_clip=1.0)
    assert deviation(searched("foe", agg), agg) == pytest.approx(deviation(fixed("foe"), agg), rel=1e-9)
    d_ls = deviation(searched("alie", agg), agg)
    assert d_ls > deviation(fixed("alie"), agg) * 1.01
    # It searched the clipped pipeline, not the bare rule.
    assert d_ls >= deviation(searched("alie", server("cwtm", 2, True)), agg)


def test_plain_mean_hand_case_picks_the_largest_eps():
    # Mean without ARC: aggregate - mean(H) = -c (1 + eps) mean(H) / n, increasing in eps.
    agg = server("mean", 2)
    assert search_factor("foe", HONEST, COPIES, agg) == max(FOE_LS_GRID) == 100.0
    mu = HONEST.mean(dim=0)
    expected = COPIES * (1 + 100.0) * float(mu.norm()) / (HONEST.shape[0] + COPIES)
    assert deviation(foe_ls(HONEST, COPIES, agg), agg) == pytest.approx(expected, rel=1e-12)


def test_candidates_include_the_default_factor():
    # With a grid that only holds worse factors, the default (eps = 10, z = alie_z) is chosen.
    agg = server("mean", 2)
    assert search_factor("foe", HONEST, COPIES, agg, grid=[0.1, 1.0], refine=0) == FOE_EPS
    z = search_factor("alie", HONEST, COPIES, agg, grid=[0.0, 0.1], refine=0)
    assert z == alie_z(HONEST.shape[0] + COPIES, COPIES)


def test_refinement_stays_in_the_bracket_and_improves_when_it_can():
    agg = server("cwtm", 2, True, True)
    z0 = search_factor("alie", HONEST, COPIES, agg, refine=0)
    z = search_factor("alie", HONEST, COPIES, agg, refine=8)
    grid = sorted(set(ALIE_LS_GRID) | {alie_z(7, 2)})
    i = grid.index(z0)
    assert grid[max(i - 1, 0)] <= z <= grid[min(i + 1, len(grid) - 1)]
    assert z != z0 and deviation(alie(HONEST, z=z), agg) > deviation(alie(HONEST, z=z0), agg)


def test_search_is_deterministic():
    for cfg in SERVERS:
        agg = server(*cfg)
        for attack in ("foe", "alie"):
            a, b = searched(attack, agg), searched(attack, agg)
            assert torch.equal(a, b)
            assert search_factor(attack, HONEST, COPIES, agg) == search_factor(attack, HONEST, COPIES, agg)
    spec = ByzantineSpec([5, 6], "alie_ls")
    agg = server("cwtm", 2, True, True)
    assert torch.equal(spec.apply(HONEST[0], HONEST, aggregation=agg), spec.apply(HONEST[0], HONEST, aggregation=agg))


def test_ties_go_to_the_smallest_factor():
    # 1-D, cwtm f=1: any negative Byzantine value is trimmed -> constant deviation for every eps.
    h = torch.tensor([[1.0], [2.0], [3.0]])
    assert search_factor("foe", h, 1, server("cwtm", 1)) == min(FOE_LS_GRID)


def test_dtypes_and_devices_are_kept():
    h32 = HONEST.float()
    out = foe_ls(h32, COPIES, server("cwtm", 2))
    assert out.dtype == torch.float32 and out.shape == (3,)
    out = ByzantineSpec([0], "foe_ls").apply(torch.zeros(3, dtype=torch.bfloat16), h32, aggregation=server("mean", 1))
    assert out.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- mimic


def test_mimic_returns_an_honest_vector():
    assert torch.equal(mimic(HONEST), HONEST[0])
    assert torch.equal(mimic(HONEST, target=3), HONEST[3])
    dist = (HONEST - HONEST.mean(dim=0)).norm(dim=1)
    assert torch.equal(mimic(HONEST, target="farthest"), HONEST[int(dist.argmax())])
    assert int(dist.argmax()) == 2  # hand check: [2, 5, -1] is the farthest from the mean
    out = mimic(HONEST)
    out += 1.0  # a copy, not a view
    assert torch.equal(HONEST[0], torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64))


def test_mimic_through_the_spec():
    honest = HONEST.reshape(5, 3, 1)  # [h, *own.shape]
    own = torch.zeros(3, 1, dtype=torch.float64)
    assert torch.equal(ByzantineSpec([5], "mimic").apply(own, honest), honest[0])
    assert torch.equal(ByzantineSpec([5], "mimic", target=4).apply(own, honest), honest[4])
    assert any(torch.equal(ByzantineSpec([5], "mimic", target="farthest").apply(own, honest), row) for row in honest)


# ----------------------------------------------------------------------------- registry and spec


def test_registry():
    assert list(ATTACKS) == ["sign_flip", "scale", "gaussian", "nan", "inf", "zero", "alie", "foe", "ipm"]
    assert list(ADAPTIVE_ATTACKS) == ["mimic", "foe_ls", "alie_ls"]
    assert list(ATTACK_NAMES) == [*ATTACKS, *ADAPTIVE_ATTACKS]
    for name in ADAPTIVE_ATTACKS:
        spec = ByzantineSpec([1], name)
        assert spec.needs_honest
        assert spec.needs_aggregation == (name != "mimic")
    assert not ByzantineSpec([1], "foe").needs_aggregation


def test_spec_config_round_trip():
    spec = ByzantineSpec([2], "foe_ls", grid=[1, 2.5, 10], refine=3)
    assert spec.params == {"grid": (1.0, 2.5, 10.0), "refine": 3}
    config = spec.to_config()
    assert config == {"ranks": [2], "attack": "foe_ls", "grid": [1.0, 2.5, 10.0], "refine": 3}
    assert ByzantineSpec.from_config(config) == spec and hash(ByzantineSpec.from_config(config)) == hash(spec)
    nested = ByzantineSpec.from_config({"ranks": [0], "attack": "mimic", "params": {"target": "farthest"}})
    assert nested.params == {"target": "farthest"}


def test_spec_apply_matches_the_functions():
    agg = server("cwtm", 2, True, True)
    for name, fn in (("foe_ls", foe_ls), ("alie_ls", alie_ls)):
        spec = ByzantineSpec([5, 6], name, grid=[0.5, 1.0, 2.0], refine=2)
        expected = fn(HONEST, 2, agg, grid=[0.5, 1.0, 2.0], refine=2)
        assert torch.equal(spec.apply(HONEST[0], HONEST, aggregation=agg), expected)


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda: search_factor("ipm", HONEST, 1, server("mean", 1)), ValueError, r"`attack` to be one of 'foe'"),
        (lambda: search_factor("foe", HONEST, 1, server("mean", 1), grid=[]), ValueError, r"`grid`.*at least one"),
        (lambda: search_factor("foe", HONEST, 1, server("mean", 1), grid=[1.0, -2.0]), ValueError,
         r"`grid\[1\]` to be a positive finite number but got -2.0"),
        (lambda: search_factor("alie", HONEST, 1, server("mean", 1), grid=[math.nan]), ValueError,
         r"`grid\[0\]` to be a finite number"),
        (lambda: search_factor("alie", HONEST, 1, server("mean", 1), grid="12"), TypeError, r"`grid` to be a sequence"),
        (lambda: search_factor("foe", HONEST, 1, server("mean", 1), refine=-1), ValueError, r"`refine`"),
        (lambda: search_factor("foe", HONEST, 0, server("mean", 1)), ValueError, r"`num_copies` to be a positive"),
        (lambda: search_factor("foe", HONEST, 1, "cwtm"), TypeError, r"`aggregation` to be a callable"),
        (lambda: search_factor("foe", HONEST, 1, lambda x: x), ValueError, r"return a vector of shape \[3\]"),
        (lambda: search_factor("foe", HONEST[0], 1, server("mean", 1)), ValueError, r"`honest` to be a 2-D"),
        (lambda: foe_ls(HONEST, 5, server("cwtm", 5)), ValueError, r"num_byzantine"),  # f >= n/2 at the server
        (lambda: mimic(HONEST, target=5), ValueError, r"0 <= target < 5, but got 5"),
        (lambda: mimic(HONEST, target=-1), ValueError, r"`target` to be a non-negative integer or 'farthest'"),
        (lambda: mimic(HONEST, target=True), ValueError, r"`target`"),
        (lambda: mimic(HONEST, target="nearest"), ValueError, r"`target`"),
        (lambda: ByzantineSpec([1], "foe_ls", grid=[]), ValueError, r"`grid`"),
        (lambda: ByzantineSpec([1], "foe_ls", eps=2.0), ValueError, r"unexpected parameter `eps`.*`grid`, `refine`"),
        (lambda: ByzantineSpec([1], "alie_ls", refine=1.5), TypeError, r"`refine`"),
        (lambda: ByzantineSpec([1], "mimic", target=-2), ValueError, r"`target`"),
        (lambda: ByzantineSpec([1], "foe_ls").apply(HONEST[0], HONEST), ValueError,
         r"'foe_ls' line-searches against the server's aggregation: pass `aggregation`"),
        (lambda: ByzantineSpec([1], "mimic").apply(HONEST[0]), ValueError, r"needs the honest vectors"),
        (lambda: ByzantineSpec([1], "mimic", target=2).check_world_size(3), ValueError,
         r"mimic `target` to index an honest rank, 0 <= target < 2"),
        (lambda: ByzantineSpec([0, 1], "foe_ls").check_world_size(2), ValueError, r"at least one honest rank"),
        (lambda: ByzantineSpec([1], "boom"), ValueError, r"'mimic', 'foe_ls', 'alie_ls' but got 'boom'"),
    ],
)
def test_validation_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_world_size_checks_pass_where_they_should():
    ByzantineSpec([1], "mimic", target=1).check_world_size(3)
    ByzantineSpec([1], "alie_ls").check_world_size(2)  # no default z for (n=2, f=1): the grid alone
    assert search_factor("alie", HONEST[:1], 1, server("mean", 0)) in ALIE_LS_GRID
