"""lightning_clip: observable, adaptive and robust gradient clipping for PyTorch Lightning.

The pure-torch names (thresholds, ``gradient_stats``) are imported here; the Lightning glue (callbacks,
``find_clip_threshold``, ``ARCDDPStrategy``) is imported on first use, so that ``lightning_clip.thresholds``,
``lightning_clip.grads`` and ``lightning_clip.robust.*`` stay usable from a plain PyTorch loop without
loading Lightning. Loading the glue also registers ``strategy="ddp_arc"`` / ``"ddp_arc_spawn"``: that
happens at ``import lightning_clip`` when Lightning is already imported, else on first use of any glue name.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

from lightning_clip.exceptions import NonFiniteGradientError
from lightning_clip.grads import GradientStats, gradient_stats
from lightning_clip.thresholds import (
    FixedThreshold,
    PercentileThreshold,
    ThresholdPolicy,
    WarmupThreshold,
    ZScoreThreshold,
)

if TYPE_CHECKING:
    from lightning_clip.callbacks import GradientClipping, GradientNormMonitor, NonFiniteGradientGuard
    from lightning_clip.finder import ClipThresholdResult, find_clip_threshold
    from lightning_clip.robust.strategy import ARCDDPStrategy

__version__ = "0.1.0"

#: Re-exported Lightning glue: name -> module that defines it (imported on first access).
_LIGHTNING_EXPORTS: dict[str, str] = {
    "GradientClipping": "lightning_clip.callbacks",
    "GradientNormMonitor": "lightning_clip.callbacks",
    "NonFiniteGradientGuard": "lightning_clip.callbacks",
    "ClipThresholdResult": "lightning_clip.finder",
    "find_clip_threshold": "lightning_clip.finder",
    "ARCDDPStrategy": "lightning_clip.robust.strategy",
}

__all__ = [
    "ARCDDPStrategy",
    "ClipThresholdResult",
    "FixedThreshold",
    "GradientClipping",
    "GradientNormMonitor",
    "GradientStats",
    "NonFiniteGradientError",
    "NonFiniteGradientGuard",
    "PercentileThreshold",
    "ThresholdPolicy",
    "WarmupThreshold",
    "ZScoreThreshold",
    "find_clip_threshold",
    "gradient_stats",
]


def _load_lightning_glue() -> None:
    """Import every glue module (the strategy module registers ``"ddp_arc"`` with Lightning)."""
    for module in dict.fromkeys(_LIGHTNING_EXPORTS.values()):
        importlib.import_module(module)


def __getattr__(name: str) -> Any:
    module = _LIGHTNING_EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    _load_lightning_glue()
    value = getattr(sys.modules[module], name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LIGHTNING_EXPORTS))


if "lightning.pytorch" in sys.modules:  # Lightning is loaded already: the glue costs nothing, register "ddp_arc" now
    _load_lightning_glue()
