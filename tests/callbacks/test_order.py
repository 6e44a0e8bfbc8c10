"""The order of the callbacks in ``Trainer(callbacks=...)`` never changes the outcome: whatever the list order,
every guard decides on the pre-clip gradients before any callback clips, a skipped step reaches no clipper and
no policy, the clippers run in one fixed order and the monitor logs the same values. Real fits on CPU with NaN
steps and injected loss spikes; every order of every pair and triple is compared bit for bit."""

from __future__ import annotations

import itertools
import random
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_clip import (
    AdaGCClipping,
    AdaptiveGradientClipping,
    GradientClipping,
    GradientNormMonitor,
    NonFiniteGradientError,
    NonFiniteGradientGuard,
    PercentileThreshold,
    SpikeGuard,
    ZScoreThreshold,
)
from tests.callbacks.test_spike import Enter, HostReads, Leave
from tests.helpers.models import RecordingLogger, SpikyRegressor, TwoOptimizers, make_loader, make_trainer, states_equal

SPIKES = {14, 15, 27}  # loss x 50 at these optimizer steps
NANS = {5, 20}  # NaN loss (NaN gradients) at these, in runs that have a guard
STEPS = 32

FACTORIES = {
    "nonfinite": lambda: NonFiniteGradientGuard("skip"),
    "spike": lambda: SpikeGuard(("grad_norm", "loss"), z_thresh=6.0, window=8, warmup_steps=6),
    "clip": lambda: GradientClipping(PercentileThreshold(90.0, warmup_steps=0)),
    "monitor": lambda: GradientNormMonitor(per_parameter=True),
    "agc": lambda: AdaptiveGradientClipping(clip_factor=0.05),
}
GUARDS = {"nonfinite", "spike"}


class Raw(Callback):
    """Placed first: the total norm of the gradients before any of our callbacks touched them."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(float(torch.nn.utils.get_total_norm(grads)) if grads else float("nan"))


class Final(Callback):
    """Placed last: the gradients the optimizer steps with (``None`` where a guard skipped the step)."""

    def __init__(self) -> None:
        self.grads: list[list[torch.Tensor | None]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append([None if p.grad is None else p.grad.detach().clone() for p in pl_module.parameters()])

    @property
    def skipped(self) -> list[bool]:
        return [all(g is None for g in step) for step in self.grads]


@dataclass
class Outcome:
    weights: list[torch.Tensor]
    checkpoint: dict[str, Any]
    states: dict[str, Any]
    metrics: dict[str, list[tuple[int, float]]]
    raw: list[float]
    final: Final
    callbacks: dict[str, Any]


def _fit(path, callbacks: dict[str, Callback], nan_at=frozenset(), model=None, steps: int = STEPS, **kwargs) -> Outcome:
    """Fit ``model()`` (default: the spiky regressor) with ``callbacks`` between two probes; save a checkpoint."""
    seed_everything(0, verbose=False)
    raw, final, logger = Raw(), Final(), RecordingLogger()
    trainer = make_trainer(path, callbacks=[raw, *callbacks.values(), final], max_steps=steps, logger=logger, **kwargs)
    model = model() if model is not None else SpikyRegressor(SPIKES, lr=0.01, nan_at=set(nan_at))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the guards warn on every skipped step
        trainer.fit(model, make_loader())
    trainer.save_checkpoint(path / "end.ckpt")
    checkpoint = torch.load(path / "end.ckpt", weights_only=False)
    return Outcome(
        weights=[p.detach().clone() for p in model.parameters()],
        checkpoint={k: checkpoint[k] for k in ("state_dict", "optimizer_states", "callbacks", "global_step")},
        states={name: cb.state_dict() for name, cb in callbacks.items()},
        metrics=logger.metrics, raw=raw.norms, final=final, callbacks=callbacks,
    )


def _same_metrics(a: dict[str, list[tuple[int, float]]], b: dict[str, list[tuple[int, float]]]) -> bool:
    if a.keys() != b.keys():
        return False
    for tag in a:
        (sa, va), (sb, vb) = zip(*a[tag]), zip(*b[tag])
        if sa != sb or not np.array_equal(np.array(va), np.array(vb), equal_nan=True):
            return False
    return True


def _assert_same(ref: Outcome, out: Outcome, order: tuple[str, ...]) -> None:
    assert all(torch.equal(p, q) for p, q in zip(ref.weights, out.weights)), f"weights differ in order {order}"
    assert states_equal(ref.final.grads, out.final.grads), f"the gradients stepped with differ in order {order}"
    for key in ref.checkpoint:
        assert states_equal(ref.checkpoint[key], out.checkpoint[key]), f"checkpoint[{key!r}] differs in order {order}"
    for name in ref.states:
        assert states_equal(ref.states[name], out.states[name]), f"{name}'s state differs in order {order}"
    assert _same_metrics(ref.metrics, out.metrics), f"the logged metrics differ in order {order}"


def _fit_every_order(tmp_path, names: tuple[str, ...], orders=None, nan_at=None, factories=None) -> Outcome:
    """Fit once per order of ``names``; assert every run equals the first; return the first."""
    orders = list(itertools.permutations(names)) if orders is None else orders
    nan_at = (NANS if GUARDS & set(names) else set()) if nan_at is None else nan_at
    factories = FACTORIES if factories is None else factories
    ref = None
    for i, order in enumerate(orders):
        out = _fit(tmp_path / str(i), {n: factories[n]() for n in order}, nan_at=nan_at)
        if ref is None:
            ref = out
        else:
            _assert_same(ref, out, order)
    assert ref is not None
    return ref


def _percentile_reference(ref: Outcome) -> tuple[np.ndarray, list[float]]:
    """By hand: the history of a ``PercentileThreshold(90, warmup_steps=0)`` fed the raw norms of the steps that
    stepped (finite ones), and the threshold in force at each of those steps (numpy's percentile)."""
    kept = [np.float32(n) for n, skipped in zip(ref.raw, ref.final.skipped) if not skipped and np.isfinite(n)]
    history = np.array(kept, dtype=np.float32)
    thresholds = [float(np.percentile(history[: i + 1], 90.0)) for i in range(len(history))]
    return history, thresholds


SUBSETS = [c for k in (2, 3) for c in itertools.combinations(FACTORIES, k)]


@pytest.mark.parametrize("names", SUBSETS, ids="+".join)
def test_every_order_of_every_pair_and_triple_gives_the_same_run(tmp_path, names):
    ref = _fit_every_order(tmp_path, names)
    skipped = {step for step, s in enumerate(ref.final.skipped) if s}
    # the guards skipped exactly the injected steps (both guards skip a NaN step), in every order
    assert skipped == (NANS if GUARDS & set(names) else set()) | (SPIKES if "spike" in names else set())
    if "clip" in names:
        clip = ref.callbacks["clip"]
        policy = clip.policy_for(0)
        kept = STEPS - len(skipped)
        assert clip.steps == {0: kept} and policy.state_dict()["steps"] == kept  # a skipped step never reached it
        if "agc" not in names:  # the policy saw the raw norms of the steps that stepped, nothing else
            history, thresholds = _percentile_reference(ref)
            assert np.array_equal(np.sort(policy.state_dict()["history"].numpy()), np.sort(history))
            np.testing.assert_allclose([v for _, v in ref.metrics["grad_clip/threshold"]], thresholds, rtol=1e-6)
    if "monitor" in names:  # the monitor logs the norms before any clipping, skipped steps included
        np.testing.assert_allclose([v for _, v in ref.metrics["grad_norm/total"]], ref.raw, rtol=1e-6)


def test_all_callbacks_with_two_policies_and_both_unitwise_clippers_in_several_orders(tmp_path):
    factories = {
        **FACTORIES,
        "clip": lambda: GradientClipping(ZScoreThreshold(warmup_steps=4, max_norm=None)),
        "adagc": lambda: AdaGCClipping(warmup_steps=4, absolute=5.0),
    }
    names = tuple(factories)
    rng = random.Random(0)
    orders = [names, names[::-1], *(tuple(rng.sample(names, len(names))) for _ in range(3))]
    ref = _fit_every_order(tmp_path, names, orders, nan_at=NANS, factories=factories)
    assert {*NANS, *SPIKES} <= {s for s, k in enumerate(ref.final.skipped) if k}
    kept = STEPS - sum(ref.final.skipped)
    assert ref.states["adagc"]["optimizers"][0]["steps"] == kept == ref.callbacks["clip"].steps[0]
    # the final gradients are what GradientClipping left after the unit-wise clippers: at most its threshold
    final_norms = [float(torch.nn.utils.get_total_norm(step)) for step in ref.final.grads if step[0] is not None]
    thresholds = [v for _, v in ref.metrics["grad_clip/threshold"]]
    assert len(final_norms) == len(thresholds) == kept
    assert all(n <= t * (1 + 1e-5) for n, t in zip(final_norms, thresholds))
    np.testing.assert_allclose([v for _, v in ref.metrics["grad_norm/clipped_total"]], final_norms, rtol=1e-5)


def test_resume_in_another_order_continues_the_run_bit_for_bit(tmp_path):
    names = ("clip", "monitor", "agc", "spike", "nonfinite")
    full = _fit(tmp_path / "full", {n: FACTORIES[n]() for n in names}, nan_at=NANS)
    half = STEPS // 2
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=half, save_top_k=-1)
    seed_everything(0, verbose=False)
    part = {n: FACTORIES[n]() for n in names}
    trainer = make_trainer(tmp_path / "part", callbacks=[*part.values(), ckpt], max_steps=half,
                           enable_checkpointing=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(SpikyRegressor(SPIKES, lr=0.01, nan_at=set(NANS)), make_loader())
    path = next((tmp_path / "ck").glob("*.ckpt"))
    seed_everything(0, verbose=False)
    resumed = {n: FACTORIES[n]() for n in reversed(names)}
    model = SpikyRegressor(SPIKES, lr=0.01, nan_at=set(NANS))
    trainer = make_trainer(tmp_path / "res", callbacks=list(resumed.values()), max_steps=STEPS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, make_loader(), ckpt_path=str(path))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), full.weights))
    for name, callback in resumed.items():
        assert states_equal(callback.state_dict(), full.states[name]), name


def test_two_optimizers_in_either_order(tmp_path):
    def callbacks(order):
        made = {"monitor": GradientNormMonitor(per_parameter=True),
                "clip": GradientClipping(PercentileThreshold(50.0, warmup_steps=1, warmup_threshold=0.5)),
                "spike": SpikeGuard("grad_norm", z_thresh=2.0, window=4, warmup_steps=2)}
        return {n: made[n] for n in order}

    order = ("monitor", "clip", "spike")
    ref = _fit(tmp_path / "a", callbacks(order), model=TwoOptimizers, steps=16)
    out = _fit(tmp_path / "b", callbacks(order[::-1]), model=TwoOptimizers, steps=16)
    _assert_same(ref, out, order[::-1])
    assert {"grad_norm/total_opt0", "grad_norm/total_opt1", "grad_clip/threshold_opt1", "grad_spike/zscore_opt0"} \
        <= ref.metrics.keys()


@pytest.mark.parametrize("guards", [True, False], ids=["with-guards", "no-guards"])
@pytest.mark.parametrize("reverse", [False, True], ids=["clippers-first", "guards-first"])
def test_one_host_read_per_step_whatever_the_order(tmp_path, reverse, guards):
    per_step: list[int] = []
    enter = Enter(HostReads(), per_step)
    stack = [GradientClipping(ZScoreThreshold(warmup_steps=2)), GradientNormMonitor(), AdaGCClipping(warmup_steps=2),
             AdaptiveGradientClipping(0.05)]
    if guards:
        stack += [NonFiniteGradientGuard("skip"), SpikeGuard(("grad_norm", "loss"), window=4, warmup_steps=2)]
    stack = stack[::-1] if reverse else stack
    seed_everything(0, verbose=False)
    trainer = make_trainer(tmp_path, callbacks=[enter, *stack, Leave(enter)], max_steps=10)  # no logger
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(SpikyRegressor(set(), lr=0.01), make_loader())
    # the guards' one read, shared; nothing in the clipping path reads the device
    assert per_step == [1 if guards else 0] * 10


@pytest.mark.parametrize("nonfinite_first", [True, False])
def test_two_guards_raising_on_one_step_raise_the_same_error_in_either_order(tmp_path, nonfinite_first):
    guards = [NonFiniteGradientGuard("raise"), SpikeGuard(action="raise")]
    trainer = make_trainer(tmp_path, callbacks=guards if nonfinite_first else guards[::-1], max_steps=8)
    with pytest.raises(NonFiniteGradientError, match="Step 5: 4 parameter"):
        trainer.fit(SpikyRegressor(set(), nan_at={5}), make_loader())


@pytest.mark.parametrize("first,second", [
    (GradientClipping(1.0), GradientClipping(0.5, mode="value")),
    (AdaptiveGradientClipping(0.01), AdaptiveGradientClipping(0.02)),
    (AdaGCClipping(absolute=1.0), AdaGCClipping(absolute=2.0)),
], ids=["GradientClipping", "AGC", "AdaGC"])
def test_two_clippers_of_one_kind_are_refused_at_setup(tmp_path, first, second):
    name = type(first).__name__
    trainer = make_trainer(tmp_path, callbacks=[first, GradientNormMonitor(), second], max_steps=2)
    with pytest.raises(ValueError, match=rf"two {name} callbacks.*order"):
        trainer.fit(SpikyRegressor(set()), make_loader())
