"""The federated study runs end to end (``--quick``) through the real strategies and reports sane numbers.

It checks the report's shape and sanity, and one property of the setting that does not depend on training
luck: a sign-flipping site that FedAvg averages in costs FedAvg accuracy against the honest run of the same
sites. Which robust method wins is the study's question, not the test's.
"""

from __future__ import annotations

import math

import pytest
import torch

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


@pytest.mark.parametrize("attack", ["ALIE", "FOE", "SF"])
def test_the_study_sends_the_simulation_layers_attack_on_the_honest_updates_of_the_round(attack):
    from lightning_clip.flower import FedARC
    from lightning_clip.flower.records import Layout
    from lightning_clip.sim.attacks import alie, foe
    from tests.helpers.flower import initial_arrays, site_data, site_module

    seen = []

    class Recording(FedARC):
        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            seen.append(self.stack_updates(Layout(self.current_arrays), [r.content for r in sorted(
                replies, key=lambda r: r.metadata.src_node_id)]))
            return super().aggregate_train(server_round, replies)

    from lightning_clip.flower import lightning_client_app

    scenario = m.Scenario(attack, 2, n=6)
    grid = m.attack_grid(lightning_client_app(site_module, site_data, steps=2), scenario)
    Recording(num_byzantine=2, fraction_evaluate=0.0, min_train_nodes=6).start(
        grid=grid, initial_arrays=initial_arrays(), num_rounds=1)
    (x,) = seen  # sites in node-id order = partition order here; the last two are Byzantine
    honest = x[:4]
    expected = {"ALIE": lambda: alie(honest, num_byzantine=2), "FOE": lambda: foe(honest),
                "SF": lambda: None}[attack]()
    if attack == "SF":
        clean = m.attack_grid(lightning_client_app(site_module, site_data, steps=2), m.Scenario(None, 0, n=6))
        seen.clear()
        Recording(num_byzantine=2, fraction_evaluate=0.0, min_train_nodes=6).start(
            grid=clean, initial_arrays=initial_arrays(), num_rounds=1)
        expected = -seen[0][4:]
        assert torch.allclose(x[4:], expected, atol=1e-6)
    else:
        for row in x[4:]:
            assert torch.allclose(row, expected.to(row.dtype), atol=1e-6)
    assert torch.equal(x[:4], honest)
