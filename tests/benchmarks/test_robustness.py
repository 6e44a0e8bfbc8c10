"""The Byzantine-robustness benchmark runs end to end (``--quick``) and reports sane numbers.

It checks the report's shape and sanity -- and that the two execution modes (single-process simulation
and real gloo DDP through the library's hook) agree run by run -- not which method wins.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch

from benchmarks import common
from benchmarks import robustness as m
from lightning_clip.robust import aggregate, pipeline
from tests.helpers.models import quick_benchmark

QUICK_ROWS = ["NNM > cwtm", "clip(2) > NNM > cwtm", "ARC > NNM > cwtm"]
QUICK_COL = "extreme f=1"
QUICK_ATTACKS = {"SF", "LF", "FOE-LS", "ALIE-LS", "Mimic"}


def _tables(md: str) -> list[tuple[str, list[str], list[list[str]]]]:
    """Every markdown table as (the last heading or text line before it, header, rows)."""
    out, context, lines, i = [], "", md.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("| "):
            header = [c.strip() for c in line.strip().strip("|").split(" | ")]
            assert set(lines[i + 1].replace("|", "")) == {"-"}, lines[i + 1]
            rows, i = [], i + 2
            while i < len(lines) and lines[i].startswith("| "):
                rows.append([c.strip() for c in lines[i].strip().strip("|").split(" | ")])
                assert len(rows[-1]) == len(header), (header, rows[-1])
                i += 1
            out.append((context, header, rows))
            continue
        if line.strip():
            context = line.strip()
        i += 1
    return out


def _acc(cell: str) -> float:
    v = float(cell.strip("*"))
    assert math.isfinite(v) and 0.0 <= v <= 1.0, cell
    return v


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory) -> tuple[Path, str, str]:
    # checks the PNG, the command, the machine and the wall time in the report
    return quick_benchmark("robustness", tmp_path_factory, min_png_bytes=5_000,
                           wall_time="Wall time of this invocation:")


@pytest.mark.distributed  # the quick run: a pool of 2 simulation processes and 3 gloo ranks
def test_quick_writes_report_and_plot(quick_report):
    _, md, stdout = quick_report
    assert "## Reading (computed)" in md
    assert "| aggregation | extreme f=1 |" in stdout  # the tables are printed too


@pytest.mark.distributed  # the quick run: a pool of 2 simulation processes and 3 gloo ranks
def test_sim_table_has_every_row_and_worst_attacks(quick_report):
    _, md, _ = quick_report
    tables = _tables(md)
    sim = [t for t in tables if t[0].startswith("The same study with all workers in one process")]
    assert len(sim) == 1
    _, header, rows = sim[0]
    assert header == ["aggregation", QUICK_COL] and [r[0] for r in rows] == QUICK_ROWS
    for r in rows:
        _acc(r[1])
    assert sum(r[1].startswith("**") for r in rows) >= 1  # the best row of the rule is marked
    attack_tables = [t for t in tables if t[0] == "Worst attack per cell:"]
    assert len(attack_tables) == 2  # DDP and sim
    for _, _, att_rows in attack_tables:
        assert {r[1] for r in att_rows} <= QUICK_ATTACKS
    (_, header, rows), = [t for t in tables if t[0].startswith("Reference without any Byzantine worker (sim")]
    assert header == ["no Byzantine worker (f = 0, D-SHB + mean)", "extreme"]
    assert _acc(rows[0][1]) > 0.1  # better than chance after 30 steps of honest training


@pytest.mark.distributed  # the quick run: a pool of 2 simulation processes and 3 gloo ranks
def test_ddp_runs_through_the_library_hook_and_matches_sim_bitwise(quick_report):
    """The 3-rank DDP runs (library hook for every row, ARC on and off) reproduce the simulation exactly."""
    _, md, _ = quick_report
    tables = _tables(md)
    (_, header, rows), = [t for t in tables if t[0].startswith("Every run is 2 + f real `DistributedDataParallel`")]
    assert header == ["aggregation", QUICK_COL] and [r[0] for r in rows] == ["NNM > cwtm", "ARC > NNM > cwtm"]
    cmp_tables = [t for t in tables if t[1][:6] == ["aggregation", "setting", "attack", "seed", "sim max acc",
                                                     "ddp max acc"]]
    assert len(cmp_tables) == 1
    header, rows = cmp_tables[0][1], cmp_tables[0][2]
    col = {h: i for i, h in enumerate(header)}
    assert len(rows) == 6  # {none, ARC} x {SF, ALIE-LS, Mimic}, one seed
    for r in rows:
        assert _acc(r[col["sim max acc"]]) == _acc(r[col["ddp max acc"]]), r
        assert float(r[col["final params rel. diff"]]) == 0.0, r
        assert r[col["steps sim/ddp"]] == "20/20"
    assert "6 runs in both modes; 6 of them end with bitwise identical weights" in md


def test_metric_is_seed_mean_then_worst_attack():
    runs = {(a, s): m.Run("extreme", 1, a, "cwtm", "arc", s) for a in ("SF", "Mimic") for s in (1, 2)}
    accs = {("SF", 1): [0.2, 0.9], ("SF", 2): [0.5, 0.1], ("Mimic", 1): [0.6], ("Mimic", 2): [0.7]}
    results = [common.Result(runs[k], v, 0.0, 1) for k, v in accs.items()]
    wc = m.worst_case(results)
    value, attack = wc[("ARC > NNM > cwtm", "extreme f=1")]
    assert attack == "Mimic" and value == pytest.approx(0.65)  # SF: (0.9 + 0.5) / 2 = 0.7, Mimic: (0.6 + 0.7) / 2
    assert m.worst_case(results, ["SF"])[("ARC > NNM > cwtm", "extreme f=1")][1] == "SF"


def test_worst_attack_ties_name_every_attack_in_a_fixed_order():
    accs = {"Mimic": 0.4, "FOE-LS": 0.4, "SF": 0.4, "LF": 0.9}
    results = [common.Result(m.Run("extreme", 1, a, "cwtm", "arc", 1), [v], 0.0, 1) for a, v in accs.items()]
    for order in (results, results[::-1]):
        value, attack = m.worst_case(order)[("ARC > NNM > cwtm", "extreme f=1")]
        assert value == pytest.approx(0.4) and attack == "SF/FOE-LS/Mimic"


def test_rows_map_to_the_hook_pipeline():
    setting = common.Setting()
    x = torch.randn(12, 5) * torch.linspace(0.5, 6.0, 12).unsqueeze(1)
    cases = {
        "none": functools.partial(aggregate, rule="geomed", num_byzantine=2, nnm=True),
        "clip": functools.partial(aggregate, rule="geomed", num_byzantine=2, nnm=True, static_clip=2.0),
        "arc": functools.partial(aggregate, rule="geomed", num_byzantine=2, nnm=True, arc=True),
        "arc+clip": functools.partial(aggregate, rule="geomed", num_byzantine=2, nnm=True, arc=True, static_clip=2.0),
    }
    for pre, expected in cases.items():
        run = m.Run("extreme", 2, "SF", "geomed", pre, 1)
        config = run.config(setting)
        assert config.worker_momentum == 0.9 and config.num_byzantine == 2
        assert torch.equal(pipeline.server_aggregation(config)(x), expected(x))
        # The chain every rank runs: worker momentum, then the attack of the last f ranks.
        chain = config.send_chain(run.transforms())
        assert [type(t).__name__ for t in chain] == ["WorkerMomentum", "ByzantineTransform"]
        assert chain[1].spec.ranks == (10, 11)
    assert m.row_label("cwtm", "arc+clip") == "ARC > clip(2) > NNM > cwtm"
    assert m.Run("extreme", 0, None, "mean", "none", 1).config(setting).num_byzantine == 0


def test_sim_sends_replace_only_byzantine_rows():
    setting = common.Setting(beta=0.0)  # no momentum: the sent rows are the gradients themselves
    g = torch.arange(15.0).reshape(5, 3)

    def sends(run):
        chains = [run.config(setting).send_chain(run.transforms()) for _ in range(run.n)]
        bufs = [common.SendBuffers([g[r].clone()], [[torch.zeros(3)]]) for r in range(run.n)]
        return common.simulate_sends(chains, bufs, 0, lambda x: x.mean(0))

    sent = sends(m.Run("extreme", 2, "SF", "cwtm", "none", 1, honest=3))
    assert torch.equal(sent[:3], g[:3]) and torch.equal(sent[3:], -g[3:])
    sent = sends(m.Run("extreme", 2, "Mimic", "cwtm", "none", 1, honest=3))
    assert torch.equal(sent[:3], g[:3]) and torch.equal(sent[3], g[0]) and torch.equal(sent[4], g[0])
    assert m.Run("extreme", 1, "LF", "cwtm", "none", 1, honest=3).transforms() == []  # data level


def test_cache_round_trip_and_resume(tmp_path):
    setting = common.Setting(steps=20)
    run = m.Run("extreme", 1, "SF", "cwtm", "arc", 3)
    res = common.Result(run, [0.1, 0.4], 1.5, 20, torch.arange(4.0))
    path = common.cache_path(str(tmp_path), "sim", run, setting)
    common.save_result(path, res)
    back = common.load_result(path, m.Run)
    assert back.run == run and back.accs == [0.1, 0.4] and torch.equal(back.final, res.final)
    done, todo = common.split_cached([run, m.Run("extreme", 1, "LF", "cwtm", "arc", 3)], setting, str(tmp_path),
                                     "sim")
    assert [r.run for r in done] == [run] and [r.attack for r in todo] == ["LF"]
    # Another setting is another key: nothing stale is reused.
    assert common.cache_path(str(tmp_path), "sim", run, common.Setting(steps=21)) != path
    assert common.split_cached([run], setting, str(tmp_path), "ddp")[0] == []


def test_cache_keys_stay_those_of_the_runs_already_cached():
    """A cached study is reused: the keys are those the study's runs were cached under (fields at the defaults
    added since, ``robust_comm`` and ``init_jitter``, stay out of the key)."""
    run, ref = m.Run("extreme", 1, "SF", "cwtm", "arc", 1), m.Run("extreme", 0, None, "mean", "none", 1)
    assert common.run_key(run, common.Setting()) == "6c13b01eb03290979b55"
    assert common.run_key(ref, common.Setting()) == "55c315806950876687ef"
    assert common.run_key(run, common.Setting(robust_comm="gather")) == "336ec0229781dc5e3b84"
    assert common.run_key(run, common.Setting(init_jitter=1e-7)) == "d8f6b4bd25138977c8a3"


def test_bad_arguments_are_rejected():
    with pytest.raises(SystemExit):
        m.parse_args(["--attacks", "SF,boom"])
    with pytest.raises(SystemExit):
        m.parse_args(["--pres", "arc,never"])
    with pytest.raises(SystemExit):
        m.parse_args(["--beta", "1.0"])
