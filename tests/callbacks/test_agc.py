"""AdaptiveGradientClipping in a real Trainer: the gradients the optimizer steps with are the formula's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, seed_everything

from lightning_clip import AdaptiveGradientClipping, GradientClipping
from tests.helpers.models import RecordingLogger, TinyRegressor, make_loader, make_trainer


class Grabber(Callback):
    """Copies of every gradient (by parameter name) at ``on_before_optimizer_step``, at its place in the list."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps.append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters()})


class Weights(Callback):
    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})


def _agc_reference(w: torch.Tensor, g: torch.Tensor, clip_factor: float, eps: float) -> np.ndarray:
    w64, g64 = w.double().numpy(), g.double().numpy()
    rows = 1 if g.ndim <= 1 else g.shape[0]
    w2, g2 = w64.reshape(rows, -1), g64.reshape(rows, -1)
    wn = np.maximum(np.sqrt((w2**2).sum(axis=1, keepdims=True)), eps)
    gn = np.maximum(np.sqrt((g2**2).sum(axis=1, keepdims=True)), 1e-6)
    return (g2 * np.minimum(1.0, clip_factor * wn / gn)).reshape(g.shape)


def test_optimizer_steps_with_the_unitwise_clipped_gradients(tmp_path):
    seed_everything(0, verbose=False)
    before, after, weights = Grabber(), Grabber(), Weights()
    agc = AdaptiveGradientClipping(clip_factor=0.02, exclude=["net.2.*"])
    logger = RecordingLogger()
    trainer = make_trainer(tmp_path, callbacks=[weights, before, agc, after], max_steps=6, logger=logger)
    trainer.fit(TinyRegressor(lr=0.05), make_loader())
    clipped_any = False
    for w, b, a in zip(weights.steps, before.steps, after.steps):
        for name in b:
            if name.startswith("net.2."):
                assert torch.equal(a[name], b[name]), name  # excluded: untouched
                continue
            exp = _agc_reference(w[name], b[name], 0.02, 1e-3)
            np.testing.assert_allclose(a[name].numpy(), exp, rtol=2e-6, atol=1e-12, err_msg=name)
            clipped_any |= not torch.equal(a[name], b[name])
    assert clipped_any and len(before.steps) == 6
    total = logger.series("grad_norm/total")
    post = logger.series("grad_norm/clipped_total")
    assert len(total) == len(post) == 6
    def norm(grads):
        return torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads.values()])).item()

    for b, a, t, p in zip(before.steps, after.steps, total, post):
        assert t == pytest.approx(norm(b), rel=1e-6) and p == pytest.approx(norm(a), rel=1e-6)


def test_gradient_clipping_after_it_clips_what_agc_left(tmp_path):
    seed_everything(0, verbose=False)
    after = Grabber()
    clip = GradientClipping(1e-3, log=False, summary=False)
    trainer = make_trainer(tmp_path, callbacks=[AdaptiveGradientClipping(0.5), clip, after], max_steps=3)
    trainer.fit(TinyRegressor(), make_loader())
    for a in after.steps:  # the final norm is the fixed threshold: GradientClipping measured the AGC-clipped grads
        norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in a.values()])).item()
        assert norm == pytest.approx(1e-3, rel=1e-4)


@pytest.mark.parametrize("kwargs,exc,name", [
    ({"clip_factor": 0.0}, ValueError, "clip_factor"),
    ({"clip_factor": "0.01"}, TypeError, "clip_factor"),
    ({"eps": -1.0}, ValueError, "eps"),
    ({"exclude": [1]}, TypeError, "exclude"),
    ({"exclude": [""]}, TypeError, "exclude"),
    ({"exclude": None}, TypeError, "exclude"),
    ({"log": 1}, TypeError, "log"),
    ({"log_every_n_steps": 0}, ValueError, "log_every_n_steps"),
])
def test_bad_arguments_name_the_argument(kwargs, exc, name):
    with pytest.raises(exc, match=f"`{name}`"):
        AdaptiveGradientClipping(**kwargs)


def test_exclude_patterns_and_state_key():
    agc = AdaptiveGradientClipping(exclude="head.*")
    assert agc.exclude == ("head.*",) and agc.excluded("head.weight") and not agc.excluded("body.head.weight")
    assert AdaptiveGradientClipping(0.01).state_key != AdaptiveGradientClipping(0.02).state_key


def test_float64_training_is_clipped_like_timm(tmp_path):
    """Under ``precision="64-true"`` the gradients are float64: AGC clips them with float64 norms, as timm does."""
    from tests.core.test_unitwise import _timm_reference

    seed_everything(0, verbose=False)
    before, weights, after = Grabber(), Weights(), Grabber()
    agc = AdaptiveGradientClipping(clip_factor=0.02)
    trainer = make_trainer(tmp_path, callbacks=[before, weights, agc, after], max_steps=4, precision="64-true")
    model = TinyRegressor(lr=0.1)
    trainer.fit(model, make_loader())
    assert len(after.steps) == 4
    for g0, w, g1 in zip(before.steps, weights.steps, after.steps):
        names = list(g0)
        expected = [g0[n].clone() for n in names]
        _timm_reference([w[n] for n in names], expected, 0.02, 1e-3)
        for n, e in zip(names, expected):
            assert g1[n].dtype == torch.float64 and torch.equal(g1[n], e), n
        assert any(not torch.equal(g0[n], g1[n]) for n in names)  # it did clip


def test_an_exclude_pattern_that_matches_nothing_is_an_error_at_setup(tmp_path):
    agc = AdaptiveGradientClipping(exclude=["net.2.*", "net.O.weight"])  # a typo: O for 0
    trainer = make_trainer(tmp_path, callbacks=[agc], max_steps=1)
    with pytest.raises(ValueError, match=r"`exclude` to match a parameter name but 'net.O.weight' matches none "
                                         r"\(the closest parameter names: .*'net.0.weight'"):
        trainer.fit(TinyRegressor(), make_loader())
