"""Callbacks under real 2-process DDP (gloo on CPU): both ranks see and log the same norms."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.strategies import DDPStrategy

from lightning_clip import GradientClipping, GradientNormMonitor, NonFiniteGradientGuard, PercentileThreshold
from tests.helpers.models import NormRecorder, RecordingLogger, TinyRegressor, make_loader, make_trainer


@pytest.mark.distributed
def test_two_rank_ddp_logs_identical_norms_and_thresholds(tmp_path):
    seed_everything(0, verbose=False)
    out = tmp_path / "out"
    out.mkdir()
    callbacks = [
        GradientNormMonitor(),
        GradientClipping(PercentileThreshold(80.0, warmup_steps=2)),
        NonFiniteGradientGuard("skip"),
        NormRecorder(str(out)),
    ]
    trainer = make_trainer(
        tmp_path, callbacks=callbacks, max_steps=6, devices=2,
        strategy=DDPStrategy(start_method="spawn", process_group_backend="gloo"),
        logger=RecordingLogger(),
    )
    trainer.fit(TinyRegressor(), make_loader())
    r0 = json.loads((out / "rank0.json").read_text())
    r1 = json.loads((out / "rank1.json").read_text())
    assert len(r0["norms"]) == 6
    assert r0["norms"] == r1["norms"]
    assert r0["weights"] == r1["weights"]
    # the values each rank logged at the last step agree too
    for key in ("grad_norm/total", "grad_clip/threshold", "grad_norm/clipped_total"):
        assert key in r0["logged"]
        assert r0["logged"][key] == r1["logged"][key]
    np.testing.assert_allclose(r0["logged"]["grad_norm/total"], r0["norms"][-1], rtol=1e-6)
    assert torch.isfinite(torch.tensor(r0["norms"])).all()
