"""NonFiniteGradientGuard: skip leaves weights and optimizer state exactly as they were."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.strategies import SingleDeviceStrategy

from lightning_clip import (
    GradientClipping,
    GradientNormMonitor,
    NonFiniteGradientError,
    NonFiniteGradientGuard,
    PercentileThreshold,
    SpikeGuard,
    ZScoreThreshold,
)
from tests.helpers.models import RecordingLogger, Snapshot, TinyRegressor, make_loader, make_trainer, states_equal


@pytest.mark.parametrize("optimizer,momentum", [("sgd", 0.9), ("adam", 0.0)])
def test_skip_leaves_weights_and_optimizer_state_untouched(tmp_path, optimizer, momentum):
    seed_everything(0, verbose=False)
    model = TinyRegressor(optimizer=optimizer, momentum=momentum, nan_at={3})
    snap = Snapshot()
    logger = RecordingLogger()
    policy = PercentileThreshold(percentile=90, warmup_steps=0)
    clip = GradientClipping(policy)
    guard = NonFiniteGradientGuard("skip")
    trainer = make_trainer(tmp_path, callbacks=[clip, guard, snap], max_steps=6, logger=logger)
    with pytest.warns(UserWarning, match="NaN/Inf gradients: net.0.weight"):
        trainer.fit(model, make_loader())
    before_w, before_opt = snap.before[3]
    after_w, after_opt = snap.after[3]
    assert all(torch.equal(a, b) for a, b in zip(before_w, after_w))
    assert states_equal(before_opt, after_opt)
    # the other steps did move the weights
    assert not all(torch.equal(a, b) for a, b in zip(snap.before[4][0], snap.after[4][0]))
    assert guard.skipped_steps == 1
    assert logger.series("grad_nonfinite/skipped")[-1] == 1.0
    # thresholds stay finite and the NaN never entered the history
    assert all(torch.isfinite(torch.tensor(logger.series("grad_clip/threshold"))))
    assert len(policy.state_dict()["history"]) == 5
    assert all(p.isfinite().all() for p in model.parameters())


def test_raise_names_the_parameter(tmp_path):
    seed_everything(0, verbose=False)
    model = TinyRegressor(nan_at={2})
    trainer = make_trainer(tmp_path, callbacks=[NonFiniteGradientGuard("raise")], max_steps=5)
    with pytest.raises(NonFiniteGradientError, match=r"net\.0\.weight.*net\.2\.bias|4 parameter"):
        trainer.fit(model, make_loader())


def test_warn_steps_anyway(tmp_path):
    seed_everything(0, verbose=False)
    model = TinyRegressor(nan_at={1})
    trainer = make_trainer(tmp_path, callbacks=[NonFiniteGradientGuard("warn")], max_steps=3)
    with pytest.warns(UserWarning, match="optimizer steps anyway"):
        trainer.fit(model, make_loader())
    assert not all(p.isfinite().all() for p in model.parameters())


def test_max_consecutive_skips_raises(tmp_path):
    seed_everything(0, verbose=False)
    model = TinyRegressor(nan_at={1, 2, 3})
    guard = NonFiniteGradientGuard("skip", max_consecutive_skips=2)
    trainer = make_trainer(tmp_path, callbacks=[guard], max_steps=6)
    with pytest.warns(UserWarning), pytest.raises(NonFiniteGradientError, match="3 consecutive"):
        trainer.fit(model, make_loader())


def test_zscore_ema_is_not_poisoned_by_nan(tmp_path):
    seed_everything(0, verbose=False)
    model = TinyRegressor(nan_at={6})
    logger = RecordingLogger()
    policy = ZScoreThreshold(warmup_steps=3, max_norm=None)
    trainer = make_trainer(tmp_path, callbacks=[GradientClipping(policy), NonFiniteGradientGuard("skip")],
                           max_steps=12, logger=logger)
    with pytest.warns(UserWarning):
        trainer.fit(model, make_loader())
    thr = torch.tensor(logger.series("grad_clip/threshold"))
    assert torch.isfinite(thr[3:]).all()
    st = policy.state_dict()
    assert torch.isfinite(st["mean"]) and torch.isfinite(st["var"])


def test_guard_state_round_trip():
    g = NonFiniteGradientGuard("skip", max_consecutive_skips=3)
    g.skipped_steps, g.consecutive_skips, g.nonfinite_steps = 4, 2, 5
    h = NonFiniteGradientGuard("skip", max_consecutive_skips=3)
    h.load_state_dict(g.state_dict())
    assert h.state_dict() == g.state_dict()
    assert g.state_key != NonFiniteGradientGuard("warn").state_key


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"action": "ignore"}, ValueError, "action"),
        ({"action": "skip", "max_consecutive_skips": 0}, ValueError, "max_consecutive_skips"),
        ({"max_names": "3"}, TypeError, "max_names"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        NonFiniteGradientGuard(**kwargs)


def test_stacked_callbacks_measure_once(tmp_path, monkeypatch):
    import lightning_clip.callbacks.step as step_mod

    calls = []
    real = step_mod.gradient_stats

    def counting(grads):
        calls.append(1)
        return real(grads)

    monkeypatch.setattr(step_mod, "gradient_stats", counting)
    seed_everything(0, verbose=False)
    trainer = make_trainer(
        tmp_path,
        callbacks=[GradientNormMonitor(per_parameter=True), GradientClipping(0.5), NonFiniteGradientGuard("skip")],
        max_steps=5,
        logger=RecordingLogger(),
    )
    trainer.fit(TinyRegressor(), make_loader())
    assert len(calls) == 5


# ----------------------------------------------------------------------------- DeepSpeed and FSDP1


class DeepSpeedStrategy(SingleDeviceStrategy):
    """A stand-in for Lightning's DeepSpeedStrategy (recognised by name; DeepSpeed is not installed here) whose
    engine reports, like DeepSpeed's, the global norm of the step it just took."""

    def __init__(self) -> None:
        super().__init__(device=torch.device("cpu"))
        self.reported: list[float] = []

    @property
    def deepspeed_engine(self):
        strategy = self

        class Engine:
            def get_global_grad_norm(self):
                grads = [p.grad for p in strategy.lightning_module.parameters() if p.grad is not None]
                strategy.reported.append(float(torch.nn.utils.get_total_norm(grads)))
                return strategy.reported[-1]

        return Engine()


def test_deepspeed_clipping_and_guards_are_refused_and_the_monitor_logs_the_engine_norm(tmp_path, monkeypatch):
    from types import SimpleNamespace

    deepspeed = SimpleNamespace(strategy=DeepSpeedStrategy(), gradient_clip_val=None, loggers=[],
                                precision_plugin=None)
    for callback in (GradientClipping(1.0), NonFiniteGradientGuard("skip"), SpikeGuard()):
        with pytest.raises(ValueError, match=r"`gradient_clipping` in the DeepSpeed config"):
            callback.setup(deepspeed, None, "fit")

    import lightning_clip.callbacks.step as step_mod

    passes = []
    monkeypatch.setattr(step_mod, "gradient_stats", lambda *a, **k: passes.append(1))
    seed_everything(0, verbose=False)
    logger, strategy = RecordingLogger(), DeepSpeedStrategy()
    trainer = make_trainer(tmp_path, callbacks=[GradientNormMonitor()], max_steps=4, logger=logger, strategy=strategy)
    trainer.fit(TinyRegressor(), make_loader())
    assert logger.series("grad_norm/total") == strategy.reported and len(strategy.reported) == 4
    assert not passes  # no pass of its own over (possibly partitioned) gradients


def _fake_fsdp1_model(group, strategy_name="FULL_SHARD", use_orig_params=False):
    """An FSDP1 unit built without FSDP's constructor (which needs an accelerator): the attributes the
    detection reads, as FSDP1 sets them (process_group, sharding_strategy, params = [flat parameter])."""
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

    inner = torch.nn.Linear(3, 2)
    unit = FullyShardedDataParallel.__new__(FullyShardedDataParallel)
    torch.nn.Module.__init__(unit)
    unit._fsdp_wrapped_module = inner  # FSDP forwards attribute lookups to it
    flat = torch.nn.Parameter(torch.zeros(8))
    flat._params = list(inner.parameters()) if use_orig_params else None
    unit.process_group, unit.sharding_strategy, unit.params = group, ShardingStrategy[strategy_name], [flat]
    root = torch.nn.Module()
    root.unit, root.extra = unit, torch.nn.Linear(2, 1)  # extra: not managed by FSDP (replicated)
    return root, flat, inner


def test_fsdp1_units_are_detected_with_their_group_and_managed_parameters():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    from lightning_clip.callbacks.step import fsdp1_shards

    group = object()
    for orig in (False, True):
        root, flat, inner = _fake_fsdp1_model(group, use_orig_params=orig)
        strategy = FSDPStrategy()
        strategy.model = root
        params = [flat, *inner.parameters(), *root.extra.parameters()]
        found_group, sharded = fsdp1_shards(SimpleNamespace(strategy=strategy), params)
        assert found_group is group
        assert sharded == [True, orig, orig, False, False]
    root, flat, _ = _fake_fsdp1_model(group, "NO_SHARD")
    strategy = FSDPStrategy()
    strategy.model = root
    assert fsdp1_shards(SimpleNamespace(strategy=strategy), [flat]) is None
    plain = SimpleNamespace(strategy=SingleDeviceStrategy(device=torch.device("cpu")))
    assert fsdp1_shards(plain, [flat]) is None
    for callback in (GradientClipping(1.0), NonFiniteGradientGuard("skip"), SpikeGuard()):  # served, not refused
        callback.setup(SimpleNamespace(strategy=strategy, gradient_clip_val=None, loggers=[], precision_plugin=None),
                       None, "fit")
