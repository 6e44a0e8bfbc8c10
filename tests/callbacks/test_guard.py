"""NonFiniteGradientGuard: skip leaves weights and optimizer state exactly as they were."""

from __future__ import annotations

import pytest
import torch
from conftest import RecordingLogger, Snapshot, TinyRegressor, make_loader, make_trainer, states_equal
from lightning.pytorch import seed_everything

from lightning_clip import (
    GradientClipping,
    GradientNormMonitor,
    NonFiniteGradientError,
    NonFiniteGradientGuard,
    PercentileThreshold,
    ZScoreThreshold,
)


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


# ----------------------------------------------------------------------------- strategies we cannot serve


def test_fsdp1_and_deepspeed_are_refused_at_setup_not_silently_wrong():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from lightning_clip import GradientClipping, GradientNormMonitor, NonFiniteGradientGuard

    class DeepSpeedStrategy(DDPStrategy):  # a stand-in (Lightning's own derives from DDPStrategy): checked by name
        pass

    fsdp1 = SimpleNamespace(strategy=FSDPStrategy(), gradient_clip_val=None, loggers=[], precision_plugin=None)
    deepspeed = SimpleNamespace(strategy=DeepSpeedStrategy(), gradient_clip_val=None,
                                loggers=[], precision_plugin=None)
    for callback in (GradientClipping(1.0), NonFiniteGradientGuard("skip")):
        name = type(callback).__name__
        with pytest.raises(ValueError, match=rf"^{name} does not support Lightning's FSDPStrategy \(FSDP1\)"):
            callback.setup(fsdp1, None, "fit")
        with pytest.raises(ValueError, match=r"`gradient_clipping` in the DeepSpeed config"):
            callback.setup(deepspeed, None, "fit")
    with pytest.warns(UserWarning, match=r"GradientNormMonitor does not support .*FSDP1"):
        GradientNormMonitor().setup(fsdp1, None, "fit")
    with pytest.warns(UserWarning, match=r"partitioned \(ZeRO\)"):
        GradientNormMonitor().setup(deepspeed, None, "fit")
