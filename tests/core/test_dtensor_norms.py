"""Norms of sharded (DTensor) gradients in real gloo processes: FSDP2 on 2 ranks, FSDP2 x tensor parallel on
a 2 x 2 mesh of 4 ranks. Every rank must get the same norms, equal to an unsharded single-process
reference and to torch's own norm of the DTensor gradients, with one all-reduce per sharded mesh dimension.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from lightning_clip import tags  # noqa: E402
from lightning_clip.core.dtensor_norms import is_dtensor  # noqa: E402
from lightning_clip.core.grads import gradient_stats  # noqa: E402
from tests.helpers import dtensor_workers as w
from tests.helpers.ddp import free_port
from tests.helpers.models import states_equal


def _run(tmp_path: Path, layout: str, world: int) -> list[dict]:
    mp.spawn(w.worker, args=(world, free_port(), str(tmp_path), layout), nprocs=world, join=True)
    return [torch.load(tmp_path / f"{layout}{r}.pt", weights_only=False) for r in range(world)]


def _reference(data_world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-parameter norms and the total of the unsharded gradient: the mean of the data ranks' gradients."""
    net = w.make_mlp()
    (sum(w.loss_of(net, r) for r in range(data_world)) / data_world).backward()
    grads = [p.grad for p in net.parameters()]
    ref = gradient_stats(grads)
    assert torch.equal(ref.total_norm, torch.nn.utils.get_total_norm(grads))  # plain tensors: torch's bits
    return ref.norms, ref.total_norm


@pytest.mark.distributed
@pytest.mark.parametrize(("layout", "world"), [("fsdp", 2), ("2d", 4)])
def test_sharded_norms_equal_the_unsharded_reference_with_one_all_reduce_per_mesh_dim(tmp_path, layout, world):
    out = _run(tmp_path, layout, world)
    ref_norms, ref_total = _reference(out[0]["data_world"])
    for rank, rec in enumerate(out):
        # Identical on every rank, bit for bit.
        assert torch.equal(rec["norms"], out[0]["norms"]) and torch.equal(rec["total"], out[0]["total"]), rank
        torch.testing.assert_close(rec["norms"], ref_norms, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(rec["total"], ref_total, rtol=1e-6, atol=0)
        # A Partial gradient (summed over all ranks: 1 + 2 + ... per entry) gets its norm in its place.
        partial_sum = sum(range(1, world + 1))
        expected = torch.cat([rec["norms"][:1], torch.tensor([partial_sum * 3 ** 0.5]), rec["norms"][1:]])
        torch.testing.assert_close(rec["with_partial"], expected, rtol=1e-6, atol=0)
        # One all-reduce per mesh dimension that shards a gradient, and no other collective on any group.
        assert rec["calls"] == rec["collectives"] == rec["mesh_ndim"], rec
        if layout == "fsdp":  # torch's own norm of the same DTensors agrees, and batches its reduction too
            torch.testing.assert_close(rec["total"], rec["torch_total"], rtol=1e-6, atol=0)
            assert rec["torch_collectives"] == 1
        else:  # gradients on two meshes (the 2-D one and its data-parallel sub-mesh): torch refuses them
            assert rec["num_meshes"] == 2 and "same mesh" in rec["torch_error"], rec["torch_error"]
    if layout == "2d":
        # Both kinds of gradients are there: sharded over both dimensions, and replicated over tensor parallel.
        assert any("Replicate" in p for p in out[0]["placements"]) and any(p.count("Shard") == 2
                                                                           for p in out[0]["placements"])


def test_plain_gradients_issue_no_collective_and_dtensor_detection():
    g = [torch.randn(3), torch.randn(2, 2)]
    assert not any(is_dtensor(t) for t in g)
    assert torch.equal(gradient_stats(g).total_norm, torch.nn.utils.get_total_norm(g))


@pytest.mark.distributed
def test_lightning_model_parallel_clips_like_the_unsharded_reference(tmp_path):
    """FSDP2 under Lightning's ModelParallelStrategy (2 CPU ranks): the callbacks measure the whole gradient,
    clip every shard by the same coefficient and train exactly like clip_grad_norm_ on the unsharded model."""
    mp.spawn(w.lightning_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    net = w.make_mlp()
    opt = torch.optim.SGD(net.parameters(), lr=w.LR)
    totals = []
    for step in range(w.STEPS):
        opt.zero_grad()
        (sum(w.loss_of(net, w.lightning_batch_index(r, step)) for r in range(2)) / 2).backward()
        totals.append(float(torch.nn.utils.clip_grad_norm_(net.parameters(), w.CLIP)))
        opt.step()
    assert min(totals) > w.CLIP  # every step clipped: the check is not vacuous
    for rank in range(2):
        final = torch.load(tmp_path / f"lightning_final{rank}.pt", weights_only=False)
        for got, expected in zip(final, net.parameters()):
            torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-6)
    with open(tmp_path / "rank0" / "version_0" / "metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get(tags.GRAD_NORM_TOTAL)]
    logged = [float(r[tags.GRAD_NORM_TOTAL]) for r in rows]
    assert logged == pytest.approx(totals, rel=1e-6)


@pytest.mark.distributed
@pytest.mark.parametrize("world", [3])
def test_fsdp1_flat_shards_sum_to_the_unsharded_norm_with_one_all_reduce(tmp_path, world):
    """FSDP1 holds disjoint (zero-padded) shards of flat parameters; emulated here on gloo, as FSDP1 itself
    needs an accelerator. Both layouts: the flat parameters, and use_orig_params' per-parameter pieces (some
    empty on some ranks); a replicated parameter counts once."""
    mp.spawn(w.fsdp1_worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    out = [torch.load(tmp_path / f"fsdp1_{r}.pt", weights_only=False) for r in range(world)]
    *units, replicated = w.full_grads()
    # The reference: torch's clip_grad_norm_ on the unsharded parameters, in one process.
    params = [torch.nn.Parameter(torch.zeros_like(t)) for u in (*units, replicated) for t in u]
    for p, g in zip(params, [t for u in (*units, replicated) for t in u]):
        p.grad = g.clone()
    ref_total = torch.nn.utils.clip_grad_norm_(params, 1.0)
    clipped = [p.grad for p in params]
    clipped_units = torch.cat([g.reshape(-1) for g in clipped[:-1]])
    unit_sizes = [sum(t.numel() for t in u) for u in units]
    for layout in ("flat", "orig"):
        for rec in out:
            r = rec[layout]
            # the same total and coefficient on every rank, bit for bit, equal to the unsharded one
            assert torch.equal(r["total"], out[0][layout]["total"]) and torch.equal(r["coef"], out[0][layout]["coef"])
            torch.testing.assert_close(r["total"], ref_total, rtol=1e-6, atol=0)
            assert r["calls"] == r["collectives"] == 1, (layout, r["calls"], r["collectives"])
            torch.testing.assert_close(r["norms"][-1], replicated[0].norm(), rtol=1e-6, atol=0)  # not summed
            torch.testing.assert_close(r["replicated"], clipped[-1], rtol=1e-6, atol=1e-7)
        # the clipped shards, put back together, are torch's clip of the unsharded gradients
        pieces = out[0][layout]["clipped"]
        if layout == "flat":  # drop each flat parameter's zero padding
            rebuilt = torch.cat([p[:n] for p, n in zip(pieces, unit_sizes)])
            whole_norms = out[0][layout]["norms"][:-1]
            torch.testing.assert_close(whole_norms, torch.stack(
                [torch.cat([t.reshape(-1) for t in u]).norm() for u in units]), rtol=1e-6, atol=0)
        else:
            rebuilt = torch.cat(pieces)
            torch.testing.assert_close(out[0][layout]["norms"][:-1], torch.stack(
                [t.norm() for u in units for t in u]), rtol=1e-6, atol=0)
        torch.testing.assert_close(rebuilt, clipped_units, rtol=1e-6, atol=1e-7)
    assert [rec["nan_finite"] for rec in out] == [False] * world


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_every_policy_and_guard_decides_alike_on_every_rank(tmp_path, strategy):
    """Percentile, warm-up then z-score and quantile thresholds, the non-finite guard and SpikeGuard on the
    gradient norm and each rank's own loss, in one run where the ranks hold different losses (and, under FSDP2,
    different shards) and one rank alone produces a NaN: every state, every skip and the weights agree."""
    mp.spawn(w.agreement_worker, args=(2, free_port(), str(tmp_path), strategy), nprocs=2, join=True)
    out = [torch.load(tmp_path / f"agree_{strategy}{r}.pt", weights_only=False) for r in range(2)]
    assert out[0]["skipped"][w.NAN_STEP] and len(out[0]["skipped"]) == w.AGREE_STEPS
    assert 0 < sum(out[0]["skipped"]) < w.AGREE_STEPS  # spikes beside the NaN: decisions were really taken
    assert out[0]["skipped"] == out[1]["skipped"]
    for a, b in zip(out[0]["states"], out[1]["states"]):
        assert states_equal(a, b), (a, b)
    for a, b in zip(out[0]["weights"], out[1]["weights"]):
        assert torch.equal(a, b)
