"""Lightning callbacks (thin glue over the pure core)."""

from lightning_clip.callbacks.adagc import AdaGCClipping
from lightning_clip.callbacks.agc import AdaptiveGradientClipping
from lightning_clip.callbacks.clipping import GradientClipping
from lightning_clip.callbacks.finder import ClipThresholdFinder
from lightning_clip.callbacks.guard import NonFiniteGradientGuard
from lightning_clip.callbacks.monitor import GradientNormMonitor
from lightning_clip.callbacks.spike import SpikeGuard

__all__ = [
    "AdaGCClipping", "AdaptiveGradientClipping", "ClipThresholdFinder", "GradientClipping", "GradientNormMonitor",
    "NonFiniteGradientGuard", "SpikeGuard",
]
