"""The sharded exchange in real gloo process groups (3, 4 and 5 ranks) against ``aggregate`` in one process.

One ``torch.multiprocessing.spawn`` per world size runs every scenario of ``tests.helpers.exchange.cases``
through the hook's robust reduction, sharded and gathered. The vectors have ``d = 77`` coordinates in
three uneven buckets (never divisible by ``n``); the coordinate-wise pipelines must give the reference's
bits, the distance-based ones agree to 1e-6 relative with the same selections.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.multiprocessing as mp

from lightning_clip.distributed.strategy import ARC_STATE_KEY
from lightning_clip.robust.pipeline import aggregate, preaggregate
from lightning_clip.robust.rules import krum_selection
from tests.helpers import ddp as h
from tests.helpers import exchange as sh
from tests.helpers import exchange_trainer as st

WORLD_SIZES = (3, 4, 5)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    """One launch of 5 processes; the 3- and 4-rank runs use groups of the first ranks."""
    out = tmp_path_factory.mktemp("exchange")
    n = max(WORLD_SIZES)
    mp.spawn(sh.worker, args=(WORLD_SIZES, h.free_port(), str(out), True), nprocs=n, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(n)] + [out]


@pytest.fixture(params=WORLD_SIZES)
def run(request, results) -> tuple[int, list[dict]]:
    n = request.param
    return n, [{key.split("/", 1)[1]: v for key, v in res.items() if key.startswith(f"{n}/")} for res in results[:n]]


# ---------------------------------------------------------------------------------------------------
# Lightning: centered clipping + bucketing on 5 ranks, checkpointed at step 2 and resumed


def trainer_reference(n: int, use_center: bool = True, step_offset: int = 0) -> tuple[list[torch.Tensor], list]:
    """Weights after every step and the aggregates: ``aggregate`` on the 5 ranks' gradients, the centre carried."""
    net = h.make_net()
    center, params, aggs = None, [], []
    for step in range(st.TOTAL):
        rows = []
        for rank in range(n):
            net.zero_grad()
            st.rank_loss(net, rank, step).backward()
            rows.append(h.grad_vector(list(net.parameters())).clone())
        kw = {k: v for k, v in st.STRATEGY.items() if k not in ("num_byzantine", "aggregator")}
        agg = aggregate(torch.stack(rows), "cclip", 1, arc=True, center=center, step=step + step_offset, **kw)
        center = agg if use_center else None
        h.sgd_step(net, agg)
        params.append(h.param_vector(net).clone())
        aggs.append(agg)
    return params, aggs


@pytest.mark.distributed
def test_trainer_resume_restores_the_centre_and_replays_the_buckets(results):
    out = results[-1]
    n = max(WORLD_SIZES)
    full = [torch.load(out / f"full_rank{r}.pt", weights_only=False) for r in range(n)]
    resumed = [torch.load(out / f"resumed_rank{r}.pt", weights_only=False) for r in range(n)]
    expected, aggs = trainer_reference(n)
    for rank in range(n):
        assert [s for s, _ in full[rank]["records"]] == list(range(1, st.TOTAL + 1))
        for (_, got), ref in zip(full[rank]["records"], expected):
            torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)
        # Resumed from step 2: the uninterrupted run's updates, centre and permutation restored. Not bit for
        # bit: a fresh DDP model has not rebuilt its buckets yet, so the norms are summed in another order.
        assert [s for s, _ in resumed[rank]["records"]] == [3, 4]
        for (_, got), (_, ref) in zip(resumed[rank]["records"], full[rank]["records"][2:]):
            torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(resumed[rank]["center"], full[rank]["center"], rtol=1e-6, atol=1e-8)
    ckpt = torch.load(out / "ckpt" / "step=2.ckpt", weights_only=True)
    assert ckpt[ARC_STATE_KEY]["names"] == ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"]
    torch.testing.assert_close(ckpt[ARC_STATE_KEY]["shared"]["center"]["vector"], aggs[1], rtol=1e-6, atol=1e-8)
    # Both states matter here: without the centre, or with another step's permutation, the run differs.
    for other in (trainer_reference(n, use_center=False)[0], trainer_reference(n, step_offset=1)[0]):
        assert not torch.allclose(other[-1], expected[-1], rtol=1e-4, atol=1e-6)


def reference(n: int, i: int, case: dict, compute: torch.dtype | None = None) -> list[torch.Tensor]:
    """``aggregate`` on the gathered vectors of every step, centered clipping's centre carried along.

    With ``compute``, the same vectors are converted to it first (``torch.float64``: the pipeline without
    float32 rounding).
    """
    dtype = getattr(torch, case.get("dtype", "float32"))
    cfg = sh.config(case)
    center = None
    out = []
    for step in range(case.get("steps", 1)):
        x = sh.vectors(n, i, step, dtype, case.get("nan", False), sh.length(n, case))
        if compute is not None:
            x = x.to(compute)
        agg = aggregate(x, cfg.aggregator, 1, nnm=cfg.nnm, arc=cfg.arc, static_clip=cfg.static_clip, center=center,
                        cclip_tau=cfg.cclip_tau, cclip_iters=cfg.cclip_iters, bucket_size=cfg.bucket_size,
                        bucket_seed=cfg.bucket_seed, step=step)
        center = agg if cfg.aggregator == "cclip" else None
        out.append(agg)
    return out


@pytest.mark.distributed
def test_sharded_equals_the_one_process_reference(run):
    n, ranks = run
    for i, case in enumerate(sh.cases(n)):
        expected = reference(n, i, case)
        for step, ref in enumerate(expected):
            got = ranks[0][f"sharded{i}"][step]["agg"]
            assert got.dtype == ref.dtype
            if case.get("exact"):
                assert torch.equal(got, ref), (n, case, step)
            elif case["rule"] == "geomed":
                # Both paths iterate in float64 on the rows' Gram matrix (summed in another order across the
                # ranks); both are held to the float64 pipeline, the sharded one within 2.5e-7 of the largest
                # coordinate.
                exact = reference(n, i, case, torch.float64)[step]
                scale = exact.abs().max().item()
                for approx in (got, ref):
                    torch.testing.assert_close(approx.double(), exact, rtol=1e-6, atol=5e-7 * scale,
                                               msg=lambda m, c=case: f"n={n} {c}: {m}")
                assert (got.double() - exact).abs().max() <= 2.5e-7 * scale, case
            else:
                torch.testing.assert_close(got.double(), ref.double(), rtol=1e-6, atol=1e-7 * ref.abs().max().item(),
                                           msg=lambda m, c=case: f"n={n} {c}: {m}")
            assert torch.isfinite(got).all(), case  # a NaN rank is neutralised by ARC
            gathered = ranks[0][f"gather{i}"][step]["agg"]
            if case.get("exact"):
                assert torch.equal(gathered, ref), case
            for r in range(1, n):  # the same bits on every rank
                assert torch.equal(ranks[r][f"sharded{i}"][step]["agg"], got), case


@pytest.mark.distributed
def test_hook_sends_each_bucket_in_its_call_and_matches_the_reference_in_bucket_order(results):
    """Raw DDP on 5 ranks, tiny buckets (several after DDP's rebuild): every bucket's all-to-all starts in its
    own hook call (the exchange is under way before the last bucket), and the gradient DDP hands back is
    ``aggregate`` of the 5 ranks' gradients flattened in the hook's bucket order: bit for bit with cwtm
    (weights too, the same SGD applied), to 1e-6 with the geometric median.
    """
    n = max(WORLD_SIZES)
    for rule in sh.OVERLAP_RULES:
        net = h.make_net()
        params = list(net.parameters())
        opt = torch.optim.SGD(params, lr=h.LR)
        for step in range(sh.OVERLAP_STEPS):
            rec = results[0]["overlap"][rule]["steps"][step]
            calls = rec["calls"]
            assert (len(calls) == 1) == (step == 0)  # several buckets once DDP has rebuilt them
            # bucket i's call had started i + 1 sends: the all-to-all did not wait for the last bucket
            assert [c[2] for c in calls[:-1]] == list(range(1, len(calls)))
            order = [i for _, idx, _ in calls for i in idx]
            rows = []
            for rank in range(n):
                net.zero_grad()
                x, y = h.rank_batch(rank, step)
                (torch.nn.functional.mse_loss(net(x), y) * (1.0 + rank)).backward()
                rows.append(torch.cat([params[i].grad.reshape(-1) for i in order]))
            agg = aggregate(torch.stack(rows), rule, 1, arc=True).split([params[i].numel() for i in order])
            for i, piece in zip(order, agg):
                params[i].grad = piece.view_as(params[i]).clone()
            expected_grad = torch.cat([p.grad.reshape(-1) for p in params])
            opt.step()
            expected = h.param_vector(net)
            for r in range(n):
                got = results[r]["overlap"][rule]["steps"][step]
                if rule == "cwtm":
                    assert torch.equal(got["grad"], expected_grad), (rule, step, r)
                    assert torch.equal(got["params"], expected), (rule, step, r)
                else:
                    torch.testing.assert_close(got["grad"], expected_grad, rtol=1e-6, atol=1e-7)
                    torch.testing.assert_close(got["params"], expected, rtol=1e-6, atol=1e-7)
            assert rec["workspace"] == sum(p.numel() for p in params)  # kept between steps: this rank's vector


@pytest.mark.distributed
def test_same_krum_selection_as_the_reference(run):
    n, ranks = run
    for i, case in enumerate(sh.cases(n)):
        # Without NNM: NNM with n - f of n neighbours makes several rows equal here, so no selection is defined
        # (the value is, and the first test checks it).
        if case["rule"] not in ("krum", "multikrum") or case.get("bucket_size", 1) > 1 or case.get("nnm"):
            continue
        dtype = getattr(torch, case.get("dtype", "float32"))
        x = sh.vectors(n, i, 0, dtype, case.get("nan", False))
        pre, _ = preaggregate(x, 1, arc=True, nnm=case.get("nnm", False))
        pre = pre.float()
        m = 1 if case["rule"] == "krum" else n - 1
        d2 = (pre[:, None, :] - pre[None, :, :]).pow(2).sum(dim=2)  # written out: no library distances
        chosen = krum_selection(d2, 1, m)
        got = ranks[0][f"sharded{i}"][0]["agg"].float()
        # The selected rows' mean is the result; any other selection is far away (tie-free data).
        errors = {}
        for other in torch.combinations(torch.arange(n), m):
            errors[tuple(sorted(other.tolist()))] = float((pre[other].mean(dim=0) - got).norm())
        assert min(errors, key=errors.__getitem__) == tuple(sorted(chosen.tolist())), (n, case)


@pytest.mark.distributed
def test_cost_is_an_all_to_all_and_an_all_gather_of_one_vector(run):
    n, ranks = run
    for i, case in enumerate(sh.cases(n)):
        buckets = [sh.length(n, case)] if case.get("one_bucket") else sh.BUCKETS
        size = 2 if case.get("dtype") == "bfloat16" else 4
        comm = ranks[0][f"sharded{i}"][0]["comm"]
        body = sum(n * (d // n) for d in buckets)  # each bucket's n equal chunks
        tails = sum(d % n for d in buckets)  # the last d_b mod n coordinates of each bucket, gathered
        assert comm["all_to_all"] == size * body
        # + the n norms and the tails, gathered together in float32
        assert comm["all_gather"] == size * body + 4 * n * tails + 4 * n
        if case["rule"] == "geomed":  # one float64 Gram matrix; all the iterations on n-vectors
            assert comm["all_reduce"] == 8 * n * n + (4 * n * n if case.get("nnm") else 0)
        if case["rule"] in ("mean", "cwtm", "median", "meamed") and not case.get("nnm"):
            assert comm["all_reduce"] == 0
        if case["rule"] in ("krum", "multikrum") and not case.get("nnm"):
            assert comm["all_reduce"] == 4 * n * n  # one n x n distance matrix
        gathered = ranks[0][f"gather{i}"][0]["comm"]
        assert gathered == {"all_reduce": 0, "all_gather": size * n * sh.length(n, case)}  # n vectors everywhere


@pytest.mark.distributed
def test_stats_are_the_references(run):
    n, ranks = run
    for i, case in enumerate(sh.cases(n)):
        dtype = getattr(torch, case.get("dtype", "float32"))
        x = sh.vectors(n, i, 0, dtype, case.get("nan", False), sh.length(n, case))
        _, stats = preaggregate(x, 1, arc=case.get("arc", True), static_clip=case.get("static_clip"))
        rec = ranks[0][f"sharded{i}"][0]
        torch.testing.assert_close(rec["norms"], stats.norms, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(rec["scales"], stats.scales, rtol=0, atol=0)
        if case.get("nan"):
            assert rec["scales"][sh.NAN_RANK] == 0 and math.isnan(float(rec["norms"][sh.NAN_RANK]))
