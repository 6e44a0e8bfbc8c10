"""Importable test helpers: ``models`` (tiny modules, trainers, recorders); ``ddp``, ``exchange*``,
``dtensor_workers`` (multi-process)."""
