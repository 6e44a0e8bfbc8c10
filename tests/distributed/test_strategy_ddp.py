"""ARC across DDP ranks: real gloo processes on CPU, checked against single-process references.

One ``torch.multiprocessing.spawn`` run (3 ranks) executes every raw-DDP scenario of
``tests.helpers.ddp.raw_worker``; one Lightning ``Trainer`` run (3 ranks, ``start_method="spawn"``) checks
the strategy end to end. The references below never call the hook: hand ARC on per-rank gradients
recomputed in this process.
"""

from __future__ import annotations

import csv
import dataclasses
import inspect
import pickle

import lightning.pytorch as pl
import pytest
import torch
import torch.multiprocessing as mp
from torch import Tensor

from lightning_clip import ARCDDPStrategy
from lightning_clip.distributed.hook import ARCHookState
from lightning_clip.robust import pipeline
from lightning_clip.robust.options import ARCConfig
from lightning_clip.robust.pipeline import aggregate
from lightning_clip.sim.byzantine import ByzantineSpec, ByzantineTransform
from lightning_clip.tags import ARC_CLIPPED_RANKS, ARC_THRESHOLD, arc_norm_tag
from tests.helpers import ddp as h

N = 3  # ranks
F = 1  # num_byzantine -> k = floor(2 * 1 * 2 / 3) = 1


# ---------------------------------------------------------------------------------------------------
# References


hand_arc, sgd_step = h.hand_arc, h.sgd_step


def rank_grads(net: torch.nn.Module, idx: int | list[int], dtype=torch.float32, divide: float = 1.0) -> Tensor:
    return h.rank_grads(net, idx, dtype, divide, n=N)


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("raw_ddp")
    mp.spawn(h.raw_worker, args=(N, h.free_port(), str(out)), nprocs=N, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(N)]


# ---------------------------------------------------------------------------------------------------
# Raw DDP + arc_hook


@pytest.mark.distributed
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


@pytest.mark.distributed
def test_num_byzantine_zero_equals_plain_ddp_exactly(raw):
    for rank in range(N):
        for plain, arc in zip(raw[rank]["plain"], raw[rank]["f0"]):
            assert torch.equal(plain["params"], arc["params"])
        assert not raw[rank]["f0"][-1]["clipped"].any()


@pytest.mark.distributed
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


@pytest.mark.distributed
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
    # The sharded default: one all-to-all of the vector's n equal chunks, one all-gather of the aggregate's,
    # one of the d mod n last coordinates, and the n norms.
    d = x.shape[1]
    assert rec["comm"]["all_to_all"] == 4 * N * (d // N)
    assert rec["comm"]["all_gather"] == 4 * N * (d // N) + 4 * N * (d % N) + 4 * N


def _peer_failure_messages(tmp_path, *hang_s: float) -> list[str]:
    """Rank 2 of N stops at step 2 (after DDP's bucket rebuild at step 1, whose broadcast is not ours): it exits,
    or with ``hang_s`` stays alive that long without taking part. The survivors' first error lines."""
    ctx = mp.get_context("spawn")
    port = h.free_port()
    procs = [ctx.Process(target=h.peer_failure_worker, args=(r, N, port, str(tmp_path), 2, 2, *hang_s))
             for r in range(N)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 3]
    lines = []
    for rank in (0, 1):
        outcome = torch.load(tmp_path / f"peer{rank}.pt", weights_only=False)
        assert outcome["type"] == "PeerFailureError", outcome
        lines.append(outcome["message"].splitlines()[0])
    return lines


@pytest.mark.distributed
def test_a_dead_peer_is_reported_with_the_step_by_the_survivors(tmp_path):
    for rank, first_line in enumerate(_peer_failure_messages(tmp_path)):
        assert first_line.startswith(f"ddp_arc: the all-gather of step 2 failed on rank {rank} of {N}: a peer rank")
        assert "Cause: [" in first_line and "gloo" in first_line  # gloo's own message, on the same line


@pytest.mark.distributed
def test_a_hung_peer_is_reported_as_a_timeout_by_the_survivors(tmp_path):
    # Rank 2 stays alive past the 3 s timeout of the process group.
    for rank, first_line in enumerate(_peer_failure_messages(tmp_path, 12.0)):
        assert first_line.startswith(f"ddp_arc: the all-gather of step 2 timed out after 3 s on rank {rank} of {N}: "
                                     "a peer rank did not take part in time, so it is hung"), first_line
        assert "probably died" not in first_line and "DDPStrategy(timeout=...)" in first_line


@pytest.mark.distributed
def test_gradient_accumulation_with_no_sync(raw):
    rec = raw[0]["accumulate"]
    assert rec["iter_no_sync"] == 0 and rec["iter"] == 1  # the hook ran once, on the synced backward
    g = rank_grads(h.make_net(), [0, 1])  # locally accumulated gradients
    torch.testing.assert_close(rec["grad"], hand_arc(g, F)[0].mean(dim=0), rtol=1e-5, atol=1e-6)


@pytest.mark.distributed
def test_bf16_gradients_norms_in_fp32(raw):
    rec = raw[0]["bf16"]
    assert rec["grad"].dtype == torch.bfloat16 and rec["norms"].dtype == torch.float32
    g = rank_grads(h.make_net().to(torch.bfloat16), 0, torch.bfloat16).float()
    torch.testing.assert_close(rec["norms"], g.norm(dim=1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rec["grad"].float(), hand_arc(g, F)[0].mean(dim=0), rtol=2e-2, atol=2e-3)


@pytest.mark.distributed
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


@pytest.mark.distributed
def test_trainer_fit_spawn_matches_hand_arc_and_logs(tmp_path, monkeypatch):
    monkeypatch.setenv("MASTER_PORT", str(h.free_port()))
    attack = ByzantineTransform(ranks=[2], attack="scale", params={"factor": 1000.0})
    strategy = ARCDDPStrategy(num_byzantine=F, send_transforms=[attack], start_method="spawn")
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
    assert trainer.strategy.arc_config == ARCConfig(num_byzantine=1, aggregator="mean")
    spawn = pl.Trainer(strategy="ddp_arc_spawn", accelerator="cpu", devices=3, logger=False).strategy
    assert isinstance(spawn, ARCDDPStrategy) and spawn._start_method == "spawn"
    with pytest.raises(ValueError, match=r"num_byzantine.*world size 3.*got 2"):
        pl.Trainer(strategy=ARCDDPStrategy(num_byzantine=2), accelerator="cpu", devices=3, logger=False)
    with pytest.raises(ValueError, match=r"world size 2"):
        pl.Trainer(strategy="ddp_arc", accelerator="cpu", devices=2, logger=False)
    with pytest.raises(ValueError, match=r"ranks.*\[0, 3\)"):
        pl.Trainer(strategy=ARCDDPStrategy(send_transforms=[ByzantineTransform(ranks=[5], attack="nan")]),
                   accelerator="cpu", devices=3, logger=False)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_byzantine": -1}, ValueError, "num_byzantine"),
        ({"num_byzantine": 1.5}, TypeError, "num_byzantine"),
        ({"aggregator": "trimmed"}, ValueError, r"`aggregator`.*'cwtm'"),
        ({"aggregator": None}, TypeError, "aggregator"),
        ({"nnm": "yes"}, TypeError, "nnm"),
        ({"log_arc": 1}, TypeError, "log_arc"),
        ({"byzantine": {"ranks": [1], "attack": "nan"}}, TypeError,
         r"does not take `byzantine=`.*send_transforms=\[ByzantineTransform\(ranks=\[1\], attack='sign_flip'\)\]"),
        ({"seed": 0}, TypeError, r"does not take `seed=`.*ByzantineTransform\(\.\.\., seed=0\)"),
        ({"send_transforms": [3]}, TypeError, r"`transforms` to hold callables"),
        ({"send_transforms": "nan"}, TypeError, r"`transforms` to be a sequence"),
        ({"ddp_comm_hook": lambda s, b: None}, ValueError, "ddp_comm_hook"),
        ({"arc": "no"}, TypeError, r"`arc` to be a bool"),
        ({"arc": 0}, TypeError, r"`arc` to be a bool"),
        ({"static_clip": 0.0}, ValueError, r"`static_clip` to be a positive finite number but got 0.0"),
        ({"static_clip": -2}, ValueError, r"`static_clip`"),
        ({"static_clip": float("inf")}, ValueError, r"`static_clip`"),
        ({"static_clip": "2"}, TypeError, r"`static_clip` to be a number"),
        ({"numbyzantine": 1}, TypeError, r"unexpected keyword argument `numbyzantine`; did you mean `num_byzantine`"),
        ({"bucket_cap": 25}, TypeError, r"`bucket_cap`; did you mean `bucket_cap_mb`"),
        ({"arc_config": {"num_byzantine": 1}}, TypeError, r"`arc_config` to be an ARCConfig"),
        ({"arc_config": ARCConfig(), "num_byzantine": 2}, ValueError, r"either `arc_config` or the keyword"),
    ],
)
def test_strategy_argument_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        ARCDDPStrategy(**kwargs)
    config_keys = {"num_byzantine", "aggregator", "nnm", "arc", "static_clip"}
    if set(kwargs) <= config_keys:  # the same check, once, in the config the strategy builds
        with pytest.raises(error, match=match):
            ARCConfig(**kwargs)


def test_strategy_builds_or_takes_one_config_and_forwards_it():
    strategy = ARCDDPStrategy()
    assert strategy.arc_config == ARCConfig() and strategy.arc_config.arc is True
    strategy = ARCDDPStrategy(arc=False, static_clip=2)
    assert strategy.arc_config.static_clip == 2.0 and isinstance(strategy.arc_config.static_clip, float)
    config = ARCConfig(num_byzantine=2, aggregator="cwtm", nnm=True, worker_momentum=0.9)
    assert ARCDDPStrategy(arc_config=config).arc_config is config
    # A keyword next to the object would be silently ignored, even at its default value: refused, naming it.
    with pytest.raises(ValueError, match=r"either `arc_config` or the keyword arguments that build one \(nnm\)"):
        ARCDDPStrategy(arc_config=config, nnm=False)
    # The strategy's keyword defaults are the config's defaults (declared once, checked here).
    params = inspect.signature(ARCDDPStrategy.__init__).parameters
    for field in dataclasses.fields(ARCConfig):
        assert params[field.name].default == field.default, field.name
    # Unknown DDP keywords fail at construction; known ones pass through to DDPStrategy.
    assert ARCDDPStrategy(find_unused_parameters=True, bucket_cap_mb=1)._ddp_kwargs["bucket_cap_mb"] == 1


def test_server_aggregation_is_the_pure_pipeline():
    config = ARCConfig(num_byzantine=1, aggregator="cwtm", nnm=True, arc=False, static_clip=2.0)
    x = torch.randn(5, 4) * torch.tensor([[1.0], [2.0], [3.0], [40.0], [0.5]])
    # The aggregation the line search attacks is the hook's own pipeline, switches included.
    assert torch.equal(pipeline.server_aggregation(config)(x), aggregate(x, "cwtm", 1, nnm=True, static_clip=2.0))


def test_hook_state_validation_and_pickle():
    with pytest.raises(ValueError, match="aggregator"):
        ARCConfig(aggregator="sum")
    with pytest.raises(TypeError, match="ARCConfig"):
        ARCHookState({"num_byzantine": 1})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="transforms"):
        ARCHookState(transforms=[3])  # type: ignore[list-item]
    state = h.hook_state(num_byzantine=2, aggregator="cwtm", nnm=True, worker_momentum=0.5,
                         byzantine={"ranks": [0], "attack": "zero"})
    assert [type(t).__name__ for t in state.transforms] == ["WorkerMomentum", "ByzantineTransform"]
    state.iter = 7
    state.worker_momentum.buffers[0] = torch.ones(3)
    copy = pickle.loads(pickle.dumps(state))
    assert copy.process_group is None and copy.held == []
    assert copy.config == state.config and copy.iter == 7
    assert copy.transforms[1].spec == state.transforms[1].spec
    assert copy.worker_momentum.beta == 0.5 and copy.worker_momentum.buffers == {}  # keyed by live parameters
    assert "process_group" not in state.__getstate__()


def test_hook_state_collects_the_state_of_its_parts_shared_or_per_rank():
    params = list(h.make_net().parameters())
    state = h.hook_state(num_byzantine=1, aggregator="cclip", worker_momentum=0.5,
                         byzantine={"ranks": [0], "attack": "zero"})
    assert list(state.stateful) == ["worker_momentum", "center"]  # the attack keeps no state
    d = sum(p.numel() for p in params)
    state.center.load_vector(torch.arange(float(d)), params)
    saved = state.state_dict(params)
    assert list(saved["per_rank"]) == ["worker_momentum"] and list(saved["shared"]) == ["center"]
    assert torch.equal(saved["shared"]["center"]["vector"], torch.arange(float(d)))
    fresh = h.hook_state(num_byzantine=1, aggregator="cclip", worker_momentum=0.5)
    fresh.load_state_dict({**saved["shared"], **saved["per_rank"]}, params)
    assert torch.equal(fresh.center.vector(params), torch.arange(float(d)))
    assert not fresh.worker_momentum.vector(params).any()  # m_0 = 0, restored as saved
    assert list(h.hook_state(num_byzantine=1).stateful) == []
