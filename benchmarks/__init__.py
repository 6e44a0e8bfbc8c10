"""Studies and timings that print tables (not tests); run each from the repository root as
``python -m benchmarks.<name>`` (``--quick`` for a smoke run that never writes ``benchmarks/results/``).

Their shared code is :mod:`benchmarks.common`.
"""
