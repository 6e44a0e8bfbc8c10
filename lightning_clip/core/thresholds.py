"""Threshold policies: small stateful objects that turn this step's gradient norm into a threshold.

Pure torch (and numpy for the CPU history). A policy is called once per optimizer step with the
pre-clip total norm (a 0-d fp32 tensor, possibly NaN/Inf) and returns the threshold in force for
that step as a 0-d fp32 tensor on the same device. Non-finite norms never enter a history or an
EMA. Every policy has ``state_dict()`` / ``load_state_dict()`` holding all state that changes the
thresholds it will produce, so a resumed run continues bit for bit.

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
=========================== ========================================================================
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from bisect import bisect_left
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_clip.exceptions import (
    check_choice,
    check_fraction,
    check_non_negative_int,
    check_positive_float,
    check_positive_int,
)

__all__ = [
    "FixedThreshold",
    "PercentileThreshold",
    "ThresholdPolicy",
    "WarmupThreshold",
    "ZScoreThreshold",
    "as_policy",
]

_INF = float("inf")


class ThresholdPolicy(ABC):
    """Base class: ``policy(norm) -> threshold``, called exactly once per optimizer step."""

    @abstractmethod
    def __call__(self, norm: Tensor) -> Tensor:
        """Observe this step's pre-clip total norm and return this step's threshold (0-d fp32)."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything that changes future thresholds, as plain values and CPU tensors."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def fresh(self) -> ThresholdPolicy:
        """A copy with the same hyperparameters and empty state (one per optimizer)."""
        clone = copy.deepcopy(self)
        clone.reset()
        return clone

    @abstractmethod
    def reset(self) -> None:
        """Forget every observed norm."""


class FixedThreshold(ThresholdPolicy):
    """A constant threshold.

    Args:
        max_norm: the threshold, a positive finite number.
    """

    def __init__(self, max_norm: float = 1.0) -> None:
        self.max_norm = check_positive_float("max_norm", max_norm)
        self._cache: Tensor | None = None

    def __call__(self, norm: Tensor) -> Tensor:
        # in the norm's dtype (fp64 norms keep max_norm exact, as torch's Python float does)
        c = self._cache
        dtype = norm.dtype if norm.dtype == torch.float64 else torch.float32
        if c is None or c.device != norm.device or c.dtype != dtype:
            c = self._cache = torch.tensor(self.max_norm, dtype=dtype, device=norm.device)
        return c

    def state_dict(self) -> dict[str, Any]:
        return {"max_norm": self.max_norm}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.max_norm = float(state.get("max_norm", self.max_norm))
        self._cache = None

    def reset(self) -> None:
        self._cache = None

    def __repr__(self) -> str:
        return f"FixedThreshold(max_norm={self.max_norm})"


# --------------------------------------------------------------------------------------------------
# Exact order statistics for PercentileThreshold.


def _lerp(a: float, b: float, t: float) -> float:
    # numpy's _lerp: symmetric form, exact at t = 0 and t = 1.
    d = b - a
    return b - d * (1.0 - t) if t >= 0.5 else a + d * t


def _virtual_index(n: int, q: float) -> tuple[int, float]:
    # numpy's "linear" method (alpha = beta = 1): index = n*q + (1 - q) - 1 = q * (n - 1).
    idx = n * q + (1.0 + q * (1.0 - 1.0 - 1.0)) - 1.0
    idx = min(max(idx, 0.0), n - 1.0)
    lo = math.floor(idx)
    return lo, idx - lo


class _SortedChunks:
    """A sorted multiset of float32 values in preallocated chunks, with cached prefix sizes.

    4 bytes per value. Insert/remove shift at most ``2 * load`` values inside one chunk and update
    the prefix sizes with one vectorised add; a rank lookup is one binary search over the prefix
    sizes. Each operation is a handful of numpy calls whose cost does not depend on the number of
    values for any realistic run length (one chunk per ``load`` values).
    """

    def __init__(self, load: int = 1024) -> None:
        self.load = load
        self.cap = 2 * load + 1
        self.chunks: list[np.ndarray] = []
        self.sizes: list[int] = []
        self.maxes: list[float] = []
        self.cum = np.zeros(0, dtype=np.int64)
        self.size = 0

    def _rebuild(self) -> None:
        self.cum = np.cumsum(np.asarray(self.sizes, dtype=np.int64))

    def add(self, x: float) -> None:
        xf = np.float32(x)
        if not self.chunks:
            buf = np.empty(self.cap, dtype=np.float32)
            buf[0] = xf
            self.chunks, self.sizes, self.maxes = [buf], [1], [float(xf)]
            self.size = 1
            self._rebuild()
            return
        ci = bisect_left(self.maxes, float(xf))
        if ci == len(self.maxes):
            ci -= 1
        buf, n = self.chunks[ci], self.sizes[ci]
        j = int(np.searchsorted(buf[:n], xf, side="right"))
        buf[j + 1 : n + 1] = buf[j:n]
        buf[j] = xf
        n += 1
        self.sizes[ci] = n
        self.maxes[ci] = float(buf[n - 1])
        self.size += 1
        if n > 2 * self.load:
            half = n // 2
            lo = np.empty(self.cap, dtype=np.float32)
            hi = np.empty(self.cap, dtype=np.float32)
            lo[:half] = buf[:half]
            hi[: n - half] = buf[half:n]
            self.chunks[ci : ci + 1] = [lo, hi]
            self.sizes[ci : ci + 1] = [half, n - half]
            self.maxes[ci : ci + 1] = [float(lo[half - 1]), float(hi[n - half - 1])]
            self._rebuild()
        else:
            self.cum[ci:] += 1

    def remove(self, x: float) -> None:
        xf = np.float32(x)
        ci = bisect_left(self.maxes, float(xf))
        buf, n = self.chunks[ci], self.sizes[ci]
        j = int(np.searchsorted(buf[:n], xf, side="left"))
        if j >= n or buf[j] != xf:  # pragma: no cover - internal invariant
            raise KeyError(x)
        buf[j : n - 1] = buf[j + 1 : n]
        n -= 1
        self.size -= 1
        if n == 0:
            del self.chunks[ci], self.sizes[ci], self.maxes[ci]
            self._rebuild()
        else:
            self.sizes[ci] = n
            self.maxes[ci] = float(buf[n - 1])
            self.cum[ci:] -= 1

    def at(self, rank: int) -> float:
        """The value of 0-based rank ``rank``."""
        ci = int(np.searchsorted(self.cum, rank, side="right"))
        before = int(self.cum[ci - 1]) if ci else 0
        return float(self.chunks[ci][rank - before])

    def values(self) -> np.ndarray:
        if not self.chunks:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate([c[:n] for c, n in zip(self.chunks, self.sizes)])

    def nbytes(self) -> int:
        """Bytes held by the value storage."""
        return sum(c.nbytes for c in self.chunks)


class _HostHistory:
    """CPU backend: exact percentile on the host (``.item()`` costs nothing on CPU tensors)."""

    def __init__(self, window: int | None) -> None:
        self.window = window
        self.sorted = _SortedChunks()
        self.ring = np.zeros(window, dtype=np.float32) if window else None
        self.ring_pos = 0  # number of finite values ever inserted

    def insert(self, x: float) -> None:
        if self.ring is not None and self.window is not None:
            slot = self.ring_pos % self.window
            if self.ring_pos >= self.window:
                self.sorted.remove(float(self.ring[slot]))
            self.ring[slot] = x
            self.ring_pos += 1
        self.sorted.add(x)

    def __len__(self) -> int:
        return self.sorted.size

    def percentile(self, q: float) -> float:
        lo, frac = _virtual_index(self.sorted.size, q)
        a = self.sorted.at(lo)
        if frac == 0.0:
            return a
        return _lerp(a, self.sorted.at(lo + 1), frac)

    def ordered_values(self) -> np.ndarray:
        """Finite history, oldest first for a window (sorted for all-history, order is irrelevant)."""
        if self.ring is not None and self.window is not None:
            n = min(self.ring_pos, self.window)
            start = self.ring_pos % self.window if self.ring_pos >= self.window else 0
            return np.roll(self.ring, -start)[:n].copy()
        return self.sorted.values()


class _DeviceHistory:
    """Accelerator backend: a sorted buffer on the device, updated with O(capacity) parallel work
    and no host-device synchronisation (insertion position and count stay on the device).

    Memory: a float32 buffer plus an int64 index of the same capacity; the capacity doubles ahead
    of the number of calls (NaN steps included), so up to ~24 bytes per step on the device.
    """

    def __init__(self, window: int | None, device: torch.device) -> None:
        self.window = window
        self.device = device
        self.capacity = 16 if window is None else window + 1
        self.buf = torch.full((self.capacity,), _INF, dtype=torch.float32, device=device)
        self.count = torch.zeros((), dtype=torch.long, device=device)
        self.upper = 0  # host-known upper bound of count (number of insert calls)
        if window:
            self.ring = torch.zeros(window, dtype=torch.float32, device=device)
            self.ring_pos = torch.zeros((), dtype=torch.long, device=device)
        self._idx = torch.arange(self.capacity, device=device)

    def _grow(self) -> None:
        new_cap = self.capacity * 2
        pad = torch.full((new_cap - self.capacity,), _INF, dtype=torch.float32, device=self.device)
        self.buf = torch.cat([self.buf, pad])
        self.capacity = new_cap
        self._idx = torch.arange(new_cap, device=self.device)

    def insert(self, x: Tensor) -> None:
        if self.window is None and self.upper + 1 >= self.capacity:
            self._grow()
        self.upper += 1
        fin = torch.isfinite(x)
        xv = torch.where(fin, x, torch.full_like(x, _INF))
        buf, idx = self.buf, self._idx
        if self.window:
            w = self.window
            slot = torch.remainder(self.ring_pos, w)
            oldest = self.ring.index_select(0, slot.reshape(1)).reshape(())
            evict = fin & (self.ring_pos >= w)
            pos_o = torch.searchsorted(buf, oldest.reshape(1), right=False).reshape(())
            shifted_left = torch.cat([buf[1:], buf.new_full((1,), _INF)])
            removed = torch.where(idx >= pos_o, shifted_left, buf)
            buf = torch.where(evict, removed, buf)
            self.ring.index_put_((slot.reshape(1),), torch.where(fin, xv, oldest).reshape(1))
            self.ring_pos = self.ring_pos + fin.long()
            self.count = self.count - evict.long()
        pos = torch.searchsorted(buf, xv.reshape(1), right=True).reshape(())
        shifted_right = torch.cat([buf.new_full((1,), -_INF), buf[:-1]])
        self.buf = torch.where(idx < pos, buf, torch.where(idx == pos, xv, shifted_right))
        self.count = self.count + fin.long()

    def percentile(self, q: float, fallback: Tensor) -> Tensor:
        n = self.count
        idx = (n.double() * q + (1.0 - q) - 1.0).clamp(min=0.0)
        idx = torch.minimum(idx, (n - 1).clamp(min=0).double())
        lo = idx.floor().long()
        frac = (idx - lo.double()).float()
        hi = torch.minimum(lo + 1, (n - 1).clamp(min=0))
        a = self.buf.index_select(0, lo.reshape(1)).reshape(())
        b = self.buf.index_select(0, hi.reshape(1)).reshape(())
        d = b - a
        val = torch.where(frac >= 0.5, b - d * (1.0 - frac), a + d * frac)
        return torch.where(n > 0, val, fallback)

    def __len__(self) -> int:  # pragma: no cover - host needs a sync; used in tests only
        return int(self.count.item())

    def ordered_values(self) -> np.ndarray:
        n = int(self.count.item())
        if self.window:
            pos = int(self.ring_pos.item())
            w = self.window
            start = pos % w if pos >= w else 0
            ring = self.ring.detach().cpu().numpy()
            return np.roll(ring, -start)[:n].copy()
        return self.buf[:n].detach().cpu().numpy().copy()


class PercentileThreshold(ThresholdPolicy):
    """AutoClip: the ``percentile``-th percentile of the gradient norms seen so far.

    During the first ``warmup_steps`` optimizer steps the threshold is ``warmup_threshold`` (the
    norms seen meanwhile already enter the history). Afterwards it is
    ``numpy.percentile(history, percentile)`` (linear interpolation) where ``history`` holds every
    finite pre-clip norm so far, the current step's included, or only the last ``window`` of them.

    History is exact and costs 4 bytes per step. On CPU tensors it is a chunked sorted array on the
    host (per-step cost flat in the number of steps); on accelerators it is a sorted buffer on the
    device updated without any host-device synchronisation.

    Args:
        percentile: in ``[0, 100]``.
        warmup_steps: number of optimizer steps that use ``warmup_threshold``.
        warmup_threshold: positive threshold used during warmup (and while no finite norm was seen).
        window: ``None`` for all history, or a positive number of most recent finite norms.
    """

    def __init__(
        self,
        percentile: float = 90.0,
        warmup_steps: int = 100,
        warmup_threshold: float = 1.0,
        window: int | None = None,
    ) -> None:
        self.percentile = check_fraction("percentile", percentile, low=0.0, high=100.0)
        self.warmup_steps = check_non_negative_int("warmup_steps", warmup_steps)
        self.warmup_threshold = check_positive_float("warmup_threshold", warmup_threshold, allow_inf=True)
        self.window = None if window is None else check_positive_int("window", window)
        self._backend: str | None = None  # "host" | "device"; None = choose from the first norm's device
        self.reset()

    def reset(self) -> None:
        self.steps = 0
        self._hist: _HostHistory | _DeviceHistory | None = None
        self._pending: np.ndarray | None = None
        self._fallback: Tensor | None = None

    def _make_history(self, device: torch.device) -> _HostHistory | _DeviceHistory:
        backend = self._backend or ("host" if device.type == "cpu" else "device")
        hist: _HostHistory | _DeviceHistory
        if backend == "host":
            hist = _HostHistory(self.window)
            if self._pending is not None:
                for v in self._pending.tolist():
                    hist.insert(v)
        else:
            hist = _DeviceHistory(self.window, device)
            if self._pending is not None:
                for v in torch.from_numpy(self._pending).to(device):
                    hist.insert(v)
        self._pending = None
        return hist

    def __call__(self, norm: Tensor) -> Tensor:
        device = norm.device
        if self._hist is None:
            self._hist = self._make_history(device)
        if self._fallback is None or self._fallback.device != device:
            self._fallback = torch.tensor(self.warmup_threshold, dtype=torch.float32, device=device)
        step = self.steps
        self.steps += 1
        q = self.percentile / 100.0
        hist = self._hist
        if isinstance(hist, _HostHistory):
            x = float(norm)
            if math.isfinite(x):
                hist.insert(x)
            if step < self.warmup_steps or len(hist) == 0:
                return self._fallback
            return torch.tensor(hist.percentile(q), dtype=torch.float32, device=device)
        hist.insert(norm.detach().reshape(()).float())
        if step < self.warmup_steps:
            return self._fallback
        return hist.percentile(q, self._fallback)

    def state_dict(self) -> dict[str, Any]:
        if self._hist is not None:
            values = self._hist.ordered_values()
        elif self._pending is not None:
            values = self._pending
        else:
            values = np.zeros(0, dtype=np.float32)
        return {
            "steps": self.steps,
            "history": torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)),
            "percentile": self.percentile,
            "window": self.window,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved_window = state.get("window", self.window)
        if saved_window != self.window:
            raise ValueError(
                f"PercentileThreshold: the checkpoint was saved with window={saved_window} but this policy has "
                f"window={self.window}; resume with the same `window`."
            )
        self.reset()
        self.steps = int(state.get("steps", 0))
        hist = state.get("history")
        if hist is not None:
            arr = hist.detach().cpu().numpy() if isinstance(hist, Tensor) else np.asarray(hist)
            arr = arr.astype(np.float32)
            if self.window is not None and arr.size > self.window:
                arr = arr[-self.window :]
            self._pending = arr

    def __repr__(self) -> str:
        return (
            f"PercentileThreshold(percentile={self.percentile}, warmup_steps={self.warmup_steps}, "
            f"warmup_threshold={self.warmup_threshold}, window={self.window})"
        )


class WarmupThreshold(ThresholdPolicy):
    """A fixed threshold for the first ``warmup_steps`` steps, then the wrapped policy ``then``.

    ``then`` observes every norm from the first step on, so it is ready when it takes over.

    Args:
        warmup_steps: number of optimizer steps that use ``warmup_threshold``.
        warmup_threshold: positive threshold during warmup.
        then: the policy that takes over (a :class:`ThresholdPolicy` or a positive float).
    """

    def __init__(self, warmup_steps: int = 100, warmup_threshold: float = 1.0,
                 then: ThresholdPolicy | float | None = None) -> None:
        self.warmup_steps = check_non_negative_int("warmup_steps", warmup_steps)
        self.warmup_threshold = check_positive_float("warmup_threshold", warmup_threshold, allow_inf=True)
        if then is None:
            then = PercentileThreshold(warmup_steps=0)
        self.then = as_policy(then, name="then")
        self.reset_counters()

    def reset_counters(self) -> None:
        self.steps = 0
        self._fallback: Tensor | None = None

    def reset(self) -> None:
        self.reset_counters()
        self.then.reset()

    def __call__(self, norm: Tensor) -> Tensor:
        inner = self.then(norm)
        step = self.steps
        self.steps += 1
        if step < self.warmup_steps:
            if self._fallback is None or self._fallback.device != norm.device:
                self._fallback = torch.tensor(self.warmup_threshold, dtype=torch.float32, device=norm.device)
            return self._fallback
        return inner

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "then": self.then.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state.get("steps", 0))
        self._fallback = None
        if "then" in state:
            self.then.load_state_dict(state["then"])

    def __repr__(self) -> str:
        return (
            f"WarmupThreshold(warmup_steps={self.warmup_steps}, warmup_threshold={self.warmup_threshold}, "
            f"then={self.then!r})"
        )


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

    Args:
        alpha: EMA smoothing factor in ``(0, 1)``.
        z_thresh: positive z-score cut-off.
        warmup_steps: number of finite norms that initialise the EMA (>= 1).
        max_norm: optional positive cap, also the threshold during warmup.
        clip_option: ``"adaptive_scaling"`` or ``"mean"``.
        clip_factor: positive multiplier of the adaptive threshold.
        skip_update_on_spike: keep the EMA unchanged on spikes.
        eps: positive constant added to the standard deviation.
    """

    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        warmup_steps: int = 25,
        max_norm: float | None = 1.0,
        clip_option: str = "adaptive_scaling",
        clip_factor: float = 1.0,
        skip_update_on_spike: bool = False,
        eps: float = 1e-6,
    ) -> None:
        self.alpha = check_fraction("alpha", alpha, open_low=True, open_high=True)
        self.z_thresh = check_positive_float("z_thresh", z_thresh)
        self.warmup_steps = check_positive_int("warmup_steps", warmup_steps)
        self.max_norm = None if max_norm is None else check_positive_float("max_norm", max_norm)
        self.clip_option = check_choice("clip_option", clip_option, ("adaptive_scaling", "mean"))
        self.clip_factor = check_positive_float("clip_factor", clip_factor)
        if not isinstance(skip_update_on_spike, bool):
            raise TypeError(f"Expected argument `skip_update_on_spike` to be a bool but got {skip_update_on_spike!r}")
        self.skip_update_on_spike = skip_update_on_spike
        self.eps = check_positive_float("eps", eps)
        self.reset()

    def reset(self) -> None:
        self.steps = 0
        self._state: dict[str, Tensor] | None = None
        self._loaded: dict[str, Tensor] | None = None

    def _init_state(self, device: torch.device) -> dict[str, Tensor]:
        f32 = {"dtype": torch.float32, "device": device}
        st = {
            "mean": torch.zeros((), **f32),
            "var": torch.zeros((), **f32),
            "initialized": torch.zeros((), dtype=torch.bool, device=device),
            "num_warmup": torch.zeros((), dtype=torch.long, device=device),
            "buffer": torch.zeros(self.warmup_steps, **f32),
        }
        if self._loaded is not None:
            for k, v in self._loaded.items():
                if k in st:
                    st[k] = v.to(device=device, dtype=st[k].dtype).clone()
            self._loaded = None
        return st

    def __call__(self, norm: Tensor) -> Tensor:
        device = norm.device
        if self._state is None or self._state["mean"].device != device:
            if self._state is not None:
                self._loaded = self._state
            self._state = self._init_state(device)
        st = self._state
        self.steps += 1
        g = norm.detach().reshape(()).float()
        fin = torch.isfinite(g)
        g0 = torch.where(fin, g, torch.zeros_like(g))
        init = st["initialized"]
        mean, var = st["mean"], st["var"]

        # Warmup: collect finite norms into the buffer; initialise when full.
        warm = (~init) & fin
        slot = st["num_warmup"].clamp(max=self.warmup_steps - 1).reshape(1)
        old = st["buffer"].index_select(0, slot)
        st["buffer"].index_put_((slot,), torch.where(warm, g0, old.reshape(())).reshape(1))
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
        cap = _INF if self.max_norm is None else self.max_norm
        thr = torch.where(init, thr, torch.full_like(thr, cap))
        if self.max_norm is not None:
            thr = thr.clamp(max=self.max_norm)

        # EMA update with the effective (clipped) norm.
        x = torch.where(spike, clip_val, g0)
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

    def state_dict(self) -> dict[str, Any]:
        src = self._state if self._state is not None else self._loaded
        out: dict[str, Any] = {"steps": self.steps}
        if src is not None:
            out.update({k: v.detach().cpu().clone() for k, v in src.items()})
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset()
        self.steps = int(state.get("steps", 0))
        loaded = {k: v for k, v in state.items() if isinstance(v, Tensor)}
        self._loaded = loaded or None

    def __repr__(self) -> str:
        return (
            f"ZScoreThreshold(alpha={self.alpha}, z_thresh={self.z_thresh}, warmup_steps={self.warmup_steps}, "
            f"max_norm={self.max_norm}, clip_option={self.clip_option!r}, clip_factor={self.clip_factor}, "
            f"skip_update_on_spike={self.skip_update_on_spike}, eps={self.eps})"
        )


def as_policy(threshold: ThresholdPolicy | float | int, name: str = "threshold") -> ThresholdPolicy:
    """Return ``threshold`` as a policy: a positive number becomes :class:`FixedThreshold`."""
    if isinstance(threshold, ThresholdPolicy):
        return threshold
    if isinstance(threshold, (int, float)) and not isinstance(threshold, bool):
        check_positive_float(name, threshold)
        return FixedThreshold(float(threshold))
    raise TypeError(
        f"Expected argument `{name}` to be a positive number or a ThresholdPolicy (FixedThreshold, "
        f"PercentileThreshold, WarmupThreshold, ZScoreThreshold) but got {threshold!r}"
    )
