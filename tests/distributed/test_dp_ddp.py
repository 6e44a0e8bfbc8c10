"""Client-level differential privacy in ``ddp_arc``: real gloo processes on CPU, one launch.

One ``torch.multiprocessing.spawn`` launch (3 ranks, one gloo process group) runs:

* raw ``DistributedDataParallel`` scenarios with ``arc_hook`` registered directly: static clipping with
  ``dp_noise_multiplier=0`` against static clipping alone (bitwise), the noise of one step (its values
  against the seeded draw), many backward passes at fixed weights (the noise's mean and variance),
  noisy training steps on the all-reduce and the all-gather (``cwtm``) paths, the adaptive clip bound;
* two Lightning fits in the same processes: an uninterrupted noisy run with the adaptive bound that
  checkpoints, and one resumed from its step-2 checkpoint, which must replay the same noise.

The parent checks against references computed in this process: ``clip_grad_norm_``'s coefficient, the
hand formula of the geometric bound update, numpy statistics and ``dp_accounting`` called directly.
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from lightning_clip import ARCDDPStrategy
from lightning_clip.distributed.strategy import ARC_STATE_KEY
from lightning_clip.robust.privacy import COUNT_STREAM, gaussian_noise
from lightning_clip.tags import DP_CLIP_BOUND, DP_EPSILON
from tests.helpers import ddp as h
from tests.helpers.gloo import close_group
from tests.helpers.reference import exact_gaussian_epsilon

N = 3
CLIP = 0.5  # below every rank's gradient norm of make_net: every rank is clipped
SIGMA = 1.0
SEED = 7
STAT_PASSES = 30  # backward passes at fixed weights for the noise statistics
QUANTILE, LR_C, COUNT_STD = 0.5, 0.3, 0.6  # adaptive bound: 2 * 0.6 > SIGMA
TOTAL = 5  # optimizer steps of the Lightning runs
DELTA = 1e-4

MEAN = {"num_byzantine": 1, "arc": False, "static_clip": CLIP}
ADAPTIVE = {**MEAN, "dp_noise_multiplier": SIGMA, "dp_seed": SEED, "dp_clip_quantile": QUANTILE,
            "dp_clip_learning_rate": LR_C, "dp_clipped_count_stddev": COUNT_STD}


def _train(rank: int, steps: int, **config: Any) -> list[dict[str, Any]]:
    state = h.hook_state(**config)
    model = h._ddp(h.make_net(), state)
    opt = torch.optim.SGD(model.parameters(), lr=h.LR)
    out = []
    for step in range(steps):
        opt.zero_grad()
        h.rank_loss(model, rank, step).backward()
        opt.step()
        rec = {"params": h.param_vector(model.module).clone(), **h.hook_stats(state)}
        if state.dp is not None and state.dp.bound is not None:
            rec["bound"] = state.dp.bound.clone()
        out.append(rec)
    return out


def _grads(rank: int, passes: int, **config: Any) -> list[Tensor]:
    """The reduced gradient of ``passes`` backward passes at the initial weights (the hook's step advances)."""
    model = h._ddp(h.make_net(), h.hook_state(**config))
    return [h._one_backward(model, rank) for _ in range(passes)]


def worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size), "NODE_RANK": "0"})
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*DP guarantee.*")
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        res: dict[str, Any] = {
            "static": _train(rank, 3, **MEAN),
            "sigma0": _train(rank, 3, **MEAN, dp_noise_multiplier=0.0, dp_seed=SEED),
            "noisy": _train(rank, 3, **MEAN, dp_noise_multiplier=SIGMA, dp_seed=SEED),
            "noisy_cwtm": _train(rank, 3, num_byzantine=1, aggregator="cwtm", static_clip=CLIP,
                                 dp_noise_multiplier=SIGMA, dp_seed=SEED),
            "adaptive": _train(rank, 4, **ADAPTIVE),
            "clean_grad": _grads(rank, 1, **MEAN)[0],
            "noisy_grads": _grads(rank, STAT_PASSES, **MEAN, dp_noise_multiplier=SIGMA, dp_seed=SEED),
            "cwtm_clean_grad": _grads(rank, 1, num_byzantine=1, aggregator="cwtm", static_clip=CLIP)[0],
            "cwtm_noisy_grad": _grads(rank, 1, num_byzantine=1, aggregator="cwtm", static_clip=CLIP,
                                      dp_noise_multiplier=SIGMA, dp_seed=SEED)[0],
        }
        torch.save(res, Path(out_dir) / f"rank{rank}.pt")
        root = Path(out_dir)
        _fit(root, "full", ckpt_dir=root / "ckpt")
        _fit(root, "resumed", ckpt_path=root / "ckpt" / "step=2.ckpt")
    except BaseException:
        dist.destroy_process_group()
        raise
    else:
        close_group()


class DPModule(h.RecordingModule):
    """:class:`~tests.helpers.ddp.RecordingModule` that also records the clipping bound; saves the privacy summary."""

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        bound = self.trainer.strategy.arc_state.dp.bound
        self.records.append((self.global_step, h.param_vector(self.net).clone(), float(bound)))

    def on_train_end(self) -> None:
        strategy = self.trainer.strategy
        self.save(summary=strategy.dp_summary(), epsilon=strategy.dp_epsilon())


def _fit(root: Path, tag: str, ckpt_dir: Path | None = None, ckpt_path: Path | None = None) -> None:
    h.fit_resumable(DPModule(str(root), tag), ARCDDPStrategy(**ADAPTIVE, dp_delta=DELTA), N, TOTAL, root,
                    ckpt_dir=ckpt_dir, ckpt_path=ckpt_path,
                    logger=pl.loggers.CSVLogger(str(root), name=tag, version=0), log_every_n_steps=1)


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    pytest.importorskip("dp_accounting")  # the strategy reports epsilon: it needs the [dp] extra
    path = tmp_path_factory.mktemp("dp_ddp")
    mp.spawn(worker, args=(N, h.free_port(), str(path)), nprocs=N, join=True)
    return path


@pytest.fixture(scope="module")
def raw(out) -> list[dict]:
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(N)]


def _clip_coef(norms: Tensor, bound: float | Tensor) -> Tensor:
    # clip_grad_norm_'s coefficient, written out independently of the library.
    return torch.clamp(bound / (norms + 1e-6), max=1.0)


def _epsilon(steps: int) -> float:
    """Every rank in every step (sampling rate 1): the exact epsilon of ``steps`` Gaussian mechanisms."""
    return exact_gaussian_epsilon(SIGMA, steps, DELTA)


# ---------------------------------------------------------------------------------------------------
# Raw DDP


@pytest.mark.distributed
def test_sigma_zero_is_bitwise_the_static_clip_run(raw):
    for rank in range(N):
        for a, b in zip(raw[rank]["static"], raw[rank]["sigma0"]):
            assert torch.equal(a["params"], b["params"])
            assert torch.equal(a["scales"], b["scales"])
    assert (raw[0]["static"][0]["scales"] < 1).all()  # every rank clipped: the bound is in force


@pytest.mark.distributed
def test_one_step_adds_the_seeded_noise_once_divided_by_n(raw):
    # noisy - noiseless aggregate of the first backward: a permutation of N(0, (sigma C)^2) / n of step 0.
    d = raw[0]["clean_grad"].numel()
    expected = gaussian_noise(d, SIGMA * CLIP, SEED, 0) / N
    for rank in range(N):
        diff = raw[rank]["noisy_grads"][0] - raw[rank]["clean_grad"]
        torch.testing.assert_close(diff.sort().values, expected.sort().values, rtol=1e-4, atol=1e-6)
        assert torch.equal(raw[rank]["noisy_grads"][0], raw[0]["noisy_grads"][0])
    # The all-gather path: every rank adds the same noise to the same aggregate.
    for rank in range(N):
        diff = raw[rank]["cwtm_noisy_grad"] - raw[rank]["cwtm_clean_grad"]
        torch.testing.assert_close(diff.sort().values, expected.sort().values, rtol=1e-4, atol=1e-6)
        assert torch.equal(raw[rank]["cwtm_noisy_grad"], raw[0]["cwtm_noisy_grad"])


@pytest.mark.distributed
def test_noise_mean_and_variance_over_many_steps(raw):
    diffs = torch.stack([g - raw[0]["clean_grad"] for g in raw[0]["noisy_grads"]]).double().numpy()
    samples = diffs.reshape(-1)
    var = (SIGMA * CLIP / N) ** 2
    m = samples.size
    assert abs(samples.mean()) < 4.0 * math.sqrt(var / m)
    assert abs(samples.var() - var) < 4.0 * var * math.sqrt(2.0 / m)
    # Fresh noise every step: consecutive steps are uncorrelated.
    assert abs(np.corrcoef(diffs[1:].reshape(-1), diffs[:-1].reshape(-1))[0, 1]) < 4.0 / math.sqrt(m)


@pytest.mark.distributed
def test_replicas_identical_after_noisy_steps(raw):
    for name in ("noisy", "noisy_cwtm", "adaptive"):
        for step in range(len(raw[0][name])):
            for rank in range(1, N):
                assert torch.equal(raw[rank][name][step]["params"], raw[0][name][step]["params"]), (name, step)
    # The noise changed the run.
    assert not torch.allclose(raw[0]["noisy"][-1]["params"], raw[0]["static"][-1]["params"], atol=1e-4)


@pytest.mark.distributed
def test_adaptive_bound_follows_the_hand_update(raw):
    bound = torch.tensor(CLIP)
    for step, rec in enumerate(raw[0]["adaptive"]):
        norms = rec["norms"]
        # This step clipped with the bound in force, as clip_grad_norm_ would.
        torch.testing.assert_close(rec["scales"], _clip_coef(norms, bound), rtol=1e-6, atol=1e-7)
        count = float((norms <= bound).sum()) + float(gaussian_noise(1, COUNT_STD, SEED, step, stream=COUNT_STREAM)[0])
        bound = bound * math.exp(-LR_C * (count / N - QUANTILE))
        torch.testing.assert_close(rec["bound"], bound, rtol=1e-6, atol=0.0)
        for rank in range(N):
            assert torch.equal(raw[rank]["adaptive"][step]["bound"], rec["bound"])
    assert float(bound) != pytest.approx(CLIP)  # it moved


# ---------------------------------------------------------------------------------------------------
# Lightning: checkpoint, resume, epsilon


def _records(out: Path, tag: str) -> list[dict]:
    return [torch.load(out / f"{tag}_rank{r}.pt", weights_only=False) for r in range(N)]


@pytest.mark.distributed
def test_resume_replays_the_noise_and_the_bound(out):
    full, resumed = _records(out, "full"), _records(out, "resumed")
    ckpt = torch.load(out / "ckpt" / "step=2.ckpt", weights_only=True)
    assert float(ckpt[ARC_STATE_KEY]["shared"]["dp"]["clip_bound"]) == full[0]["records"][1][2]
    for rank in range(N):
        assert [s for s, _, _ in resumed[rank]["records"]] == list(range(3, TOTAL + 1))
        for (step, params, bound), (fstep, fparams, fbound) in zip(resumed[rank]["records"], full[rank]["records"][2:]):
            assert step == fstep
            # Not bitwise: a fresh DDP model starts with one bucket, so its first norm is summed in another
            # order; the noise (about sigma C lr / n = 0.017 per weight each step) must be the same draw.
            torch.testing.assert_close(params, fparams, rtol=1e-6, atol=1e-6)
            assert bound == pytest.approx(fbound, rel=1e-6)
        assert torch.equal(full[rank]["records"][-1][1], full[0]["records"][-1][1])


@pytest.mark.distributed
def test_epsilon_is_the_exact_gaussian_one_and_is_logged(out):
    full = _records(out, "full")
    assert full[0]["epsilon"] == pytest.approx(_epsilon(TOTAL), rel=1e-9)
    assert f"epsilon = {_epsilon(TOTAL):.4g}" in full[0]["summary"]
    for tag, first in (("full", 1), ("resumed", 3)):
        with open(out / tag / "version_0" / "metrics.csv") as fh:
            rows = [r for r in csv.DictReader(fh) if r.get(DP_EPSILON)]
        logged = [float(r[DP_EPSILON]) for r in rows]
        assert logged == pytest.approx([_epsilon(s) for s in range(first, TOTAL + 1)], rel=1e-6)
        assert all(float(r[DP_CLIP_BOUND]) > 0 for r in rows)
