"""Byzantine-robust maths on stacked vectors ``[n, d]`` and norms ``[n]``: ARC and the aggregation rules.

Pure torch: no Lightning, no ``torch.distributed``. The DDP transport is :mod:`lightning_clip.distributed`.
"""

from lightning_clip.robust.aggregators import AGGREGATORS, aggregate
from lightning_clip.robust.arc import arc_clip, arc_num_clipped, arc_scales, arc_stats, arc_threshold

__all__ = [
    "AGGREGATORS",
    "aggregate",
    "arc_clip",
    "arc_num_clipped",
    "arc_scales",
    "arc_stats",
    "arc_threshold",
]
