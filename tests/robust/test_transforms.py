"""Send transforms and the configuration, in one process: WorkerMomentum against the recursion written out,
SendBuffers layouts, ByzantineTransform, simulate_sends' gather semantics, ARCConfig's chain and pipeline."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lightning_clip.distributed.config import ARCConfig
from lightning_clip.robust.aggregators import aggregate, preaggregate, preaggregation_stats
from lightning_clip.robust.arc import arc_stats
from lightning_clip.robust.transforms import SendBuffers, SendContext, WorkerMomentum
from lightning_clip.sim.byzantine import ByzantineSpec, ByzantineTransform, simulate_sends


def _ctx(rank: int = 0, n: int = 1, step: int = 0, rows: torch.Tensor | None = None) -> SendContext:
    def gather(flat: torch.Tensor) -> torch.Tensor:
        if rows is None:
            raise AssertionError("this transform must not gather")
        return rows

    return SendContext(rank, n, step, gather, lambda x: x.mean(0))


def test_send_buffers_flatten_and_write_round_trip_across_buckets_and_dtypes():
    a, b = torch.arange(4.0), torch.arange(4.0, 7.0, dtype=torch.float64)
    sent = SendBuffers([a.clone(), b.clone()], [[], []])
    flat = sent.flatten()
    assert flat.dtype == torch.float32 and torch.equal(flat, torch.arange(7.0))  # mixed dtypes: float32
    sent.write_(-flat)
    assert torch.equal(sent.buffers[0], -a) and torch.equal(sent.buffers[1], -b)
    single = SendBuffers([a], [[]])
    assert single.flatten() is not a and torch.equal(single.flatten(), a)  # a copy, never a view


def test_worker_momentum_follows_the_recursion_per_parameter_across_bucket_layouts():
    p1, p2 = torch.zeros(3), torch.zeros(2)
    momentum = WorkerMomentum(0.75)
    grads = [torch.randn(5, generator=torch.Generator().manual_seed(s)) for s in range(4)]
    m = torch.zeros(5)
    for step, g in enumerate(grads):
        m = 0.75 * m + 0.25 * g  # m_0 = 0, no bias correction
        # Step 0: one bucket (p1, p2); later: reversed, one bucket each (DDP's rebuild).
        if step == 0:
            sent = SendBuffers([g.clone()], [[p1, p2]])
        else:
            sent = SendBuffers([g[3:].clone(), g[:3].clone()], [[p2], [p1]])
        momentum(sent, _ctx())
        got = torch.cat([sent.buffers[0], sent.buffers[1]]) if step else sent.buffers[0]
        expected = m if step == 0 else torch.cat([m[3:], m[:3]])
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(momentum.vector([p1, p2]), m, rtol=1e-6, atol=1e-7)
    with pytest.raises(RuntimeError, match="dense, unpadded buckets"):
        momentum(SendBuffers([torch.zeros(6)], [[p1, p2]]), _ctx())


def test_byzantine_transform_changes_only_byzantine_ranks_and_seeds_gaussian_per_rank_and_step():
    spec = ByzantineSpec(ranks=[1], attack="gaussian", std=1.0)
    t = ByzantineTransform(spec, seed=5)
    honest = SendBuffers([torch.ones(4)], [[]])
    t(honest, _ctx(rank=0, n=3))
    assert torch.equal(honest.buffers[0], torch.ones(4))
    draws = []
    for step in (0, 0, 1):
        sent = SendBuffers([torch.ones(4)], [[]])
        t(sent, _ctx(rank=1, n=3, step=step))
        draws.append(sent.buffers[0].clone())
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])  # replayable, fresh per step
    assert not torch.equal(draws[0], torch.ones(4))
    with pytest.raises(TypeError, match="ByzantineSpec"):
        ByzantineTransform({"ranks": [1], "attack": "nan"})  # type: ignore[arg-type]


def test_simulate_sends_gathers_what_every_rank_held_before_the_stage():
    # Stage 1: worker momentum (beta 0.5) on every rank; stage 2: rank 2 mimics honest row 0 of the momenta.
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]])
    spec = ByzantineSpec(ranks=[2], attack="mimic")
    chains = [ARCConfig(num_byzantine=1, worker_momentum=0.5).send_chain([ByzantineTransform(spec)])
              for _ in range(3)]
    params = [torch.zeros(2)]
    sends = [SendBuffers([x[r].clone()], [params]) for r in range(3)]
    out = simulate_sends(chains, sends, 0, lambda v: v.mean(0))
    m = 0.5 * x
    assert torch.equal(out[:2], m[:2]) and torch.equal(out[2], m[0])
    # Rank 2's own buffer keeps its untransformed momentum.
    assert torch.equal(chains[2][0].vector(params), m[2])
    with pytest.raises(ValueError, match="one chain per rank"):
        simulate_sends(chains[:2], sends, 0, lambda v: v.mean(0))


def test_config_validates_once_and_builds_the_chain_and_pipeline():
    assert ARCConfig().send_chain() == []
    chain = ARCConfig(worker_momentum=0.9).send_chain(["extra"])  # type: ignore[list-item]
    assert isinstance(chain[0], WorkerMomentum) and chain[0].beta == 0.9 and chain[1] == "extra"
    with pytest.raises(dataclasses.FrozenInstanceError):
        ARCConfig().num_byzantine = 2  # type: ignore[misc]
    config = ARCConfig(num_byzantine=1, aggregator="median", nnm=True, static_clip=3)
    assert config.static_clip == 3.0 and not config.uses_all_reduce and ARCConfig().uses_all_reduce
    x = torch.randn(5, 3)
    assert torch.equal(config.server_aggregation(x), aggregate(x, "median", 1, nnm=True, arc=True, static_clip=3.0))
    with pytest.raises(ValueError, match=r"world size 2"):
        ARCConfig(num_byzantine=1).check_world_size(2)


def test_preaggregation_multiplies_arc_and_static_factors_written_out_by_hand():
    x = torch.tensor([[3.0, 4.0], [0.0, 1.0], [30.0, 40.0], [float("nan"), 0.0], [0.6, 0.8]])
    norms = torch.tensor([5.0, 1.0, 50.0, float("nan"), 1.0])
    # n = 5, f = 1: k = floor(2 * 4 / 5) = 1 -> ARC zeroes the NaN row and keeps the rest (threshold 50).
    arc = arc_stats(norms, 1)
    assert arc.scales.tolist() == [1.0, 1.0, 1.0, 0.0, 1.0] and float(arc.threshold) == 50.0
    stats = preaggregation_stats(norms, 1, static_clip=2.0)
    expected = [2.0 / (5.0 + 1e-6), 1.0, 2.0 / (50.0 + 1e-6), 0.0, 1.0]
    torch.testing.assert_close(stats.scales, torch.tensor(expected), rtol=1e-6, atol=0)
    assert stats.clipped.tolist() == [True, False, True, True, False]
    out, _ = preaggregate(x, 1, static_clip=2.0)
    assert torch.isfinite(out).all() and torch.equal(out[3], torch.zeros(2))
    torch.testing.assert_close(out.norm(dim=1), torch.tensor([2.0, 1.0, 2.0, 0.0, 1.0]), rtol=1e-5, atol=1e-6)
    # Without ARC the NaN row stays NaN (static clipping does not neutralise it); the threshold is C.
    no_arc = preaggregation_stats(norms, 1, arc=False, static_clip=2.0)
    assert torch.isnan(no_arc.scales[3]) and float(no_arc.threshold) == 2.0 and no_arc.num_clipped == 0
    assert float(preaggregation_stats(norms, 1, arc=False).threshold) == float("inf")


def test_preaggregation_runs_on_meta_tensors_without_host_sync():
    x = torch.empty(6, 4, device="meta")
    out, stats = preaggregate(x, 2, static_clip=1.0, nnm=True)
    assert out.shape == (6, 4) and stats.scales.shape == (6,)
