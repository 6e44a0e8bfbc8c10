"""GradientNormMonitor, several optimizers, bf16, accumulation and TensorBoard event files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_clip import GradientClipping, GradientNormMonitor, PercentileThreshold
from tests.helpers.models import RecordingLogger, TinyRegressor, TwoOptimizers, make_loader, make_trainer


class GradProbe(Callback):
    """Placed first: records the true pre-clip gradients with torch's own norm."""

    def __init__(self) -> None:
        self.totals: list[float] = []
        self.per_param: list[dict[str, float]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.totals.append(float(torch.nn.utils.get_total_norm(grads)))
        self.per_param.append({n: float(p.grad.norm()) for n, p in pl_module.named_parameters()})


def test_monitor_logs_pre_clip_total_and_per_parameter(tmp_path):
    seed_everything(0, verbose=False)
    probe, logger = GradProbe(), RecordingLogger()
    trainer = make_trainer(
        tmp_path, callbacks=[probe, GradientClipping(0.1), GradientNormMonitor(per_parameter=True)],
        max_steps=6, logger=logger,
    )
    trainer.fit(TinyRegressor(), make_loader())
    np.testing.assert_allclose(logger.series("grad_norm/total"), probe.totals, rtol=1e-6)
    for name in ("net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"):
        np.testing.assert_allclose(logger.series(f"grad_norm/{name}"), [d[name] for d in probe.per_param], rtol=1e-5)


def test_monitor_respects_log_every_n_steps(tmp_path):
    seed_everything(0, verbose=False)
    logger = RecordingLogger()
    trainer = make_trainer(tmp_path, callbacks=[GradientNormMonitor()], max_steps=12, logger=logger,
                           log_every_n_steps=4)
    trainer.fit(TinyRegressor(), make_loader())
    assert len(logger.series("grad_norm/total")) == 3


def test_bad_monitor_arguments():
    with pytest.raises(TypeError, match="per_parameter"):
        GradientNormMonitor(per_parameter="yes")
    with pytest.raises(ValueError, match="log_every_n_steps"):
        GradientNormMonitor(log_every_n_steps=0)


class PostClipProbe(Callback):
    def __init__(self) -> None:
        self.records: list[tuple[int, float, float]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        idx = [o.optimizer if hasattr(o, "optimizer") else o for o in trainer.optimizers].index(optimizer)
        a = float(torch.nn.utils.get_total_norm([p.grad for p in pl_module.a.parameters() if p.grad is not None]))
        b = float(torch.nn.utils.get_total_norm([p.grad for p in pl_module.b.parameters() if p.grad is not None]))
        self.records.append((idx, a, b))


def test_several_optimizers_clip_only_their_parameters(tmp_path):
    seed_everything(0, verbose=False)
    logger, probe = RecordingLogger(), PostClipProbe()
    clip = GradientClipping(PercentileThreshold(50.0, warmup_steps=1, warmup_threshold=0.5))
    trainer = make_trainer(tmp_path, callbacks=[clip, probe], max_steps=10, logger=logger)
    model = TwoOptimizers()
    trainer.fit(model, make_loader())
    # tags carry the optimizer suffix, each optimizer has its own history
    assert len(logger.series("grad_norm/total_opt0")) == 5
    assert len(logger.series("grad_norm/total_opt1")) == 5
    assert "grad_norm/total" not in logger.metrics
    assert clip.policy_for(0).state_dict()["steps"] == 5 == clip.policy_for(1).state_dict()["steps"]
    assert not torch.equal(clip.policy_for(0).state_dict()["history"], clip.policy_for(1).state_dict()["history"])
    # after opt0's clipping (probe runs after clip) a's grads are within the threshold; b is untouched (None/0)
    thr0 = logger.series("grad_clip/threshold_opt0")
    pre0 = logger.series("grad_norm/total_opt0")
    a_after = [a for i, a, _ in probe.records if i == 0]
    np.testing.assert_allclose(a_after, np.minimum(pre0, thr0), rtol=1e-5, atol=2e-6)
    pre1 = logger.series("grad_norm/total_opt1")
    thr1 = logger.series("grad_clip/threshold_opt1")
    b_after = [b for i, _, b in probe.records if i == 1]
    np.testing.assert_allclose(b_after, np.minimum(pre1, thr1), rtol=1e-5, atol=2e-6)  # torch eps 1e-6
    # opt1's step did not rescale a's gradients again: a's grads at opt1's step are opt0's clipped ones
    a_at_1 = [a for i, a, _ in probe.records if i == 1]
    np.testing.assert_allclose(a_at_1, a_after, rtol=1e-6)


def test_bf16_mixed_and_accumulation(tmp_path):
    seed_everything(0, verbose=False)
    logger = RecordingLogger()
    trainer = make_trainer(tmp_path, callbacks=[GradientNormMonitor(), GradientClipping(0.5)], max_steps=4,
                           precision="bf16-mixed", accumulate_grad_batches=2, logger=logger)
    trainer.fit(TinyRegressor(), make_loader())
    # one record per optimizer step, not per batch
    assert len(logger.series("grad_norm/total")) == 4
    assert all(np.isfinite(logger.series("grad_norm/clipped_total")))
    assert max(logger.series("grad_norm/clipped_total")) <= 0.5 + 1e-5


def test_accumulation_matches_lightning(tmp_path):
    def run(path, **kw):
        seed_everything(0, verbose=False)
        m = TinyRegressor()
        make_trainer(path, max_steps=4, accumulate_grad_batches=2, **kw).fit(m, make_loader())
        return m

    ours = run(tmp_path / "a", callbacks=[GradientClipping(0.2)])
    ref = run(tmp_path / "b", gradient_clip_val=0.2)
    assert all(torch.equal(p, q) for p, q in zip(ours.parameters(), ref.parameters()))


def test_tensorboard_event_files_contain_tags(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    seed_everything(0, verbose=False)
    tb = TensorBoardLogger(save_dir=str(tmp_path), name="tb")
    trainer = make_trainer(tmp_path, callbacks=[GradientNormMonitor(histograms=True), GradientClipping(0.5)],
                           max_steps=5, logger=tb)
    trainer.fit(TinyRegressor(), make_loader())
    acc = EventAccumulator(tb.log_dir, size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"grad_norm/total", "grad_clip/threshold", "grad_norm/clipped_total", "grad_clip/clip_rate"} <= scalars
    assert len(acc.Scalars("grad_norm/total")) == 5
    assert "grad_hist/net.0.weight" in acc.Tags()["histograms"]
