"""Flower's ``ArrayRecord`` as one flat vector of its floating-point arrays, and back (numpy and torch only)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import Tensor

__all__ = ["SECURE_WEIGHT_KEY", "Layout", "flat_update", "floating_keys"]

#: Config key of the weight every site reports under secure aggregation (the same everywhere: a plain mean).
SECURE_WEIGHT_KEY = "secagg-weight"


def floating_keys(record: ArrayRecord) -> list[str]:
    """The keys of the floating-point arrays of ``record``, in its order (the ones a strategy aggregates)."""
    return [key for key, array in record.items() if np.issubdtype(np.dtype(array.dtype), np.floating)]


class Layout:
    """Where each floating-point array of a record sits in the flat vector, and how to rebuild the record.

    Args:
        template: The record whose keys, shapes and dtypes the flat vectors follow (the global model).
    """

    def __init__(self, template: ArrayRecord) -> None:
        self.template = template
        self.keys = floating_keys(template)
        arrays = {key: template[key].numpy() for key in self.keys}
        self.shapes = {key: a.shape for key, a in arrays.items()}
        self.dtypes = {key: a.dtype for key, a in arrays.items()}
        dtype = torch.float32
        for a in arrays.values():
            dtype = torch.promote_types(dtype, torch.from_numpy(np.zeros(0, dtype=a.dtype)).dtype)
        #: The dtype of the flat vectors: float32, or wider when an array is.
        self.dtype = dtype
        self.numel = sum(int(np.prod(s)) for s in self.shapes.values())
        self.global_flat = self.flatten(template)

    def flatten(self, record: ArrayRecord | Mapping[str, np.ndarray] | Sequence[np.ndarray]) -> Tensor:
        """The floating arrays of ``record`` (by key, or a list in the template's order) as one 1-D tensor.

        Raises:
            ValueError: If an array is missing or has another shape than the template's.
        """
        positions = {key: i for i, key in enumerate(self.template.keys())}
        pieces = []
        for key in self.keys:
            value: Any
            if isinstance(record, Sequence):
                value = record[positions[key]]
            elif key in record:
                value = record[key]
            else:
                raise ValueError(f"The arrays lack {key!r}: expected the keys {self.keys}")
            a = value.numpy() if isinstance(value, Array) else np.asarray(value)
            if a.shape != self.shapes[key]:
                raise ValueError(f"Array {key!r} has shape {a.shape}, the global model's has {self.shapes[key]}")
            pieces.append(torch.from_numpy(np.ascontiguousarray(a)).reshape(-1).to(self.dtype))
        return torch.cat(pieces) if pieces else torch.zeros(0, dtype=self.dtype)

    def record(self, flat: Tensor) -> ArrayRecord:
        """A record like the template with its floating arrays taken from ``flat`` (each in its own dtype); the
        other arrays (integer counters) are the template's."""
        out = ArrayRecord()
        offset = 0
        pieces = {}
        for key in self.keys:
            numel = int(np.prod(self.shapes[key]))
            piece = flat[offset : offset + numel].detach().cpu().numpy().astype(self.dtypes[key], copy=False)
            pieces[key] = piece.reshape(self.shapes[key])
            offset += numel
        for key, array in self.template.items():
            out[key] = Array(np.ascontiguousarray(pieces[key])) if key in pieces else array
        return out


def flat_update(layout: Layout, record: ArrayRecord) -> Tensor:
    """``record``'s floating arrays minus the template's, flattened: a site's update."""
    return layout.flatten(record) - layout.global_flat
