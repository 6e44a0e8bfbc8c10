"""Exact-percentile histories of finite gradient norms, behind one small interface.

A :class:`NormHistory` holds the finite float32 norms seen so far (or only the last ``window`` of
them) and answers ``numpy.percentile(values, 100 * q)`` (the default "linear" method) bit for bit.
Two backends implement it; :func:`make_history` picks one:

============ ========================================================================================
backend      how
============ ========================================================================================
``"host"``   a sorted multiset in preallocated numpy chunks: per-step cost flat in the number of
             steps; reads each norm on the host (free for CPU tensors, a sync on accelerators)
``"device"`` a sorted buffer on the norm's device, updated with parallel tensor ops: no host-device
             synchronisation, O(capacity) work per step
============ ========================================================================================

Pure torch and numpy.
"""

from __future__ import annotations

import math
import struct
from abc import ABC, abstractmethod
from bisect import bisect_left

import numpy as np
import torch
from torch import Tensor

from lightning_clip.exceptions import check_choice

__all__ = ["BACKENDS", "DeviceHistory", "HostHistory", "NormHistory", "SortedChunks", "make_history"]

#: The values of ``PercentileThreshold(backend=...)``.
BACKENDS = ("auto", "host", "device")

_INF = float("inf")
_FLOAT32 = struct.Struct("f")
#: The smallest positive float64 that float32 rounds to infinity.
_FLOAT32_OVERFLOW = 2.0**128 - 2.0**103


class NormHistory(ABC):
    """The finite norms seen so far (or the last ``window`` of them) and their exact percentiles."""

    #: ``"host"`` or ``"device"``.
    backend: str
    window: int | None

    @abstractmethod
    def insert(self, norm: Tensor) -> None:
        """Add the 0-d ``norm`` (rounded to float32) when it is finite; NaN and Inf never enter."""

    @abstractmethod
    def percentile(self, q: float, fallback: Tensor) -> Tensor:
        """``numpy.percentile(self.values(), 100 * q)`` bit for bit, ``fallback`` while empty.

        Args:
            q: the quantile, in ``(0, 1)``.
            fallback: a 0-d fp32 tensor on the norms' device.

        Returns:
            A 0-d fp32 tensor on ``fallback``'s device.
        """

    @abstractmethod
    def values(self) -> np.ndarray:
        """The float32 values: oldest first for a window, sorted for the whole history."""

    @abstractmethod
    def __len__(self) -> int:
        """Number of values held (a host read on the device backend)."""

    @abstractmethod
    def nbytes(self) -> int:
        """Bytes held by the value storage."""


def make_history(backend: str, window: int | None, device: torch.device,
                 values: np.ndarray | None = None) -> NormHistory:
    """Create the history for norms on ``device``, filled with ``values`` (oldest first).

    Args:
        backend: ``"host"``, ``"device"`` or ``"auto"`` (host for CPU norms, device otherwise).
        window: ``None`` for all history, else the number of most recent values kept.
        device: where the norms live.
        values: finite float32 values to start from (at most ``window`` of them).
    """
    check_choice("backend", backend, BACKENDS)
    if backend == "auto":
        backend = "host" if device.type == "cpu" else "device"
    if backend == "host":
        return HostHistory(window, values)
    return DeviceHistory(window, device, values)


def _f32(x: float) -> float:
    # round to float32 (to nearest even). A float32 operation equals the float64 operation followed
    # by this rounding, for + - * / (float64 has more than 2 * 24 + 2 bits: no double-rounding error).
    return float(_FLOAT32.unpack(_FLOAT32.pack(x))[0])


def _virtual_index(n: int, q: float) -> tuple[int, float]:
    # numpy's "linear" method: index (n - 1) * q in float64; its floor and the weight index - floor
    index = (n - 1) * q
    lo = math.floor(index)
    return lo, index - lo


def _lerp(a: float, b: float, t: float) -> float:
    # numpy's _lerp for float32 values and a Python-float weight: float32 arithmetic with the weight
    # rounded to float32, the symmetric form (exact at t = 0 and 1) chosen on the float64 weight
    d = _f32(b - a)
    if t >= 0.5:
        return _f32(b - _f32(d * _f32(1.0 - t)))
    return _f32(a + _f32(d * _f32(t)))


class SortedChunks:
    """A sorted multiset of float32 values in preallocated chunks, with cached prefix sizes.

    4 bytes per value. Insert/remove shift at most ``2 * load`` values inside one chunk and update
    the prefix sizes with one vectorised add; a rank lookup is one binary search over the prefix
    sizes. Each operation is a handful of numpy calls whose cost does not depend on the number of
    values for any realistic run length (one chunk per ``load`` values).
    """

    def __init__(self, load: int = 1024, sorted_values: np.ndarray | None = None) -> None:
        self.load = load
        self.cap = 2 * load + 1
        self.chunks: list[np.ndarray] = []
        self.sizes: list[int] = []
        self.maxes: list[float] = []
        self.size = 0
        if sorted_values is not None:
            for start in range(0, len(sorted_values), load):
                part = sorted_values[start : start + load]
                buf = np.empty(self.cap, dtype=np.float32)
                buf[: len(part)] = part
                self.chunks.append(buf)
                self.sizes.append(len(part))
                self.maxes.append(float(part[-1]))
            self.size = len(sorted_values)
        self.cum = np.zeros(0, dtype=np.int64)
        self._rebuild()

    def _rebuild(self) -> None:
        self.cum = np.cumsum(np.asarray(self.sizes, dtype=np.int64))

    def add(self, x: float) -> None:
        """Insert ``x`` (a float32 value)."""
        if not self.chunks:
            buf = np.empty(self.cap, dtype=np.float32)
            buf[0] = x
            self.chunks, self.sizes, self.maxes = [buf], [1], [float(x)]
            self.size = 1
            self._rebuild()
            return
        ci = bisect_left(self.maxes, float(x))
        if ci == len(self.maxes):
            ci -= 1
        buf, n = self.chunks[ci], self.sizes[ci]
        j = int(np.searchsorted(buf[:n], x, side="right"))
        buf[j + 1 : n + 1] = buf[j:n]
        buf[j] = x
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
        """Remove one occurrence of ``x`` (which must be present)."""
        ci = bisect_left(self.maxes, float(x))
        buf, n = self.chunks[ci], self.sizes[ci]
        j = int(np.searchsorted(buf[:n], x, side="left"))
        if j >= n or buf[j] != x:  # pragma: no cover - internal invariant
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
        return self.pair(rank)[0]

    def pair(self, rank: int) -> tuple[float, float]:
        """The values of ranks ``rank`` and ``rank + 1`` (the last value twice at the end), one lookup."""
        ci = int(np.searchsorted(self.cum, rank, side="right"))
        j = rank - (int(self.cum[ci - 1]) if ci else 0)
        chunk = self.chunks[ci]
        a = float(chunk[j])
        if j + 1 < self.sizes[ci]:
            return a, float(chunk[j + 1])
        if ci + 1 < len(self.chunks):
            return a, float(self.chunks[ci + 1][0])
        return a, a

    def values(self) -> np.ndarray:
        """All values, sorted."""
        if not self.chunks:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate([c[:n] for c, n in zip(self.chunks, self.sizes)])

    def nbytes(self) -> int:
        """Bytes held by the value storage."""
        return sum(c.nbytes for c in self.chunks)


class HostHistory(NormHistory):
    """Host backend: :class:`SortedChunks` plus, for a window, a ring of the values in arrival order."""

    backend = "host"

    def __init__(self, window: int | None, values: np.ndarray | None = None) -> None:
        self.window = window
        vals = np.zeros(0, dtype=np.float32) if values is None else np.asarray(values, dtype=np.float32)
        self.sorted = SortedChunks(sorted_values=np.sort(vals))
        self.ring = None if window is None else np.zeros(window, dtype=np.float32)
        self.ring_pos = len(vals)  # number of values ever inserted; the next slot is ring_pos % window
        if self.ring is not None:
            self.ring[: len(vals)] = vals

    def insert(self, norm: Tensor) -> None:
        x = float(norm)
        if not abs(x) < _FLOAT32_OVERFLOW:  # NaN, Inf, and what float32 rounds to Inf
            return
        x = _f32(x)
        if self.ring is not None and self.window is not None:
            slot = self.ring_pos % self.window
            if self.ring_pos >= self.window:
                self.sorted.remove(float(self.ring[slot]))
            self.ring[slot] = x
            self.ring_pos += 1
        self.sorted.add(x)

    def percentile(self, q: float, fallback: Tensor) -> Tensor:
        n = self.sorted.size
        if n == 0:
            return fallback
        lo, t = _virtual_index(n, q)
        a, b = self.sorted.pair(lo)  # numpy takes the last value twice at the end, as pair does
        out = torch.from_numpy(np.array(_lerp(a, b, t), dtype=np.float32))
        return out if fallback.device.type == "cpu" else out.to(fallback.device)

    def values(self) -> np.ndarray:
        if self.ring is not None and self.window is not None:
            n = min(self.ring_pos, self.window)
            start = self.ring_pos % self.window if self.ring_pos >= self.window else 0
            return np.roll(self.ring, -start)[:n].copy()
        return self.sorted.values()

    def __len__(self) -> int:
        return self.sorted.size

    def nbytes(self) -> int:
        return self.sorted.nbytes() + (0 if self.ring is None else self.ring.nbytes)


class DeviceHistory(NormHistory):
    """Device backend: a sorted buffer on the device, updated with O(capacity) parallel work and no
    host-device synchronisation (insertion position and count stay on the device).

    Memory: a float32 buffer plus an int64 position index of the same capacity; for the whole
    history the capacity doubles ahead of the number of calls (NaN steps included), so up to ~24
    bytes per step on the device. The percentile's index is computed in float64, as numpy does.
    """

    backend = "device"

    def __init__(self, window: int | None, device: torch.device, values: np.ndarray | None = None) -> None:
        self.window = window
        self.device = device
        vals = torch.as_tensor(np.zeros(0, dtype=np.float32) if values is None else values, dtype=torch.float32)
        k = vals.numel()
        if window is None:
            self.capacity = 16
            while self.capacity <= k + 1:
                self.capacity *= 2
        else:
            self.capacity = window + 1
        self.buf = torch.full((self.capacity,), _INF, dtype=torch.float32, device=device)
        self.buf[:k] = torch.sort(vals.to(device)).values
        self.count = torch.tensor(k, dtype=torch.long, device=device)
        self.upper = k  # host-known upper bound of count (number of insert calls)
        if window is not None:
            self.ring = torch.zeros(window, dtype=torch.float32, device=device)
            self.ring[:k] = vals.to(device)
            self.ring_pos = torch.tensor(k, dtype=torch.long, device=device)
        self.positions = torch.arange(self.capacity, device=device)

    def _grow(self) -> None:
        new_cap = self.capacity * 2
        pad = torch.full((new_cap - self.capacity,), _INF, dtype=torch.float32, device=self.device)
        self.buf = torch.cat([self.buf, pad])
        self.capacity = new_cap
        self.positions = torch.arange(new_cap, device=self.device)

    def insert(self, norm: Tensor) -> None:
        if self.window is None and self.upper + 1 >= self.capacity:
            self._grow()
        self.upper += 1
        x = norm.detach().reshape(()).float()
        fin = torch.isfinite(x)
        xv = torch.where(fin, x, torch.full_like(x, _INF))
        buf, idx = self.buf, self.positions
        if self.window is not None:
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
        # The same arithmetic as HostHistory, in tensors: the index in float64 (as numpy), the
        # interpolation in float32 with the weight rounded to float32, the branch on the float64 weight.
        last = (self.count - 1).clamp(min=0)
        index = last.double() * q
        lo_f = index.floor()
        t = index - lo_f
        lo = torch.minimum(lo_f.long(), last)
        hi = torch.minimum(lo + 1, last)
        a = self.buf.index_select(0, lo.reshape(1)).reshape(())
        b = self.buf.index_select(0, hi.reshape(1)).reshape(())
        d = b - a
        value = torch.where(t >= 0.5, b - d * (1.0 - t).float(), a + d * t.float())
        return torch.where(self.count > 0, value, fallback)

    def values(self) -> np.ndarray:
        n = int(self.count.item())
        if self.window is not None:
            pos = int(self.ring_pos.item())
            start = pos % self.window if pos >= self.window else 0
            ring = self.ring.detach().cpu().numpy()
            return np.roll(ring, -start)[:n].copy()
        return self.buf[:n].detach().cpu().numpy().copy()

    def __len__(self) -> int:
        return int(self.count.item())

    def nbytes(self) -> int:
        ring = 0 if self.window is None else self.ring.nbytes
        return self.buf.nbytes + self.positions.nbytes + ring
