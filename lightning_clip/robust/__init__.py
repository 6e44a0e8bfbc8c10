"""Byzantine-robust maths on stacked vectors ``[n, d]`` and norms ``[n]``: ARC, the rules, the one pipeline.

Pure torch: no Lightning, no ``torch.distributed``. The DDP transport is :mod:`lightning_clip.distributed`.
"""

from lightning_clip.robust.arc import arc_clip, arc_num_clipped, arc_scales, arc_stats, arc_threshold
from lightning_clip.robust.options import ARCConfig
from lightning_clip.robust.pipeline import aggregate, preaggregate
from lightning_clip.robust.rules import RULES

__all__ = [
    "RULES",
    "ARCConfig",
    "aggregate",
    "arc_clip",
    "arc_num_clipped",
    "arc_scales",
    "arc_stats",
    "arc_threshold",
    "preaggregate",
]
