"""benchmarks/spikes.py: its table counts caught and false skips right, and short runs train for real."""

from __future__ import annotations

from benchmarks import spikes


def test_table_counts_caught_and_false_skips():
    inject = spikes.injected_steps(400, 50)
    assert inject == [300, 350]
    results = [
        spikes.Result("SpikeGuard loss", 0, True, 0.9, [300, 10], 1.0),
        spikes.Result("SpikeGuard loss", 1, True, 0.8, [300, 350], 1.0),
        spikes.Result("SpikeGuard loss", 0, False, 0.95, [7], 1.0),
    ] + [spikes.Result(row, 0, True, 0.5, [], 1.0) for row in spikes.ROWS["digits"] if row != "SpikeGuard loss"]
    rows = {line.split(" | ")[0].strip("| "): line for line in spikes.table(results, inject, 400)[2:]}
    assert rows["SpikeGuard loss"] == ("| SpikeGuard loss | 0.850, 0.800 | 3 / 4 (75%) | 1 / 796 | 1 / 400 | "
                                       "0.950 |")
    assert "0 / 2 (0%)" in rows["no guard"] and rows["no guard"].endswith("| — | — |")
    lm = [spikes.Result("SpikeGuard loss", s, True, v, [], 1.0, task="lm") for s, v in ((0, 1.8), (1, 2.0))]
    (line,) = spikes.table(lm + results, inject, 400, task="lm")[2:]  # only the lm results, worst = highest loss
    assert line.startswith("| SpikeGuard loss | 1.900, 2.000 | 0 / 4 (0%) |")


def test_every_row_builds_its_callbacks():
    from lightning_clip import GradientClipping, SpikeGuard

    for task in spikes.TASKS:
        for row in spikes.ROWS[task]:
            callbacks = spikes._callbacks(row)
            assert (row == "no guard") == (callbacks == [])
            if row.startswith("SpikeGuard"):
                (guard,) = callbacks
                assert isinstance(guard, SpikeGuard) and (guard.scale == "log") == row.endswith("scale='log'")
                assert set(guard.monitor) == ({"grad_norm", "loss"} if "both" in row else {row.split()[1].rstrip(",")})
            elif callbacks:
                assert isinstance(callbacks[0], GradientClipping)


def test_short_runs_train_and_record_skips():
    result = spikes.run("SpikeGuard both", seed=0, steps=30, inject=[])
    assert result.metric > 0.5 and result.skipped == []  # 30 steps: learns; the window is not full yet
    lm = spikes.run("SpikeGuard both", seed=0, steps=30, inject=[], task="lm")
    assert lm.metric < 3.4 and lm.skipped == []  # below log(32) = 3.47, the loss of a uniform guess
