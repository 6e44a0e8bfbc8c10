"""FedARC on replies built by hand: the aggregate is the library's pipeline bit for bit; Flower's own strategies
on the same replies (median, trimmed mean, Krum, Multi-Krum, FedAvg) agree where the definitions agree, and
differ, as stated, where they do not; bad options fail before any round."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("flwr.serverapp")

import torch  # noqa: E402
from flwr.app import Array, ArrayRecord, ConfigRecord  # noqa: E402
from flwr.server.workflow import SecAggPlusWorkflow  # noqa: E402
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg, Krum, MultiKrum  # noqa: E402
from flwr.serverapp.strategy.multikrum import select_multikrum  # noqa: E402

from lightning_clip.flower import FedARC, InProcessGrid, lightning_client_app  # noqa: E402
from lightning_clip.flower.records import Layout  # noqa: E402
from lightning_clip.robust import ARCConfig, aggregate  # noqa: E402
from lightning_clip.robust.rules import krum_selection  # noqa: E402
from lightning_clip.tags import ARC_CLIPPED_RANKS, ARC_THRESHOLD  # noqa: E402
from tests.helpers.flower import initial_arrays, replies, site_data, site_module  # noqa: E402

N = 7


def _updates(n: int = N, seed: int = 0, d: int | None = None) -> torch.Tensor:
    d = Layout(initial_arrays()).numel if d is None else d
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * 0.1
    x[-1] *= 40.0  # one outlier
    return x


def _run_round(strategy, global_arrays: ArrayRecord, msgs, server_round: int = 1):
    strategy.current_arrays = global_arrays  # what configure_train keeps
    return strategy.aggregate_train(server_round, msgs)


def _flat(record: ArrayRecord) -> torch.Tensor:
    return torch.cat([torch.from_numpy(record[k].numpy()).reshape(-1) for k in record])


CONFIGS = [
    {"aggregator": "cwtm", "nnm": True, "arc": True, "num_byzantine": 2},
    {"aggregator": "mean", "arc": True, "num_byzantine": 3},
    {"aggregator": "median", "arc": False, "num_byzantine": 1},
    {"aggregator": "krum", "arc": True, "num_byzantine": 2, "static_clip": 0.5},
    {"aggregator": "geomed", "arc": True, "num_byzantine": 1},
    {"aggregator": "multikrum", "nnm": True, "arc": True, "num_byzantine": 1, "bucket_size": 2},
    {"aggregator": "meamed", "arc": False, "num_byzantine": 2},
]


@pytest.mark.parametrize("options", CONFIGS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_the_aggregate_is_the_pipeline_of_the_stacked_updates_bit_for_bit(options):
    g = initial_arrays()
    x = _updates()
    msgs = replies(g, x)
    strategy = FedARC(min_train_nodes=N, **options)
    arrays, metrics = _run_round(strategy, g, msgs, server_round=3)
    # the updates as the server forms them: returned arrays (float32) minus the global arrays, in node order
    stacked = torch.stack([_flat(m.content["arrays"]) - _flat(g) for m in msgs])
    rule = options.pop("aggregator")
    expected = aggregate(stacked, rule, step=2, **options)  # round 3 is pipeline step 2 (bucketing)
    assert torch.equal(strategy.last_aggregate, expected)
    assert torch.equal(_flat(arrays), _flat(g) + expected)
    assert metrics["train_loss"] == pytest.approx(np.mean(range(N)))  # FedAvg's metric average (equal weights)
    if options.get("arc"):
        assert metrics[ARC_CLIPPED_RANKS] == int(strategy.last_stats.clipped.sum()) >= 1
        assert metrics[ARC_THRESHOLD] == pytest.approx(float(strategy.last_stats.threshold))


def test_rows_follow_the_node_ids_whatever_order_the_replies_arrive_in():
    g, x = initial_arrays(), _updates()
    msgs = replies(g, x)
    a = FedARC(min_train_nodes=N, aggregator="cwtm", nnm=True, num_byzantine=2, bucket_size=1)
    b = FedARC(min_train_nodes=N, aggregator="cwtm", nnm=True, num_byzantine=2, bucket_size=1)
    _run_round(a, g, msgs)
    _run_round(b, g, list(reversed(replies(g, x))))
    assert torch.equal(a.last_aggregate, b.last_aggregate) and a.last_node_ids == sorted(a.last_node_ids)


def test_centered_clipping_starts_from_the_previous_rounds_aggregate():
    g = initial_arrays()
    s = FedARC(min_train_nodes=N, aggregator="cclip", arc=False, num_byzantine=1, cclip_tau=0.5, cclip_iters=2)
    x1, x2 = _updates(seed=1), _updates(seed=2)
    _run_round(s, g, replies(g, x1), 1)
    first = s.last_aggregate
    _run_round(s, g, replies(g, x2), 2)
    s1 = torch.stack([_flat(m.content["arrays"]) - _flat(g) for m in replies(g, x2)])
    assert torch.equal(s.last_aggregate, aggregate(s1, "cclip", 1, arc=False, center=first, cclip_tau=0.5,
                                                   cclip_iters=2))
    assert not torch.equal(s.last_aggregate, aggregate(s1, "cclip", 1, arc=False, cclip_tau=0.5, cclip_iters=2))


# ----------------------------------------------------------------------------- Flower's strategies, same replies


def _ours_and_flowers(strategy, flower, x, num_examples=None):
    g = initial_arrays()
    ours, _ = _run_round(strategy, g, replies(g, x, num_examples))
    theirs, _ = flower.aggregate_train(1, replies(g, x, num_examples))
    return _flat(ours), _flat(theirs), _flat(g)


def _ulp_close(a: torch.Tensor, b: torch.Tensor, ulps: int = 4) -> None:
    # FedARC works on updates w - g and adds g back; Flower on the arrays w: the same numbers up to the rounding
    # of the subtraction and the addition (a few float32 ulps of the arrays' magnitude)
    tol = ulps * torch.finfo(torch.float32).eps * torch.maximum(a.abs(), b.abs()).clamp(min=1.0)
    assert bool(((a - b).abs() <= tol).all()), float((a - b).abs().max())


@pytest.mark.parametrize("n", [7, 8])
def test_median_without_arc_and_nnm_equals_fedmedian(n):
    x = _updates(n)
    ours, theirs, g = _ours_and_flowers(FedARC(min_train_nodes=n, aggregator="median", arc=False, num_byzantine=2),
                                        FedMedian(), x, num_examples=list(range(1, n + 1)))
    _ulp_close(ours, theirs)
    assert not torch.equal(ours, g)  # the round moved the model


@pytest.mark.parametrize("f", [1, 2, 3])
def test_trimmed_mean_equals_fedtrimmedavg_at_the_matching_trim(f):
    x = _updates(N, seed=f)
    ours, theirs, _ = _ours_and_flowers(FedARC(min_train_nodes=N, aggregator="cwtm", arc=False, num_byzantine=f),
                                        FedTrimmedAvg(beta=(f + 0.25) / N), x)  # Flower trims int(beta n) = f a side
    _ulp_close(ours, theirs)
    other = f - 1 if f > 1 else f + 1  # another trim gives another number: the match is not vacuous
    theirs_other = _flat(FedTrimmedAvg(beta=(other + 0.25) / N).aggregate_train(1, replies(initial_arrays(), x))[0])
    assert not torch.allclose(ours, theirs_other, atol=1e-5)


def _selection_flower(x: torch.Tensor, f_flower: int, m: int) -> list[int]:
    msgs = replies(initial_arrays(), x)
    contents = [msg.content for msg in msgs]
    chosen = select_multikrum(contents, num_malicious_nodes=f_flower, num_nodes_to_select=m)
    return sorted(next(i for i, c in enumerate(contents) if c is ch) for ch in chosen)


@pytest.mark.parametrize("f", [1, 2, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_krum_and_multikrum_select_the_sites_flower_selects(f, seed):
    # Krum's score: ours sums the n - f - 1 nearest squared distances, Flower's the n - f - 2 nearest, so
    # Flower's num_malicious_nodes = f - 1 is our num_byzantine = f.
    x = _updates(N, seed=seed)
    d2 = torch.cdist(x.double(), x.double()).square()
    for m in (1, N - f):
        ours = sorted(krum_selection(d2, f, m).tolist())
        assert ours == _selection_flower(x, f - 1, m), (f, m)
    # FedARC's Krum returns exactly the selected site's update (Flower's Krum: its arrays, the same numbers)
    g = initial_arrays()
    s = FedARC(min_train_nodes=N, aggregator="krum", arc=False, num_byzantine=f)
    _run_round(s, g, replies(g, x))
    stacked = torch.stack([_flat(m.content["arrays"]) - _flat(g) for m in replies(g, x)])
    (chosen,) = krum_selection(torch.cdist(stacked.double(), stacked.double()).square(), f, 1).tolist()
    assert torch.equal(s.last_aggregate, stacked[chosen])
    flower_krum, _ = Krum(num_malicious_nodes=f - 1).aggregate_train(1, replies(g, x))
    _ulp_close(_flat(flower_krum), _flat(g) + stacked[chosen])


def test_krum_differs_from_flowers_at_the_same_f_by_one_neighbour():
    # Seven sites on a line: with f = 2 our score sums each site's 4 nearest squared distances and picks site 3,
    # Flower's sums the 3 nearest and picks site 5; Flower's num_malicious_nodes = f - 1 picks ours.
    pts = torch.tensor([[15.0], [22.0], [29.0], [11.0], [28.0], [8.0], [3.0]])
    d2 = torch.cdist(pts.double(), pts.double()).square()
    f = 2
    assert krum_selection(d2, f, 1).tolist() == [3] == _selection_flower_from_vectors(pts, f - 1, 1)
    assert _selection_flower_from_vectors(pts, f, 1) == [5]


def _selection_flower_from_vectors(pts: torch.Tensor, f_flower: int, m: int) -> list[int]:
    d = Layout(initial_arrays()).numel
    x = torch.zeros(pts.shape[0], d)
    x[:, :1] = pts
    return _selection_flower(x, f_flower, m)


def test_multikrum_averages_unweighted_where_flower_weights_by_num_examples():
    f, n = 2, N
    x = _updates(n, seed=5)
    weights = [1, 2, 3, 4, 5, 6, 7]
    g = initial_arrays()
    s = FedARC(min_train_nodes=n, aggregator="multikrum", arc=False, num_byzantine=f)
    ours, _ = _run_round(s, g, replies(g, x, weights))
    theirs, _ = MultiKrum(num_malicious_nodes=f - 1, num_nodes_to_select=n - f).aggregate_train(
        1, replies(g, x, weights))
    stacked = torch.stack([_flat(m.content["arrays"]) - _flat(g) for m in replies(g, x)])
    chosen = krum_selection(torch.cdist(stacked.double(), stacked.double()).square(), f, n - f)
    _ulp_close(_flat(ours), _flat(g) + stacked[chosen].mean(dim=0), ulps=8)
    w = torch.tensor([weights[i] for i in chosen.tolist()], dtype=torch.float64)
    weighted = (stacked[chosen].double() * (w / w.sum()).unsqueeze(1)).sum(dim=0)
    assert torch.allclose(_flat(theirs).double(), _flat(g).double() + weighted, atol=1e-5)
    assert not torch.allclose(_flat(ours), _flat(theirs), atol=1e-4)


def test_the_mean_counts_every_site_once_where_fedavg_weights_by_num_examples():
    x = _updates(N, seed=3)
    x[-1] /= 40.0  # no outlier: a plain comparison of the weightings
    weights = [1, 1, 1, 1, 1, 1, 30]
    ours, theirs, g = _ours_and_flowers(FedARC(min_train_nodes=N, arc=False, num_byzantine=0), FedAvg(), x, weights)
    _ulp_close(ours, g + x.mean(dim=0), ulps=8)
    w = torch.tensor(weights, dtype=torch.float64)
    assert torch.allclose(theirs.double(), g.double() + (x.double() * (w / w.sum()).unsqueeze(1)).sum(0), atol=1e-5)
    assert not torch.allclose(ours, theirs, atol=1e-4)
    same, fedavg, _ = _ours_and_flowers(FedARC(min_train_nodes=N, arc=False, num_byzantine=0), FedAvg(), x, [5] * N)
    assert torch.allclose(same, fedavg, atol=1e-6)  # equal weights: the same mean up to rounding


# ----------------------------------------------------------------------------- faults


def test_a_nan_site_does_not_poison_arcs_aggregate_but_poisons_fedavgs():
    g = initial_arrays()
    x = _updates(N, seed=4)
    x[2] = float("nan")
    s = FedARC(min_train_nodes=N, aggregator="cwtm", nnm=True, num_byzantine=1)
    arrays, metrics = _run_round(s, g, replies(g, x))
    assert bool(torch.isfinite(_flat(arrays)).all())
    assert metrics[ARC_CLIPPED_RANKS] >= 1 and math.isfinite(metrics[ARC_THRESHOLD])
    honest = torch.cat([x[:2], x[3:]])
    assert _flat(arrays).sub(_flat(g)).abs().max() <= honest.abs().max()  # inside the honest sites' range
    mean_arc, _ = _run_round(FedARC(min_train_nodes=N, num_byzantine=1), g, replies(g, x))
    assert bool(torch.isfinite(_flat(mean_arc)).all())
    fedavg, _ = FedAvg().aggregate_train(1, replies(g, x))
    assert not bool(torch.isfinite(_flat(fedavg)).all())
    no_arc, _ = _run_round(FedARC(min_train_nodes=N, num_byzantine=1, arc=False), g, replies(g, x))
    assert not bool(torch.isfinite(_flat(no_arc)).all())  # the ablation: ARC is what stops it


def test_a_round_with_too_few_replies_for_num_byzantine_is_skipped(caplog):
    g = initial_arrays()
    s = FedARC(min_train_nodes=5, aggregator="cwtm", num_byzantine=2)
    arrays, metrics = _run_round(s, g, replies(g, _updates(4)))  # failures left 4 <= 2 f
    assert arrays is None and metrics is None and s.last_aggregate is None


def test_integer_arrays_keep_the_global_value():
    g = initial_arrays()
    record = ArrayRecord({**{k: g[k] for k in g}, "counter": Array(np.array([7], dtype=np.int64))})
    layout = Layout(record)
    assert "counter" not in layout.keys and layout.numel == Layout(g).numel
    out = layout.record(layout.global_flat + 1.0)
    assert int(out["counter"].numpy()[0]) == 7 and out["counter"].numpy().dtype == np.int64


# ----------------------------------------------------------------------------- options


def test_keywords_and_the_config_object_build_the_same_strategy():
    a = FedARC(num_byzantine=2, aggregator="cwtm", nnm=True, min_train_nodes=6)
    b = FedARC(arc_config=ARCConfig(num_byzantine=2, aggregator="cwtm", nnm=True), min_train_nodes=6)
    assert a.arc_config == b.arc_config and a.min_train_nodes == b.min_train_nodes == 6
    assert "num_byzantine" in str(FedARC.__init__.__signature__)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"aggregator": "krumm"}, ValueError, "aggregator"),
    ({"num_byzantine": 3, "min_train_nodes": 6}, ValueError, "num_byzantine.*min_train_nodes"),
    ({"num_byzantine": -1}, ValueError, "num_byzantine"),
    ({"bucket_size": 3, "num_byzantine": 1, "min_train_nodes": 5}, ValueError, "bucket_size"),
    ({"worker_momentum": 0.9}, ValueError, "worker_momentum"),
    ({"robust_comm": "gather"}, ValueError, "robust_comm"),
    ({"dp_seed": 3}, ValueError, "dp_seed"),
    ({"static_clip": 1.0, "dp_clip_quantile": 0.5, "arc": False}, ValueError, "dp_clip_quantile"),
    ({"fraction_trian": 0.5}, TypeError, "fraction_train"),
    ({"arc_config": ARCConfig(), "nnm": True}, ValueError, "not both"),
    ({"arc_config": {"nnm": True}}, TypeError, "arc_config"),
    ({"static_clip": -1.0}, ValueError, "static_clip"),
])
def test_bad_options_fail_at_construction_naming_the_option(kwargs, error, match):
    kwargs = {"min_train_nodes": 10, **kwargs}
    with pytest.raises(error, match=match):
        FedARC(**kwargs)


@pytest.mark.parametrize("robust", [{"arc": True}, {"aggregator": "cwtm", "arc": False}, {"nnm": True, "arc": False},
                                    {"bucket_size": 2, "arc": False, "num_byzantine": 0}])
def test_secure_aggregation_refuses_arc_and_every_robust_step_saying_why(robust):
    with pytest.raises(ValueError, match="sum of the masked updates"):
        FedARC(static_clip=1.0, min_train_nodes=4, **{"num_byzantine": 1, **robust},
               secure_aggregation=SecAggPlusWorkflow(num_shares=3, reconstruction_threshold=2))


def test_secure_aggregation_needs_the_clip_bound_within_the_quantization_range():
    workflow = SecAggPlusWorkflow(num_shares=3, reconstruction_threshold=2, clipping_range=1.0)
    with pytest.raises(ValueError, match="static_clip"):
        FedARC(arc=False, num_byzantine=0, secure_aggregation=workflow)
    with pytest.raises(ValueError, match="clipping_range"):
        FedARC(arc=False, num_byzantine=0, static_clip=2.0, secure_aggregation=workflow)
    with pytest.raises(TypeError, match="SecAggPlusWorkflow"):
        FedARC(arc=False, num_byzantine=0, static_clip=0.5, secure_aggregation="secagg+")
    FedARC(arc=False, num_byzantine=0, static_clip=0.5, secure_aggregation=workflow)


class _CountingGrid(InProcessGrid):
    sent = 0

    def deliver(self, messages):
        self.sent += len(messages)
        return super().deliver(messages)


def test_noise_without_flowers_dp_wrapper_is_refused_before_any_round():
    grid = _CountingGrid(lightning_client_app(site_module, site_data, steps=1), 4)
    s = FedARC(num_byzantine=0, arc=False, static_clip=1.0, dp_noise_multiplier=1.0, min_train_nodes=4)
    with pytest.raises(ValueError, match="differential_privacy"):
        s.start(grid=grid, initial_arrays=initial_arrays(), num_rounds=1)
    with pytest.raises(ValueError, match="floating-point"):
        FedARC(num_byzantine=0).start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=1)
    assert grid.sent == 0


def test_the_strategy_runs_rounds_through_flowers_start_with_fedavgs_sampling_and_evaluation():
    grid = InProcessGrid(lightning_client_app(site_module, site_data, steps=2), 5)
    s = FedARC(num_byzantine=1, aggregator="cwtm", nnm=True, min_train_nodes=5, min_available_nodes=5,
               fraction_train=0.6, min_evaluate_nodes=2, fraction_evaluate=0.4)
    result = s.start(grid=grid, initial_arrays=initial_arrays(), num_rounds=2,
                     train_config=ConfigRecord({"lr": 0.1}))
    assert set(result.train_metrics_clientapp) == {1, 2}
    assert len(s.last_node_ids) == 5  # max(int(5 * 0.6), min_train_nodes) sites: FedAvg's sampling
    assert set(result.evaluate_metrics_clientapp) == {1, 2} and "val_loss" in result.evaluate_metrics_clientapp[2]
    assert not torch.equal(_flat(result.arrays), _flat(initial_arrays()))


@pytest.mark.parametrize(("options", "fewest"), [({}, 3), ({"num_byzantine": 0}, 2), ({"num_byzantine": 2}, 5),
                                                 ({"num_byzantine": 2, "bucket_size": 2}, 9)])
def test_node_minimums_default_to_the_fewest_updates_the_pipeline_can_aggregate(options, fewest):
    s = FedARC(**options)
    assert s.min_train_nodes == s.min_available_nodes == fewest
    s.arc_config.check_rows(fewest)  # the pipeline accepts that many
    if fewest > 2:
        with pytest.raises(ValueError):
            s.arc_config.check_rows(fewest - 1)
    assert FedARC(min_train_nodes=fewest + 2, **options).min_available_nodes == fewest + 2
