"""The ``ddp_arc`` hook's differential-privacy state: the noise laid out on DDP's buckets, the adaptive bound.

The maths is :mod:`lightning_clip.robust.privacy`; this module places it on the buckets the hook holds.
The noise of a step is one flat vector of ``d`` samples in a canonical parameter order: the order of
the parameters in DDP's buckets at the first step this state sees. A fresh DDP model always starts with
the same buckets (DDP rebuilds them in gradient-ready order after its first step), so a resumed run
maps the noise of a step onto the parameters exactly as the uninterrupted run did.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_clip.distributed.config import ARCConfig
from lightning_clip.robust import privacy
from lightning_clip.robust.arc import ARCStats
from lightning_clip.robust.transforms import SendBuffers

__all__ = ["DPState"]


class DPState:
    """What the hook needs for client-level DP: the noise's layout and the adaptive clip bound.

    Args:
        config: The validated settings (``dp_*`` fields).
        world_size: ``n``, the number of ranks.

    Attributes:
        noise_multiplier: The multiplier of the noise on the vectors (larger than ``dp_noise_multiplier``
            with the adaptive bound, which spends part of the budget on its count).
        count_stddev: Standard deviation of the noise on the count of unclipped ranks.
        bound: The adaptive clip bound ``C_t`` (0-d float32 tensor), ``None`` with a fixed bound. Saved in
            checkpoints (:meth:`state_dict`).
    """

    __slots__ = ("config", "world_size", "noise_multiplier", "count_stddev", "bound", "_offsets", "_perms")

    def __init__(self, config: ARCConfig, world_size: int) -> None:
        self.config = config
        self.world_size = world_size
        self.noise_multiplier = config.dp_vector_noise_multiplier(world_size)
        self.count_stddev = config.dp_count_stddev(world_size)
        self.bound: Tensor | None = None
        if config.dp_clip_quantile is not None:
            assert config.static_clip is not None  # checked by ARCConfig
            self.bound = torch.tensor(config.static_clip, dtype=torch.float32)
        self._offsets: dict[int, int] | None = None  # id(parameter) -> offset in the canonical order
        self._perms: dict[tuple[int, ...], Tensor | None] = {}

    def clip_bound(self, device: torch.device) -> Tensor | float:
        """The clip bound ``C`` in force: the adaptive one on ``device``, else ``static_clip``."""
        if self.bound is None:
            assert self.config.static_clip is not None
            return self.config.static_clip
        if self.bound.device != device:
            self.bound = self.bound.to(device)
        return self.bound

    def stats(self, stats: ARCStats, device: torch.device) -> ARCStats:
        """``stats`` computed without the static clip, with the adaptive bound applied (fixed bound: unchanged)."""
        if self.bound is None:
            return stats
        bound = self.clip_bound(device)
        assert isinstance(bound, Tensor)
        return privacy.bound_stats(stats, bound, self.config.arc)

    def update_bound(self, norms: Tensor, step: int) -> None:
        """Move the adaptive bound one geometric step towards the target quantile of ``norms`` (same on every rank)."""
        if self.bound is None:
            return
        cfg = self.config
        assert cfg.dp_clip_quantile is not None
        bound = self.clip_bound(norms.device)
        assert isinstance(bound, Tensor)
        self.bound = privacy.update_clip_bound(bound, norms.to(bound.dtype), cfg.dp_clip_quantile,
                                               cfg.dp_clip_learning_rate, self.count_stddev, cfg.dp_seed, step)

    def add_noise_(self, sent: SendBuffers, step: int, scale: float) -> None:
        """Add ``N(0, (sigma C scale)^2)`` noise of step ``step`` to the buffers, in the canonical parameter order."""
        if self.noise_multiplier == 0.0:
            return
        device = sent.buffers[0].device
        numel = sum(b.numel() for b in sent.buffers)
        std = self.clip_bound(device) * (self.noise_multiplier * scale)
        noise = privacy.gaussian_noise(numel, std, self.config.dp_seed, step, device=device)
        perm = self._perm(sent, numel)
        if perm is not None:
            noise = noise[perm.to(device)]
        offset = 0
        for b in sent.buffers:
            b.add_(noise[offset : offset + b.numel()].view_as(b).to(b.dtype))
            offset += b.numel()

    def _perm(self, sent: SendBuffers, numel: int) -> Tensor | None:
        """Indices into the canonical noise vector, in the order of this step's buckets (``None``: the same order)."""
        ids = tuple(id(p) for ps in sent.params for p in ps)
        if ids in self._perms:
            return self._perms[ids]
        params = [p for ps in sent.params for p in ps]
        held = sum(p.numel() for p in params)
        if held != numel:
            raise RuntimeError(
                f"ddp_arc: the gradient buckets hold {numel} elements but their parameters {held}; "
                "privacy noise needs buckets laid out parameter by parameter"
            )
        if self._offsets is None:
            self._offsets, offset = {}, 0
            for p in params:
                self._offsets[id(p)] = offset
                offset += p.numel()
        parts = [torch.arange(self._offsets[id(p)], self._offsets[id(p)] + p.numel()) for p in params]
        perm: Tensor | None = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
        if perm is not None and torch.equal(perm, torch.arange(numel)):
            perm = None
        self._perms[ids] = perm
        return perm

    def state_dict(self) -> dict[str, Any]:
        """The adaptive bound (``{}`` with a fixed bound): the only state; the noise is seeded per step."""
        return {} if self.bound is None else {"clip_bound": self.bound.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (a missing bound keeps the current one)."""
        if self.bound is not None and state.get("clip_bound") is not None:
            self.bound = torch.as_tensor(state["clip_bound"], dtype=torch.float32).clone().reshape(())

    def __getstate__(self) -> dict[str, Any]:
        """Everything but the parameter layout (keyed by object ids, meaningless in another process)."""
        return {s: getattr(self, s) for s in self.__slots__ if s not in ("_offsets", "_perms")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore ``state`` with an empty layout."""
        for k, v in state.items():
            setattr(self, k, v)
        self._offsets = None
        self._perms = {}
