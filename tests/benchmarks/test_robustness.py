"""The Byzantine-robustness benchmark runs end to end (``--quick``) and reports sane numbers.

It checks the report's shape and sanity -- and that the two execution modes (single-process simulation
and real gloo DDP through the library's hook) agree run by run -- not which method wins.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from benchmarks import common
from benchmarks import robustness as m
from lightning_clip.robust import aggregate, pipeline
from lightning_clip.sim.adaptive import line_search
from lightning_clip.sim.attacks import alie, foe
from tests.helpers.models import quick_benchmark

QUICK_ROWS = ["NNM > cwtm", "clip(2) > NNM > cwtm", "ARC > NNM > cwtm"]
QUICK_COL = "extreme f=1"
QUICK_ATTACKS = {"SF", "LF", "FOE-LS", "FOE-LS-bf", "ALIE-LS", "ALIE-LS-bf", "Mimic"}


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


def test_cached_only_reports_the_complete_cells(tmp_path):
    # A cell (row x column) is reported only when all of its attacks and seeds are cached: one missing run leaves
    # the whole cell out, so no worst case is taken over part of it.
    setting = common.Setting()
    runs = m.build_runs(["extreme"], [3, 4], ["SF", "LF"], ["cwtm"], ["none", "arc"], [1, 2], 10)
    gap = m.Run("extreme", 3, "LF", "cwtm", "none", 2)
    ref2 = m.Run("extreme", 0, None, "mean", "none", 2)
    for run in runs:
        if run not in (gap, ref2):
            common.save_result(common.cache_path(str(tmp_path), "sim", run, setting), common.Result(run, [0.5], 1.0, 1))
    kept, left_out = m.complete_cells(runs, setting, str(tmp_path))
    assert left_out == ["extreme f=3 / NNM > cwtm"]
    assert sorted(kept, key=repr) == sorted([r for r in runs if r != ref2 and (r.f, r.pre) != (3, "none")], key=repr)
    assert len(kept) == 1 + 8 + 4  # the cached reference, f=4's two cells, f=3's ARC cell
    assert m.complete_cells(runs, setting, str(tmp_path / "empty")) == ([], [
        "extreme f=3 / NNM > cwtm", "extreme f=3 / ARC > NNM > cwtm", "extreme f=4 / NNM > cwtm",
        "extreme f=4 / ARC > NNM > cwtm"])


def test_cached_only_assembles_both_grids_from_the_cache_and_runs_nothing(tmp_path):
    # Sim: both rows cached; DDP: the ARC row only, so DDP's NNM > cwtm cell is left out, and the comparison covers
    # the runs cached in both modes. Nothing is trained: a missing run would be computed and cached otherwise.
    setting, cache, out = common.Setting(), str(tmp_path / "cache"), tmp_path / "out"
    runs = m.build_runs(["extreme"], [3], ["SF", "LF"], ["cwtm"], ["none", "arc"], [1], 10)
    final = torch.arange(4.0)
    for run in runs:
        acc = 0.9 if run.f == 0 else (0.6 if run.pre == "arc" else 0.2) + (0.1 if run.attack == "LF" else 0.0)
        common.save_result(common.cache_path(cache, "sim", run, setting), common.Result(run, [acc], 1.0, 200, final))
        if run.pre == "arc" or run.f == 0:
            ddp_acc = acc + (0.01 if run.attack == "LF" else 0.0)
            common.save_result(common.cache_path(cache, "ddp", run, setting),
                               common.Result(run, [ddp_acc], 2.0, 200, final + (run.attack == "LF")))
    files = sorted(p.name for p in (tmp_path / "cache").rglob("*.pt"))
    m.main(["--mode", "both", "--cached-only", "--cache", cache, "--out", str(out), "--hets", "extreme", "--f", "3",
            "--rules", "cwtm", "--pres", "none,arc", "--attacks", "SF,LF", "--seeds", "1", "--ddp-hets", "extreme"])
    assert sorted(p.name for p in (tmp_path / "cache").rglob("*.pt")) == files
    md = (out / "robustness.md").read_text()
    assert md.startswith("# Does ARC hold under attack? Robust D-SHB (worker momentum) on digits, simulated and in "
                         "real DDP")
    assert "not reported (some of their runs not in the cache): DDP extreme f=3 / NNM > cwtm." in md
    tables = _tables(md)
    (_, header, rows), = [t for t in tables if t[0].startswith("Every run is 10 + f real")]
    assert header == ["aggregation", "extreme f=3"] and rows == [["ARC > NNM > cwtm", "0.600"]]  # one seed, one row
    (_, header, rows), = [t for t in tables if t[0].startswith("The same study with all workers in one process")]
    assert rows == [["NNM > cwtm", "0.200"], ["ARC > NNM > cwtm", "**0.600**"]]
    # reference + SF + LF of the ARC row: the SF and reference runs equal, LF's weights and accuracy differ
    assert "3 runs in both modes; 2 of them end with bitwise identical weights" in md
    assert "max 0.0100" in md
    # --name writes the same report under another stem, beside the first one, which it leaves alone
    m.main(["--mode", "both", "--cached-only", "--cache", cache, "--out", str(out), "--hets", "extreme", "--f", "3",
            "--rules", "cwtm", "--pres", "none,arc", "--attacks", "SF,LF", "--seeds", "1", "--ddp-hets", "extreme",
            "--name", "robustness_slice"])
    assert _tables((out / "robustness_slice.md").read_text()) == tables
    assert (out / "robustness_slice.png").stat().st_size > 0 and (out / "robustness.md").read_text() == md


def test_byzfl_comparison_takes_both_sides_over_the_same_seeds():
    # ByzFL's code ran seed 1 only: our side is taken over seed 1 too, not over the mean of seeds 1-3 (here 0.5,
    # which a 3-seed mean against a 1-seed value would call "within noise" or "weaker").
    def res(attack, seed, acc, impl="ours"):
        return common.Result(m.Run("extreme", 4, attack, "cwtm", "arc", seed, impl=impl), [acc], 1.0, 1)

    results = [res("ALIE-LS-bf", 1, 0.2), res("ALIE-LS-bf", 2, 0.6), res("ALIE-LS-bf", 3, 0.7),
               res("SF", 1, 0.3), res("SF", 2, 0.3), res("SF", 3, 0.3), res("ALIE-LS-bf", 1, 0.25, impl="byzfl")]
    table, _, summary = m.byzfl_comparison(results, [m.row_label("cwtm", "arc")], [m.col_label("extreme", 4)])
    assert summary["cells"] == 1 and summary["at_least"] == 1 and summary["more damaging"] == 1
    assert summary["mean_delta"] == pytest.approx(-0.05)
    assert "0.200 (0.20-0.20) | ALIE-LS-bf | 0.250 (0.25-0.25) | ALIE-LS-bf | -0.050 | more damaging |" in table


def test_byzfl_comparison_verdicts():
    # equal -> "as damaging"; higher with overlapping seed ranges -> "less, within noise"; beyond -> "less, beyond"
    def res(col_f, attack, seed, acc, impl="ours"):
        return common.Result(m.Run("extreme", col_f, attack, "cwtm", "arc", seed, impl=impl), [acc], 1.0, 1)

    results = [res(2, "SF", 1, 0.4), res(2, "SF", 2, 0.4), res(2, "ALIE-LS-bf", 1, 0.4, impl="byzfl"),
               res(3, "SF", 1, 0.5), res(3, "SF", 2, 0.3), res(3, "ALIE-LS-bf", 1, 0.35, impl="byzfl"),
               res(3, "ALIE-LS-bf", 2, 0.35, impl="byzfl"),
               res(4, "SF", 1, 0.6), res(4, "ALIE-LS-bf", 1, 0.2, impl="byzfl")]
    cols = [m.col_label("extreme", f) for f in (2, 3, 4)]
    table, _, summary = m.byzfl_comparison(results, [m.row_label("cwtm", "arc")], cols)
    verdicts = [line.rsplit("|", 2)[1].strip() for line in table.splitlines()[2:]]
    assert verdicts == ["as damaging", "less, within noise", "less, beyond noise"]
    assert summary["at_least"] == 1 and summary["as damaging"] == 1 and summary["cells"] == 3


def test_cache_keys_stay_those_of_the_runs_already_cached():
    """A cached study is reused: the keys are those the study's runs were cached under (fields at the defaults
    added since, ``robust_comm``, ``init_jitter``, ``split_seed`` and ``impl``, stay out of the key)."""
    run, ref = m.Run("extreme", 1, "SF", "cwtm", "arc", 1), m.Run("extreme", 0, None, "mean", "none", 1)
    assert common.run_key(run, common.Setting()) == "6c13b01eb03290979b55"
    assert common.run_key(ref, common.Setting()) == "55c315806950876687ef"
    assert common.run_key(run, common.Setting(robust_comm="gather")) == "336ec0229781dc5e3b84"
    assert common.run_key(run, common.Setting(init_jitter=1e-7)) == "d8f6b4bd25138977c8a3"
    assert common.run_key(replace(run, split_seed=None, impl="ours"), common.Setting()) == "6c13b01eb03290979b55"


def _key_before(run: m.Run, setting: common.Setting) -> str:
    """The cache key as it was computed before split seeds, ByzFL runs and attack revisions existed."""
    fields = {k: v for k, v in asdict(setting).items() if (k, v) not in {("robust_comm", "sharded"),
                                                                          ("init_jitter", 0.0)}}
    old = {k: v for k, v in asdict(run).items() if k not in ("split_seed", "impl")}
    return hashlib.sha256((repr(sorted(old.items())) + repr(sorted(fields.items()))).encode()).hexdigest()[:20]


def test_changed_or_new_runs_get_new_keys():
    setting = common.Setting()
    for attack in ("SF", "LF", "Mimic", None):  # unchanged: the keys they had
        run = m.Run("a=0.5", 2 if attack else 0, attack, "geomed" if attack else "mean", "clip", 2)
        assert common.run_key(run, setting) == _key_before(run, setting)
    for attack in ("FOE-LS", "ALIE-LS"):  # their search changed: new keys, so no stale run is reused
        run = m.Run("extreme", 1, attack, "cwtm", "arc", 1)
        assert common.run_key(run, setting) != _key_before(run, setting)
    run = m.Run("a=0.1", 1, "SF", "cwtm", "arc", 1)
    keys = {common.run_key(r, setting) for r in (run, replace(run, split_seed=7), replace(run, seed=7),
                                                  replace(run, attack="FOE-LS-bf"),
                                                  replace(run, attack="FOE-LS-bf", impl="byzfl"))}
    assert len(keys) == 5


def test_split_seeds_pair_with_the_training_seeds():
    def splits(**kw):
        runs = m.build_runs(["extreme", "a=0.1"], [1], ["SF"], ["cwtm"], ["arc"], [1, 2, 3], 10, baseline=False, **kw)
        return [(r.het, r.seed, r.split_seed, common.split_seed_of(r)) for r in runs]

    # default: split seed = training seed, stored as None (the key of the runs cached before)
    assert splits() == [("extreme", s, None, s) for s in (1, 2, 3)] + [("a=0.1", s, None, s) for s in (1, 2, 3)]
    # one split for every training seed; the extreme split has no seed
    assert splits(split_seeds=[7]) == [("extreme", s, None, s) for s in (1, 2, 3)] + [
        ("a=0.1", s, 7, 7) for s in (1, 2, 3)]
    assert splits(split_seeds=[5, 2, 9])[3:] == [("a=0.1", 1, 5, 5), ("a=0.1", 2, None, 2), ("a=0.1", 3, 9, 9)]
    with pytest.raises(ValueError, match="one per seed"):
        splits(split_seeds=[1, 2])
    data = common.load_data()
    # the split follows the split seed, not the training seed
    a, b = (m.Run("a=0.1", 1, "SF", "cwtm", "arc", s, split_seed=7) for s in (1, 2))
    assert common.shard_sizes(data, "a=0.1", 10, common.split_seed_of(a)) == common.shard_sizes(
        data, "a=0.1", 10, common.split_seed_of(b))
    sizes = common.shard_sizes(data, "a=0.1", 10, 7)
    assert sum(sizes) == len(data.train_y) and sizes != common.shard_sizes(data, "a=0.1", 10, 8)


def test_impl_byzfl_only_for_its_attacks():
    runs = m.build_runs(["extreme"], [1], ["SF", "FOE-LS", "FOE-LS-bf", "ALIE-LS-bf"], ["cwtm"], ["arc"], [1], 10,
                        baseline=False, impls=("ours", "byzfl"))
    assert sorted(r.attack_label for r in runs) == ["ALIE-LS-bf", "ALIE-LS-bf (ByzFL code)", "FOE-LS", "FOE-LS-bf",
                                                    "FOE-LS-bf (ByzFL code)", "SF"]
    with pytest.raises(ValueError, match="ByzFL's implementation covers"):
        common.attack_transforms("FOE-LS", [10], impl="byzfl")


def _sends(run, steps: int, shared: bool, setting=None) -> list[torch.Tensor]:
    """What every rank sends at each of ``steps`` steps of random gradients, through the run's chains."""
    setting = setting or common.Setting()
    config = run.config(setting)
    made = run.transforms()
    wrap = [common.SharedAttack(t) if shared and common.SharedAttack.applies(t) else None for t in made]
    chains = [config.send_chain([w or t for w, t in zip(wrap, run.transforms())]) for _ in range(run.n)]
    gen = torch.Generator().manual_seed(0)
    params = [torch.zeros(40) for _ in range(run.n)]  # one parameter per rank for every step: momentum follows it
    out = []
    for step in range(steps):
        g = torch.randn(run.n, 40, generator=gen) * torch.linspace(0.5, 2.0, run.n).unsqueeze(1)
        bufs = [common.SendBuffers([g[r].clone()], [[params[r]]]) for r in range(run.n)]
        out.append(common.simulate_sends(chains, bufs, step, pipeline.server_aggregation(config)))
    return out


@pytest.mark.parametrize("attack", ["ALIE-LS", "FOE-LS-bf", "FOE-LS-1s", "Mimic"])
def test_shared_attack_sends_the_same_bits(attack):
    # In simulation the omniscient attack is computed once per step for its f = 3 ranks: the same bits as f times.
    run = m.Run("extreme", 3, attack, "cwtm", "arc", 1, honest=4)
    plain, shared = _sends(run, 4, shared=False), _sends(run, 4, shared=True)
    for a, b in zip(plain, shared):
        assert torch.equal(a, b)
        assert torch.equal(b[4], b[5]) and torch.equal(b[4], b[6])


def test_one_sided_attacks_keep_to_their_side():
    # FOE-LS-1s sends -eps * mean(honest) with eps >= 0, ALIE-LS-1s mean + |z| * std (population): every step,
    # our search kept to that side against the row's own pipeline (FOE-LS: the same search over both signs).
    # FOE-LS-1s-fine: the same one-sided search on the twelve magnitudes of FOE_FINE_GRID.
    for attack, family in (("FOE-LS-1s", "foe"), ("ALIE-LS-1s", "alie"), ("FOE-LS", "foe"), ("FOE-LS-1s-fine", "foe")):
        run = m.Run("extreme", 2, attack, "cwtm", "arc", 1, honest=4)
        factors = []
        spec = common.ATTACKS[attack]
        assert spec is not None
        for sent in _sends(run, 6, shared=False):
            honest, byz = sent[:4], sent[4]
            res = line_search(family, honest, 2, pipeline.server_aggregation(run.config(common.Setting())),
                              search="ours", sign=spec.get("sign", 0), grid=spec.get("grid"))
            assert torch.equal(byz, res.vector(family, honest))
            factors.append(res.factor)
        if attack.startswith("FOE-LS-1s"):
            assert min(factors) >= 0 and max(factors) > 0
        elif attack == "ALIE-LS-1s":
            assert max(factors) <= 0 and min(factors) < 0


# ----------------------------------------------------------------------------- ByzFL, the reference

try:
    common.byzfl_attacks()
    HAVE_BYZFL = True
except ModuleNotFoundError:
    HAVE_BYZFL = False
needs_byzfl = pytest.mark.skipif(
    not HAVE_BYZFL, reason=f"ByzFL is not installed (pip install --no-deps byzfl=={common.BYZFL_VERSION}; its "
    "attacks need numpy and scipy, the [bench] extra)")


@needs_byzfl
def test_alie_and_foe_definitions_equal_byzfl():
    b = common.byzfl_attacks()
    gen = torch.Generator().manual_seed(1)
    for trial in range(25):
        h = 2 + trial % 9
        honest = torch.randn(h, 300, generator=gen) * torch.rand(1, 300, generator=gen) * 4 + torch.randn(
            1, 300, generator=gen)
        tau = float(torch.randn(1, generator=gen) * 10 ** (trial % 5))
        # ByzFL's ALIE is mean + tau * (sample std): the library's z = -tau with correction = 1, bit for bit
        assert torch.equal(alie(honest, z=-tau, correction=1), b.ALittleIsEnough(tau=tau)(honest))
        assert torch.equal(foe(honest, eps=tau), b.InnerProductManipulation(tau=tau)(honest))
        # the population std differs from ByzFL's by sqrt((h - 1) / h) exactly as defined
        torch.testing.assert_close(alie(honest, z=-tau) - honest.mean(dim=0),
                                   (b.ALittleIsEnough(tau=tau)(honest) - honest.mean(dim=0)) * math.sqrt((h - 1) / h))


@needs_byzfl
@pytest.mark.parametrize("attack", ["foe", "alie"])
def test_byzfl_style_search_sends_byzfls_vector(attack):
    b = common.byzfl_attacks()
    cls = b.Optimal_InnerProductManipulation if attack == "foe" else b.Optimal_ALittleIsEnough
    gen = torch.Generator().manual_seed(2)
    for trial in range(16):
        h, f = 5 + trial % 4, 1 + trial % 3
        honest = torch.randn(h, 60, generator=gen) * torch.rand(1, 60, generator=gen) * 3 + torch.randn(
            1, 60, generator=gen)
        rule = ["cwtm", "geomed", "multikrum", "median"][trial % 4]
        agg = functools.partial(aggregate, rule=rule, num_byzantine=f, nnm=trial % 2 == 0, arc=trial % 3 == 0,
                                static_clip=2.0 if trial % 5 == 0 else None)
        expected = cls(agg=agg, pre_agg_list=[], f=f)(honest)
        res = line_search(attack, honest, f, agg, search="byzfl")
        assert torch.equal(res.vector(attack, honest), expected)
        assert res.evaluations <= 20  # ByzFL's 20 aggregations, each factor once


@needs_byzfl
def test_byzfl_code_runs_send_the_library_bits():
    # The study's ByzFL-code transform and the library's ByzFL-style search send the same vectors, step by step
    # (worker momentum, ARC > NNM > geomed, f = 2), and the transform's own per-step check finds no difference.
    runs = [m.Run("extreme", 2, a, "geomed", "arc", 1, honest=5) for a in ("ALIE-LS-bf", "FOE-LS-bf")]
    for run in runs:
        lib, ref = _sends(run, 4, shared=True), _sends(replace(run, impl="byzfl"), 4, shared=True)
        for a, b in zip(lib, ref):
            assert torch.equal(a, b)
    t = common.ByzflAttack("alie", [5, 6])
    run = replace(runs[0], impl="byzfl")
    config = run.config(common.Setting())
    chains = [config.send_chain([t]) for _ in range(run.n)]
    g = torch.randn(run.n, 30, generator=torch.Generator().manual_seed(3))
    common.simulate_sends(chains, [common.SendBuffers([g[r].clone()], [[torch.zeros(30)]]) for r in range(run.n)],
                          0, pipeline.server_aggregation(config))
    assert t.stats["steps"] == 2  # both Byzantine ranks, unshared
    assert t.stats["search_max_abs_diff"] == 0.0 and t.stats["fixed_max_abs_diff"] == 0.0
    assert t.stats["extra_evals"] == 0 and t.stats["byzfl_evals"] == 40


def test_missing_byzfl_says_how_to_install(monkeypatch):
    monkeypatch.delitem(sys.modules, "byzfl", raising=False)
    monkeypatch.setattr(common.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps byzfl==0\.0\.11"):
        common.byzfl_attacks()
    with pytest.raises(SystemExit):
        m.parse_args(["--attack-impl", "both"])


def test_ddp_cells_list_the_runs_of_each_cell_and_the_references():
    # --ddp-cells: each cell with its own attack, every seed, and each heterogeneity's f = 0 reference once.
    runs = m.build_cell_runs(["extreme/3/arc/geomed/ALIE-LS-1s", "a=0.1/4/none/cwtm/FOE-LS-1s",
                              "extreme/1/arc+clip/multikrum/SF"], [1, 2], 10)
    refs = [m.Run(h, 0, None, "mean", "none", s, 10) for h in ("extreme", "a=0.1") for s in (1, 2)]
    cells = [m.Run("extreme", 3, "ALIE-LS-1s", "geomed", "arc", s, 10) for s in (1, 2)] + [
        m.Run("a=0.1", 4, "FOE-LS-1s", "cwtm", "none", s, 10) for s in (1, 2)] + [
        m.Run("extreme", 1, "SF", "multikrum", "arc+clip", s, 10) for s in (1, 2)]
    assert sorted(runs, key=repr) == sorted(refs + cells, key=repr) and len(set(runs)) == len(runs)
    assert m.parse_cell(" a=0.5/3/arc+clip/geomed/FOE-LS-1s-fine") == ("a=0.5", 3, "arc+clip", "geomed",
                                                                       "FOE-LS-1s-fine")
    for bad, words in (("extreme/3/arc/geomed", "HET/F/PRE/RULE/ATTACK"), ("moon/3/arc/cwtm/SF", "HET 'moon'"),
                       ("extreme/0/arc/cwtm/SF", "F must be"), ("extreme/x/arc/cwtm/SF", "F must be"),
                       ("extreme/3/arc/median/SF", "RULE 'median'"), ("extreme/3/arc/cwtm/boom", "ATTACK 'boom'"),
                       ("extreme/3/never/cwtm/SF", "PRE 'never'")):
        with pytest.raises(ValueError, match=re.escape(words)):
            m.parse_cell(bad)
    for argv in (["--ddp-cells", "extreme/3/arc/cwtm/SF,extreme/3/arc/cwtm/boom"], ["--cells", "extreme/3/arc/cwtm"],
                 ["--cells", "extreme/3/arc/cwtm/SF", "--attack-impl", "both"]):
        with pytest.raises(SystemExit):
            m.parse_args(argv)
    assert m.parse_args(["--ddp-cells", "extreme/3/arc/cwtm/SF"]).ddp_cells == "extreme/3/arc/cwtm/SF"


def test_cells_tables_show_each_listed_cell_with_its_own_attack(tmp_path):
    # --cells: the table has the listed cells' rows and columns, a dash where no cell was listed, and each cell's
    # worst case over its own attack only (the SF run of the first cell is cached but not listed: not taken).
    setting, cache, out = common.Setting(), str(tmp_path / "cache"), tmp_path / "out"
    cells = ["extreme/3/arc/cwtm/FOE-LS-1s", "a=0.1/4/none/geomed/LF"]
    runs = m.build_cell_runs(cells, [1, 2], 10) + [m.Run("extreme", 3, "SF", "cwtm", "arc", 1, 10)]
    for run in runs:
        acc = {None: 0.95, "FOE-LS-1s": 0.4 + 0.1 * run.seed, "LF": 0.3, "SF": 0.1}[run.attack]
        common.save_result(common.cache_path(cache, "sim", run, setting), common.Result(run, [acc], 1.0, 200))
    m.main(["--mode", "sim", "--cached-only", "--cache", cache, "--out", str(out), "--seeds", "1,2", "--cells",
            ",".join(cells)])
    md = (out / "robustness.md").read_text()
    (_, header, rows), (_, _, attacks) = [t for t in _tables(md) if t[1][0] == "aggregation"][:2]
    assert header == ["aggregation", "extreme f=3", "a=0.1 f=4"]
    assert rows == [["ARC > NNM > cwtm", "0.550 (0.50-0.60)", "—"], ["NNM > geomed", "—", "0.300 (0.30-0.30)"]]
    assert attacks == [["ARC > NNM > cwtm", "FOE-LS-1s", "—"], ["NNM > geomed", "—", "LF"]]
    assert "of the worst attack each listed cell ran" in md


def test_bad_arguments_are_rejected():
    with pytest.raises(SystemExit):
        m.parse_args(["--attacks", "SF,boom"])
    with pytest.raises(SystemExit):
        m.parse_args(["--pres", "arc,never"])
    with pytest.raises(SystemExit):
        m.parse_args(["--beta", "1.0"])
    with pytest.raises(SystemExit):
        m.parse_args(["--seeds", "1,2,3", "--split-seeds", "4,5"])
    for argv in (["--name", "results/robustness"], ["--name", ""]):
        with pytest.raises(SystemExit):
            m.parse_args(argv)
    for argv in (["--cached-only", "--mode", "sim"], ["--cached-only", "--mode", "both"]):  # no cache
        with pytest.raises(SystemExit):
            m.parse_args(argv)
