"""torch.distributed transport: the ARC communication hook and the ``ddp_arc`` Lightning strategy.

``lightning_clip.distributed.hook`` needs torch only; ``lightning_clip.distributed.strategy`` is the
Lightning glue (import it, or ``lightning_clip.ARCDDPStrategy``, to register ``strategy="ddp_arc"``).
"""
