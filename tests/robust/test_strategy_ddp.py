"""ARC across DDP ranks: real gloo processes on CPU, checked against single-process references.

One ``torch.multiprocessing.spawn`` run (3 ranks) executes every raw-DDP scenario of
``_ddp_helpers.raw_worker``; one Lightning ``Trainer`` run (3 ranks, ``start_method="spawn"``) checks
the strategy end to end. The references below never call the hook: hand ARC on per-rank gradients
recomputed in this process.
"""

from __future__ import annotations

import csv
import pickle
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.multiprocessing as mp
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _ddp_helpers as h  # noqa: E402

from lightning_clip import ARCDDPStrategy  # noqa: E402
from lightning_clip.distributed.hook import ARCHookState  # noqa: E402
from lightning_clip.robust.aggregators import aggregate  # noqa: E402
from lightning_clip.sim.attacks import ByzantineSpec  # noqa: E402
from lightning_clip.tags import ARC_CLIPPED_RANKS, ARC_THRESHOLD, arc_norm_tag  # noqa: E402

N = 3  # ranks
F = 1  # num_byzantine -> k = floor(2 * 1 * 2 / 3) = 1


# ---------------------------------------------------------------------------------------------------
# References


def hand_arc(g: Tensor, f: int) -> tuple[Tensor, float, list[bool]]:
    """ARC by hand on finite rows: sort the norms, clip the k largest to the (k+1)-th largest."""
    n = g.shape[0]
    norms = [float(row.double().norm()) for row in g]
    k = (2 * f * (n - f)) // n
    threshold = sorted(norms, reverse=True)[k]
    out = g.clone()
    clipped = []
    for i, norm in enumerate(norms):
        clipped.append(norm > threshold)
        if norm > threshold:
            out[i] = g[i] * (threshold / norm)
    return out, threshold, clipped


def rank_grads(net: torch.nn.Module, idx: int | list[int], dtype=torch.float32, divide: float = 1.0) -> Tensor:
    """Every rank's local gradient ``[n, d]`` (parameter order) at ``net``'s current weights."""
    rows = []
    for rank in range(N):
        net.zero_grad()
        for i in [idx] if isinstance(idx, int) else idx:
            (h.rank_loss(net, rank, i, dtype) / divide).backward()
        rows.append(h.grad_vector(list(net.parameters())).clone())
    net.zero_grad()
    return torch.stack(rows)


def sgd_step(net: torch.nn.Module, grad: Tensor) -> None:
    with torch.no_grad():
        offset = 0
        for p in net.parameters():
            p -= h.LR * grad[offset : offset + p.numel()].view_as(p)
            offset += p.numel()


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("raw_ddp")
    mp.spawn(h.raw_worker, args=(N, h.free_port(), str(out)), nprocs=N, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(N)]


# ---------------------------------------------------------------------------------------------------
# Raw DDP + arc_hook


def test_arc_mean_sgd_matches_hand_arc(raw):
    net = h.make_net()
    for step, rec in enumerate(raw[0]["arc_mean"]):
        g = rank_grads(net, step)
        clipped, threshold, mask = hand_arc(g, F)
        sgd_step(net, clipped.mean(dim=0))
        torch.testing.assert_close(rec["params"], h.param_vector(net), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rec["norms"], g.norm(dim=1), rtol=1e-5, atol=1e-6)
        assert float(rec["threshold"]) == pytest.approx(threshold, rel=1e-5)
        assert rec["clipped"].tolist() == mask == [False, False, True]
        assert rec["iter"] == step + 1
        assert rec["comm"] == {"all_reduce": 4 * g.shape[1], "all_gather": 4 * N}  # DDP's traffic + n floats
    # DDP rebuilds its buckets after the first step: one bucket, then one per parameter-ish.
    assert raw[0]["arc_mean"][0]["num_buckets"] == 1
    assert raw[0]["arc_mean"][-1]["num_buckets"] > 1
    for other in raw[1:]:  # replicas stay in sync
        assert torch.equal(other["arc_mean"][-1]["params"], raw[0]["arc_mean"][-1]["params"])


def test_num_byzantine_zero_equals_plain_ddp_exactly(raw):
    for rank in range(N):
        for plain, arc in zip(raw[rank]["plain"], raw[rank]["f0"]):
            assert torch.equal(plain["params"], arc["params"])
        assert not raw[rank]["f0"][-1]["clipped"].any()


@pytest.mark.parametrize("case", range(len(h.ATTACK_CASES)), ids=[c["attack"] for c in h.ATTACK_CASES])
def test_byzantine_rank_is_bounded(raw, case):
    spec = ByzantineSpec.from_config(h.ATTACK_CASES[case])
    honest = [r for r in range(N) if not spec.is_byzantine(r)]
    g = rank_grads(h.make_net(), 0)
    max_honest = float(g[honest].norm(dim=1).max())
    for rank in range(N):
        agg = raw[rank][f"attack{case}"]["grad"]
        assert torch.isfinite(agg).all()
        assert float(agg.norm()) <= max_honest * (1 + 1e-5)
    rec = raw[0][f"attack{case}"]
    torch.testing.assert_close(rec["norms"][honest], g[honest].norm(dim=1), rtol=1e-5, atol=1e-6)
    if spec.attack in ("nan", "inf"):
        # Non-finite: scale 0 (zeroed explicitly), the honest vectors pass unclipped.
        assert rec["scales"].tolist() == [1.0, 0.0, 1.0]
        torch.testing.assert_close(rec["grad"], g[honest].sum(dim=0) / N, rtol=1e-5, atol=1e-6)
    elif spec.attack == "scale":
        sent = g.clone()
        sent[1] *= 1e6
        torch.testing.assert_close(rec["grad"], hand_arc(sent, F)[0].mean(dim=0), rtol=1e-4, atol=1e-6)
    if spec.needs_honest:  # the extra gather of the flat gradients, documented
        assert rec["comm"]["all_gather"] == 4 * N + 4 * N * g.shape[1]


@pytest.mark.parametrize(
    "case", range(len(h.ROBUST_CASES)),
    ids=[f"{a}{'+nnm' if n else ''}{'+' + s['attack'] if s else ''}" for a, n, s in h.ROBUST_CASES],
)
def test_robust_aggregator_matches_pure_function(raw, case):
    name, nnm, spec = h.ROBUST_CASES[case]
    x = rank_grads(h.make_net(), 0)
    if spec is not None:
        s = ByzantineSpec.from_config(spec)
        for r in s.ranks:
            x[r] = s.apply(x[r])
    expected = aggregate(x, name, F, nnm=nnm, arc=True)
    for rank in range(N):
        rec = raw[rank][f"robust{case}"]
        torch.testing.assert_close(rec["grad"], expected, rtol=1e-4, atol=1e-6)
        assert torch.equal(rec["grad"], raw[0][f"robust{case}"]["grad"])  # identical on every rank
    rec = raw[0][f"robust{case}"]
    torch.testing.assert_close(rec["norms"], x.norm(dim=1), rtol=1e-5, atol=1e-6)
    # n x d gathered instead of an all-reduce: the documented cost.
    assert rec["comm"] == {"all_reduce": 0, "all_gather": 4 * N * x.shape[1]}


def test_gradient_accumulation_with_no_sync(raw):
    rec = raw[0]["accumulate"]
    assert rec["iter_no_sync"] == 0 and rec["iter"] == 1  # the hook ran once, on the synced backward
    g = rank_grads(h.make_net(), [0, 1])  # locally accumulated gradients
    torch.testing.assert_close(rec["grad"], hand_arc(g, F)[0].mean(dim=0), rtol=1e-5, atol=1e-6)


def test_bf16_gradients_norms_in_fp32(raw):
    rec = raw[0]["bf16"]
    assert rec["grad"].dtype == torch.bfloat16 and rec["norms"].dtype == torch.float32
    g = rank_grads(h.make_net().to(torch.bfloat16), 0, torch.bfloat16).float()
    torch.testing.assert_close(rec["norms"], g.norm(dim=1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rec["grad"].float(), hand_arc(g, F)[0].mean(dim=0), rtol=2e-2, atol=2e-3)


def test_find_unused_parameters(raw):
    rec = raw[0]["unused"]
    g = rank_grads(h.make_net(), 0)
    expected = hand_arc(g, F)[0].mean(dim=0)
    used = torch.cat([v.reshape(-1) for k, v in rec["grads"].items() if not k.startswith("unused")])
    torch.testing.assert_close(used, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rec["norms"], g.norm(dim=1), rtol=1e-5, atol=1e-6)
    for k, v in rec["grads"].items():
        if k.startswith("unused"):
            assert v is None or not v.any()


# ---------------------------------------------------------------------------------------------------
# Lightning


def test_trainer_fit_spawn_matches_hand_arc_and_logs(tmp_path, monkeypatch):
    monkeypatch.setenv("MASTER_PORT", str(h.free_port()))
    byzantine = {"ranks": [2], "attack": "scale", "factor": 1000.0}
    strategy = ARCDDPStrategy(num_byzantine=F, byzantine=byzantine, start_method="spawn")
    model = h.ARCModule(out_dir=str(tmp_path))
    trainer = pl.Trainer(
        accelerator="cpu", devices=N, strategy=strategy, max_steps=2, accumulate_grad_batches=2,
        logger=pl.loggers.CSVLogger(str(tmp_path), name="arc", version=0), log_every_n_steps=1,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(model)

    net = h.make_net()
    expected = []
    for step in range(2):
        g = rank_grads(net, [2 * step, 2 * step + 1], divide=2.0)  # Lightning divides the loss
        g[2] *= 1000.0
        clipped, threshold, mask = hand_arc(g, F)
        sgd_step(net, clipped.mean(dim=0))
        expected.append((threshold, sum(mask), g.norm(dim=1)))
    # The spawn launcher loads rank 0's trained weights back into `model`.
    torch.testing.assert_close(h.param_vector(model.net), h.param_vector(net), rtol=1e-5, atol=1e-6)

    # `strategy.last_arc_stats` on every rank: the last step's statistics, identical everywhere.
    threshold, _, norms = expected[-1]
    for rank in range(N):
        stats = torch.load(tmp_path / f"stats{rank}.pt", weights_only=False)
        assert float(stats["threshold"]) == pytest.approx(threshold, rel=1e-5)
        torch.testing.assert_close(stats["norms"], norms, rtol=1e-5, atol=1e-6)
        assert stats["clipped"].tolist() == [False, False, True] and stats["num_clipped"] == 1

    with open(tmp_path / "arc" / "version_0" / "metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get(ARC_THRESHOLD)]
    assert [int(r["step"]) for r in rows] == [0, 1]
    for row, (threshold, num_clipped, norms) in zip(rows, expected):
        assert float(row[ARC_THRESHOLD]) == pytest.approx(threshold, rel=1e-5)
        assert float(row[ARC_CLIPPED_RANKS]) == num_clipped == 1
        for i in range(N):
            assert float(row[arc_norm_tag(i)]) == pytest.approx(float(norms[i]), rel=1e-5)


def test_string_registry_and_world_size_errors():
    trainer = pl.Trainer(strategy="ddp_arc", accelerator="cpu", devices=3, logger=False)
    assert isinstance(trainer.strategy, ARCDDPStrategy)
    assert trainer.strategy.num_byzantine == 1 and trainer.strategy.aggregator == "mean"
    spawn = pl.Trainer(strategy="ddp_arc_spawn", accelerator="cpu", devices=3, logger=False).strategy
    assert isinstance(spawn, ARCDDPStrategy) and spawn._start_method == "spawn"
    with pytest.raises(ValueError, match=r"num_byzantine.*world size 3.*got 2"):
        pl.Trainer(strategy=ARCDDPStrategy(num_byzantine=2), accelerator="cpu", devices=3, logger=False)
    with pytest.raises(ValueError, match=r"world size 2"):
        pl.Trainer(strategy="ddp_arc", accelerator="cpu", devices=2, logger=False)
    with pytest.raises(ValueError, match=r"ranks.*\[0, 3\)"):
        pl.Trainer(strategy=ARCDDPStrategy(byzantine={"ranks": [5], "attack": "nan"}), accelerator="cpu",
                   devices=3, logger=False)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_byzantine": -1}, ValueError, "num_byzantine"),
        ({"num_byzantine": 1.5}, TypeError, "num_byzantine"),
        ({"aggregator": "trimmed"}, ValueError, r"`aggregator`.*'cwtm'"),
        ({"aggregator": None}, TypeError, "aggregator"),
        ({"nnm": "yes"}, TypeError, "nnm"),
        ({"log_arc": 1}, TypeError, "log_arc"),
        ({"byzantine": "nan"}, TypeError, "byzantine"),
        ({"byzantine": {"ranks": [1], "attack": "boom"}}, ValueError, "attack"),
        ({"ddp_comm_hook": lambda s, b: None}, ValueError, "ddp_comm_hook"),
        ({"arc": "no"}, TypeError, r"`arc` to be a bool"),
        ({"arc": 0}, TypeError, r"`arc` to be a bool"),
        ({"static_clip": 0.0}, ValueError, r"`static_clip` to be a positive finite number but got 0.0"),
        ({"static_clip": -2}, ValueError, r"`static_clip`"),
        ({"static_clip": float("inf")}, ValueError, r"`static_clip`"),
        ({"static_clip": "2"}, TypeError, r"`static_clip` to be a number"),
    ],
)
def test_strategy_argument_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        ARCDDPStrategy(**kwargs)
    if set(kwargs) <= {"arc", "static_clip"}:
        with pytest.raises(error, match=match):
            ARCHookState(**kwargs)


def test_ablation_switches_defaults_and_properties():
    strategy = ARCDDPStrategy()
    assert strategy.arc is True and strategy.static_clip is None
    strategy = ARCDDPStrategy(arc=False, static_clip=2)
    assert strategy.arc is False and strategy.static_clip == 2.0 and isinstance(strategy.static_clip, float)
    state = ARCHookState(num_byzantine=1, aggregator="cwtm", nnm=True, arc=False, static_clip=2.0)
    x = torch.randn(5, 4) * torch.tensor([[1.0], [2.0], [3.0], [40.0], [0.5]])
    # The aggregation the line search attacks is the hook's own pipeline, switches included.
    torch.testing.assert_close(state.server_aggregation(x), aggregate(x, "cwtm", 1, nnm=True, static_clip=2.0))
    copy = pickle.loads(pickle.dumps(state))
    assert (copy.arc, copy.static_clip) == (False, 2.0)
    old = ARCHookState(num_byzantine=1).__getstate__()
    for key in ("arc", "static_clip", "worker_momentum"):
        del old[key]  # a state pickled before these settings existed
    legacy = ARCHookState.__new__(ARCHookState)
    legacy.__setstate__(old)
    assert (legacy.arc, legacy.static_clip, legacy.worker_momentum) == (True, None, 0.0)


def test_hook_state_validation_and_pickle():
    with pytest.raises(ValueError, match="aggregator"):
        ARCHookState(aggregator="sum")
    with pytest.raises(ValueError, match="num_byzantine"):
        ARCHookState(num_byzantine=-2)
    state = ARCHookState(num_byzantine=2, aggregator="cwtm", nnm=True, byzantine={"ranks": [0], "attack": "zero"})
    state.iter = 7
    copy = pickle.loads(pickle.dumps(state))
    assert copy.process_group is None and copy.held == []
    assert (copy.num_byzantine, copy.aggregator, copy.nnm, copy.iter) == (2, "cwtm", True, 7)
    assert copy.byzantine == state.byzantine
    assert "process_group" not in state.__getstate__()
