"""AdaGC (per-tensor adaptive clipping): the core step against a plain-Python transcription of the
paper's algorithm, and the callback in a real Trainer (gradients, resume)."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_clip import AdaGCClipping
from lightning_clip.core.adagc import adagc_coefficients
from tests.helpers.models import TinyRegressor, make_loader, make_trainer

INF, NAN = float("inf"), float("nan")


def _reference(steps: list[list[float]], warmup: int, absolute: float, relative: float, beta: float):
    """AdaGC in Python floats: warmup clips globally (gamma = first clipped norm, then the min), then
    h_i = min(1, relative * gamma_i / ||g_i||), gamma_i = beta * gamma_i + (1 - beta) * h_i * ||g_i||.
    A non-finite step leaves gamma alone; a tensor never set is clipped globally."""
    gamma = [None] * len(steps[0])
    out = []
    for t, norms in enumerate(steps):
        total = math.sqrt(sum(n * n for n in norms))
        finite = math.isfinite(total)
        glob = min(1.0, absolute / (total + 1e-6)) if finite else NAN
        coefs = []
        for i, n in enumerate(norms):
            if t < warmup or gamma[i] is None:
                h = glob
                if finite:
                    gamma[i] = n * h if gamma[i] is None else min(gamma[i], n * h)
            else:
                h = min(1.0, relative * gamma[i] / max(n, 1e-6)) if finite else min(1.0, relative * gamma[i] / n)
                if finite:
                    gamma[i] = beta * gamma[i] + (1 - beta) * h * n
            coefs.append(h)
        out.append((coefs, list(gamma)))
    return out


def test_core_matches_the_algorithm_by_hand():
    # two tensors; warmup 2 steps at absolute 1.0, then relative 1.5, beta 0.5
    seq = [[3.0, 4.0], [0.3, 0.4], [1.0, 0.1], [NAN, 1.0], [0.2, 10.0], [0.1, 0.1]]
    # t0: total 5 -> h = 1/(5+1e-6), clipped (0.6, 0.8) -> gamma (0.6, 0.8)
    # t1: total 0.5 -> h = 1, clipped (0.3, 0.4) -> gamma (0.3, 0.4)
    # t2: h = (min(1, 0.45 / 1), min(1, 0.6 / 0.1)) = (0.45, 1) -> gamma (0.375, 0.25)
    # t3: NaN: gamma unchanged
    # t4: h = (1, 0.375 / 10) -> gamma (0.2875, 0.3125)
    got, gamma = [], torch.full((2,), INF)
    for t, norms in enumerate(seq):
        n = torch.tensor(norms)
        coef, gamma = adagc_coefficients(n, torch.linalg.vector_norm(n), gamma, t, warmup_steps=2, absolute=1.0,
                                         relative=1.5, beta=0.5)
        got.append((coef.tolist(), gamma.tolist()))
    assert got[0][1] == pytest.approx([0.6, 0.8], rel=1e-6)
    assert got[1][1] == pytest.approx([0.3, 0.4], rel=1e-6)
    assert got[2][0] == pytest.approx([0.45, 1.0]) and got[2][1] == pytest.approx([0.375, 0.25])
    assert got[3][1] == pytest.approx([0.375, 0.25])
    assert got[4][0] == pytest.approx([1.0, 0.0375]) and got[4][1] == pytest.approx([0.2875, 0.3125])
    ref = _reference(seq, 2, 1.0, 1.5, 0.5)
    for t, ((c, g), (rc, rg)) in enumerate(zip(got, ref)):
        assert g == pytest.approx(rg, rel=1e-6), t
        if t != 3:
            assert c == pytest.approx(rc, rel=1e-6), t


def test_core_matches_the_reference_on_a_long_spiky_sequence():
    gen = torch.Generator().manual_seed(0)
    k, steps = 5, 200
    norms = torch.rand(steps, k, generator=gen) * torch.logspace(-2, 1, k)  # tensors of very different scales
    norms[torch.rand(steps, k, generator=gen) < 0.05] *= 50.0  # spikes
    norms[17, 2] = NAN
    ref = _reference(norms.tolist(), 10, 2.0, 1.05, 0.98)
    gamma = torch.full((k,), INF)
    for t in range(steps):
        coef, gamma = adagc_coefficients(norms[t], torch.linalg.vector_norm(norms[t]), gamma, t, warmup_steps=10,
                                         absolute=2.0, relative=1.05, beta=0.98)
        assert gamma.tolist() == pytest.approx(ref[t][1], rel=1e-5), t
        if t != 17:
            assert coef.tolist() == pytest.approx(ref[t][0], rel=1e-5), t


class Grabber(Callback):
    def __init__(self) -> None:
        self.steps: list[list[torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps.append([p.grad.detach().clone() for p in pl_module.parameters()])


def test_callback_clips_each_tensor_as_the_algorithm_and_resumes_bit_for_bit(tmp_path):
    kw = dict(warmup_steps=3, absolute=0.5, relative=1.05, beta=0.9)
    steps, k = 16, 8
    seed_everything(0, verbose=False)
    before, after = Grabber(), Grabber()
    full_cb = AdaGCClipping(**kw)
    full = TinyRegressor(lr=0.1)
    make_trainer(tmp_path / "full", callbacks=[before, full_cb, after], max_steps=steps).fit(full, make_loader())
    ref = _reference([[torch.linalg.vector_norm(g).item() for g in b] for b in before.steps], 3, 0.5, 1.05, 0.9)
    for b, a, (coefs, _) in zip(before.steps, after.steps, ref):
        for gb, ga, c in zip(b, a, coefs):
            torch.testing.assert_close(ga, gb * c, rtol=1e-5, atol=1e-9)
    assert any(c < 1.0 for coefs, _ in ref[3:] for c in coefs)  # the relative phase clipped something

    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=k, save_top_k=-1)
    seed_everything(0, verbose=False)
    make_trainer(tmp_path / "part", callbacks=[AdaGCClipping(**kw), ckpt_cb], max_steps=k,
                 enable_checkpointing=True).fit(TinyRegressor(lr=0.1), make_loader())
    seed_everything(0, verbose=False)
    resumed_cb, model = AdaGCClipping(**kw), TinyRegressor(lr=0.1)
    make_trainer(tmp_path / "res", callbacks=[resumed_cb], max_steps=steps).fit(
        model, make_loader(), ckpt_path=str(next((tmp_path / "ck").glob("*.ckpt"))))
    for p, q in zip(model.parameters(), full.parameters()):
        assert torch.equal(p, q)
    assert torch.equal(resumed_cb.gamma(), full_cb.gamma())


@pytest.mark.parametrize("kwargs,exc,name", [
    ({"warmup_steps": 0}, ValueError, "warmup_steps"),
    ({"absolute": 0.0}, ValueError, "absolute"),
    ({"relative": -1.0}, ValueError, "relative"),
    ({"beta": 1.0}, ValueError, "beta"),
    ({"log": "yes"}, TypeError, "log"),
])
def test_bad_arguments_name_the_argument(kwargs, exc, name):
    with pytest.raises(exc, match=f"`{name}`"):
        AdaGCClipping(**kwargs)


def test_a_relative_below_one_warns_that_gamma_shrinks():
    with pytest.warns(UserWarning, match=r"relative=0.5\): below 1.*beta \+ \(1 - beta\) relative = 0.99 per"):
        AdaGCClipping(relative=0.5)
    with pytest.raises(ValueError, match=r"`absolute` to be in \[1.175e-38"):
        AdaGCClipping(absolute=1e-300)
