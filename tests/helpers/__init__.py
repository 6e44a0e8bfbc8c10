"""Importable test helpers: ``models`` (tiny modules, trainers, recorders); ``ddp``, ``sharded*`` (multi-process)."""
