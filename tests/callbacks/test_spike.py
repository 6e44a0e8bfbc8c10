"""SpikeGuard: decisions equal a NumPy re-computation of the rule; skips leave weights untouched; one host
read per step shared with the non-finite guard; resume replays the same decisions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.overrides import TorchFunctionMode

from lightning_clip import GradientSpikeError, NonFiniteGradientGuard, SpikeGuard
from lightning_clip.core.window import RollingWindow
from tests.helpers.models import (
    RecordingLogger,
    Snapshot,
    SpikyRegressor,
    TinyRegressor,
    make_loader,
    make_trainer,
    states_equal,
)


class Seen(Callback):
    """Records, per optimizer step, the loss and the pre-step grad norm (placed before the guard) ..."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.norms: list[float] = []

    def on_before_backward(self, trainer, pl_module, loss):
        self.losses.append(float(loss.detach()))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(float(torch.nn.utils.get_total_norm(grads)))


class Skipped(Callback):
    """... and (placed after it) whether the guard took the gradients away."""

    def __init__(self) -> None:
        self.skipped: list[bool] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.skipped.append(all(p.grad is None for p in pl_module.parameters()))


def reference(values: list[list[float]], z_thresh: float, window: int, warmup: int, log: bool = False) -> list[bool]:
    """The rule in NumPy (float64): spike when any value's z over its last `window` accepted values exceeds
    `z_thresh` once `warmup` values were accepted, or when a value is not finite; spikes are not accepted.
    With `log`, the values' logarithms are scored."""
    if log:
        values = [[math.log(v) if v > 0 else v for v in step] for step in values]
    held: list[list[float]] = [[] for _ in values[0]]
    out = []
    for step in values:
        zs = []
        for k, v in enumerate(step):
            w = np.array(held[k][-window:])
            zs.append(math.inf if not math.isfinite(v) else (v - w.mean()) / w.std(ddof=1) if len(w) >= 2 else 0.0)
        armed = len(held[0]) >= warmup
        spike = any(z == math.inf for z in zs) or (armed and any(z > z_thresh for z in zs))
        out.append(spike)
        if not spike:
            for k, v in enumerate(step):
                held[k].append(v)
    return out


def test_rolling_window_zscore_matches_numpy():
    rng = np.random.default_rng(0)
    xs = rng.normal(3.0, 2.0, size=20)
    w = RollingWindow(6)
    for i, x in enumerate(xs):
        held = xs[max(0, i - 6):i]
        expected = (x - held.mean()) / held.std(ddof=1) if len(held) >= 2 else 0.0
        assert float(w.zscore(torch.tensor(x))) == pytest.approx(expected, rel=1e-5, abs=1e-6)
        w.push(torch.tensor(x))
    assert float(w.zscore(torch.tensor(float("nan")))) == math.inf
    restored = RollingWindow(6)
    restored.load_state_dict(w.state_dict())
    assert torch.equal(restored.values(), w.values()) and restored.seen == w.seen == 20
    with pytest.raises(ValueError, match="another `window`"):
        RollingWindow(5).load_state_dict(w.state_dict())


def _fit(tmp_path, guard, spike_at=frozenset({14, 15, 27}), steps=32, **kwargs):
    seed_everything(0, verbose=False)
    seen, skipped, snap = Seen(), Skipped(), Snapshot()
    model = SpikyRegressor(set(spike_at), lr=0.01)
    trainer = make_trainer(tmp_path, callbacks=[snap, seen, guard, skipped], max_steps=steps, **kwargs)
    trainer.fit(model, make_loader())
    return model, seen, skipped, snap


@pytest.mark.parametrize("monitor,scale", [("grad_norm", "linear"), ("loss", "linear"),
                                           (("grad_norm", "loss"), "linear"), (("grad_norm", "loss"), "log")])
def test_decisions_equal_the_rule_and_skips_leave_the_weights_untouched(tmp_path, monitor, scale):
    guard = SpikeGuard(monitor, z_thresh=4.0, window=8, warmup_steps=6, action="skip", scale=scale)
    logger = RecordingLogger()
    with pytest.warns(UserWarning, match="spike"):
        _, seen, skipped, snap = _fit(tmp_path, guard, logger=logger)
    names = (monitor,) if isinstance(monitor, str) else monitor
    values = [[{"grad_norm": n, "loss": lo}[m] for m in names] for n, lo in zip(seen.norms, seen.losses)]
    assert skipped.skipped == reference(values, 4.0, 8, 6, log=scale == "log")
    assert {14, 15, 27} <= {i for i, s in enumerate(skipped.skipped) if s}  # every injected step caught
    assert guard.spikes == sum(skipped.skipped) and logger.series("grad_spike/skipped")[-1] == guard.spikes
    for step, was_skipped in enumerate(skipped.skipped):
        if was_skipped:  # weights and optimizer state bit for bit as before the step
            assert states_equal(snap.before[step], snap.after[step])
    assert len(logger.series("grad_spike/zscore")) == 32


def test_nothing_is_a_spike_before_the_window_is_full_by_default(tmp_path):
    # spikes at steps 3 and 5 fall in the first (default: full-window) warm-up: they step, and enter the window
    guard = SpikeGuard("grad_norm", z_thresh=3.0, window=10)
    _, seen, skipped, _ = _fit(tmp_path, guard, spike_at={3, 5}, steps=12)
    assert not any(skipped.skipped)
    assert reference([[n] for n in seen.norms], 3.0, 10, 10) == skipped.skipped


def test_warn_and_raise_and_max_consecutive(tmp_path):
    with pytest.warns(UserWarning, match="The optimizer steps anyway"):
        _, _, skipped, _ = _fit(tmp_path / "w", SpikeGuard(z_thresh=4.0, window=8, warmup_steps=6, action="warn"))
    assert not any(skipped.skipped)
    with pytest.raises(GradientSpikeError, match=r"Step 14: grad_norm spike"):
        _fit(tmp_path / "r", SpikeGuard(z_thresh=4.0, window=8, warmup_steps=6, action="raise"))
    with pytest.raises(GradientSpikeError, match=r"2 spikes in a row \(max_consecutive=1\)"), \
            pytest.warns(UserWarning):
        _fit(tmp_path / "c", SpikeGuard(z_thresh=4.0, window=8, warmup_steps=6, max_consecutive=1))


class HostReads(TorchFunctionMode):
    READS = {"tolist", "item", "__bool__", "__float__", "__int__"}

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


class Enter(Callback):
    def __init__(self, mode: HostReads, per_step: list[int]) -> None:
        self.mode, self.per_step = mode, per_step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.start = self.mode.count
        self.mode.__enter__()


class Leave(Callback):
    def __init__(self, enter: Enter) -> None:
        self.enter = enter

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.enter.mode.__exit__(None, None, None)
        self.enter.per_step.append(self.enter.mode.count - self.enter.start)


@pytest.mark.parametrize("stack", ["spike", "both guards"])
def test_one_host_read_per_step_shared_with_the_nonfinite_guard(tmp_path, stack):
    per_step: list[int] = []
    enter = Enter(HostReads(), per_step)
    guards = [SpikeGuard(("grad_norm", "loss"), window=4, warmup_steps=2)]
    if stack == "both guards":
        guards.insert(0, NonFiniteGradientGuard("skip"))
    seed_everything(0, verbose=False)
    trainer = make_trainer(tmp_path, callbacks=[enter, *guards, Leave(enter)], max_steps=10)  # no logger
    trainer.fit(TinyRegressor(), make_loader())
    assert per_step == [1] * 10


def test_resume_replays_the_same_decisions(tmp_path):
    steps, k = 32, 16  # resume at an epoch boundary (8 batches per epoch)

    def guard():
        return SpikeGuard(("grad_norm", "loss"), z_thresh=4.0, window=8, warmup_steps=6)

    with pytest.warns(UserWarning):
        full, _, full_skips, _ = _fit(tmp_path / "full", guard(), steps=steps)
        ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=k, save_top_k=-1)
        seed_everything(0, verbose=False)
        part_guard = guard()
        trainer = make_trainer(tmp_path / "part", callbacks=[part_guard, ckpt], max_steps=k, enable_checkpointing=True)
        trainer.fit(SpikyRegressor({14, 15, 27}, lr=0.01), make_loader())
        path = next((tmp_path / "ck").glob("*.ckpt"))
        saved = torch.load(path, weights_only=False)["callbacks"][part_guard.state_key]
        assert saved["spikes"] == sum(full_skips.skipped[:k]) and saved["windows"]["loss/0"]["seen"] > 0

        seed_everything(0, verbose=False)
        resumed_guard, skipped = guard(), Skipped()
        model = SpikyRegressor({14, 15, 27}, lr=0.01)
        trainer = make_trainer(tmp_path / "res", callbacks=[resumed_guard, skipped], max_steps=steps)
        trainer.fit(model, make_loader(), ckpt_path=str(path))
    assert skipped.skipped == full_skips.skipped[k:]
    assert resumed_guard.spikes == sum(full_skips.skipped)
    for p, q in zip(model.parameters(), full.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"monitor": "weights"}, ValueError, "monitor"),
        ({"monitor": ("loss", "loss")}, ValueError, "monitor"),
        ({"monitor": 3}, TypeError, "monitor"),
        ({"z_thresh": 0.0}, ValueError, "z_thresh"),
        ({"window": 1}, ValueError, "window"),
        ({"warmup_steps": 1}, ValueError, "warmup_steps"),
        ({"action": "ignore"}, ValueError, "action"),
        ({"max_consecutive": 0}, ValueError, "max_consecutive"),
        ({"scale": "sqrt"}, ValueError, "scale"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        SpikeGuard(**kwargs)


@pytest.mark.parametrize("guard_first", [True, False], ids=["guard-first", "guard-last"])
def test_a_skipped_spike_never_reaches_a_clipping_policy_wherever_the_guard_is(tmp_path, guard_first):
    from lightning_clip import GradientClipping, PercentileThreshold

    seed_everything(0, verbose=False)
    guard, skipped = SpikeGuard(z_thresh=4.0, window=8, warmup_steps=6), Skipped()
    policy = PercentileThreshold(90.0, warmup_steps=0)
    clip = GradientClipping(policy)
    ours = [guard, clip] if guard_first else [clip, guard]
    trainer = make_trainer(tmp_path, callbacks=[*ours, skipped], max_steps=32)
    with pytest.warns(UserWarning, match="spike"):
        trainer.fit(SpikyRegressor({14, 15, 27}, lr=0.01), make_loader())
    kept = 32 - sum(skipped.skipped)
    assert sum(skipped.skipped) >= 3 and clip.steps == {0: kept}
    assert policy.state_dict()["steps"] == kept  # the policy saw only the steps that stepped
