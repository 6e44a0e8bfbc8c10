"""The two-task clipping study runs end to end (``--quick``) and reports sane numbers.

It checks the report's shape and sanity, not which method wins.
"""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

import pytest

from tests.helpers.models import quick_benchmark

TASK_SWEEPS = {"adding": ["0.1", "0.3", "1"], "digits": ["3", "30"]}  # the --quick sweeps
ADAPTIVE_PREFIXES = [
    "GradientClipping(fixed=",
    "Percentile() defaults",
    "Percentile(history='clipped')",
    "Percentile p90, no warmup",
    "Percentile p90, no warmup, history='clipped'",
    "Percentile p10, no warmup",
    "ZScore() defaults",
    "ZScore(history='clipped')",
    "ZScore(max_norm=None)",
    "ZScore(max_norm=None, history='clipped')",
    "Quantile() defaults",
    "Quantile(quantile=0.9)",
    "Quantile(quantile=0.1, learning_rate=0.05)",
    "AdaptiveGradientClipping() defaults",
    "AdaGCClipping() defaults",
]


def _zclip_installed() -> bool:
    return importlib.util.find_spec("zclip") is not None


def _tables(md: str) -> dict[str, tuple[list[str], list[list[str]]]]:
    """Every markdown table, keyed by the heading of its section ("both" or the task's key)."""
    out: dict[str, tuple[list[str], list[list[str]]]] = {}
    section = None
    lines: list[str] = []
    for ln in md.splitlines() + [""]:
        if ln.startswith("## "):
            m = re.match(r"## Task `(\w+)`", ln)
            section = m.group(1) if m else "both"
        if ln.startswith("|"):
            lines.append(ln)
        elif lines:
            header = [c.strip() for c in lines[0].strip("|").split(" | ")]
            rows = [[c.strip() for c in x.strip().strip("|").split(" | ")] for x in lines[2:]]
            for r in rows:
                assert len(r) == len(header), r
            assert section is not None and section not in out
            out[section] = (header, rows)
            lines = []
    return out


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory) -> tuple[Path, str, str]:
    # checks the PNG, the command, the machine and the wall time in the report
    return quick_benchmark("exploding", tmp_path_factory, min_png_bytes=10_000, wall_time="Total wall time:")


def test_quick_prints_the_tables(quick_report):
    out = quick_report[2]
    assert "| method | diverged / seeds |" in out and "| method | adding: diverged |" in out


def test_every_method_has_a_row_on_every_task(quick_report):
    _, md, _ = quick_report
    tables = _tables(md)
    assert set(tables) == {"both", "adding", "digits"}
    has_zclip = _zclip_installed()
    for task, sweep in TASK_SWEEPS.items():
        names = [r[0] for r in tables[task][1]]
        expected = ["none"] + [f"lightning clip_val={v}" for v in sweep] + ADAPTIVE_PREFIXES
        for prefix in expected:
            assert sum(n == prefix or (n.startswith(prefix) and prefix.endswith("=")) for n in names) == 1, (
                task, prefix, names)
        assert any(n.startswith("zclip.") for n in names) == has_zclip
        assert len(names) == len(expected) + int(has_zclip)
    if not has_zclip:
        assert "`zclip` (PyPI) is not installed" in md
    both = [r[0] for r in tables["both"][1]]
    assert both[0].startswith("tuned fixed threshold (adding ") and len(both) == len(ADAPTIVE_PREFIXES) + has_zclip


def test_numbers_are_sane(quick_report):
    _, md, _ = quick_report
    tables = _tables(md)
    for task, metric, target in (("adding", "val MSE", "0.1"), ("digits", "val CE", "0.3")):
        header, rows = tables[task]
        col = {h.split(" (")[0].split(":")[0]: i for i, h in enumerate(header)}
        for r in rows:
            m = re.fullmatch(r"(\d+)/(\d+)", r[col["diverged / seeds"]])
            assert m, r
            diverged, seeds = int(m.group(1)), int(m.group(2))
            assert seeds == 1 and 0 <= diverged <= seeds
            final = r[col[f"final {metric}"]]
            if final == "diverged":
                assert diverged == seeds
            else:
                mean, sd = (float(x) for x in final.split(" ± "))
                assert math.isfinite(mean) and mean >= 0 and math.isfinite(sd) and sd >= 0
            assert 0.0 <= float(r[col["clip rate"]]) <= 1.0
            steps = re.fullmatch(r"(\d+|—) \((\d+)/(\d+)\)", r[col[f"steps to {metric} < {target}"]])
            assert steps and int(steps.group(2)) <= int(steps.group(3)) == seeds
            assert float(r[col["wall s / run"]]) >= 0 and float(r[col["ms / step"]]) > 0
        assert float({r[0]: r for r in rows}["none"][col["clip rate"]]) == 0.0


def test_summary_ratios_are_the_task_tables_ratios(quick_report):
    _, md, _ = quick_report
    tables = _tables(md)
    header, rows = tables["both"]
    for task, metric in (("adding", "val MSE"), ("digits", "val CE")):
        t_header, t_rows = tables[task]
        fcol = next(i for i, h in enumerate(t_header) if h.startswith(f"final {metric}"))
        by_name = {r[0]: r for r in t_rows}
        tuned = float(next(r for r in t_rows if r[0].startswith("GradientClipping(fixed="))[fcol].split(" ± ")[0])
        scol = header.index(f"{task}: final {metric} (x tuned)")
        for r in rows[1:]:
            cell = r[scol]
            if cell == "diverged":
                assert by_name[r[0]][fcol] == "diverged"
                continue
            value, ratio = re.fullmatch(r"([0-9.]+) \(([0-9.]+|inf)x\)", cell).groups()
            assert float(value) == pytest.approx(float(by_name[r[0]][fcol].split(" ± ")[0]), abs=1e-4)
            if tuned > 0:
                assert float(ratio) == pytest.approx(float(value) / tuned, abs=0.006)
    for r in rows[1:]:  # the verdict follows from the cells
        cells = [r[header.index(f"{t}: diverged")] for t in ("adding", "digits")]
        ratios = [re.search(r"\(([0-9.]+)x\)", r[header.index(h)]) for h in header if "(x tuned)" in h]
        ok = all(c.startswith("0/") for c in cells) and all(m and float(m.group(1)) <= 1.5 for m in ratios)
        assert r[-1] == ("**yes**" if ok else "no"), r


def test_our_fixed_clipping_matches_lightnings(quick_report):
    """Same seed, same threshold: GradientClipping(fixed=v) reproduces Trainer(gradient_clip_val=v)."""
    _, md, _ = quick_report
    for task, metric in (("adding", "val MSE"), ("digits", "val CE")):
        header, rows = _tables(md)[task]
        col = {h.split(" (")[0]: i for i, h in enumerate(header)}
        ours = next(r for r in rows if r[0].startswith("GradientClipping(fixed="))
        value = re.search(r"fixed=([0-9.e+-]+)\)", ours[0]).group(1)
        lightning = next(r for r in rows if r[0] == f"lightning clip_val={value}")
        for key in ("diverged / seeds", "clip rate"):
            assert ours[col[key]] == lightning[col[key]]
        if ours[col[f"final {metric}"]] != "diverged":
            a = float(ours[col[f"final {metric}"]].split(" ± ")[0])
            b = float(lightning[col[f"final {metric}"]].split(" ± ")[0])
            assert a == pytest.approx(b, rel=1e-3, abs=1e-4)
