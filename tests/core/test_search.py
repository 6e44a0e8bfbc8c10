"""The pure search: grid, scoring, selection and the driver on hand-made loss sequences (hand computations)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_clip.core.search import (
    SearchResult,
    SearchRule,
    apply_threshold,
    candidate_grid,
    check_candidates,
    divergence_step,
    near_tie_band,
    probe_median,
    refine_candidates,
    schedule_steps,
    score_run,
    search,
    select_threshold,
    standard_error,
)
from lightning_clip.core.thresholds import (
    FixedThreshold,
    PercentileThreshold,
    QuantileThreshold,
    WarmupThreshold,
    ZScoreThreshold,
)

INF = math.inf


def test_grid_is_half_decades_from_a_thousandth_to_ten_times_m0():
    np.testing.assert_allclose(candidate_grid(2.0), [2.0 * 10 ** (-3 + k / 2) for k in range(9)], rtol=1e-15)
    np.testing.assert_allclose(candidate_grid(1.0, 3), [1e-3, 10 ** -2.5, 1e-2])
    np.testing.assert_allclose(candidate_grid(1.0, 2, first_exponent=0.0, exponent_step=1.0), [1.0, 10.0])


@pytest.mark.parametrize("bad", [[], [1.0, 0.0], [-1.0], [float("nan")], [INF], "0.1,1", 3.0, None])
def test_check_candidates_rejects_empty_and_non_positive(bad):
    with pytest.raises((ValueError, TypeError), match="`candidates`"):
        check_candidates(bad)


def test_check_candidates_sorts_and_deduplicates():
    assert check_candidates([3, 1.0, 3.0, np.float32(2.0)]) == [1.0, 2.0, 3.0]


def test_probe_median_ignores_non_finite_and_refuses_no_scale():
    assert probe_median([3.0, float("nan"), 1.0, INF, 2.0]) == 2.0
    for bad in ([float("nan")], [0.0, 0.0, 0.0], []):
        with pytest.raises(ValueError, match="candidates"):
            probe_median(bad)


def test_divergence_step():
    assert divergence_step([1.0, 2.0, 999.0]) is None
    assert divergence_step([1.0, 2.0, 1000.5, 3.0]) == 2
    assert divergence_step([1.0, float("nan")]) == 1
    assert divergence_step([-1.0, -5000.0, 3.0]) is None  # ratio test only for a positive first loss
    assert divergence_step([2.0, 30.0], factor=10.0) == 1


def test_score_is_the_mean_of_the_scored_part_and_inf_for_divergence_or_early_stop():
    losses = [4.0, 3.0, 2.0, 1.0]
    assert score_run(losses, 4) == 2.5
    assert score_run(losses, 4, fraction=0.5) == 1.5
    assert score_run(losses, 4, fraction=0.3) == 1.5  # ceil(0.3 * 4) = 2 values
    assert score_run(losses, 4, fraction=0.2) == 1.0  # at least one value
    assert score_run(losses, 5) == INF  # stopped early
    assert score_run([1.0, 2000.0, 1.0], 3) == INF
    assert score_run([1.0, float("inf")], 2) == INF


def test_standard_error_of_the_last_half():
    losses = [9.0, 9.0, 9.0, 1.0, 2.0, 3.0]
    assert standard_error(losses) == pytest.approx(1.0 / math.sqrt(3))  # sample sd of 1,2,3 is 1
    assert standard_error([5.0]) == 0.0


def test_selection_takes_the_largest_candidate_within_tolerance():
    cands = [0.01, 0.1, 1.0, 10.0]
    scores = [1.0, 0.50, 0.55, 0.70]
    assert select_threshold(cands, scores, error=0.03, tolerance=2.0) == 2  # 0.55 <= 0.50 + 0.06
    assert select_threshold(cands, scores, error=0.02, tolerance=2.0) == 1  # 0.55 > 0.54
    assert select_threshold(cands, scores, error=0.10, tolerance=2.0) == 3  # 0.70 <= 0.70
    assert select_threshold(cands, scores, error=0.03, tolerance=0.0) == 1
    assert select_threshold(cands, [INF, 0.5, INF, 0.52], error=0.01, tolerance=2.0) == 3
    assert select_threshold(cands, [INF] * 4, error=0.1, tolerance=2.0) is None
    assert select_threshold([10.0, 0.1], [0.5, 0.5], error=0.0, tolerance=2.0) == 0  # by value, not position


CANDS = [0.01, 0.1, 1.0, 10.0, 100.0, 1000.0]


@pytest.mark.parametrize("scores, band, middle, largest", [
    # limit 0.50 + 2 * 0.02 = 0.54 everywhere
    ([0.90, 0.52, 0.51, 0.50, 0.60, 0.80], (1, 3), 2, 3),  # band 0.1..10: middle 1
    ([0.90, 0.52, 0.51, 0.50, 0.90, 0.53], (1, 3), 2, 5),  # 1000 within the limit but cut off by 100: not in it
    ([0.53, 0.90, 0.51, 0.50, 0.60, 0.80], (2, 3), 3, 3),  # 0.01 cut off by 0.1; middle of 1..10: tie -> larger
    ([0.90, 0.80, 0.51, 0.50, 0.52, 0.53], (2, 5), 5, 5),  # the band reaches the largest candidate: that one
    ([0.90, 0.80, 0.51, 0.50, 0.52, INF], (2, 4), 3, 4),  # the largest diverged: middle of 1..100 is 10
    ([0.50, 0.51, 0.52, 0.53, 0.60, INF], (0, 3), 3, 3),  # the band reaches the smallest: its largest, 10
    ([0.60, 0.51, 0.52, 0.53, 0.52, 0.90], (1, 4), 3, 4),  # band 0.1..100: 1 and 10 equally far from 3.16
    ([INF, 0.70, 0.50, 0.70, INF, INF], (2, 2), 2, 2),  # a band of one
])
def test_middle_choice_on_hand_tables(scores, band, middle, largest):
    assert near_tie_band(CANDS, scores, error=0.02, tolerance=2.0) == band
    assert select_threshold(CANDS, scores, error=0.02, tolerance=2.0, choice="middle") == middle
    assert select_threshold(CANDS, scores, error=0.02, tolerance=2.0, choice="largest") == largest
    perm = [3, 0, 5, 1, 4, 2]  # candidates in any order: indices follow the given order
    c, s = [CANDS[i] for i in perm], [scores[i] for i in perm]
    assert select_threshold(c, s, error=0.02, tolerance=2.0, choice="middle") == perm.index(middle)
    assert near_tie_band(c, s, error=0.02, tolerance=2.0) == (perm.index(band[0]), perm.index(band[1]))


def test_middle_choice_edge_cases():
    assert select_threshold(CANDS, [INF] * 6, error=0.1, tolerance=2.0, choice="middle") is None
    assert near_tie_band(CANDS, [INF] * 6, error=0.1, tolerance=2.0) is None
    # a band of two quarter-decade neighbours 1 and 10**0.25 with 0.1 and 10 outside: the tie goes to the larger
    c = [0.1, 1.0, 10 ** 0.25, 10.0]
    assert select_threshold(c, [0.9, 0.50, 0.50, 0.9], error=0.0, tolerance=2.0, choice="middle") == 2
    # three in the band, uneven spacing: middle of 1..10 is 10**0.5; 10**0.25 is nearer than 10
    c = [0.1, 1.0, 10 ** 0.25, 10.0, 100.0]
    assert select_threshold(c, [0.9, 0.5, 0.5, 0.5, 0.9], error=0.0, tolerance=2.0, choice="middle") == 2
    # the same band reaching the smallest candidate (0.1 dropped): no lower edge measured, the band's largest
    assert select_threshold(c[1:], [0.5, 0.5, 0.5, 0.9], error=0.0, tolerance=2.0, choice="middle") == 2
    with pytest.raises(ValueError, match="`choice`"):
        select_threshold(c, [0.5] * 5, error=0.0, tolerance=2.0, choice="median")
    with pytest.raises(ValueError, match="scores"):
        near_tie_band(c, [0.5] * 4, error=0.0, tolerance=2.0)


def test_rule_default_is_the_middle_and_the_driver_uses_it():
    assert SearchRule().choice == "middle"
    # 0.1, 1, 10 tie exactly (SE 0), 100 worse, 1000 diverges: middle 1 ("largest" would take 10)
    table = {0.01: [3.0] * 4, 0.1: [1.0] * 4, 1.0: [1.0] * 4, 10.0: [1.0] * 4, 100.0: [2.0] * 4, 1000.0: [1.0, 1e4]}
    result = search(_table_run(table, []), list(table), num_steps=4, rule=SearchRule(refine=False))
    assert result.threshold == 1.0 and "middle of the near-tie band 0.1-10" in str(result)
    result = search(_table_run(table, []), list(table), num_steps=4, rule=SearchRule(refine=False, choice="largest"))
    assert result.threshold == 10.0 and "the largest threshold within" in str(result)
    # the band reaching the largest candidate: that one, as "largest" would
    table[100.0] = [1.0] * 4
    table[1000.0] = [1.0] * 4
    result = search(_table_run(table, []), list(table), num_steps=4, rule=SearchRule(refine=False))
    assert result.threshold == 1000.0 and "the largest of the near-tie band" in str(result)
    # the band reaching the smallest candidate (a task the clipping does not slow): the band's largest
    table = {0.01: [1.0] * 4, 0.1: [1.0] * 4, 1.0: [1.0] * 4, 10.0: [3.0] * 4}
    result = search(_table_run(table, []), list(table), num_steps=4, rule=SearchRule(refine=False))
    assert result.threshold == 1.0 and "reaches the smallest threshold tried" in str(result)


def _table_run(table: dict[float, list[float]], calls: list[tuple[float, int]]):
    def run(threshold: float, num_steps: int) -> list[float]:
        calls.append((threshold, num_steps))
        key = min(table, key=lambda c: abs(math.log(c / threshold)))
        return table[key][:num_steps]
    return run


def test_driver_on_a_hand_table_without_refinement():
    half = [1.0, 1.0]  # last half of the best run: sd 0 -> SE 0
    table = {0.1: [3.0, 3.0, *half], 1.0: [2.0, 2.0, *half], 10.0: [2.0, 2.0, 1.0, 1.0], 100.0: [1.0, 5000.0]}
    calls: list[tuple[float, int]] = []
    result = search(_table_run(table, calls), [100.0, 0.1, 10.0, 1.0], num_steps=4, rule=SearchRule(refine=False))
    assert calls == [(0.1, 4), (1.0, 4), (10.0, 4), (100.0, 4)]  # ascending, the same length
    assert result.scores == [2.0, 1.5, 1.5, INF]
    assert result.best == 1 and result.chosen == 2 and result.threshold == 10.0  # exact tie: the larger
    assert result.error == 0.0
    assert result.total_steps == 4 + 4 + 4 + 2
    text = str(result)
    assert "diverged at step 1" in text and "chosen" in text


def test_driver_tolerance_uses_the_best_runs_standard_error():
    best = [2.0, 2.0, 0.0, 1.0, 2.0, 1.0]  # mean 4/3; last half 1, 2, 1: sd 0.577, SE 0.333
    near = [2.0, 2.0, 1.0, 1.0, 1.5, 1.5]  # mean 1.5
    table = {1.0: best, 3.0: near, 9.0: [3.0] * 6}
    rule = SearchRule(tolerance=0.4, refine=False)
    result = search(_table_run(table, []), [1.0, 3.0, 9.0], num_steps=6, rule=rule)
    se = np.std([1.0, 2.0, 1.0], ddof=1) / math.sqrt(3)
    assert result.error == pytest.approx(se)
    assert result.best == 0
    # 1.5 - 4/3 = 0.1667 <= 0.4 * 0.3333 = 0.1333? no -> the best itself
    assert result.threshold == 1.0
    result = search(_table_run(table, []), [1.0, 3.0, 9.0], num_steps=6, rule=SearchRule(tolerance=0.6, refine=False))
    assert result.threshold == 3.0  # 0.1667 <= 0.2


def test_driver_refines_around_the_choice_with_the_same_rule():
    r = 10 ** 0.25
    table = {0.1: [3.0] * 4, 1.0: [2.0] * 4, 10.0: [4.0] * 4, 1.0 / r: [2.5] * 4, r: [1.0] * 4}
    calls: list[tuple[float, int]] = []
    result = search(_table_run(table, calls), [0.1, 1.0, 10.0], num_steps=4)
    assert [c for c, _ in calls] == pytest.approx([0.1, 1.0, 10.0, 1.0 / r, r])
    assert result.refined == pytest.approx([1.0 / r, r])
    assert result.threshold == pytest.approx(r)
    assert result.candidates == sorted(result.candidates)
    assert "refinement" in str(result)


def test_refinement_skips_thresholds_already_run():
    r = 10 ** 0.25
    cands = [1.0 / r, 1.0, r]
    calls: list[tuple[float, int]] = []
    table = {1.0 / r: [3.0] * 3, 1.0: [1.0] * 3, r: [3.0] * 3}
    result = search(_table_run(table, calls), cands, num_steps=3)
    assert len(calls) == 3 and result.threshold == 1.0


def test_every_run_diverging_gives_no_threshold():
    result = search(lambda c, n: [1.0, float("nan")], [0.1, 1.0], num_steps=2)
    assert not result.found and math.isnan(result.threshold) and result.chosen is None
    assert "every run diverged" in str(result)


def test_per_candidate_run_lengths_reach_the_callable():
    seen: list[int] = []

    def run(c: float, n: int) -> list[float]:
        seen.append(n)
        return [1.0 / c] * n

    search(run, [1.0, 2.0], num_steps=7, rule=SearchRule(refine=False))
    assert seen == [7, 7]


@pytest.mark.parametrize("kwargs, name", [
    ({"num_steps": 1}, "num_steps"), ({"num_steps": 0}, "num_steps"), ({"candidates": []}, "candidates"),
    ({"candidates": [0.0, 1.0]}, "candidates"),
])
def test_driver_rejects_bad_inputs_before_any_run(kwargs, name):
    calls: list[float] = []
    args = {"candidates": [1.0], "num_steps": 5, **kwargs}
    with pytest.raises((ValueError, TypeError), match=f"`{name}`"):
        search(lambda c, n: calls.append(c) or [1.0] * n, **args)
    assert not calls


@pytest.mark.parametrize("kwargs, name", [
    ({"tolerance": -1.0}, "tolerance"), ({"score_fraction": 0.0}, "score_fraction"),
    ({"se_fraction": 1.5}, "se_fraction"), ({"refine_exponent": 0.0}, "refine_exponent"),
    ({"divergence_factor": 1.0}, "divergence_factor"), ({"refine": 1}, "refine"), ({"choice": "median"}, "choice"),
])
def test_rule_rejects_bad_values(kwargs, name):
    with pytest.raises((ValueError, TypeError), match=f"`{name}`"):
        SearchRule(**kwargs)


def test_schedule_steps_compress_the_training_into_the_run():
    # floor(t * T / K) by hand: 1000 training steps into a 4-step run, 10 into 4
    assert schedule_steps(1000, 4) == [0, 250, 500, 750]
    assert schedule_steps(10, 4) == [0, 2, 5, 7]
    # a training no longer than a run, or of unknown length: the schedule's own first steps
    assert schedule_steps(4, 4) == [0, 1, 2, 3]
    assert schedule_steps(3, 4) == [0, 1, 2, 3]
    assert schedule_steps(None, 3) == [0, 1, 2]
    with pytest.raises(ValueError, match="num_steps"):
        schedule_steps(100, 0)


def test_refine_candidates():
    lo, hi = refine_candidates(2.0)
    assert lo == pytest.approx(2.0 / 10 ** 0.25) and hi == pytest.approx(2.0 * 10 ** 0.25)


def test_result_round_trips_through_plain_values():
    result = search(lambda c, n: [1.0, 1.0 / c, 0.5][:n], [0.5, 1.0, 2.0], num_steps=3)
    state = result.state_dict()
    assert all(isinstance(v, (list, float, int, dict, type(None))) for v in state.values())
    again = SearchResult.from_state_dict(state)
    assert again == result


def _first_thresholds(policy, norms):
    return [float(policy(torch.tensor(n))) for n in norms]


def test_apply_threshold_per_policy():
    fixed = FixedThreshold(1.0)
    _first_thresholds(fixed, [5.0])  # builds its cached tensor
    assert apply_threshold(fixed, 0.25) == "max_norm"
    assert _first_thresholds(fixed, [5.0]) == [0.25] and fixed.steps == 2

    pct = PercentileThreshold(50.0, warmup_steps=2, warmup_threshold=1.0)
    assert apply_threshold(pct, 0.5) == "warmup_threshold"
    assert _first_thresholds(pct, [3.0, 1.0, 2.0]) == [0.5, 0.5, 2.0]

    warm = WarmupThreshold(1, 1.0, then=FixedThreshold(7.0))
    assert apply_threshold(warm, 0.125) == "warmup_threshold"
    assert _first_thresholds(warm, [3.0, 3.0]) == [0.125, 7.0]

    z = ZScoreThreshold(warmup_steps=2, max_norm=None)
    assert apply_threshold(z, 0.75) == "max_norm"
    assert _first_thresholds(z, [3.0, 3.0]) == [0.75, 0.75]

    q = QuantileThreshold(0.5, initial=1.0, learning_rate=0.2)
    _first_thresholds(q, [5.0])  # the tracker moved off `initial`
    assert apply_threshold(q, 0.5) == "initial"
    assert _first_thresholds(q, [0.1]) == [0.5]


def test_apply_threshold_keeps_the_observed_history():
    pct = PercentileThreshold(50.0, warmup_steps=0, warmup_threshold=1.0)
    _first_thresholds(pct, [1.0, 3.0])
    apply_threshold(pct, 9.0)
    assert _first_thresholds(pct, [2.0]) == [2.0]  # median of 1, 3, 2
    assert pct.steps == 3
