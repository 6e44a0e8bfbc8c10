"""Every exported callback goes through construct -> fit -> save -> load, and public names exist."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import seed_everything

import lightning_clip
from lightning_clip import (
    GradientClipping,
    GradientNormMonitor,
    NonFiniteGradientGuard,
    PercentileThreshold,
    WarmupThreshold,
    ZScoreThreshold,
)
from tests.helpers.models import RecordingLogger, TinyRegressor, make_loader, make_trainer

CONTRACT = [
    "GradientNormMonitor", "GradientClipping", "NonFiniteGradientGuard", "FixedThreshold", "PercentileThreshold",
    "WarmupThreshold", "ZScoreThreshold", "QuantileThreshold", "AdaptiveGradientClipping", "SpikeGuard",
    "GradientSpikeError", "ClipThresholdFinder",
]


@pytest.mark.parametrize("name", CONTRACT)
def test_public_names(name):
    assert hasattr(lightning_clip, name)


def _state_equal(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_state_equal(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


FACTORIES = [
    lambda: GradientNormMonitor(per_parameter=True),
    lambda: GradientClipping(0.5),
    lambda: GradientClipping(0.01, mode="value"),
    lambda: GradientClipping(PercentileThreshold(75.0, warmup_steps=2, window=4)),
    lambda: GradientClipping(WarmupThreshold(2, 1.0, then=ZScoreThreshold(warmup_steps=2))),
    lambda: GradientClipping(lightning_clip.QuantileThreshold(0.5, initial=0.05)),
    lambda: NonFiniteGradientGuard("skip", max_consecutive_skips=3),
    lambda: lightning_clip.AdaptiveGradientClipping(0.05, exclude=("net.2.*",)),
    lambda: lightning_clip.AdaGCClipping(warmup_steps=2),
    lambda: lightning_clip.SpikeGuard(("grad_norm", "loss"), window=3, warmup_steps=2),
    lambda: lightning_clip.ClipThresholdFinder(num_candidates=3, num_batches=2, num_probe_batches=2, plot=False),
]

#: Callbacks a factory's callback needs next to it (the finder sets a GradientClipping's threshold).
COMPANIONS = {"ClipThresholdFinder": lambda: [GradientClipping()]}


@pytest.mark.parametrize("factory", FACTORIES)
def test_construct_fit_save_load(tmp_path, factory):
    seed_everything(0, verbose=False)
    cb = factory()
    companions = COMPANIONS.get(type(cb).__name__, list)()
    trainer = make_trainer(tmp_path, callbacks=[cb, *companions], max_steps=5, logger=RecordingLogger())
    trainer.fit(TinyRegressor(), make_loader())
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)
    if not cb.state_dict():  # stateless (the monitor): Lightning stores nothing, nothing to restore
        assert cb.state_key not in ckpt["callbacks"]
        return
    assert cb.state_key in ckpt["callbacks"]
    fresh = factory()
    fresh.load_state_dict(ckpt["callbacks"][cb.state_key])
    assert _state_equal(fresh.state_dict(), cb.state_dict())


def test_two_clipping_callbacks_have_distinct_state_keys():
    assert GradientClipping(0.5).state_key != GradientClipping(PercentileThreshold()).state_key
