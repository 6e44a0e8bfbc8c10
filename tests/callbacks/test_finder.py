"""ClipThresholdFinder: every candidate run is the prefix of the fit clipped at that threshold, the fit after the
search is the fit started with the chosen GradientClipping(c) bit for bit, resume does not search again, ranks
agree under gloo DDP, and every bad input fails before a step."""

from __future__ import annotations

import json
import math
import sys
import warnings

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningDataModule, seed_everything
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_clip import (
    ClipThresholdFinder,
    GradientClipping,
    PercentileThreshold,
    QuantileThreshold,
    WarmupThreshold,
    ZScoreThreshold,
    tags,
)
from lightning_clip.callbacks.finder import PROBE_EXTRA_STEPS
from lightning_clip.core.search import SearchRule, candidate_grid, search
from tests.helpers.models import RecordingLogger, TwoOptimizers, make_trainer, states_equal

SMALL = dict(num_candidates=4, num_batches=4, num_probe_batches=3, plot=False)


def _data(n: int = 96, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x.sum(dim=1, keepdim=True) ** 2) + torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


class Net(__import__("lightning.pytorch", fromlist=["LightningModule"]).LightningModule):
    """An MLP with dropout (the steps draw random numbers), SGD with momentum and a per-step LR schedule;
    records the loss of every training_step call."""

    def __init__(self, lr: float = 0.02, dropout: float = 0.1, scheduler: bool = True) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 1))
        self.lr, self.use_scheduler = lr, scheduler
        self.calls: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.calls.append(float(loss.detach()))
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        if not self.use_scheduler:
            return opt
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class DataModule(LightningDataModule):
    """Shuffles with the global RNG (a new loader, without a generator, per request)."""

    def train_dataloader(self):
        return DataLoader(_data(), batch_size=8, shuffle=True)


def _loader(shuffle: bool = True) -> DataLoader:
    return DataLoader(_data(), batch_size=8, shuffle=shuffle, generator=torch.Generator().manual_seed(3))


def _fit(tmp_path, callbacks, *, data="generator", max_steps=10, model_kwargs=None, **trainer_kwargs):
    seed_everything(0, verbose=False)
    model = Net(**(model_kwargs or {}))
    logger = trainer_kwargs.pop("logger", RecordingLogger())
    trainer = make_trainer(tmp_path, callbacks=callbacks, max_steps=max_steps, logger=logger, **trainer_kwargs)
    source = DataModule() if data == "datamodule" else _loader(shuffle=data != "ordered")
    trainer.fit(model, datamodule=source) if data == "datamodule" else trainer.fit(model, source)
    return model, trainer, torch.get_rng_state()


def _assert_same_fit(a, b, last_calls=None):
    """Weights, optimizer and scheduler state, RNG, step count and the fit's last losses equal bit for bit."""
    (ma, ta, rnga), (mb, tb, rngb) = a, b
    for pa, pb in zip(ma.parameters(), mb.parameters()):
        assert torch.equal(pa, pb)
    assert states_equal(ta.optimizers[0].state_dict(), tb.optimizers[0].state_dict())
    assert states_equal(ta.lr_scheduler_configs[0].scheduler.state_dict(),
                        tb.lr_scheduler_configs[0].scheduler.state_dict())
    assert torch.equal(rnga, rngb)
    n = len(mb.calls) if last_calls is None else last_calls
    assert ma.calls[-n:] == mb.calls[-n:]  # the fit's own steps: the same losses
    assert ta.global_step == tb.global_step


def _fp16_with_a_grad_scaler():
    """fp16 autocast with a GradScaler on the CPU: the first steps overflow and are skipped while it backs off."""
    return {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 16))]}


@pytest.mark.parametrize("data, trainer_kwargs", [
    ("generator", dict),
    ("datamodule", dict),
    ("generator", lambda: {"accumulate_grad_batches": 2}),
    ("generator", lambda: {"precision": "bf16-mixed"}),
    ("generator", _fp16_with_a_grad_scaler),
])
def test_fit_after_the_search_equals_the_fit_with_the_chosen_threshold(tmp_path, data, trainer_kwargs):
    finder, clip = ClipThresholdFinder(**SMALL), GradientClipping()
    searched = _fit(tmp_path / "a", [finder, clip], data=data, **trainer_kwargs())
    assert finder.threshold is not None and finder.threshold == finder.results.threshold
    assert clip.policy.max_norm == finder.threshold
    reference_clip = GradientClipping(finder.threshold)
    reference = _fit(tmp_path / "b", [reference_clip], data=data, **trainer_kwargs())
    _assert_same_fit(searched, reference)
    assert states_equal(clip.state_dict(), reference_clip.state_dict())  # counters and policy state
    assert states_equal(searched[1].precision_plugin.state_dict(), reference[1].precision_plugin.state_dict())
    # the search ran: probe + candidate runs before the fit's own steps
    accumulate = trainer_kwargs().get("accumulate_grad_batches", 1)
    probe_steps = (len(searched[0].calls) - len(reference[0].calls)) // accumulate - finder.results.total_steps
    if trainer_kwargs is _fp16_with_a_grad_scaler:  # overflowing steps have no finite norm: the probe goes on
        assert 3 < probe_steps <= 3 + PROBE_EXTRA_STEPS
    else:
        assert probe_steps == 3


@pytest.mark.parametrize("num_batches", [4, 15])  # 15: the runs cross the end of the 12-batch epoch
def test_each_candidate_run_is_the_prefix_of_the_fit_clipped_there(tmp_path, num_batches):
    finder = ClipThresholdFinder(**{**SMALL, "num_batches": num_batches})
    _fit(tmp_path / "a", [finder, GradientClipping()], max_steps=2)
    result = finder.results
    for k in (0, result.chosen, result.candidates.index(result.refined[0])):
        c = result.candidates[k]
        reference, _, _ = _fit(tmp_path / f"c{k}", [GradientClipping(c)], max_steps=num_batches)
        assert result.losses[k] == reference.calls  # same weights, batches, dropout masks, optimizer state
        assert result.num_steps[k] == num_batches


class RateNet(Net):
    """Records the learning rate each optimizer step runs at."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.rates: list[float] = []

    def on_before_optimizer_step(self, optimizer):
        self.rates.append(optimizer.param_groups[0]["lr"])


@pytest.mark.parametrize("compress", [True, False])
def test_each_run_follows_the_whole_schedule_compressed(tmp_path, compress):
    """StepLR(3, 0.7) over a 40-step fit: run step t takes the rate of fit step floor(t * 40 / 4); without
    compression the schedule's first 4 steps. The fit itself keeps its own schedule."""
    seed_everything(0, verbose=False)
    model = RateNet(scheduler=True)
    finder = ClipThresholdFinder(**SMALL, compress_schedule=compress)
    trainer = make_trainer(tmp_path, callbacks=[finder, GradientClipping()], max_steps=40, logger=RecordingLogger())
    trainer.fit(model, _loader())
    runs = len(finder.results.candidates)
    rate = [0.02 * 0.7 ** (s // 3) for s in range(40)]  # the scheduler's rate at each fit step
    steps = [0, 10, 20, 30] if compress else [0, 1, 2, 3]
    searched = model.rates[3:3 + 4 * runs]  # after the 3 probe steps
    assert searched == pytest.approx([rate[s] for s in steps] * runs, rel=1e-12)
    assert model.rates[3 + 4 * runs:] == pytest.approx(rate, rel=1e-12)  # the fit's own 40 steps


@pytest.mark.parametrize("fit_steps", [40, None])
def test_the_tool_compresses_the_schedule_of_the_fit_it_searches_for(tmp_path, fit_steps):
    """find_clip_threshold(fit_steps=40) runs as the callback does at the start of a 40-step fit (the rates
    of fit steps 0, 10, 20, 30); the trainer's max_steps is the default."""
    from lightning_clip.tools.finder import find_clip_threshold

    seed_everything(0, verbose=False)
    model = RateNet(scheduler=True)
    trainer = make_trainer(tmp_path, max_steps=40 if fit_steps is None else -1, max_epochs=1)
    result = find_clip_threshold(trainer, model, train_dataloaders=_loader(), num_candidates=4, num_batches=4,
                                 num_probe_batches=3, compress_schedule=True, fit_steps=fit_steps)
    rate = [0.02 * 0.7 ** (s // 3) for s in range(40)]
    assert model.rates[3:] == pytest.approx([rate[s] for s in (0, 10, 20, 30)] * len(result.candidates), rel=1e-12)
    with pytest.raises(ValueError, match="fit_steps"):
        find_clip_threshold(trainer, model, train_dataloaders=_loader(), compress_schedule=True, fit_steps=0)


def test_probe_median_grid_and_rule_match_independent_computations(tmp_path):
    finder = ClipThresholdFinder(**SMALL)
    model, _, _ = _fit(tmp_path, [finder, GradientClipping()], data="ordered", max_steps=1,
                       model_kwargs={"dropout": 0.0})
    # m0 by hand: the first 3 batches (not shuffled) at the initial weights
    seed_everything(0, verbose=False)
    fresh = Net(dropout=0.0)
    norms = []
    for i, (x, y) in enumerate(_loader(shuffle=False)):
        if i == 3:
            break
        fresh.zero_grad()
        nn.functional.mse_loss(fresh.net(x), y).backward()
        norms.append(float(torch.nn.utils.get_total_norm([p.grad for p in fresh.parameters()])))
    assert finder.initial_norm == pytest.approx(float(np.median(norms)), rel=1e-6)
    result = finder.results
    grid = [finder.initial_norm * 10 ** (-3 + k / 2) for k in range(4)]
    assert all(any(math.isclose(g, c, rel_tol=1e-12) for c in result.candidates) for g in grid)
    # the rule of core/search on the recorded runs chooses the same threshold
    table = dict(zip(result.candidates, result.losses))
    again = search(lambda c, n: table[c], grid, num_steps=4, rule=SearchRule())
    assert again.threshold == finder.threshold


def test_results_table_log_and_plot(tmp_path, caplog):
    pytest.importorskip("matplotlib")
    finder = ClipThresholdFinder(num_candidates=3, num_batches=3, num_probe_batches=2, plot=True)
    logger = RecordingLogger()
    _fit(tmp_path, [finder, GradientClipping()], max_steps=2, logger=logger)
    assert logger.metrics[tags.FINDER_THRESHOLD] == [(0, pytest.approx(finder.threshold))]
    png = tmp_path / "clip_threshold_finder.png"  # the RecordingLogger has no log_dir: default_root_dir
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert tags.parse(tags.FINDER_THRESHOLD) == tags.Tag(tags.FINDER_THRESHOLD)


def test_plot_false_writes_nothing_and_missing_matplotlib_warns(tmp_path, monkeypatch):
    _fit(tmp_path / "a", [ClipThresholdFinder(**SMALL), GradientClipping()], max_steps=1)
    assert not list((tmp_path / "a").glob("*.png"))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    finder = ClipThresholdFinder(**{**SMALL, "plot": True})
    with pytest.warns(UserWarning, match=r"pip install 'lightning-clip\[plot\]'"):
        _fit(tmp_path / "b", [finder, GradientClipping()], max_steps=1)
    assert finder.threshold is not None and not list((tmp_path / "b").glob("*.png"))


@pytest.mark.parametrize("policy, attr", [
    (PercentileThreshold(90.0, warmup_steps=5, history="clipped"), "warmup_threshold"),
    (WarmupThreshold(5, 1.0), "warmup_threshold"),
    (ZScoreThreshold(warmup_steps=3, max_norm=None), "max_norm"),
    (QuantileThreshold(0.5, initial=1.0), "initial"),
])
def test_the_chosen_value_lands_where_the_docstring_says(tmp_path, policy, attr):
    finder = ClipThresholdFinder(**SMALL)
    _fit(tmp_path, [finder, GradientClipping(policy)], max_steps=2)
    assert getattr(policy, attr) == finder.threshold


class _CountSteps(Callback):
    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches += 1


def test_resume_does_not_search_again_and_continues_bit_for_bit(tmp_path):
    # ordered batches and no dropout: Lightning's resume restores neither the RNG nor a loader's position
    def callbacks():
        return [ClipThresholdFinder(**SMALL), GradientClipping(PercentileThreshold(50.0, warmup_steps=2))]

    kwargs = dict(data="ordered", model_kwargs={"dropout": 0.0})
    first = callbacks()
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=12, save_top_k=-1)
    _fit(tmp_path / "a", [*first, ckpt_cb], max_steps=12, enable_checkpointing=True, **kwargs)  # one epoch
    finder, clip = first
    ckpt = next((tmp_path / "ck").glob("*.ckpt"))
    saved = torch.load(ckpt, weights_only=False)["callbacks"]
    resumed_finder, fresh_clip = callbacks()
    assert fresh_clip.state_key in saved  # under the configured threshold's key: a resumed run finds it
    assert clip.state_key not in saved
    full, _, _ = _fit(tmp_path / "full", callbacks(), max_steps=20, **kwargs)

    seed_everything(0, verbose=False)
    steps = _CountSteps()
    resumed = Net(dropout=0.0)
    trainer2 = make_trainer(tmp_path / "r", callbacks=[resumed_finder, fresh_clip, steps], max_steps=20,
                            logger=RecordingLogger())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer2.fit(resumed, _loader(shuffle=False), ckpt_path=ckpt)
    missing = [str(w.message) for w in caught if "Please add the following callbacks" in str(w.message)]
    assert not any("GradientClipping" in m or "ClipThresholdFinder" in m for m in missing)  # only ModelCheckpoint
    assert steps.batches == 8  # the remaining steps only: no probe, no candidate run
    assert resumed.calls == full.calls[-8:]
    assert resumed_finder.threshold == finder.threshold
    assert resumed_finder.results == finder.results
    assert fresh_clip.policy.warmup_threshold == finder.threshold
    assert fresh_clip.optimizer_state(0).steps == 20
    for pa, pb in zip(resumed.parameters(), full.parameters()):
        assert torch.equal(pa, pb)


def test_milestone_searches_again_and_the_rest_of_the_fit_matches_a_reference(tmp_path):
    finder, clip = ClipThresholdFinder(**SMALL, milestones=(1,)), GradientClipping()
    searched = _fit(tmp_path / "a", [finder, clip], max_steps=18)  # 12 batches per epoch
    assert sorted(finder._searched) == [0, 1]
    first = ClipThresholdFinder(**SMALL)
    _fit(tmp_path / "b", [first, GradientClipping()], max_steps=1)
    assert finder.threshold != first.threshold or finder.results != first.results

    class SetAtEpoch1(Callback):
        def __init__(self, clipping: GradientClipping) -> None:
            self.clipping = clipping

        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                self.clipping.set_threshold(finder.threshold)

    ref_clip = GradientClipping(first.threshold)
    reference = _fit(tmp_path / "c", [ref_clip, SetAtEpoch1(ref_clip)], max_steps=18)
    _assert_same_fit(searched, reference, last_calls=6)  # epoch 1, after the second search
    first_epoch = searched[0].calls[len(searched[0].calls) - 6 - finder.results.total_steps - 3 - 12:][:12]
    assert first_epoch == reference[0].calls[:12]


def test_every_candidate_diverging_is_an_error(tmp_path):
    finder = ClipThresholdFinder(candidates=[1e6, 1e7], num_batches=4, plot=False)
    with pytest.raises(RuntimeError, match="every candidate threshold diverged"):
        _fit(tmp_path, [finder, GradientClipping()], max_steps=2, model_kwargs={"lr": 50.0, "scheduler": False})


# ----------------------------------------------------------------------------------------------------
# Bad inputs: a clear error naming the argument, before any step.


@pytest.mark.parametrize("kwargs, name", [
    ({"candidates": []}, "candidates"),
    ({"candidates": [0.1, 0.0]}, "candidates"),
    ({"candidates": [-1.0]}, "candidates"),
    ({"candidates": "0.1"}, "candidates"),
    ({"num_batches": 1}, "num_batches"),
    ({"num_batches": 0}, "num_batches"),
    ({"num_candidates": 0}, "num_candidates"),
    ({"num_probe_batches": 0}, "num_probe_batches"),
    ({"tolerance": -0.5}, "tolerance"),
    ({"refine": "yes"}, "refine"),
    ({"choice": "smallest"}, "choice"),
    ({"milestones": (0,)}, "milestones"),
    ({"milestones": 3}, "milestones"),
    ({"plot": 1}, "plot"),
])
def test_bad_arguments_fail_at_construction(kwargs, name):
    with pytest.raises((ValueError, TypeError), match=f"`{name}`"):
        ClipThresholdFinder(**kwargs)


class _Manual(TwoOptimizers):
    pass


@pytest.mark.parametrize("callbacks, model, match", [
    (lambda: [ClipThresholdFinder(**SMALL)], None, "has none: add lightning_clip.GradientClipping"),
    (lambda: [ClipThresholdFinder(**SMALL), GradientClipping(), GradientClipping(0.5)], None, "has 2: keep one"),
    (lambda: [ClipThresholdFinder(**SMALL), GradientClipping(0.1, mode="value")], None, "mode='value'"),
    (lambda: [ClipThresholdFinder(**SMALL), GradientClipping(groups={"net.0.*": 0.5})], None, "`groups`"),
    (lambda: [ClipThresholdFinder(**SMALL), GradientClipping()], _Manual, "automatic optimization"),
])
def test_setup_refusals_come_before_any_step(tmp_path, callbacks, model, match):
    seed_everything(0, verbose=False)
    module = Net() if model is None else model()
    steps = _CountSteps()
    trainer = make_trainer(tmp_path, callbacks=[*callbacks(), steps], max_steps=2)
    with pytest.raises(ValueError, match=match):
        trainer.fit(module, _loader())
    assert steps.batches == 0 and trainer.global_step == 0
    if model is None:
        assert not module.calls


@pytest.mark.parametrize("kwargs, trainer_kwargs, name", [
    ({"num_batches": 13}, {"max_epochs": 1}, "num_batches"),
    ({"num_batches": 25}, {"max_epochs": 2}, "num_batches"),
    ({"num_batches": 7}, {"max_epochs": 1, "accumulate_grad_batches": 2}, "num_batches"),
    ({"num_batches": 4, "num_probe_batches": 13}, {"max_epochs": 1}, "num_probe_batches"),
    ({"num_batches": 6}, {"max_epochs": 1, "limit_train_batches": 5}, "num_batches"),
])
def test_training_data_shorter_than_a_run_fails_before_any_step(tmp_path, kwargs, trainer_kwargs, name):
    finder = ClipThresholdFinder(**{**SMALL, **kwargs})
    seed_everything(0, verbose=False)
    model = Net()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = make_trainer(tmp_path, callbacks=[finder, GradientClipping()], max_steps=2, **trainer_kwargs)
    with pytest.raises(ValueError, match=f"`{name}`"):
        trainer.fit(model, _loader())  # 12 batches per epoch
    assert not model.calls and trainer.global_step == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_two_finders_are_refused_when_the_trainer_is_built(tmp_path):
    with pytest.raises(RuntimeError, match="more than one stateful callback of type `ClipThresholdFinder`"):
        make_trainer(tmp_path, callbacks=[ClipThresholdFinder(), ClipThresholdFinder(), GradientClipping()])


def test_fast_dev_run_skips_the_search(tmp_path):
    finder, clip = ClipThresholdFinder(**SMALL), GradientClipping(0.7)
    with pytest.warns(UserWarning, match="fast_dev_run"):
        _fit(tmp_path, [finder, clip], fast_dev_run=True)
    assert finder.threshold is None and clip.policy.max_norm == 0.7


def test_grid_helper_is_the_one_the_finder_uses():
    assert candidate_grid(1.0, 2) == [1e-3, 10 ** -2.5]


# ----------------------------------------------------------------------------------------------------
# Real gloo DDP: every rank scores the ranks' mean loss and reaches the same threshold.


class _DDPNet(Net):
    """Each rank's data differ (rank-dependent targets), so the ranks' own losses would disagree."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y * (1.0 + self.global_rank))
        self.calls.append(float(loss.detach()))
        return loss


class _WriteFinder(Callback):
    def __init__(self, out: str) -> None:
        self.out = out

    def on_fit_end(self, trainer, pl_module):
        finder = next(cb for cb in trainer.callbacks if isinstance(cb, ClipThresholdFinder))
        clip = next(cb for cb in trainer.callbacks if isinstance(cb, GradientClipping))
        with open(f"{self.out}/rank{trainer.global_rank}.json", "w") as f:
            json.dump({"threshold": finder.threshold, "results": finder.results.state_dict(),
                       "max_norm": clip.policy.max_norm, "calls": pl_module.calls,
                       "weights": [p.detach().flatten().tolist() for p in pl_module.parameters()]}, f)


@pytest.mark.distributed
def test_two_rank_ddp_ranks_agree_on_the_mean_loss(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    seed_everything(0, verbose=False)
    finder = ClipThresholdFinder(num_candidates=3, num_batches=3, num_probe_batches=2, plot=True)
    trainer = make_trainer(tmp_path, callbacks=[finder, GradientClipping(), _WriteFinder(str(out))], max_steps=3,
                           devices=2, strategy=DDPStrategy(start_method="spawn", process_group_backend="gloo"))
    trainer.fit(_DDPNet(dropout=0.0), DataLoader(_data(), batch_size=8))  # DDP shards it: 6 batches per rank
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["threshold"] == r1["threshold"] == r0["max_norm"] == r1["max_norm"]
    assert r0["results"] == r1["results"] and r0["weights"] == r1["weights"]
    assert r0["calls"] != r1["calls"]  # the ranks' own losses differ; every run scored their mean
    results = r0["results"]
    order = [c for c in results["candidates"] if c not in results["refined"]] + results["refined"]  # run order
    pos = 2  # after the probe's two steps
    for c in order:
        n = len(results["losses"][results["candidates"].index(c)])
        mean = [(a + b) / 2 for a, b in zip(r0["calls"][pos:pos + n], r1["calls"][pos:pos + n])]
        np.testing.assert_allclose(results["losses"][results["candidates"].index(c)], mean, rtol=1e-6)
        pos += n
    assert (tmp_path / "clip_threshold_finder.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # rank 0 wrote it


# ----------------------------------------------------------------------------------------------------
# FSDP2 (Lightning's ModelParallelStrategy, gloo on CPU): sharded gradients, the same threshold on every rank,
# and the fit after the search is the fit with the chosen threshold.


def _fsdp2_worker(rank: int, world: int, port: int, out_dir: str, threshold: float | None) -> None:
    import os

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "NODE_RANK": "0"})
    torch.set_num_threads(1)
    from lightning.pytorch.strategies import ModelParallelStrategy

    from tests.helpers.dtensor_workers import make_fsdp_module
    from tests.helpers.gloo import end_sharded_worker

    module = make_fsdp_module(out_dir)
    module.on_train_end = lambda: None
    finder = ClipThresholdFinder(num_candidates=3, num_batches=3, num_probe_batches=2, plot=False)
    callbacks = [finder, GradientClipping()] if threshold is None else [GradientClipping(threshold)]
    trainer = make_trainer(out_dir, callbacks=callbacks, max_steps=4, devices=world, deterministic=False,
                           strategy=ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module)
    weights = [p.full_tensor().detach().clone() for p in module.parameters()]
    results = None if finder.results is None else finder.results.state_dict()
    torch.save({"threshold": finder.threshold, "results": results, "weights": weights},
               f"{out_dir}/{'search' if threshold is None else 'reference'}{rank}.pt")
    end_sharded_worker()


@pytest.mark.distributed
def test_fsdp2_ranks_agree_and_the_fit_matches_the_chosen_threshold(tmp_path):
    import torch.multiprocessing as mp

    from tests.helpers.ddp import free_port

    mp.spawn(_fsdp2_worker, args=(2, free_port(), str(tmp_path), None), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"search{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["threshold"] == r1["threshold"] and r0["results"] == r1["results"]
    mp.spawn(_fsdp2_worker, args=(2, free_port(), str(tmp_path), r0["threshold"]), nprocs=2, join=True)
    ref = torch.load(tmp_path / "reference0.pt", weights_only=False)
    for a, b in zip(r0["weights"], ref["weights"]):
        assert torch.equal(a, b)
