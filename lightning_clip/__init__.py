"""lightning_clip: observable, adaptive and robust gradient clipping for PyTorch Lightning.

The pure-torch names (thresholds, ``gradient_stats``) are imported here; the Lightning glue (callbacks,
``ARCDDPStrategy``) is imported on first use, so that ``lightning_clip.core``, ``lightning_clip.robust`` and
``lightning_clip.distributed.hook`` stay usable from a plain PyTorch loop without loading Lightning.
Loading the glue also registers ``strategy="ddp_arc"`` / ``"ddp_arc_spawn"``: that happens at
``import lightning_clip`` when Lightning is already imported, else on first use of any glue name.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

from lightning_clip.core.grads import GradientStats, gradient_stats
from lightning_clip.core.thresholds import (
    FixedThreshold,
    PercentileThreshold,
    QuantileThreshold,
    ThresholdPolicy,
    WarmupThreshold,
    ZScoreThreshold,
)
from lightning_clip.exceptions import GradientSpikeError, NonFiniteGradientError
from lightning_clip.robust.options import ARCConfig

if TYPE_CHECKING:
    from lightning_clip.callbacks import (
        AdaGCClipping,
        AdaptiveGradientClipping,
        ClipThresholdFinder,
        GradientClipping,
        GradientNormMonitor,
        NonFiniteGradientGuard,
        SpikeGuard,
    )
    from lightning_clip.distributed.strategy import ARCDDPStrategy

__version__ = "0.1.0"

#: Re-exported Lightning glue: name -> module that defines it (imported on first access).
_LIGHTNING_EXPORTS: dict[str, str] = {
    "AdaGCClipping": "lightning_clip.callbacks",
    "AdaptiveGradientClipping": "lightning_clip.callbacks",
    "ClipThresholdFinder": "lightning_clip.callbacks",
    "GradientClipping": "lightning_clip.callbacks",
    "GradientNormMonitor": "lightning_clip.callbacks",
    "NonFiniteGradientGuard": "lightning_clip.callbacks",
    "SpikeGuard": "lightning_clip.callbacks",
    "ARCDDPStrategy": "lightning_clip.distributed.strategy",
}

__all__ = [
    "ARCConfig",
    "ARCDDPStrategy",
    "AdaGCClipping",
    "AdaptiveGradientClipping",
    "ClipThresholdFinder",
    "FixedThreshold",
    "GradientClipping",
    "GradientNormMonitor",
    "GradientSpikeError",
    "GradientStats",
    "NonFiniteGradientError",
    "NonFiniteGradientGuard",
    "PercentileThreshold",
    "QuantileThreshold",
    "SpikeGuard",
    "ThresholdPolicy",
    "WarmupThreshold",
    "ZScoreThreshold",
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
