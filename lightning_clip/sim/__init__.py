"""Simulation only: attacks, Byzantine specs, data partitions and demo data for experiments and tests.

Production code never imports this package: a simulated attack reaches the ``ddp_arc`` strategy as a send
transform, :class:`ByzantineTransform` (``ARCDDPStrategy(send_transforms=[ByzantineTransform(...)])``).
"""

from lightning_clip.sim.byzantine import ATTACK_NAMES, ByzantineSpec, ByzantineTransform, simulate_sends

__all__ = ["ATTACK_NAMES", "ByzantineSpec", "ByzantineTransform", "simulate_sends"]
