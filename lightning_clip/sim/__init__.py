"""Simulation only: attacks, Byzantine specs, data partitions and demo data for experiments and tests.

The production DDP hook never imports this package; the strategy injects its send transforms.
"""
