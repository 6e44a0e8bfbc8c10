"""Adaptive attacks: mimic and the line-searched FOE / ALIE (``foe_ls``, ``alie_ls``), on small hand cases.

The hook-level runs of these attacks (real gloo processes, with and without worker momentum) are in
``test_worker_momentum.py``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import replace

import pytest
import torch

from lightning_clip.robust.pipeline import aggregate
from lightning_clip.sim.adaptive import (
    ADAPTIVE_ATTACKS,
    ALIE_LS_GRID,
    FOE_LS_GRID,
    LS_SEARCHES,
    LS_SIGNS,
    alie_ls,
    attack_deviation,
    foe_ls,
    line_search,
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


def coordinate_max(x: torch.Tensor) -> torch.Tensor:
    """A server that lets through only what lies above every honest row (hand cases for the sign)."""
    return x.max(dim=0).values


def coordinate_min(x: torch.Tensor) -> torch.Tensor:
    return x.min(dim=0).values


# ----------------------------------------------------------------------------- the line search


@pytest.mark.parametrize(("cfg", "attack"), STRICT, ids=[f"{'+'.join(map(str, c))}-{a}" for c, a in STRICT])
def test_line_search_beats_the_default_factor(cfg, attack):
    agg = server(*cfg)
    assert deviation(searched(attack, agg), agg) > deviation(fixed(attack), agg) * (1 + 1e-6)


@pytest.mark.parametrize("cfg", SERVERS, ids=["+".join(map(str, c)) for c in SERVERS])
@pytest.mark.parametrize("attack", ["foe", "alie"])
@pytest.mark.parametrize("search", LS_SEARCHES)
def test_line_search_never_worse_than_the_default_and_refinement_only_improves(cfg, attack, search):
    # Our search evaluates the default factor and keeps refined factors only when strictly better; "both" keeps
    # the better of the two searches.
    agg = server(*cfg)
    d = deviation(searched(attack, agg, search=search), agg)
    if search != "byzfl":
        assert d >= deviation(searched(attack, agg, search=search, refine=0), agg) >= deviation(fixed(attack), agg)
    if search == "both":
        assert d == max(deviation(searched(attack, agg, search=s), agg) for s in ("ours", "byzfl"))


@pytest.mark.parametrize("attack", ["foe", "alie"])
def test_the_search_covers_both_signs_without_a_cap(attack):
    # Only a Byzantine row above every honest row moves a coordinate-wise max: for FOE (-eps * mean, the mean
    # positive) that is eps < 0, for ALIE (mean - z * std) z < 0, and the deviation then grows with |factor| without
    # bound. Our search doubles the factor until the deviation stops growing (here: until its float64 norm
    # overflows), far past any fixed grid; ByzFL's 20-step search reaches 10 * (2**19 - 1) on its side (tau >= 0:
    # z = -tau, eps = tau).
    assert bool((HONEST.mean(dim=0) > 0).all())
    res = line_search(attack, HONEST, COPIES, coordinate_max, search="ours")
    assert res.factor < -1e100  # doubled until the deviation's norm overflowed (+inf: the largest deviation)
    assert res.deviation >= abs(res.factor) / 4 * float(HONEST.std(dim=0).min())
    assert bool(torch.isfinite(res.vector(attack, HONEST)).all())
    # ByzFL's search tries one side only (tau >= 0): the right one for ALIE here (z = -tau), the wrong one for FOE.
    bz = line_search(attack, HONEST, COPIES, coordinate_max, search="byzfl")
    assert bz.factor == (-10.0 * (2**19 - 1) if attack == "alie" else 0.0)
    assert bz.correction == (1 if attack == "alie" else 0)
    # The mirror image: with a coordinate-wise min the positive side wins; ByzFL's search finds it for FOE only.
    res = line_search(attack, HONEST, COPIES, coordinate_min, search="ours")
    assert res.factor > 1e100
    bz = line_search(attack, HONEST, COPIES, coordinate_min, search="byzfl")
    assert bz.factor == (0.0 if attack == "alie" else 10.0 * (2**19 - 1))
    both = line_search(attack, HONEST, COPIES, coordinate_min, search="both")
    assert both == replace(res, evaluations=both.evaluations)  # ours wins


@pytest.mark.parametrize("attack", ["foe", "alie"])
def test_a_one_sided_search_keeps_to_its_side_without_a_cap(attack):
    # sign=+-1 keeps our search to one side, uncapped: on the winning side it finds what both signs find; on the
    # other side (a coordinate-wise max ignores every Byzantine row below the honest ones) nothing moves the max,
    # so the tie goes to the factor 0.
    for agg, winning in ((coordinate_max, -1), (coordinate_min, 1)):
        both = line_search(attack, HONEST, COPIES, agg, search="ours")
        same = line_search(attack, HONEST, COPIES, agg, search="ours", sign=winning)
        assert (same.factor, same.deviation) == (both.factor, both.deviation) and abs(same.factor) > 1e100
        other = line_search(attack, HONEST, COPIES, agg, search="ours", sign=-winning)
        assert other.factor == 0.0 and other.deviation < both.deviation
        assert other.deviation == deviation(searched(attack, agg, search="ours", sign=-winning), agg)


def test_a_one_sided_search_is_the_best_of_its_side():
    # ARC > NNM > cwtm: the best FOE is on the negative side (next test); kept to eps >= 0 the search still does at
    # least as well as every non-negative grid factor and the default, and no better than both signs together.
    agg = server("cwtm", 2, True, True)
    pos = line_search("foe", HONEST, COPIES, agg, search="ours", sign=1)
    assert pos.factor >= 0
    assert pos.deviation >= max(deviation(foe(HONEST, x), agg) for x in (0.0, FOE_EPS, *FOE_LS_GRID))
    assert pos.deviation < line_search("foe", HONEST, COPIES, agg, search="ours").deviation
    # ALIE kept to ByzFL's side (z <= 0) is at least as damaging as ByzFL's search there, on the same std
    neg = line_search("alie", HONEST, COPIES, agg, search="ours", sign=-1, correction=1)
    assert neg.factor <= 0 and neg.deviation >= line_search("alie", HONEST, COPIES, agg, search="byzfl").deviation
    # "both" with a side: ours kept to it, ByzFL's unchanged, the more damaging wins
    both = line_search("foe", HONEST, COPIES, agg, search="both", sign=1)
    assert both.deviation == max(pos.deviation, line_search("foe", HONEST, COPIES, agg, search="byzfl").deviation)
    assert LS_SIGNS == (0, 1, -1)


def test_a_negative_foe_factor_beats_every_positive_one_on_arc_nnm_cwtm():
    # On ARC > NNM > cwtm the best FOE sends a positive multiple of the honest mean (eps < 0): no eps > 0 comes
    # close (a dense grid up to 1e4), which is all a one-signed search can try.
    agg = server("cwtm", 2, True, True)
    res = line_search("foe", HONEST, COPIES, agg, search="ours")
    best_positive = max(deviation(foe(HONEST, x), agg) for x in [0.0, *torch.logspace(-3, 4, 400).tolist()])
    assert res.factor < 0 and res.deviation > 2 * best_positive
    assert deviation(foe_ls(HONEST, COPIES, agg), agg) == res.deviation  # "both": ours wins here


def test_the_doubling_stops_where_the_deviation_stops_growing():
    # Static clipping bounds every vector: once FOE's copies are clipped, a larger |eps| sends the same vector, so
    # the doubling stops after one evaluation past the grid instead of running to overflow.
    agg = functools.partial(aggregate, rule="cwtm", num_byzantine=2, nnm=True, static_clip=1.0)
    res = line_search("foe", HONEST, COPIES, agg, search="ours", refine=0)
    grid_points = 2 * len(FOE_LS_GRID) + 1  # 0 and +-g; the default eps = 10 is in the grid
    assert grid_points <= res.evaluations <= grid_points + 2
    assert abs(res.factor) <= max(FOE_LS_GRID)


def test_plain_mean_grows_without_a_cap():
    # Mean without ARC: aggregate - mean(H) = -c (1 + eps) mean(H) / n, increasing in |1 + eps|: both sides grow
    # without bound, the positive side ahead by 2 c ||mean|| / n at every |eps|. The search doubles eps as long as
    # the deviation grows.
    agg = server("mean", 2)
    eps = search_factor("foe", HONEST, COPIES, agg)
    assert eps > 1e100 and math.log2(eps / max(FOE_LS_GRID)).is_integer()
    mu = HONEST.mean(dim=0)
    at_grid_top = COPIES * (1 + max(FOE_LS_GRID)) * float(mu.norm()) / (HONEST.shape[0] + COPIES)
    assert deviation(foe(HONEST, max(FOE_LS_GRID)), agg) == pytest.approx(at_grid_top, rel=1e-12)
    assert deviation(foe_ls(HONEST, COPIES, agg, search="ours"), agg) > 1e90 * at_grid_top


def test_candidates_include_the_default_factor():
    # A server whose deviation peaks exactly at the attack's default vector (eps = 10, z = alie_z): with a grid of
    # worse factors and no refinement, the default is chosen.
    def peaked(target: torch.Tensor):
        def agg(x: torch.Tensor) -> torch.Tensor:
            bump = torch.exp(-((x[-1] - target) ** 2).sum())
            return x[:-COPIES].mean(dim=0) + bump * torch.ones_like(target)

        return agg

    assert search_factor("foe", HONEST, COPIES, peaked(foe(HONEST)), grid=[0.1, 1.0], refine=0) == FOE_EPS
    z = search_factor("alie", HONEST, COPIES, peaked(alie(HONEST, num_byzantine=COPIES)), grid=[0.1], refine=0)
    assert z == alie_z(HONEST.shape[0] + COPIES, COPIES)


def test_refinement_finds_a_factor_between_the_grid_points():
    agg = server("cwtm", 2, True, True)
    z0 = search_factor("alie", HONEST, COPIES, agg, refine=0)
    z = search_factor("alie", HONEST, COPIES, agg, refine=8)
    assert z0 in {0.0, *ALIE_LS_GRID, *(-g for g in ALIE_LS_GRID), alie_z(7, 2)}
    assert z != z0 and deviation(alie(HONEST, z=z), agg) > deviation(alie(HONEST, z=z0), agg)


def test_byzfl_search_by_hand():
    # ByzFL's search on the plain mean, where the deviation grows with tau: 0, then tau += 10, 20, 40, ... while it
    # grows -- all 20 evaluations -- so tau = 10 (2**19 - 1); ALIE on the sample std with z = -tau.
    res = line_search("alie", HONEST, COPIES, server("mean", 2), search="byzfl")
    assert (res.factor, res.correction, res.search) == (-10.0 * (2**19 - 1), 1, "byzfl")
    assert res.evaluations == 20
    assert torch.equal(res.vector("alie", HONEST), alie(HONEST, z=res.factor, correction=1))
    # A server that ignores the Byzantine rows: nothing grows, ByzFL keeps its start tau = 0 after 20 evaluations
    # (the first step fails, then the contraction tries 8, 6.4, ... above 0).
    flat = line_search("foe", HONEST, COPIES, lambda x: x[: HONEST.shape[0]].mean(dim=0), search="byzfl")
    assert flat.factor == 0.0 and flat.evaluations == 20


def test_search_is_deterministic():
    for cfg in SERVERS:
        agg = server(*cfg)
        for attack in ("foe", "alie"):
            a, b = searched(attack, agg), searched(attack, agg)
            assert torch.equal(a, b)
            assert line_search(attack, HONEST, COPIES, agg) == line_search(attack, HONEST, COPIES, agg)
    spec = ByzantineSpec([5, 6], "alie_ls")
    agg = server("cwtm", 2, True, True)
    assert torch.equal(spec.apply(HONEST[0], HONEST, aggregation=agg), spec.apply(HONEST[0], HONEST, aggregation=agg))


def test_ties_go_to_the_smallest_factor():
    # 1-D, cwtm f=1: any Byzantine value outside the honest range is trimmed -> the same deviation for every
    # eps of either sign but those that land inside it; factor 0 (the vector 0, trimmed too) is among the best.
    h = torch.tensor([[1.0], [2.0], [3.0]])
    assert search_factor("foe", h, 1, server("cwtm", 1)) == 0.0


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
        for search in LS_SEARCHES:
            spec = ByzantineSpec([5, 6], name, grid=[0.5, 1.0, 2.0], refine=2, search=search)
            expected = fn(HONEST, 2, agg, grid=[0.5, 1.0, 2.0], refine=2, search=search)
            assert torch.equal(spec.apply(HONEST[0], HONEST, aggregation=agg), expected)
        for sign in LS_SIGNS:
            spec = ByzantineSpec([5, 6], name, search="ours", sign=sign)
            assert torch.equal(spec.apply(HONEST[0], HONEST, aggregation=agg), fn(HONEST, 2, agg, search="ours",
                                                                                   sign=sign))
    spec = ByzantineSpec([5, 6], "alie_ls", correction=1, search="ours")
    res = line_search("alie", HONEST, 2, agg, correction=1, search="ours")
    assert res.correction == 1
    assert torch.equal(spec.apply(HONEST[0], HONEST, aggregation=agg), alie(HONEST, z=res.factor, correction=1))


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
        (lambda: ByzantineSpec([1], "foe_ls", eps=2.0), ValueError,
         r"unexpected parameter `eps`.*`grid`, `refine`, `search`"),
        (lambda: line_search("foe", HONEST, 1, server("mean", 1), search="all"), ValueError,
         r"`search` to be one of 'both', 'ours', 'byzfl' but got 'all'"),
        (lambda: line_search("foe", HONEST, 1, server("mean", 1), search=None), TypeError, r"`search` to be a string"),
        (lambda: line_search("alie", HONEST, 1, server("mean", 1), correction=2), ValueError,
         r"`correction` to be 0 \(population std\) or 1 \(sample std\) but got 2"),
        (lambda: line_search("alie", HONEST[:1], 1, server("mean", 0), search="byzfl"), ValueError,
         r"sample std: it needs at least 2 honest rows"),
        (lambda: ByzantineSpec([1], "alie_ls", search="fast"), ValueError, r"`search`"),
        (lambda: line_search("foe", HONEST, 1, server("mean", 1), sign=2), ValueError,
         r"`sign` to be one of \(0, 1, -1\) \(0: both signs\) but got 2"),
        (lambda: line_search("foe", HONEST, 1, server("mean", 1), sign=True), ValueError, r"`sign`"),
        (lambda: ByzantineSpec([1], "alie_ls", sign=0.5), ValueError, r"`sign`.*but got 0.5"),
        (lambda: ByzantineSpec([1], "alie_ls", correction=True), ValueError, r"`correction`"),
        (lambda: ByzantineSpec([1], "foe_ls", correction=1), ValueError, r"unexpected parameter `correction`"),
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
    # One honest row: std 0, every z sends the row itself (a tie: z = 0); no sample std, so "both" is ours alone.
    assert search_factor("alie", HONEST[:1], 1, server("mean", 0)) == 0.0
    assert line_search("alie", HONEST[:1], 1, server("mean", 0)).search == "ours"
