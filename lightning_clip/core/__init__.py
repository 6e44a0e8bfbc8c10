"""The pure-torch core: one-pass gradient statistics, clipping primitives, threshold policies and the
exact-percentile histories behind :class:`PercentileThreshold`.

Nothing here imports Lightning or ``torch.distributed``: usable from a plain PyTorch loop or Fabric.
"""

from lightning_clip.core.functional import (
    clip_coefficient,
    clip_grads_by_value_,
    clip_grads_with_norm_,
    geometric_quantile_update,
    scale_grads_,
)
from lightning_clip.core.grads import GradientStats, collect_grads, gradient_stats
from lightning_clip.core.histories import NormHistory, make_history
from lightning_clip.core.thresholds import (
    FixedThreshold,
    PercentileThreshold,
    QuantileThreshold,
    ThresholdPolicy,
    WarmupThreshold,
    ZScoreThreshold,
    as_policy,
)

__all__ = [
    "FixedThreshold",
    "GradientStats",
    "NormHistory",
    "PercentileThreshold",
    "QuantileThreshold",
    "ThresholdPolicy",
    "WarmupThreshold",
    "ZScoreThreshold",
    "as_policy",
    "clip_coefficient",
    "clip_grads_by_value_",
    "clip_grads_with_norm_",
    "collect_grads",
    "geometric_quantile_update",
    "gradient_stats",
    "make_history",
    "scale_grads_",
]
