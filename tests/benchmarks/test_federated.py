"""The federated study runs end to end (``--quick``) through the real strategies and reports sane numbers.

It checks the report's shape and sanity, and one property of the setting that does not depend on training
luck: a sign-flipping site that FedAvg averages in costs FedAvg accuracy against the honest run of the same
sites. Which robust method wins is the study's question, not the test's.
"""

from __future__ import annotations

import math

import pytest

pytest.importorskip("flwr.serverapp")

from benchmarks import federated as m  # noqa: E402
from tests.helpers.models import quick_benchmark  # noqa: E402


def _acc(cell: str) -> float:
    v = float(cell)
    assert math.isfinite(v) and 0.0 <= v <= 1.0, cell
    return v


def test_quick_run_writes_the_table_and_the_plot(tmp_path_factory):
    _, md, stdout = quick_benchmark("federated", tmp_path_factory, min_png_bytes=5_000, wall_time="Wall time:")
    lines = md.splitlines()
    start = lines.index("| strategy | SF f=1 |")
    table = lines[start + 2 : start + 5]
    assert [row.split(" | ")[0].strip("| ") for row in table] == ["FedAvg", "Krum", "ARC > NNM > CWTM"]
    for row in table:
        _acc(row.strip("| ").split(" | ")[1])
    assert "3 runs of 3 rounds" in stdout


def test_strategies_and_scenarios_are_what_the_report_says():
    assert m.make_strategy("Bulyan", 3) is None and m.make_strategy("Bulyan", 1) is not None  # n >= 4 f + 3
    assert m.make_strategy("ARC > NNM > CWTM", 3).arc_config.num_byzantine == 3
    assert m.make_strategy("FedTrimmedAvg", 3).beta * m.N // 1 == 3  # trims f sites a side
    labels = [s.label for s in m.scenarios(quick=False)]
    assert labels[0] == "no attack" and "ALIE f=3" in labels and len(labels) == 1 + 4 * len(m.BYZANTINE_COUNTS)
    assert m.Scenario("SF", 3).byzantine == [7, 8, 9]


def test_a_sign_flipping_site_costs_fedavg_accuracy():
    data = m.load_data()
    shards = m.honest_shards(data, m.HET, m.N, 1)
    m.quiet()
    honest = m.run_one("FedAvg", m.Scenario(None, 0), 4, 1, data, shards)
    attacked = m.run_one("FedAvg", m.Scenario("scale", 3), 4, 1, data, shards)
    assert honest is not None and attacked is not None
    assert attacked[-1] < honest[-1] - 0.2
