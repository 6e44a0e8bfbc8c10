"""Tensor argument checks and the compute dtype shared by the robust maths and the simulation (pure torch)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["check_floating", "check_matrix", "check_norms", "compute_dtype"]


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """Return float64 when every given dtype is float64, else float32 (bf16/fp16 accumulate in float32)."""
    return torch.float64 if dtypes and all(d == torch.float64 for d in dtypes) else torch.float32


def check_floating(name: str, x: Any) -> Tensor:
    """Return ``x`` or raise naming ``name`` unless it is a floating-point tensor."""
    if not isinstance(x, Tensor):
        raise TypeError(f"Expected argument `{name}` to be a torch.Tensor but got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"Expected argument `{name}` to have a floating dtype but got {x.dtype}")
    return x


def check_matrix(name: str, x: Any) -> Tensor:
    """Return ``x`` in its compute dtype, or raise unless it is a floating ``[n, d]`` tensor with ``n >= 1``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"Expected argument `{name}` to be a torch.Tensor but got {type(x).__name__}")
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(
            f"Expected argument `{name}` to be a 2-D tensor [n, d] with n >= 1 but got shape {tuple(x.shape)}"
        )
    check_floating(name, x)
    return x.to(compute_dtype(x.dtype))


def check_norms(name: str, norms: Any) -> Tensor:
    """Return ``norms`` in its compute dtype, or raise unless it is a 1-D real tensor ``[n]``."""
    if not isinstance(norms, Tensor):
        raise TypeError(f"Expected argument `{name}` to be a torch.Tensor but got {type(norms).__name__}")
    if norms.ndim != 1:
        raise ValueError(f"Expected argument `{name}` to be a 1-D tensor [n] but got shape {tuple(norms.shape)}")
    if norms.dtype == torch.bool or norms.is_complex():
        raise TypeError(f"Expected argument `{name}` to have a real dtype but got {norms.dtype}")
    return norms.to(compute_dtype(norms.dtype))
