"""GradientClipping against Lightning's own gradient_clip_val, numpy's percentile, and resume."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_clip import (
    AdaGCClipping,
    FixedThreshold,
    GradientClipping,
    GradientNormMonitor,
    PercentileThreshold,
    SpikeGuard,
    WarmupThreshold,
    ZScoreThreshold,
)
from lightning_clip.callbacks.clipping import clip_rate_advice
from tests.helpers.models import RecordingLogger, TinyRegressor, make_loader, make_trainer


def _fit(tmp_path, callbacks=(), steps=12, model_kwargs=None, **trainer_kwargs):
    seed_everything(0, verbose=False)
    model = TinyRegressor(**(model_kwargs or {}))
    trainer = make_trainer(tmp_path, callbacks=callbacks, max_steps=steps, **trainer_kwargs)
    trainer.fit(model, make_loader())
    return model, trainer


@pytest.mark.parametrize(
    "mode,algorithm,value", [("norm", "norm", 1.0), ("norm", "norm", 0.05), ("value", "value", 0.01)]
)
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_fixed_threshold_equals_lightning_gradient_clip_val(tmp_path, mode, algorithm, value, optimizer):
    ours, _ = _fit(tmp_path / "a", [GradientClipping(value, mode=mode)], model_kwargs={"optimizer": optimizer})
    ref, _ = _fit(tmp_path / "b", gradient_clip_val=value, gradient_clip_algorithm=algorithm,
                  model_kwargs={"optimizer": optimizer})
    untouched, _ = _fit(tmp_path / "c", model_kwargs={"optimizer": optimizer})
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    # the comparison is not vacuous: without clipping the weights differ
    assert any(not torch.equal(p, u) for p, u in zip(ours.parameters(), untouched.parameters()))


def test_refuses_double_clipping(tmp_path):
    with pytest.raises(ValueError, match="gradient_clip_val"):
        _fit(tmp_path, [GradientClipping(1.0)], gradient_clip_val=1.0)


def test_logged_tags_and_post_clip_norm(tmp_path):
    logger = RecordingLogger()
    _fit(tmp_path, [GradientClipping(0.5)], logger=logger)
    total = np.array(logger.series("grad_norm/total"))
    clipped = np.array(logger.series("grad_norm/clipped_total"))
    thr = np.array(logger.series("grad_clip/threshold"))
    rate = np.array(logger.series("grad_clip/clip_rate"))
    assert len(total) == len(clipped) == len(thr) == len(rate) == 12
    np.testing.assert_allclose(thr, 0.5)
    np.testing.assert_allclose(clipped, np.minimum(total, 0.5), rtol=1e-5)
    expected_rate = np.cumsum(total > 0.5) / np.arange(1, 13)
    np.testing.assert_allclose(rate, expected_rate)


def test_percentile_thresholds_equal_numpy_percentile_of_logged_norms(tmp_path):
    logger = RecordingLogger()
    policy = PercentileThreshold(percentile=75.0, warmup_steps=3, warmup_threshold=2.0)
    _fit(tmp_path, [GradientClipping(policy), GradientNormMonitor()], steps=20, logger=logger)
    norms = np.array(logger.series("grad_norm/total"), dtype=np.float32)
    thr = logger.series("grad_clip/threshold")
    assert len(norms) == len(thr) == 20
    for t in range(20):
        expected = 2.0 if t < 3 else np.percentile(norms[: t + 1], 75.0)
        assert thr[t] == pytest.approx(float(expected), rel=1e-6), t


def _thresholds(logger):
    return logger.series("grad_clip/threshold")


@pytest.mark.parametrize(
    "make_policy",
    [
        lambda: PercentileThreshold(percentile=80.0, warmup_steps=2),
        lambda: PercentileThreshold(percentile=50.0, warmup_steps=0, window=5),
        lambda: ZScoreThreshold(warmup_steps=3, z_thresh=1.0, max_norm=None),
        lambda: WarmupThreshold(4, 3.0, then=PercentileThreshold(90.0, warmup_steps=0)),
    ],
)
def test_resume_continues_with_identical_thresholds(tmp_path, make_policy):
    steps, k = 20, 8  # resume at an epoch boundary (8 batches per epoch)
    full_logger = RecordingLogger()
    full, _ = _fit(tmp_path / "full", [GradientClipping(make_policy())], steps=steps, logger=full_logger)

    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=k, save_top_k=-1)
    _fit(tmp_path / "part", [GradientClipping(make_policy()), ckpt_cb], steps=k, logger=RecordingLogger(),
         enable_checkpointing=True)
    ckpt = next((tmp_path / "ck").glob("*.ckpt"))

    seed_everything(0, verbose=False)
    resumed_logger = RecordingLogger()
    model = TinyRegressor()
    trainer = make_trainer(tmp_path / "res", callbacks=[GradientClipping(make_policy())], max_steps=steps,
                           logger=resumed_logger)
    trainer.fit(model, make_loader(), ckpt_path=str(ckpt))
    assert _thresholds(resumed_logger) == _thresholds(full_logger)[k:]
    for p, q in zip(model.parameters(), full.parameters()):
        assert torch.equal(p, q)


def _state_equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_state_equal(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def test_stacked_callbacks_share_a_checkpoint_and_resume_independently(tmp_path):
    # every kind of state at once, two instances of one class among them (two clippers of one kind are refused:
    # tests/callbacks/test_order.py): each keeps its own entry in the checkpoint and resumes bit for bit
    steps, k = 20, 8

    def callbacks():
        return [GradientClipping(PercentileThreshold(60.0, warmup_steps=2, window=5)),
                AdaGCClipping(warmup_steps=3, absolute=40.0),
                SpikeGuard("grad_norm", z_thresh=3.0, window=4, warmup_steps=2, action="warn"),
                SpikeGuard("loss", z_thresh=3.0, window=4, warmup_steps=2, action="warn")]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the guards warn on spikes
        full_cbs = callbacks()
        full, _ = _fit(tmp_path / "full", full_cbs, steps=steps)

        ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=k, save_top_k=-1)
        part_cbs = callbacks()
        _fit(tmp_path / "part", [*part_cbs, ckpt_cb], steps=k, enable_checkpointing=True)
        ckpt_path = next((tmp_path / "ck").glob("*.ckpt"))
        saved = torch.load(ckpt_path, weights_only=False)["callbacks"]
        keys = [cb.state_key for cb in part_cbs]
        assert len(set(keys)) == 4 and set(keys) <= set(saved)
        assert saved[keys[0]]["optimizers"][0]["steps"] == saved[keys[1]]["optimizers"][0]["steps"] == k

        seed_everything(0, verbose=False)
        model = TinyRegressor()
        resumed_cbs = callbacks()
        make_trainer(tmp_path / "res", callbacks=resumed_cbs, max_steps=steps).fit(model, make_loader(),
                                                                                   ckpt_path=str(ckpt_path))
    for p, q in zip(model.parameters(), full.parameters()):
        assert torch.equal(p, q)
    for resumed, reference in zip(resumed_cbs, full_cbs):
        assert _state_equal(resumed.state_dict(), reference.state_dict())
    assert resumed_cbs[0].health() == full_cbs[0].health()
    # not vacuous: both clippers clipped, and the two guards ended with different windows
    assert full_cbs[0].clip_rate() > 0 and torch.isfinite(full_cbs[1].gamma()).all()
    assert not _state_equal(full_cbs[2].state_dict()["windows"]["grad_norm/0"],
                            full_cbs[3].state_dict()["windows"]["loss/0"])


def test_health_and_counters_against_logged_norms(tmp_path):
    logger = RecordingLogger()
    cb = GradientClipping(0.5)
    _fit(tmp_path, [cb], steps=12, logger=logger)
    total = np.array(logger.series("grad_norm/total"), dtype=np.float32)
    health = cb.health()
    assert list(health) == [0] and cb.steps == {0: 12}
    h = health[0]
    assert h["steps"] == 12.0 and h["nonfinite_steps"] == 0.0
    assert h["clip_rate"] == cb.clip_rate(0) == pytest.approx(float(np.mean(total > 0.5)))
    assert h["mean_norm"] == pytest.approx(float(np.mean(total.astype(np.float64))), rel=1e-6)
    assert h["max_norm"] == float(total.max())
    state = cb.optimizer_state(0)
    assert state.clipped.dtype == torch.long and state.norm_sum.dtype == torch.float64
    # the counters round-trip exactly, dtypes included
    other = GradientClipping(0.5)
    other.load_state_dict(cb.state_dict())
    assert _state_equal(other.state_dict(), cb.state_dict()) and other.health() == health
    assert cb.clip_rate(3) == 0.0 and 3 not in cb.health()


def test_nonfinite_steps_are_counted_and_kept_out_of_the_norm_statistics(tmp_path):
    logger = RecordingLogger()
    cb = GradientClipping(0.5)
    _fit(tmp_path, [cb], steps=6, logger=logger, model_kwargs={"nan_at": {5}})  # the last step's loss is NaN
    total = np.array(logger.series("grad_norm/total"), dtype=np.float32)
    assert np.isnan(total[5]) and np.isfinite(total[:5]).all()
    h = cb.health()[0]
    assert h["steps"] == 6.0 and h["nonfinite_steps"] == 1.0
    assert h["mean_norm"] == pytest.approx(float(np.mean(total[:5].astype(np.float64))), rel=1e-6)
    assert h["max_norm"] == float(total[:5].max())
    assert h["clip_rate"] == pytest.approx(float(np.sum(total[:5] > 0.5)) / 6)  # a NaN step is not "clipped"


@pytest.mark.parametrize("rate,words", [(0.0, "too high"), (0.03, "rare"), (0.1, "healthy"), (0.3, "frequent"),
                                        (0.6, "excessive"), (1.0, "excessive")])
def test_clip_rate_advice_bands(rate, words):
    assert words in clip_rate_advice(rate)


def test_end_of_fit_summary(tmp_path, caplog):
    cb = GradientClipping(0.5)
    with caplog.at_level(logging.INFO):
        _fit(tmp_path, [cb], steps=6)
    h = cb.health()[0]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[lightning_clip] gradients:")]
    assert lines == [
        f"[lightning_clip] gradients: 6 steps, clip rate {h['clip_rate']:.1%} ({clip_rate_advice(h['clip_rate'])}), "
        f"mean norm {h['mean_norm']:.4g}, max norm {h['max_norm']:.4g}, non-finite steps 0"
    ]


def test_policy_is_not_shared_between_runs_of_different_optimizers():
    cb = GradientClipping(PercentileThreshold(warmup_steps=0))
    assert cb.policy_for(0) is cb.policy
    assert cb.policy_for(1) is not cb.policy
    assert isinstance(cb.policy_for(1), PercentileThreshold)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"threshold": -1.0}, ValueError, "threshold"),
        ({"threshold": 0}, ValueError, "threshold"),
        ({"threshold": "big"}, TypeError, "threshold"),
        ({"mode": "l1"}, ValueError, "mode"),
        ({"mode": "value", "threshold": PercentileThreshold()}, ValueError, "mode='value'"),
        ({"log_every_n_steps": 0}, ValueError, "log_every_n_steps"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        GradientClipping(**kwargs)


def test_fixed_threshold_object_equals_float(tmp_path):
    a, _ = _fit(tmp_path / "a", [GradientClipping(FixedThreshold(0.3))])
    b, _ = _fit(tmp_path / "b", [GradientClipping(0.3)])
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
