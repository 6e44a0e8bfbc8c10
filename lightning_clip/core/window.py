"""A rolling window of accepted values on the device, and the z-score of a new value against it.

Pure torch, no host reads: the buffer, its mean and standard deviation stay on the values' device; only
the fill count is a host integer (it moves the same way on every rank because decisions do).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_clip.exceptions import check_positive_int

__all__ = ["RollingWindow", "check_window_size"]


def check_window_size(size: Any) -> int:
    """Return ``size`` or raise naming ``window`` when it is not an integer >= 2 (a standard deviation needs two)."""
    check_positive_int("window", size)
    if size < 2:
        raise ValueError(f"Expected argument `window` to be an integer >= 2 but got {size}")
    return int(size)


class RollingWindow:
    """The last ``size`` accepted finite values, as a ring buffer (torchmetrics' ``n_seen % size``).

    :meth:`zscore` is ``(value - mean) / std`` over the values held, with the sample standard deviation
    (``torch.std``, Bessel-corrected), fp32. A non-finite value scores ``+inf``; fewer than two values
    score ``0``. :meth:`push` appends a value; the caller decides whether a value is accepted.

    Args:
        size: how many values the window holds (>= 2).
    """

    def __init__(self, size: int) -> None:
        self.size = check_window_size(size)
        self.seen = 0
        self._buffer: Tensor | None = None

    @property
    def filled(self) -> int:
        """How many values the window holds now."""
        return min(self.seen, self.size)

    def values(self) -> Tensor:
        """The values held (oldest slot first in ring order; empty before the first push)."""
        if self._buffer is None:
            return torch.zeros(0)
        return self._buffer[: self.filled]

    def zscore(self, value: Tensor) -> Tensor:
        """``(value - mean) / std`` of ``value`` against the window, a 0-d fp32 tensor on ``value``'s device."""
        value = value.detach().reshape(()).to(torch.float32)
        if self._buffer is None or self.filled < 2:
            z = torch.zeros((), dtype=torch.float32, device=value.device)
        else:
            held = self._buffer[: self.filled].to(value.device)
            mean = held.mean()
            std = held.std()
            # a constant window: any rise is infinitely unlikely, an equal value scores 0
            z = (value - mean) / std.clamp_min(torch.finfo(torch.float32).tiny)
        return torch.where(torch.isfinite(value), z, torch.full_like(z, float("inf")))

    def push(self, value: Tensor) -> None:
        """Append ``value`` (the caller checked it is finite), overwriting the oldest once full."""
        value = value.detach().reshape(()).to(torch.float32)
        if self._buffer is None:
            self._buffer = torch.zeros(self.size, dtype=torch.float32, device=value.device)
        self._buffer[self.seen % self.size] = value.to(self._buffer.device)
        self.seen += 1

    def state_dict(self) -> dict[str, Any]:
        """Plain values: the fill count and the buffer (on the CPU; ``None`` before the first push)."""
        return {"seen": self.seen, "buffer": None if self._buffer is None else self._buffer.detach().cpu().clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (the buffer moves to the device at the next push/score)."""
        buffer = state.get("buffer")
        if buffer is not None and (not isinstance(buffer, Tensor) or buffer.shape != (self.size,)):
            raise ValueError(
                f"Expected a saved window of {self.size} values but got "
                f"{tuple(buffer.shape) if isinstance(buffer, Tensor) else type(buffer).__name__}; "
                "was the checkpoint written with another `window`?"
            )
        self.seen = int(state.get("seen", 0))
        self._buffer = None if buffer is None else buffer.to(torch.float32).clone()

    def to(self, device: torch.device) -> RollingWindow:
        """Move the buffer to ``device`` (in place; returns ``self``)."""
        if self._buffer is not None and self._buffer.device != device:
            self._buffer = self._buffer.to(device)
        return self
