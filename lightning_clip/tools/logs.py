"""Read a run's logged scalars back: TensorBoard event files or CSVLogger ``metrics.csv``.

- :func:`find_runs` locates the runs under a directory (searched recursively);
- :func:`read_scalars` reads one run's scalars into ``{tag: Series(steps, values)}``.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Series", "find_runs", "log_source", "read_scalars"]


@dataclass(frozen=True)
class Series:
    """One scalar tag of a run: ``values[i]`` was logged at optimizer step ``steps[i]`` (sorted by step)."""

    steps: np.ndarray
    values: np.ndarray

    def __len__(self) -> int:
        return int(self.steps.size)

    @property
    def last(self) -> float:
        """The value at the largest step (``nan`` when empty)."""
        return float(self.values[-1]) if self.values.size else float("nan")


_EVENT_RE = re.compile(r"events\.out\.tfevents\.")


def find_runs(root: str | os.PathLike[str]) -> list[Path]:
    """Directories under ``root`` (``root`` included) that hold a run's logs, sorted by path.

    A run directory holds TensorBoard event files (``events.out.tfevents.*``) or a CSVLogger
    ``metrics.csv``. ``root`` may also be an event file or a ``metrics.csv`` itself.

    Raises:
        FileNotFoundError: if ``root`` does not exist or holds no run.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"Log directory {str(root)!r} does not exist")
    if root.is_file():
        if _EVENT_RE.match(root.name) or root.name == "metrics.csv":
            return [root]
        raise FileNotFoundError(f"{str(root)!r} is neither a TensorBoard event file nor a CSVLogger metrics.csv")
    runs = set()
    for dirpath, _dirnames, filenames in os.walk(root):
        if any(_EVENT_RE.match(f) for f in filenames) or "metrics.csv" in filenames:
            runs.add(Path(dirpath))
    if not runs:
        raise FileNotFoundError(
            f"No TensorBoard event files (events.out.tfevents.*) or CSVLogger metrics.csv found under {str(root)!r}"
        )
    return sorted(runs)


def _to_series(points: Iterable[tuple[int, float]]) -> Series:
    pts = sorted(points, key=lambda p: p[0])
    steps = np.array([p[0] for p in pts], dtype=np.int64)
    values = np.array([p[1] for p in pts], dtype=np.float64)
    return Series(steps=steps, values=values)


def _read_tensorboard(path: Path) -> dict[str, Series]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, dict[int, float]] = {}
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if _EVENT_RE.match(p.name))
    for file in files:  # several files in one directory: a resumed run; later files win per step
        acc = EventAccumulator(str(file), size_guidance={"scalars": 0, "tensors": 0})
        acc.Reload()
        try:  # every event file TensorBoard writes starts with a timestamped version event
            acc.FirstEventTimestamp()
        except ValueError:
            raise ValueError(f"{str(file)!r} holds no readable TensorBoard event: it is not an event file, or it is "
                             "corrupt (TensorBoard itself would show nothing for it)") from None
        for tag in acc.Tags().get("scalars", []):
            target = series.setdefault(tag, {})
            for ev in acc.Scalars(tag):
                target[int(ev.step)] = float(ev.value)
    return {tag: _to_series(points.items()) for tag, points in series.items()}


def _csv_number(file: Path, line: int, column: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{str(file)!r}, line {line}, column {column!r}: expected a number but got {text!r} (the "
                         "file is not a CSVLogger metrics.csv, or it was edited)") from None


def _read_csv(path: Path) -> dict[str, Series]:
    file = path if path.is_file() else path / "metrics.csv"
    series: dict[str, dict[int, float]] = {}
    with open(file, newline="") as f:
        for line, row in enumerate(csv.DictReader(f), start=2):  # line 1 is the header
            step_text = row.get("step", "")
            if not step_text:
                continue
            step = int(_csv_number(file, line, "step", step_text))
            for key, text in row.items():
                if key in ("step", "epoch") or key is None or text in ("", None):
                    continue
                series.setdefault(key, {})[step] = _csv_number(file, line, key, text)
    return {tag: _to_series(points.items()) for tag, points in series.items()}


def log_source(run: str | os.PathLike[str]) -> str:
    """``"tensorboard"`` or ``"csv"``: what :func:`read_scalars` reads for ``run`` (events win when both exist)."""
    path = Path(run)
    if path.is_file():
        return "csv" if path.name == "metrics.csv" else "tensorboard"
    return "tensorboard" if any(_EVENT_RE.match(p.name) for p in path.iterdir()) else "csv"


def read_scalars(run: str | os.PathLike[str]) -> dict[str, Series]:
    """Every scalar tag of one run directory (from :func:`find_runs`), TensorBoard or CSV (:func:`log_source`)."""
    path = Path(run)
    return _read_tensorboard(path) if log_source(path) == "tensorboard" else _read_csv(path)
