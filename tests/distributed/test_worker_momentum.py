"""Worker momentum in ``ddp_arc`` (the ARC paper's Robust D-SHB): real gloo processes on CPU.

One ``torch.multiprocessing.spawn`` launch (3 ranks, one gloo process group) runs everything, as
starting processes that import Lightning is the expensive part on a small CPU machine:

* the raw-DDP scenarios of :data:`SCENARIOS` (``arc_hook`` registered directly, tiny buckets so DDP
  reorders them after the first step); the parent recomputes every step from each rank's data:
  ``m_r <- beta m_r + (1 - beta) g_r`` (``m_0 = 0``), the attack on the sent momentum, ARC and the
  aggregator;
* two Lightning ``Trainer`` fits in the same processes (``LOCAL_RANK`` & co. are set, so Lightning
  launches nothing and reuses the process group): an uninterrupted one that saves checkpoints, and
  one resumed from the step-2 checkpoint; the resumed weights must follow the uninterrupted ones,
  which needs every rank's buffer restored before the first resumed step.

The worker and the LightningModule live at module level: the spawned children import this module.
"""

from __future__ import annotations

import functools
import os
import pickle
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel as DDP

from lightning_clip import ARCDDPStrategy
from lightning_clip.distributed.hook import ARCHookState, arc_hook
from lightning_clip.distributed.strategy import ARC_STATE_KEY
from lightning_clip.robust.options import ARCConfig
from lightning_clip.robust.pipeline import aggregate
from lightning_clip.robust.transforms import WorkerMomentum
from lightning_clip.sim.byzantine import ByzantineSpec
from tests.helpers import ddp as h
from tests.helpers.gloo import close_group

N = 3  # ranks
F = 1  # num_byzantine: k = 1, ARC clips rank 2 (the largest loss scale)
BETA = 0.9
STEPS = 4
STATIC = 0.3  # static_clip bound: below ranks 1 and 2's momentum norms from the first step on

#: Raw scenarios: name -> (``h.hook_state`` kwargs: ARCConfig fields and ``byzantine``, steps).
SCENARIOS: dict[str, tuple[dict[str, Any], int]] = {
    "mean": ({"worker_momentum": BETA}, STEPS),
    "cwtm_nnm": ({"worker_momentum": 0.5, "aggregator": "cwtm", "nnm": True}, 3),
    "scale": ({"worker_momentum": BETA, "byzantine": {"ranks": [1], "attack": "scale", "factor": 1e3}}, 3),
    "foe_ls": ({"worker_momentum": BETA, "aggregator": "cwtm", "byzantine": {"ranks": [1], "attack": "foe_ls"}}, 3),
    "mimic": ({"worker_momentum": BETA, "byzantine": {"ranks": [0], "attack": "mimic"}}, 3),
    # Adaptive attacks without momentum (the hook's gather path for `needs_honest`).
    "alie_ls_nomom": ({"byzantine": {"ranks": [1], "attack": "alie_ls", "refine": 4}}, 2),
    "mimic_nomom": ({"aggregator": "median", "byzantine": {"ranks": [2], "attack": "mimic", "target": 1}}, 2),
    # Ablations and baselines: ARC off, static clipping (all-reduce and all-gather paths), both.
    "no_arc_cwtm_nnm": ({"worker_momentum": BETA, "aggregator": "cwtm", "nnm": True, "arc": False}, 3),
    "static_mean": ({"worker_momentum": BETA, "arc": False, "static_clip": STATIC}, 3),
    "arc_static_mean": ({"worker_momentum": BETA, "static_clip": STATIC}, 3),
    "arc_static_geomed": ({"worker_momentum": BETA, "aggregator": "geomed", "nnm": True, "static_clip": 0.5,
                           "byzantine": {"ranks": [1], "attack": "alie_ls", "refine": 2}}, 2),
    # Two Byzantine ranks of an omniscient attack: both compute it from the same gathered rows.
    "shared_foe_ls": ({"worker_momentum": BETA, "aggregator": "cwtm",
                       "byzantine": {"ranks": [1, 2], "attack": "foe_ls", "refine": 2}}, 2),
    "shared_mimic_no_arc": ({"aggregator": "median", "arc": False,
                             "byzantine": {"ranks": [1, 2], "attack": "mimic"}}, 2),
}


# ---------------------------------------------------------------------------------------------------
# Raw torch.multiprocessing worker


def _train(rank: int, steps: int, state: ARCHookState | None, dtype: torch.dtype = torch.float32) -> list[dict]:
    net = h.make_net().to(dtype)
    model = DDP(net, bucket_cap_mb=h.TINY_BUCKET_MB)
    if state is not None:
        model.register_comm_hook(state, arc_hook)
    opt = torch.optim.SGD(model.parameters(), lr=h.LR)
    out = []
    for step in range(steps):
        opt.zero_grad()
        h.rank_loss(model, rank, step, dtype).backward()
        opt.step()
        rec: dict[str, Any] = {"params": h.param_vector(net).clone()}
        if state is not None:
            momentum = state.worker_momentum or WorkerMomentum(0.0)  # none: zeros, what a buffer starts from
            rec["momentum"] = momentum.vector(list(net.parameters()))
            rec["momentum_dtypes"] = sorted({str(m.dtype) for m in momentum.buffers.values()})
            rec.update(h.hook_stats(state))
        out.append(rec)
    return out


def worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    # The environment of an external launcher: Lightning then starts no processes of its own.
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size), "NODE_RANK": "0"})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        res: dict[str, Any] = {}
        for name, (kwargs, steps) in SCENARIOS.items():
            res[name] = _train(rank, steps, h.hook_state(num_byzantine=F, **kwargs))
        # beta = 0.0 passed explicitly against the state without the argument.
        res["default"] = _train(rank, 3, h.hook_state(num_byzantine=F))
        res["beta0"] = _train(rank, 3, h.hook_state(num_byzantine=F, worker_momentum=0.0))
        res["bf16"] = _train(rank, 2, h.hook_state(num_byzantine=F, worker_momentum=BETA), torch.bfloat16)
        # A NaN rank without ARC poisons the average, as in plain DDP (with ARC it is zeroed).
        res["nan_no_arc"] = _train(rank, 1, h.hook_state(num_byzantine=F, arc=False,
                                                         byzantine={"ranks": [1], "attack": "nan"}))
        res["nan_arc"] = _train(rank, 1, h.hook_state(num_byzantine=F, byzantine={"ranks": [1], "attack": "nan"}))
        torch.save(res, Path(out_dir) / f"rank{rank}.pt")
        # Lightning: uninterrupted, checkpointing every 2 steps; then resumed from step 2.
        root = Path(out_dir)
        _fit(root, "full", TOTAL, ckpt_dir=root / "ckpt")
        _fit(root, "resumed", TOTAL, ckpt_path=root / "ckpt" / "step=2.ckpt")
        # The strategy's ablation switches reach the hook.
        _fit(root, "ablation", 3, aggregator="cwtm", nnm=True, arc=False, static_clip=ABLATION_CLIP)
    except BaseException:
        dist.destroy_process_group()
        raise
    else:
        close_group()


# ---------------------------------------------------------------------------------------------------
# References (never call the hook)


def rank_grads(net: torch.nn.Module, idx: int, dtype: torch.dtype = torch.float32) -> Tensor:
    return h.rank_grads(net, idx, dtype, n=N)


sgd_step = h.sgd_step


def reference(steps: int, worker_momentum: float = 0.0, aggregator: str = "mean", nnm: bool = False,
              byzantine: dict | None = None, dtype: torch.dtype = torch.float32, arc: bool = True,
              static_clip: float | None = None) -> list[dict[str, Tensor]]:
    """Robust D-SHB by hand: per-rank momenta, the attack on the sent vectors (each Byzantine rank on its own),
    [ARC], [static clip], [NNM], the rule, an SGD step."""
    spec = None if byzantine is None else ByzantineSpec.from_config(byzantine)
    honest = [r for r in range(N) if spec is None or not spec.is_byzantine(r)]
    server = functools.partial(aggregate, rule=aggregator, num_byzantine=F, nnm=nnm, arc=arc,
                               static_clip=static_clip)
    net = h.make_net().to(dtype)
    m = None
    out = []
    for step in range(steps):
        g = rank_grads(net, step, dtype).float()
        if worker_momentum > 0:
            m = (1 - worker_momentum) * g if m is None else worker_momentum * m + (1 - worker_momentum) * g
            sent = m.clone()
        else:
            sent = g.clone()
        if spec is not None:
            honest_rows = sent[honest].clone()
            for r in spec.ranks:
                sent[r] = spec.apply(sent[r], honest_rows, aggregation=server)
        agg = server(sent)
        sgd_step(net, agg)
        out.append({"params": h.param_vector(net).clone(), "momentum": None if m is None else m.clone(),
                    "sent": sent})
    return out


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("worker_momentum")
    mp.spawn(worker, args=(N, h.free_port(), str(path)), nprocs=N, join=True)
    return path


@pytest.fixture(scope="module")
def raw(out) -> list[dict]:
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(N)]


def _records(out: Path, tag: str) -> list[dict]:
    return [torch.load(out / f"{tag}_rank{r}.pt", weights_only=False) for r in range(N)]


# ---------------------------------------------------------------------------------------------------
# Raw DDP + arc_hook with worker momentum


@pytest.mark.distributed
def test_momentum_mean_matches_hand_robust_dshb(raw):
    ref = reference(STEPS, BETA)
    for step, expected in enumerate(ref):
        for rank in range(N):
            rec = raw[rank]["mean"][step]
            torch.testing.assert_close(rec["params"], expected["params"], rtol=1e-5, atol=1e-6)
            # Every rank's own buffer: m_1 = (1 - beta) g_1, then the recursion.
            torch.testing.assert_close(rec["momentum"], expected["momentum"][rank], rtol=1e-5, atol=1e-7)
        # ARC saw the momenta, not the gradients.
        torch.testing.assert_close(raw[0]["mean"][step]["norms"], expected["momentum"].norm(dim=1),
                                   rtol=1e-5, atol=1e-7)
    # The buckets were rebuilt (reordered) after the first step: the per-parameter buffers survived it.
    assert raw[0]["mean"][0]["num_buckets"] == 1 and raw[0]["mean"][-1]["num_buckets"] > 1
    # ARC clipped rank 2's momentum (the largest), so ARC is active in this check.
    assert raw[0]["mean"][-1]["norms"].argmax() == 2
    # Not the momentum-free run: the check would fail if the hook sent gradients.
    plain = reference(STEPS)
    assert not torch.allclose(plain[-1]["params"], ref[-1]["params"], rtol=1e-4, atol=1e-5)
    for rank in range(1, N):
        assert torch.equal(raw[rank]["mean"][-1]["params"], raw[0]["mean"][-1]["params"])


@pytest.mark.distributed
@pytest.mark.parametrize("name", [n for n in SCENARIOS if n != "mean"])
def test_momentum_robust_rules_and_attacks_match_reference(raw, name):
    kwargs, steps = SCENARIOS[name]
    ref = reference(steps, kwargs.get("worker_momentum", 0.0), kwargs.get("aggregator", "mean"),
                    kwargs.get("nnm", False), kwargs.get("byzantine"), arc=kwargs.get("arc", True),
                    static_clip=kwargs.get("static_clip"))
    for step, expected in enumerate(ref):
        for rank in range(N):
            torch.testing.assert_close(raw[rank][name][step]["params"], expected["params"], rtol=1e-5, atol=1e-6)
    if name in ("scale", "foe_ls", "mimic"):
        # The Byzantine rank's own buffer is its untransformed momentum; the attack only changes what it sends.
        for rank in range(N):
            torch.testing.assert_close(raw[rank][name][-1]["momentum"], ref[-1]["momentum"][rank],
                                       rtol=1e-5, atol=1e-7)
    if name.startswith("mimic"):
        spec = ByzantineSpec.from_config(SCENARIOS[name][0]["byzantine"])
        honest = [r for r in range(N) if not spec.is_byzantine(r)]
        target = spec.params.get("target", 0)
        for expected in ref:
            assert torch.equal(expected["sent"][spec.ranks[0]], expected["sent"][honest[target]])


def _static_scales(norms: Tensor, bound: float) -> Tensor:
    # clip_grad_norm_'s coefficient, written out independently of the library.
    return torch.clamp(bound / (norms + 1e-6), max=1.0)


@pytest.mark.distributed
def test_static_clip_really_clips_and_reports_its_scales(raw):
    ref = reference(3, BETA, arc=False, static_clip=STATIC)
    for step, expected in enumerate(ref):
        rec = raw[0]["static_mean"][step]
        norms = expected["momentum"].norm(dim=1)
        torch.testing.assert_close(rec["norms"], norms, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(rec["scales"], _static_scales(norms, STATIC), rtol=1e-5, atol=1e-7)
        assert float(rec["threshold"]) == pytest.approx(STATIC)  # no ARC: the static bound is the threshold
        assert (rec["scales"] < 1).sum() >= 2  # ranks 1 and 2 are clipped: the check is not vacuous
    # Without the clip the run differs.
    assert not torch.allclose(reference(3, BETA, arc=False)[-1]["params"], ref[-1]["params"], rtol=1e-4, atol=1e-5)
    # ARC then the static clip: ARC's scale first, the static clip on the ARC-clipped norm.
    ref = reference(3, BETA, static_clip=STATIC)
    for step, expected in enumerate(ref):
        rec = raw[0]["arc_static_mean"][step]
        norms = expected["momentum"].norm(dim=1)
        arc_scale = torch.ones(N)
        arc_scale[2] = norms[1] / norms[2]  # k = 1: the largest (rank 2) clipped to the second largest
        expected_scales = arc_scale * _static_scales(norms * arc_scale, STATIC)
        torch.testing.assert_close(rec["scales"], expected_scales, rtol=1e-5, atol=1e-7)


@pytest.mark.distributed
def test_without_arc_a_nan_rank_poisons_the_average_and_with_arc_it_does_not(raw):
    for rank in range(N):
        assert torch.isnan(raw[rank]["nan_no_arc"][0]["params"]).all()
        assert torch.isfinite(raw[rank]["nan_arc"][0]["params"]).all()
    ref = reference(1, byzantine={"ranks": [1], "attack": "nan"})
    torch.testing.assert_close(raw[0]["nan_arc"][0]["params"], ref[0]["params"], rtol=1e-5, atol=1e-6)


@pytest.mark.distributed
def test_shared_omniscient_attack_sends_the_same_vector_from_every_byzantine_rank(raw):
    # The reference applies the attack on each Byzantine rank separately, as every Byzantine rank of the hook does.
    for name in ("shared_foe_ls", "shared_mimic_no_arc"):
        kwargs, steps = SCENARIOS[name]
        ref = reference(steps, kwargs.get("worker_momentum", 0.0), kwargs["aggregator"],
                        byzantine=kwargs["byzantine"], arc=kwargs.get("arc", True))
        for expected in ref:
            assert torch.equal(expected["sent"][1], expected["sent"][2])
        for rank in range(N):
            torch.testing.assert_close(raw[rank][name][-1]["params"], ref[-1]["params"], rtol=1e-5, atol=1e-6)


@pytest.mark.distributed
def test_beta_zero_is_bitwise_the_previous_behaviour(raw):
    for rank in range(N):
        for a, b in zip(raw[rank]["default"], raw[rank]["beta0"]):
            assert torch.equal(a["params"], b["params"])
            assert torch.equal(a["norms"], b["norms"])
        assert not raw[rank]["beta0"][-1]["momentum"].any()  # no buffers kept: zeros
    ref = reference(3)
    torch.testing.assert_close(raw[0]["beta0"][-1]["params"], ref[-1]["params"], rtol=1e-5, atol=1e-6)


@pytest.mark.distributed
def test_bf16_gradients_keep_a_float32_momentum(raw):
    rec = raw[0]["bf16"]
    assert rec[-1]["momentum_dtypes"] == ["torch.float32"]
    ref = reference(2, BETA, dtype=torch.bfloat16)
    torch.testing.assert_close(rec[-1]["momentum"], ref[-1]["momentum"][0], rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(rec[-1]["params"].float(), ref[-1]["params"].float(), rtol=2e-2, atol=2e-3)


# ---------------------------------------------------------------------------------------------------
# Lightning: checkpoint every rank's buffer, resume mid-run


class MomentumModule(h.RecordingModule):
    """``RecordingModule`` of ``tests.helpers.ddp`` (20 batches per rank: one epoch); saves every rank's momentum."""

    def on_train_end(self) -> None:
        state = self.trainer.strategy.arc_state
        names = [n for n, p in self.named_parameters()]
        momentum = state.worker_momentum.vector([p for p in self.parameters()])
        self.save(momentum=momentum, names=names)


TOTAL = 5  # optimizer steps of the Lightning runs


def _fit(root: Path, tag: str, max_steps: int, ckpt_dir: Path | None = None, ckpt_path: Path | None = None,
         **strategy_kwargs: Any) -> None:
    """One ``Trainer.fit`` on this rank (run inside :func:`worker` by every rank)."""
    h.fit_resumable(MomentumModule(str(root), tag), ARCDDPStrategy(num_byzantine=F, worker_momentum=BETA,
                                                                   **strategy_kwargs),
                    N, max_steps, root, ckpt_dir=ckpt_dir, ckpt_path=ckpt_path)


@pytest.mark.distributed
def test_trainer_checkpoints_every_rank_and_resume_continues_the_run(out):
    total = TOTAL
    ckpt_dir = out / "ckpt"
    full = _records(out, "full")
    ref = reference(total, BETA)

    # The uninterrupted run is Robust D-SHB with ARC, step by step, on every rank.
    for rank in range(N):
        assert [s for s, _ in full[rank]["records"]] == list(range(1, total + 1))
        for (_, params), expected in zip(full[rank]["records"], ref):
            torch.testing.assert_close(params, expected["params"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(full[rank]["momentum"], ref[-1]["momentum"][rank], rtol=1e-5, atol=1e-7)

    # The step-2 checkpoint, written by rank 0, holds every rank's buffer after step 2.
    ckpt = torch.load(ckpt_dir / "step=2.ckpt", weights_only=True)
    entry = ckpt[ARC_STATE_KEY]
    assert entry["world_size"] == N and {row["worker_momentum"]["beta"] for row in entry["per_rank"]} == {BETA}
    assert entry["names"] == full[0]["names"] == ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"]
    buffers = torch.stack([row["worker_momentum"]["vector"] for row in entry["per_rank"]])
    assert buffers.shape == (N, ref[0]["momentum"].shape[1])
    torch.testing.assert_close(buffers, ref[1]["momentum"], rtol=1e-5, atol=1e-7)
    assert not torch.allclose(buffers[0], buffers[1])  # really per rank

    # Resume from step 2: the next steps equal the uninterrupted run's (buffers restored before step 3).
    resumed = _records(out, "resumed")
    for rank in range(N):
        steps = [s for s, _ in resumed[rank]["records"]]
        assert steps == list(range(3, total + 1))
        for (step, params), (full_step, full_params) in zip(resumed[rank]["records"], full[rank]["records"][2:]):
            assert step == full_step
            torch.testing.assert_close(params, full_params, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(resumed[rank]["momentum"], full[rank]["momentum"], rtol=1e-6, atol=1e-7)


ABLATION_CLIP = 0.6  # between ranks 1 and 2's momentum norms: ARC and the static clip act differently


@pytest.mark.distributed
def test_trainer_strategy_ablation_switches_reach_the_hook(out):
    ref = reference(3, BETA, aggregator="cwtm", nnm=True, arc=False, static_clip=ABLATION_CLIP)
    ablation = _records(out, "ablation")
    for rank in range(N):
        for (_, params), expected in zip(ablation[rank]["records"], ref):
            torch.testing.assert_close(params, expected["params"], rtol=1e-5, atol=1e-6)
    # Both switches matter here: with ARC, or without the static clip, the run differs.
    for other in (reference(3, BETA, aggregator="cwtm", nnm=True, static_clip=ABLATION_CLIP),
                  reference(3, BETA, aggregator="cwtm", nnm=True, arc=False)):
        assert not torch.allclose(other[-1]["params"], ref[-1]["params"], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Single process: arguments, state round trips, checkpoint edge cases


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (1.0, ValueError, r"`worker_momentum` to be in \[0, 1\) but got 1.0"),
        (-0.1, ValueError, r"`worker_momentum` to be in \[0, 1\) but got -0.1"),
        (float("nan"), ValueError, r"`worker_momentum`"),
        ("0.9", TypeError, r"`worker_momentum` to be a number"),
        (True, TypeError, r"`worker_momentum` to be a number"),
    ],
)
def test_worker_momentum_validation(value, error, match):
    with pytest.raises(error, match=match):
        ARCDDPStrategy(worker_momentum=value)
    with pytest.raises(error, match=match):
        ARCConfig(worker_momentum=value)
    with pytest.raises(error, match=match):
        WorkerMomentum(value)


def test_strategy_and_state_accept_worker_momentum():
    assert ARCDDPStrategy().arc_config.worker_momentum == 0.0
    assert ARCDDPStrategy(worker_momentum=0.9).arc_config.worker_momentum == 0.9
    assert ARCDDPStrategy(worker_momentum=0).arc_config.worker_momentum == 0.0
    state = ARCHookState(ARCConfig(worker_momentum=0.5))
    assert state.worker_momentum is not None and state.worker_momentum.beta == 0.5
    assert ARCHookState().worker_momentum is None and ARCHookState().transforms == []


def test_momentum_vector_round_trip_and_pickle():
    net = h.make_net()
    params = list(net.parameters())
    momentum = WorkerMomentum(0.9)
    d = sum(p.numel() for p in params)
    assert torch.equal(momentum.vector(params), torch.zeros(d))  # m_0 = 0
    vec = torch.arange(d, dtype=torch.float32)
    momentum.load_vector(vec, params)
    assert torch.equal(momentum.vector(params), vec)
    assert torch.equal(momentum.vector(params[::-1]), torch.cat([vec[-2:], vec[-18:-2], vec[32:40], vec[:32]]))
    with pytest.raises(ValueError, match=rf"1-D tensor of {d} elements"):
        momentum.load_vector(vec[:-1], params)
    copy = pickle.loads(pickle.dumps(momentum))
    assert copy.beta == 0.9 and copy.buffers == {}
    momentum.reset()
    assert not momentum.vector(params).any()


def _strategy_with(module: pl.LightningModule, worker_momentum: float) -> ARCDDPStrategy:
    strategy = ARCDDPStrategy(worker_momentum=worker_momentum)
    strategy.connect(module)
    return strategy


def _save(tmp_path: Path, checkpoint: dict) -> Path:
    path = tmp_path / "c.ckpt"
    torch.save(checkpoint, path)
    return path


def test_load_checkpoint_edge_cases(tmp_path):
    module = MomentumModule(str(tmp_path), "x")
    names = [n for n, _ in module.named_parameters()]
    params = list(module.parameters())
    d = sum(p.numel() for p in params)
    row = {"worker_momentum": {"beta": BETA, "vector": torch.ones(d)}}
    good = {"names": names, "world_size": 1, "shared": {}, "per_rank": [row]}

    strategy = _strategy_with(module, BETA)
    strategy.load_checkpoint(_save(tmp_path, {"optimizer_states": [], ARC_STATE_KEY: good}))
    assert torch.equal(strategy.arc_state.worker_momentum.vector(params), torch.ones(d))  # this rank's row

    with pytest.warns(UserWarning, match=r"from 3 ranks but this run has 1.*restarts from zero"):
        strategy = _strategy_with(module, BETA)
        strategy.load_checkpoint(_save(tmp_path, {ARC_STATE_KEY: {**good, "world_size": 3, "per_rank": [row] * 3}}))
    assert not strategy.arc_state.worker_momentum.vector(params).any()

    with pytest.warns(UserWarning, match=r"no ddp_arc state .*worker_momentum restart"):
        _strategy_with(module, BETA).load_checkpoint(_save(tmp_path, {"optimizer_states": []}))

    with pytest.warns(UserWarning, match=r"does not use \(worker_momentum\): it is ignored"):
        _strategy_with(module, 0.0).load_checkpoint(_save(tmp_path, {ARC_STATE_KEY: good}))

    with pytest.raises(ValueError, match=r"model changed since the checkpoint"):
        _strategy_with(module, BETA).load_checkpoint(_save(tmp_path, {ARC_STATE_KEY: {**good, "names": ["w"]}}))

    # A checkpoint written under the earlier key (one [n, D] tensor of every rank's buffer) is read too.
    earlier = {"worker_momentum": BETA, "world_size": 1, "names": names, "numels": [],
               "buffers": torch.full((1, d), 2.0)}
    strategy = _strategy_with(module, BETA)
    strategy.load_checkpoint(_save(tmp_path, {"optimizer_states": [], "arc_worker_momentum": earlier}))
    assert torch.equal(strategy.arc_state.worker_momentum.vector(params), torch.full((d,), 2.0))
