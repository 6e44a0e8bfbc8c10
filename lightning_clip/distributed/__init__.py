"""torch.distributed transport: the communication hook, the sharded exchange and the ``ddp_arc`` strategy.

``lightning_clip.distributed.hook`` and ``.exchange`` need torch only; ``lightning_clip.distributed.strategy`` is
the Lightning glue (import it, or ``lightning_clip.ARCDDPStrategy``, to register ``strategy="ddp_arc"``).
"""
