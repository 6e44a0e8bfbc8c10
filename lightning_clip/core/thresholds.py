"""Threshold policies: small stateful objects that turn this step's gradient norm into a threshold.

Pure torch. A policy is called once per optimizer step with the pre-clip total norm (a 0-d tensor,
possibly NaN/Inf) and returns the threshold in force for that step as a 0-d fp32 tensor on the same
device. Non-finite norms never enter a history or an EMA. Every policy has ``state_dict()`` /
``load_state_dict()`` holding all state that changes the thresholds it will produce, so a resumed
run continues bit for bit.

=========================== ========================================================================
policy                      threshold at step ``t`` (0-based)
=========================== ========================================================================
``FixedThreshold``          ``max_norm``
``PercentileThreshold``     ``warmup_threshold`` for ``t < warmup_steps``, then the ``percentile``-th
                            percentile (numpy's linear method) of the finite norms seen so far,
                            the current one included (AutoClip)
``WarmupThreshold``         ``warmup_threshold`` for ``t < warmup_steps`` while ``then`` observes,
                            then whatever ``then`` returns
``ZScoreThreshold``         ZClip: EMA mean/variance of the norm; a norm whose z-score exceeds
                            ``z_thresh`` is clipped to ``mean + z_thresh**2 * std / z``
``QuantileThreshold``       the geometric quantile tracker: ``C_t``, then
                            ``C_{t+1} = C_t * exp(-learning_rate * (1[norm_t <= C_t] - quantile))``
=========================== ========================================================================

The histories behind ``PercentileThreshold`` live in :mod:`lightning_clip.core.histories`. This
module keeps the policies next to the base class whose loading protocol they implement.
"""

from __future__ import annotations

import copy
import warnings
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_clip.core.functional import geometric_quantile_update
from lightning_clip.core.histories import BACKENDS, NormHistory, make_history
from lightning_clip.exceptions import (
    FLOAT32_MAX,
    FLOAT32_TINY,
    check_bool,
    check_choice,
    check_fraction,
    check_non_negative_int,
    check_positive_float,
    check_positive_int,
    check_threshold,
)

#: The largest ``QuantileThreshold`` learning rate: ``exp(88)`` is about the largest factor float32 holds.
MAX_LEARNING_RATE = 88.0

__all__ = ["MAX_LEARNING_RATE", "FixedThreshold", "PercentileThreshold", "QuantileThreshold", "ThresholdPolicy",
           "WarmupThreshold", "ZScoreThreshold", "as_policy"]


class ThresholdPolicy(ABC):
    """Base class: ``policy(norm) -> threshold``, called exactly once per optimizer step.

    State that lives on the norms' device is created at the first call, on that call's device (and
    moved when a later call comes from another device). A state loaded before the first call is
    kept as given and applied then, so ``load_state_dict(s)`` followed by ``state_dict()`` returns
    ``s``. A subclass implements :meth:`_threshold` (one step), :meth:`_materialize` (build its
    device state, from a loaded state or empty) and :meth:`_state` (export it), and calls
    ``super().__init__()`` once its hyperparameters are set.

    Attributes:
        steps: number of calls so far (restored by :meth:`load_state_dict`).
    """

    steps: int
    _loaded: dict[str, Any] | None  # a state loaded but not yet placed on a device
    _device: torch.device | None  # where the device state lives (None: not built yet)
    #: The constructor's arguments, shown by ``repr`` (which callbacks use in their state keys).
    _ARGS: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.reset()

    def __call__(self, norm: Tensor) -> Tensor:
        """Observe this step's pre-clip total norm and return this step's threshold (0-d fp32)."""
        if norm.device != self._device:  # first call, first call after a load, or the norms moved
            moved = self._state() if self._device is not None else None
            self._materialize(self._loaded if self._loaded is not None else moved, norm.device)
            self._loaded, self._device = None, norm.device
        threshold = self._threshold(norm)
        self.steps += 1
        return threshold

    @abstractmethod
    def _threshold(self, norm: Tensor) -> Tensor:
        """This step's threshold; ``self.steps`` is the 0-based index of this step."""

    @abstractmethod
    def _materialize(self, state: Mapping[str, Any] | None, device: torch.device) -> None:
        """Build the device state on ``device`` from ``state`` (a :meth:`state_dict`), or empty."""

    @abstractmethod
    def _state(self) -> dict[str, Any]:
        """The policy's own state as plain values and CPU tensors (``steps`` is added by the base)."""

    def _check_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """Validate a state about to be loaded and return it in the form :meth:`state_dict` gives."""
        return state

    def state_dict(self) -> dict[str, Any]:
        """Everything that changes future thresholds, as plain values and CPU tensors."""
        if self._loaded is not None:
            return dict(self._loaded)
        return {"steps": self.steps, **self._state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; device state is rebuilt at the next call."""
        checked = self._check_state(dict(state))
        self.reset()
        self.steps = int(checked.get("steps", 0))
        self._loaded = checked

    def reset(self) -> None:
        """Forget every observed norm (and any loaded state)."""
        self.steps = 0
        self._loaded = None
        self._device = None

    def fresh(self) -> ThresholdPolicy:
        """A copy with the same hyperparameters and empty state (one per optimizer)."""
        clone = copy.deepcopy(self)
        clone.reset()
        return clone

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={getattr(self, k)!r}' for k in self._ARGS)})"


class FixedThreshold(ThresholdPolicy):
    """A constant threshold.

    Args:
        max_norm: the threshold, a positive finite number.
    """

    _ARGS = ("max_norm",)

    def __init__(self, max_norm: float = 1.0) -> None:
        self.max_norm = check_threshold("max_norm", max_norm)
        self._cache: Tensor | None = None
        super().__init__()

    def _materialize(self, state: Mapping[str, Any] | None, device: torch.device) -> None:
        self._cache = None

    def _threshold(self, norm: Tensor) -> Tensor:
        # in the norm's dtype when it is fp64 (keeps max_norm exact, as torch's Python float does)
        dtype = norm.dtype if norm.dtype == torch.float64 else torch.float32
        c = self._cache
        if c is None or c.dtype != dtype:
            c = self._cache = torch.tensor(self.max_norm, dtype=dtype, device=norm.device)
        return c

    def _state(self) -> dict[str, Any]:
        return {"max_norm": self.max_norm}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the state, ``max_norm`` included."""
        super().load_state_dict(state)
        self.max_norm = check_threshold("max_norm", state.get("max_norm", self.max_norm))


def _check_percentile(value: Any) -> float:
    try:
        return check_fraction("percentile", value, low=0.0, high=100.0, open_low=True, open_high=True)
    except ValueError as err:
        reason = {0.0: "the 0th percentile is the smallest norm seen, so nearly every step would be clipped",
                  100.0: "the 100th percentile is the largest norm seen, the current one included, so no step "
                         "would be clipped"}.get(float(value))
        if reason is None:
            raise
        raise ValueError(f"{err}: {reason}") from None


class PercentileThreshold(ThresholdPolicy):
    """AutoClip: the ``percentile``-th percentile of the gradient norms seen so far.

    During the first ``warmup_steps`` optimizer steps the threshold is ``warmup_threshold`` (the
    norms seen meanwhile already enter the history). Afterwards it is
    ``numpy.percentile(history, percentile)`` bit for bit, where ``history`` holds every finite
    pre-clip norm so far (as float32), the current step's included, or only the last ``window``.

    With ``history="clipped"`` the history records ``min(norm, threshold)`` instead of the raw norm, as
    AdaGC does: the threshold in force at a step is then the percentile of the earlier records only
    (``warmup_threshold`` while warming up or while none is held), and the step records its norm clipped
    to it. No record can exceed the threshold of its step, so an exploding norm cannot raise the
    threshold; the threshold never exceeds the largest one in force before it (``warmup_threshold``
    after a warmup) and follows the norms downwards.

    The history is exact and costs 4 bytes per step (see :mod:`lightning_clip.core.histories`).

    Args:
        percentile: in the open interval ``(0, 100)``.
        warmup_steps: number of optimizer steps that use ``warmup_threshold``.
        warmup_threshold: positive threshold used during warmup (and while no finite norm was seen).
        window: ``None`` for all history, or a number of most recent finite norms (``>= 2`` with
            ``history="raw"``, where a window of one would make every threshold the current norm).
        backend: where the history lives: ``"host"`` (numpy, per-step cost flat in the number of
            steps; reads the norm on the host), ``"device"`` (on the norms' device, no host-device
            synchronisation) or ``"auto"`` (host for CPU norms, device otherwise, decided at the
            first call).
        history: ``"raw"`` records every finite pre-clip norm; ``"clipped"`` records
            ``min(norm, threshold)``.
    """

    _ARGS = ("percentile", "warmup_steps", "warmup_threshold", "window", "backend", "history")

    def __init__(self, percentile: float = 90.0, warmup_steps: int = 100, warmup_threshold: float = 1.0,
                 window: int | None = None, backend: str = "auto", history: str = "raw") -> None:
        self.history = check_choice("history", history, ("raw", "clipped"))
        self.percentile = _check_percentile(percentile)
        self.warmup_steps = check_non_negative_int("warmup_steps", warmup_steps)
        self.warmup_threshold = check_threshold("warmup_threshold", warmup_threshold, allow_inf=True)
        self.window = None if window is None else check_positive_int("window", window)
        if self.window == 1 and self.history == "raw":
            raise ValueError("Expected argument `window` to be None or an integer >= 2 with history='raw' but got 1: "
                             "the only norm in the window is the current one, so the threshold is that norm and no "
                             "step is ever clipped")
        if self.percentile < 1.0:
            warnings.warn(f"PercentileThreshold(percentile={self.percentile:g}) is the {self.percentile:g}th "
                          "percentile, near the smallest norm seen: `percentile` is on the 0-100 scale (for the "
                          f"{100 * self.percentile:g}th percentile pass percentile={100 * self.percentile:g})",
                          UserWarning, stacklevel=2)
        self.backend = check_choice("backend", backend, BACKENDS)
        self._history: NormHistory | None = None
        self._fallback: Tensor | None = None
        super().__init__()

    @property
    def norm_history(self) -> NormHistory | None:
        """The history in use (``None`` until the first call after construction, reset or load)."""
        return self._history

    def reset(self) -> None:
        super().reset()
        self._history = None

    def _materialize(self, state: Mapping[str, Any] | None, device: torch.device) -> None:
        values = None if state is None or state.get("history") is None else state["history"].numpy()
        self._history = make_history(self.backend, self.window, device, values)
        self._fallback = torch.tensor(self.warmup_threshold, dtype=torch.float32, device=device)

    def _threshold(self, norm: Tensor) -> Tensor:
        assert self._history is not None and self._fallback is not None  # set by _materialize
        if self.history == "clipped":
            threshold = self._current()
            norm = norm.detach().reshape(())
            # min(norm, threshold) for finite norms; a non-finite norm stays non-finite and is never recorded
            self._history.insert(torch.where(torch.isfinite(norm), torch.minimum(norm.float(), threshold), norm))
            return threshold
        self._history.insert(norm)
        return self._current()

    def _current(self) -> Tensor:
        assert self._history is not None and self._fallback is not None  # set by _materialize
        if self.steps < self.warmup_steps:
            return self._fallback
        return self._history.percentile(self.percentile / 100.0, self._fallback)

    def _state(self) -> dict[str, Any]:
        values = np.zeros(0, dtype=np.float32) if self._history is None else self._history.values()
        return {
            "history": torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)),
            "percentile": self.percentile,
            "window": self.window,
            "history_mode": self.history,
        }

    def _check_state(self, state: dict[str, Any]) -> dict[str, Any]:
        saved_window = state.get("window", self.window)
        if saved_window != self.window:
            raise ValueError(
                f"PercentileThreshold: the checkpoint was saved with window={saved_window} but this policy has "
                f"window={self.window}; resume with the same `window`."
            )
        saved_mode = state.get("history_mode", self.history)
        if saved_mode != self.history:
            raise ValueError(
                f"PercentileThreshold: the checkpoint was saved with history={saved_mode!r} but this policy has "
                f"history={self.history!r}; resume with the same `history`."
            )
        if state.get("history") is not None:
            history = torch.as_tensor(state["history"], dtype=torch.float32).detach().cpu()
            if self.window is not None and history.numel() > self.window:
                history = history[-self.window :]
            state["history"] = history
        return state


class WarmupThreshold(ThresholdPolicy):
    """A fixed threshold for the first ``warmup_steps`` steps, then the wrapped policy ``then``.

    ``then`` observes every norm from the first step on, so it is ready when it takes over.

    Args:
        warmup_steps: number of optimizer steps that use ``warmup_threshold``.
        warmup_threshold: positive threshold during warmup.
        then: the policy that takes over (a :class:`ThresholdPolicy` or a positive float);
            ``PercentileThreshold(warmup_steps=0)`` by default.
    """

    _ARGS = ("warmup_steps", "warmup_threshold", "then")

    def __init__(self, warmup_steps: int = 100, warmup_threshold: float = 1.0,
                 then: ThresholdPolicy | float | None = None) -> None:
        self.warmup_steps = check_non_negative_int("warmup_steps", warmup_steps)
        self.warmup_threshold = check_threshold("warmup_threshold", warmup_threshold, allow_inf=True)
        self.then = as_policy(PercentileThreshold(warmup_steps=0) if then is None else then, name="then")
        self._fallback: Tensor | None = None
        super().__init__()

    def reset(self) -> None:
        super().reset()
        self.then.reset()

    def _materialize(self, state: Mapping[str, Any] | None, device: torch.device) -> None:
        # `then` holds and places its own state (see load_state_dict)
        self._fallback = torch.tensor(self.warmup_threshold, dtype=torch.float32, device=device)

    def _threshold(self, norm: Tensor) -> Tensor:
        assert self._fallback is not None  # set by _materialize
        inner = self.then(norm)
        return self._fallback if self.steps < self.warmup_steps else inner

    def _state(self) -> dict[str, Any]:
        return {"then": self.then.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the state; the wrapped policy's part goes to ``then``."""
        super().load_state_dict(state)
        if "then" in state:
            self.then.load_state_dict(state["then"])


class ZScoreThreshold(ThresholdPolicy):
    """ZClip (Kumar et al. 2025): z-score spike detection on an EMA of the gradient norm.

    The first ``warmup_steps`` finite norms initialise the EMA mean and (population) variance; until
    then the threshold is ``max_norm`` (no clipping when ``max_norm`` is None). Afterwards, with
    ``std = sqrt(var)`` and ``z = (norm - mean) / (std + eps)``, a spike ``z > z_thresh`` is clipped
    to ``clip_factor * (mean + z_thresh**2 * std / z)`` (``clip_option="adaptive_scaling"``) or to
    ``mean`` (``"mean"``); otherwise the reported threshold is the spike cut-off
    ``mean + z_thresh * (std + eps)``, which the norm does not exceed. ``max_norm`` caps the result.
    The EMA is then updated with the clipped norm (or skipped on a spike when
    ``skip_update_on_spike``). Unlike ZClip, non-finite norms never touch the EMA or the warmup
    buffer, and all state stays on the device (no host-device synchronisation).

    ``history="zclip"`` records what ZClip records: raw norms in the warmup buffer, and in the EMA the
    norm clipped to the z-score threshold before the ``max_norm`` cap. ``history="clipped"`` records
    ``min(norm, threshold)`` with the threshold in force (cap included) in both, so neither a spike
    nor a norm above ``max_norm`` enters the statistics unclipped.

    Args:
        alpha: EMA smoothing factor in ``(0, 1)``.
        z_thresh: positive z-score cut-off.
        warmup_steps: number of finite norms that initialise the EMA (>= 1).
        max_norm: optional positive cap, also the threshold during warmup.
        clip_option: ``"adaptive_scaling"`` or ``"mean"``.
        clip_factor: positive multiplier of the adaptive threshold.
        skip_update_on_spike: keep the EMA unchanged on spikes.
        eps: positive constant added to the standard deviation.
        history: ``"zclip"`` or ``"clipped"`` (what the warmup buffer and the EMA record, see above).
    """

    _ARGS = ("alpha", "z_thresh", "warmup_steps", "max_norm", "clip_option", "clip_factor", "skip_update_on_spike",
             "eps", "history")

    def __init__(self, alpha: float = 0.97, z_thresh: float = 2.5, warmup_steps: int = 25,
                 max_norm: float | None = 1.0, clip_option: str = "adaptive_scaling", clip_factor: float = 1.0,
                 skip_update_on_spike: bool = False, eps: float = 1e-6, history: str = "zclip") -> None:
        self.history = check_choice("history", history, ("zclip", "clipped"))
        self.alpha = check_fraction("alpha", alpha, open_low=True, open_high=True)
        self.z_thresh = check_positive_float("z_thresh", z_thresh)
        self.warmup_steps = check_positive_int("warmup_steps", warmup_steps)
        self.max_norm = None if max_norm is None else check_threshold("max_norm", max_norm)
        self.clip_option = check_choice("clip_option", clip_option, ("adaptive_scaling", "mean"))
        self.clip_factor = check_positive_float("clip_factor", clip_factor)
        check_bool("skip_update_on_spike", skip_update_on_spike)
        self.skip_update_on_spike = skip_update_on_spike
        self.eps = check_positive_float("eps", eps)
        self._ema: dict[str, Tensor] | None = None
        super().__init__()

    def reset(self) -> None:
        super().reset()
        self._ema = None

    def _empty(self, device: torch.device) -> dict[str, Tensor]:
        def zeros(*shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        return {"mean": zeros(), "var": zeros(), "initialized": zeros(dtype=torch.bool),
                "num_warmup": zeros(dtype=torch.long), "buffer": zeros(self.warmup_steps)}

    def _materialize(self, state: Mapping[str, Any] | None, device: torch.device) -> None:
        ema = self._empty(device)
        for k, v in (state or {}).items():
            if k in ema:
                ema[k] = torch.as_tensor(v).to(device=device, dtype=ema[k].dtype).clone()
        self._ema = ema

    def _state(self) -> dict[str, Any]:
        ema = self._ema if self._ema is not None else self._empty(torch.device("cpu"))
        return {**{k: v.detach().cpu().clone() for k, v in ema.items()}, "history_mode": self.history}

    def _check_state(self, state: dict[str, Any]) -> dict[str, Any]:
        saved_mode = state.get("history_mode", self.history)
        if saved_mode != self.history:
            raise ValueError(f"ZScoreThreshold: the checkpoint was saved with history={saved_mode!r} but this policy "
                             f"has history={self.history!r}; resume with the same `history`.")
        saved = torch.as_tensor(state.get("buffer", torch.zeros(self.warmup_steps))).numel()
        if saved != self.warmup_steps:
            raise ValueError(f"ZScoreThreshold: the checkpoint was saved with warmup_steps={saved} but this policy has "
                             f"warmup_steps={self.warmup_steps}; resume with the same `warmup_steps`.")
        return state

    def _threshold(self, norm: Tensor) -> Tensor:
        st = self._ema
        assert st is not None  # set by _materialize
        g = norm.detach().reshape(()).float()
        fin = torch.isfinite(g)
        g0 = torch.where(fin, g, torch.zeros_like(g))
        init = st["initialized"]
        mean, var = st["mean"], st["var"]

        cap = float("inf") if self.max_norm is None else self.max_norm
        # Warmup: collect finite norms (clipped to the cap with history="clipped"); initialise when full.
        warm = (~init) & fin
        slot = st["num_warmup"].clamp(max=self.warmup_steps - 1).reshape(1)
        old = st["buffer"].index_select(0, slot)
        record = g0.clamp(max=cap) if self.history == "clipped" else g0
        st["buffer"].index_put_((slot,), torch.where(warm, record, old.reshape(())).reshape(1))
        num_warmup = st["num_warmup"] + warm.long()
        just_init = (~init) & (num_warmup >= self.warmup_steps)
        buf_mean = st["buffer"].mean()
        buf_var = (st["buffer"] - buf_mean).square().mean()

        # Adaptive phase.
        std = var.clamp(min=0).sqrt()
        z = (g0 - mean) / (std + self.eps)
        spike = init & fin & (z > self.z_thresh)
        if self.clip_option == "adaptive_scaling":
            z_safe = torch.where(spike, z, torch.ones_like(z))
            clip_val = (mean + self.z_thresh * std / (z_safe / self.z_thresh)) * self.clip_factor
        else:
            clip_val = mean
        cutoff = mean + self.z_thresh * (std + self.eps)
        thr = torch.where(spike, clip_val, cutoff)
        thr = torch.where(init, thr, torch.full_like(thr, cap))
        if self.max_norm is not None:
            thr = thr.clamp(max=self.max_norm)

        # EMA update with the effective (clipped) norm.
        x = torch.minimum(g0, thr) if self.history == "clipped" else torch.where(spike, clip_val, g0)
        update = init & fin
        if self.skip_update_on_spike:
            update = update & ~spike
        new_mean = self.alpha * mean + (1 - self.alpha) * x
        new_var = self.alpha * var + (1 - self.alpha) * (x - new_mean).square()
        st["mean"] = torch.where(update, new_mean, torch.where(just_init, buf_mean, mean))
        st["var"] = torch.where(update, new_var, torch.where(just_init, buf_var, var))
        st["num_warmup"] = num_warmup
        st["initialized"] = init | just_init
        return thr


class QuantileThreshold(ThresholdPolicy):
    """The geometric quantile tracker of Andrew et al. 2021 ("Differentially Private Learning with
    Adaptive Clipping"): a threshold that drifts towards the ``quantile`` of the gradient norms.

    The threshold in force at step ``t`` is ``C_t`` (``C_0 = initial``); after the step
    ``C_{t+1} = C_t * exp(-learning_rate * (1[norm_t <= C_t] - quantile))``: it shrinks by
    ``exp(-learning_rate * (1 - quantile))`` after a norm at or under it and grows by
    ``exp(learning_rate * quantile)`` after a norm above it. A NaN or Inf norm leaves ``C`` unchanged.
    O(1) state (one fp32 scalar on the norms' device), no history, no host-device synchronisation.
    An explosion raises the threshold by at most ``exp(learning_rate * quantile)`` per step (x1.105 at
    the defaults), whatever its size.

    Args:
        quantile: target fraction of norms at or under the threshold, in ``(0, 1)``.
        initial: positive starting threshold ``C_0``.
        learning_rate: step size of the geometric update, in ``(0, 88]`` (``exp(learning_rate)`` must be a
            float32). The tracked threshold stays within float32's positive normal range.
    """

    _ARGS = ("quantile", "initial", "learning_rate")

    def __init__(self, quantile: float = 0.5, initial: float = 1.0, learning_rate: float = 0.2) -> None:
        self.quantile = check_fraction("quantile", quantile, open_low=True, open_high=True)
        self.initial = check_threshold("initial", initial)
        self.learning_rate = check_fraction("learning_rate", learning_rate, low=0.0, high=MAX_LEARNING_RATE,
                                            open_low=True)
        self._c: Tensor | None = None
        super().__init__()

    def reset(self) -> None:
        super().reset()
        self._c = None

    def _materialize(self, state: Mapping[str, Any] | None, device: torch.device) -> None:
        saved = None if state is None else state.get("threshold")
        value = torch.tensor(self.initial) if saved is None else torch.as_tensor(saved)
        self._c = value.to(device=device, dtype=torch.float32).reshape(()).clone()

    def _threshold(self, norm: Tensor) -> Tensor:
        c = self._c
        assert c is not None  # set by _materialize
        g = norm.detach().reshape(())
        below = (g <= c).to(torch.float32)
        new = geometric_quantile_update(c, below, self.quantile, self.learning_rate).clamp(FLOAT32_TINY, FLOAT32_MAX)
        self._c = torch.where(torch.isfinite(g), new, c)
        return c

    def _state(self) -> dict[str, Any]:
        c = torch.tensor(self.initial, dtype=torch.float32) if self._c is None else self._c.detach().cpu().clone()
        return {"threshold": c}

    def _check_state(self, state: dict[str, Any]) -> dict[str, Any]:
        if state.get("threshold") is not None:
            c = torch.as_tensor(state["threshold"], dtype=torch.float32).detach().cpu().reshape(()).clone()
            if not (torch.isfinite(c) and c > 0):
                raise ValueError(f"QuantileThreshold: expected the checkpoint's `threshold` to be a positive finite "
                                 f"number but got {c.item()!r}")
            state["threshold"] = c
        return state


def as_policy(threshold: ThresholdPolicy | float | int, name: str = "threshold") -> ThresholdPolicy:
    """Return ``threshold`` as a policy: a positive number becomes :class:`FixedThreshold`."""
    if isinstance(threshold, ThresholdPolicy):
        return threshold
    if isinstance(threshold, (int, float)) and not isinstance(threshold, bool):
        check_threshold(name, threshold)
        return FixedThreshold(float(threshold))
    raise TypeError(
        f"Expected argument `{name}` to be a positive number or a ThresholdPolicy (FixedThreshold, "
        f"PercentileThreshold, QuantileThreshold, WarmupThreshold, ZScoreThreshold) but got {threshold!r}"
    )
