"""benchmarks/spikes.py: its table counts caught and false skips right, and a short run trains for real."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import spikes  # noqa: E402


def test_table_counts_caught_and_false_skips():
    inject = spikes.injected_steps(400, 50)
    assert inject == [300, 350]
    results = [
        spikes.Result("SpikeGuard loss", 0, True, 0.9, [300, 10], 1.0),
        spikes.Result("SpikeGuard loss", 1, True, 0.8, [300, 350], 1.0),
        spikes.Result("SpikeGuard loss", 0, False, 0.95, [7], 1.0),
    ] + [spikes.Result(row, 0, True, 0.5, [], 1.0) for row in spikes.ROWS if row != "SpikeGuard loss"]
    rows = {line.split(" | ")[0].strip("| "): line for line in spikes.table(results, inject, 400)[2:]}
    assert rows["SpikeGuard loss"] == ("| SpikeGuard loss | 0.850, 0.800 | 3 / 4 (75%) | 1 / 796 | 1 / 400 | "
                                       "0.950 |")
    assert "0 / 2 (0%)" in rows["no guard"] and rows["no guard"].endswith("| — | — |")


def test_a_short_run_trains_and_records_skips():
    result = spikes.run("SpikeGuard both", seed=0, steps=30, inject=[])
    assert result.accuracy > 0.5 and result.skipped == []  # 30 steps: learns; the window is not full yet
