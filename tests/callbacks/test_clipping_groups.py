"""GradientClipping(groups=...): each group clipped by its own norm and policy, against torch's clip_grad_norm_
on that group alone and numpy's percentile; the tags; checkpoint/resume; the argument checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_clip import GradientClipping, PercentileThreshold, QuantileThreshold, tags
from tests.helpers.models import RecordingLogger, TinyRegressor, TwoOptimizers, make_loader, make_trainer, states_equal


class TwoGroupRegressor(TinyRegressor):
    """TinyRegressor with two optimizer param groups: the first layer, and the second at half the rate."""

    def configure_optimizers(self):
        return torch.optim.SGD([{"params": self.net[0].parameters()},
                                {"params": self.net[2].parameters(), "lr": self.lr / 2}], lr=self.lr, momentum=0.5)


class Grads(Callback):
    """Clones the named gradients each step (placed before / after the clipping callback)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps.append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters()})


def _fit(tmp_path, clipping, steps=10, model_cls=TinyRegressor, **kwargs):
    seed_everything(0, verbose=False)
    model = model_cls(lr=0.1)
    pre, post = Grads(), Grads()
    trainer = make_trainer(tmp_path, callbacks=[pre, clipping, post], max_steps=steps, **kwargs)
    trainer.fit(model, make_loader())
    return model, pre.steps, post.steps


def _torch_clip(grads: dict[str, torch.Tensor], names: list[str], max_norm: float) -> dict[str, torch.Tensor]:
    """torch.nn.utils.clip_grad_norm_ on the named gradients alone (on copies)."""
    params = []
    for n in names:
        p = torch.zeros_like(grads[n], requires_grad=True)
        p.grad = grads[n].clone()
        params.append(p)
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    return {n: p.grad for n, p in zip(names, params)}


W0, B0, W2, B2 = "net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"


@pytest.mark.parametrize(
    "model_cls,groups,expected",
    [
        # a pattern: the first layer's weight alone; the other three tensors are clipped together at 0.3
        (TinyRegressor, {"net.0.weight": 0.2}, [([W0], 0.2), ([B0, W2, B2], 0.3)]),
        # a param-group index and a pattern; the first matching group wins (net.2.bias goes to the pattern)
        (TwoGroupRegressor, {"*.bias": 0.05, 1: 0.1}, [([B0, B2], 0.05), ([W2], 0.1), ([W0], 0.3)]),
    ],
)
def test_each_group_equals_torch_clip_grad_norm_on_that_group(tmp_path, model_cls, groups, expected):
    _, pre, post = _fit(tmp_path, GradientClipping(0.3, groups=groups), model_cls=model_cls)
    clipped_somewhere = False
    for before, after in zip(pre, post):
        for names, max_norm in expected:
            ref = _torch_clip(before, names, max_norm)
            for n in names:
                assert torch.equal(after[n], ref[n]), (n, max_norm)
            clipped_somewhere |= any(not torch.equal(before[n], after[n]) for n in names)
    assert clipped_somewhere
    # not the same as one threshold over all gradients
    whole = _torch_clip(pre[0], [W0, B0, W2, B2], 0.3)
    assert any(not torch.equal(whole[n], post[0][n]) for n in whole)


def test_adaptive_group_follows_numpy_percentile_of_its_own_norms_and_logs_its_tags(tmp_path):
    logger = RecordingLogger()
    clip = GradientClipping(0.05, groups={"net.2.*": PercentileThreshold(50.0, warmup_steps=0)})
    _, pre, post = _fit(tmp_path, clip, steps=12, logger=logger)
    history, thresholds, norms = [], [], []
    for before, after in zip(pre, post):
        g = torch.nn.utils.get_total_norm([before[W2], before[B2]])
        history.append(float(g))
        thr = float(np.percentile(history, 50.0))
        ref = _torch_clip(before, [W2, B2], thr)
        for n in (W2, B2):
            torch.testing.assert_close(after[n], ref[n], rtol=1e-6, atol=0.0)
        ungrouped = _torch_clip(before, [W0, B0], 0.05)
        for n in (W0, B0):
            assert torch.equal(after[n], ungrouped[n])
        thresholds.append(thr)
        norms.append(float(g))
    name = "net.2.*"
    np.testing.assert_allclose(logger.series(tags.group_tag(tags.CLIP_THRESHOLD, name)), thresholds, rtol=1e-6)
    np.testing.assert_allclose(logger.series(tags.group_tag(tags.GROUP_NORM, name)), norms, rtol=1e-6)
    clipped = np.array(norms) + 1e-6 > np.array(thresholds)  # coefficient thr / (norm + 1e-6) < 1
    rate = np.cumsum(clipped) / np.arange(1, len(norms) + 1)
    np.testing.assert_allclose(logger.series(tags.group_tag(tags.CLIP_RATE, name)), rate, rtol=1e-6)
    # the existing tags keep their meaning: the ungrouped threshold, the totals of all gradients
    assert logger.series(tags.CLIP_THRESHOLD) == pytest.approx([0.05] * 12)
    totals = [float(torch.nn.utils.get_total_norm(list(b.values()))) for b in pre]
    after = [float(torch.nn.utils.get_total_norm(list(a.values()))) for a in post]
    np.testing.assert_allclose(logger.series(tags.GRAD_NORM_TOTAL), totals, rtol=1e-6)
    np.testing.assert_allclose(logger.series(tags.GRAD_NORM_CLIPPED), after, rtol=1e-5)
    assert clip.clip_rate() == 1.0  # the ungrouped parameters were clipped at 0.05 every step
    assert clip.group_state(0, name).clip_rate() == pytest.approx(rate[-1])


def test_resume_continues_every_group_bit_for_bit(tmp_path):
    def make():
        return GradientClipping(PercentileThreshold(80.0, warmup_steps=2),
                                groups={"net.0.*": QuantileThreshold(0.5, initial=0.1), 1: 0.2})

    steps, k = 20, 8  # resume at an epoch boundary (8 batches per epoch)
    full_logger = RecordingLogger()
    full, _, _ = _fit(tmp_path / "full", make(), steps=steps, model_cls=TwoGroupRegressor, logger=full_logger)

    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=k, save_top_k=-1)
    part = make()
    seed_everything(0, verbose=False)
    trainer = make_trainer(tmp_path / "part", callbacks=[part, ckpt_cb], max_steps=k, logger=RecordingLogger(),
                           enable_checkpointing=True)
    trainer.fit(TwoGroupRegressor(lr=0.1), make_loader())
    ckpt = next((tmp_path / "ck").glob("*.ckpt"))
    saved = torch.load(ckpt, weights_only=False)["callbacks"][part.state_key]
    assert set(saved["groups"][0]) == {"net.0.*", "param_group1"}
    assert states_equal(saved, part.state_dict())

    seed_everything(0, verbose=False)
    resumed_logger = RecordingLogger()
    model = TwoGroupRegressor(lr=0.1)
    resumed = make()
    trainer = make_trainer(tmp_path / "res", callbacks=[resumed], max_steps=steps, logger=resumed_logger)
    trainer.fit(model, make_loader(), ckpt_path=str(ckpt))
    for base in (tags.CLIP_THRESHOLD, tags.group_tag(tags.CLIP_THRESHOLD, "net.0.*"),
                 tags.group_tag(tags.CLIP_RATE, "param_group1")):
        assert resumed_logger.series(base) == full_logger.series(base)[k:], base
    assert len(set(full_logger.series(tags.group_tag(tags.CLIP_THRESHOLD, "net.0.*")))) > 5  # it adapts
    for p, q in zip(model.parameters(), full.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"groups": [0.5]}, TypeError, "`groups` to be a mapping"),
        ({"groups": {2.5: 0.5}}, TypeError, "key of argument `groups`"),
        ({"groups": {True: 0.5}}, TypeError, "key of argument `groups`"),
        ({"groups": {-1: 0.5}}, ValueError, "`groups` to be a non-negative integer but got -1"),
        ({"groups": {"": 0.5}}, TypeError, "`groups` to be a parameter-name pattern"),
        ({"groups": {"enc.*": -1.0}}, ValueError, r"groups\['enc.\*'\]"),
        ({"groups": {"enc.*": "big"}}, TypeError, r"groups\['enc.\*'\]"),
        ({"groups": {"a": 0.5}, "mode": "value"}, ValueError, "mode='value'"),
        ({"groups": {1: 0.5, "param_group1": 0.2}}, ValueError, "both called 'param_group1'"),
    ],
)
def test_bad_groups_are_refused_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        GradientClipping(1.0, **kwargs)


def test_a_policy_object_serves_one_group_only():
    shared = PercentileThreshold()
    with pytest.raises(ValueError, match="its own threshold object"):
        GradientClipping(1.0, groups={"a.*": shared, "b.*": shared})
    with pytest.raises(ValueError, match="other than `threshold`"):
        GradientClipping(shared, groups={"a.*": shared})


@pytest.mark.parametrize(
    "groups,match",
    [
        ({"encoder.*": 0.5}, r"'encoder.\*' matches none \(the module's parameters: 'net.0.weight'"),
        ({"net.*": 0.5, "net.2.*": 0.1},
         r"'net.2.\*' matches no optimizer's parameter that an earlier group did not take"),
        ({3: 0.5}, "param group 3 is in no optimizer"),
    ],
)
def test_groups_matching_nothing_fail_before_the_first_step(tmp_path, groups, match):
    seed_everything(0, verbose=False)
    trainer = make_trainer(tmp_path, callbacks=[GradientClipping(1.0, groups=groups)], max_steps=2)
    with pytest.raises(ValueError, match=match):
        trainer.fit(TinyRegressor(), make_loader())
    assert trainer.global_step == 0


def test_group_tags_round_trip():
    for base in tags.GROUP_TAGS:
        tag = tags.group_tag(base, "encoder.*")
        assert tag == base + "/encoder.*"
        assert tags.split_group(tag) == (base, "encoder.*")
        assert tags.parse(tag) == tags.Tag(base + "/", None, group="encoder.*")
        assert tags.parse(tags.with_optimizer(tag, 1, 2), suffixed=True) == tags.Tag(base + "/", 1, group="encoder.*")
        assert tags.parse(tag).base not in tags.STEP_TAGS  # readers of the whole-optimizer tags never take it
    assert tags.split_group(tags.CLIP_THRESHOLD) is None
    assert tags.parse(tags.CLIP_THRESHOLD) == tags.Tag(tags.CLIP_THRESHOLD)
    with pytest.raises(ValueError, match="`base`"):
        tags.group_tag(tags.GRAD_NORM_TOTAL, "a")
    with pytest.raises(ValueError, match="`group`"):
        tags.group_tag(tags.CLIP_RATE, "")


def test_groups_from_yaml_through_the_cli(tmp_path, monkeypatch):
    """Plain YAML mappings reach ``groups``: a pattern to a policy (class_path), a pattern to a number."""
    from pathlib import Path

    from lightning_clip.tools.cli import main
    from lightning_clip.tools.report import read_scalars

    base = (Path(__file__).resolve().parents[2] / "configs" / "fixed.yaml").read_text()
    groups = ('        groups:\n'
              '          "rnn.weight_hh*": {class_path: lightning_clip.PercentileThreshold,\n'
              '                             init_args: {percentile: 50.0, warmup_steps: 0}}\n'
              '          "head.*": 0.05\n')
    assert "        mode: norm\n" in base
    (tmp_path / "groups.yaml").write_text(base.replace("        mode: norm\n", "        mode: norm\n" + groups))
    monkeypatch.chdir(tmp_path)
    fast = ["--trainer.max_steps=3", "--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=1",
            "--trainer.limit_val_batches=1", "--data.init_args.num_train=64", "--data.init_args.num_val=16",
            "--data.init_args.seq_len=8", "--model.init_args.hidden_size=8", f"--trainer.default_root_dir={tmp_path}"]
    assert main(["fit", "--config", str(tmp_path / "groups.yaml"), *fast]) == 0
    run = sorted((tmp_path / "lightning_logs" / "fixed").glob("version_*"))[-1]
    scalars = read_scalars(run)
    np.testing.assert_allclose(scalars[tags.group_tag(tags.CLIP_THRESHOLD, "head.*")].values, [0.05] * 3)
    hh_norm = scalars[tags.group_tag(tags.GROUP_NORM, "rnn.weight_hh*")].values
    hh_thr = scalars[tags.group_tag(tags.CLIP_THRESHOLD, "rnn.weight_hh*")].values
    np.testing.assert_allclose(hh_thr, [np.percentile(hh_norm[: i + 1], 50.0) for i in range(3)], rtol=1e-6)
    np.testing.assert_allclose(scalars[tags.CLIP_THRESHOLD].values, [0.3] * 3)  # the rest: the config's 0.3
    # the report reads the whole-optimizer tags, not a group's
    from lightning_clip.tools.report import summarize

    (health,) = summarize(scalars).optimizers
    assert health.last_threshold == pytest.approx(0.3) and health.logged_steps == 3


def test_each_optimizer_keeps_its_own_copy_of_a_group_policy(tmp_path):
    class WeightNorms(Callback):
        def __init__(self) -> None:
            self.norms: dict[int, list[float]] = {0: [], 1: []}

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            idx = 0 if getattr(optimizer, "_optimizer", optimizer) is trainer.optimizers[0] else 1
            layer = pl_module.a if idx == 0 else pl_module.b
            self.norms[idx].append(float(layer.weight.grad.norm()))

    seed_everything(0, verbose=False)
    logger, probe = RecordingLogger(), WeightNorms()
    policy = PercentileThreshold(50.0, warmup_steps=0)
    clip = GradientClipping(1.0, groups={"*.weight": policy})
    trainer = make_trainer(tmp_path, callbacks=[probe, clip], max_steps=12, logger=logger)
    trainer.fit(TwoOptimizers(), make_loader())
    assert clip.group_state(0, "*.weight").policy is policy
    assert clip.group_state(1, "*.weight").policy is not policy
    for idx in (0, 1):
        norms = probe.norms[idx]
        assert len(norms) == 6
        expected = [np.percentile(norms[: i + 1], 50.0) for i in range(len(norms))]
        logged = logger.series(tags.with_optimizer(tags.group_tag(tags.CLIP_THRESHOLD, "*.weight"), idx, 2))
        np.testing.assert_allclose(logged, expected, rtol=1e-5)
    assert max(probe.norms[1]) < min(probe.norms[0])  # the two histories really differ
