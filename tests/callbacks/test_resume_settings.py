"""A callback resumed under changed settings (so under another ``state_key``) takes its saved state, and says so."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_clip import GradientClipping, QuantileThreshold, SpikeGuard
from tests.helpers.models import TinyRegressor, make_loader, make_trainer, states_equal


class StateAtStart(Callback):
    """The state of ``of`` when training starts (after the checkpoint is restored)."""

    def __init__(self, of: Callback) -> None:
        self.of, self.state = of, None

    def on_train_start(self, trainer, pl_module):
        self.state = self.of.state_dict()


def _checkpoint(tmp_path, callback, steps=16):
    seed_everything(0, verbose=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=steps, save_top_k=-1)
    trainer = make_trainer(tmp_path / "run", callbacks=[callback, ckpt], max_steps=steps, enable_checkpointing=True)
    trainer.fit(TinyRegressor(), make_loader())
    path = next((tmp_path / "ck").glob("*.ckpt"))
    return path, torch.load(path, weights_only=False)["callbacks"][callback.state_key]


def _resume(tmp_path, callback, path, steps=20):
    seed_everything(0, verbose=False)
    probe = StateAtStart(callback)
    trainer = make_trainer(tmp_path / "res", callbacks=[callback, probe], max_steps=steps)
    trainer.fit(TinyRegressor(), make_loader(), ckpt_path=str(path))
    return probe.state


def test_a_spike_guard_resumed_with_another_z_thresh_continues_its_windows(tmp_path):
    path, saved = _checkpoint(tmp_path, SpikeGuard(("grad_norm", "loss"), z_thresh=4.0, window=8, warmup_steps=4))
    assert saved["windows"]["loss/0"]["seen"] > 0
    resumed = SpikeGuard(("grad_norm", "loss"), z_thresh=5.0, window=8, warmup_steps=4)
    with pytest.warns(UserWarning, match=r"SpikeGuard: the checkpoint's state was saved with the settings "
                                         r"\{.*'z_thresh': 4.0.*\}; it is resumed under .*'z_thresh': 5.0"):
        at_start = _resume(tmp_path, resumed, path)
    assert states_equal(at_start, saved)


def test_a_quantile_threshold_resumed_with_another_learning_rate_starts_from_its_saved_threshold(tmp_path):
    path, saved = _checkpoint(tmp_path, GradientClipping(QuantileThreshold(0.5, initial=1.0, learning_rate=0.2)))
    resumed = GradientClipping(QuantileThreshold(0.5, initial=1.0, learning_rate=0.05))
    with pytest.warns(UserWarning, match=r"GradientClipping: the checkpoint's state was saved with .*rate=0.2"):
        at_start = _resume(tmp_path, resumed, path)
    assert states_equal(at_start, saved)
    assert float(saved["optimizers"][0]["policy"]["threshold"]) != 1.0  # it moved in the first run


def test_several_saved_states_under_other_settings_are_refused(tmp_path):
    path, _ = _checkpoint(tmp_path, SpikeGuard(("loss",), z_thresh=4.0, window=8))
    ckpt = torch.load(path, weights_only=False)
    (key,) = [k for k in ckpt["callbacks"] if k.startswith("SpikeGuard")]
    ckpt["callbacks"][key.replace("4.0", "4.5")] = ckpt["callbacks"][key]
    torch.save(ckpt, tmp_path / "two.ckpt")
    with pytest.raises(ValueError, match=r"SpikeGuard: the checkpoint holds 2 states of SpikeGuard saved under other "
                                         r"settings"):
        _resume(tmp_path, SpikeGuard(("loss",), z_thresh=6.0, window=8), tmp_path / "two.ckpt")
