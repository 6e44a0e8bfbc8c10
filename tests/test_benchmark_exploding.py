"""The exploding-gradients benchmark runs end to end (``--quick``) and reports sane numbers.

It checks the report's shape and sanity, not which method wins.
"""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

import pytest
from conftest import quick_benchmark

EXPECTED_PREFIXES = [
    "none",
    "lightning clip_val=0.1",
    "lightning clip_val=0.3",
    "lightning clip_val=1",
    "GradientClipping(fixed=",
    "Percentile p90, all history, no warmup",
    "Percentile() defaults",
    "Percentile p90, window=",
    "Percentile p10, all history",
    "Warmup(100 @ 1.0) -> p90 window=",
    "Percentile() p90, warmup 100 @ ",
    "ZScore() defaults",
    "ZScore(max_norm=None)",
]


def _zclip_installed() -> bool:
    return importlib.util.find_spec("zclip") is not None


def _parse_table(md: str) -> tuple[list[str], list[list[str]]]:
    lines = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert lines, "no markdown table in the report"
    header = [c.strip() for c in lines[0].strip("|").split(" | ")]
    rows = [[c.strip() for c in ln.strip().strip("|").split(" | ")] for ln in lines[1:]]
    for r in rows:
        assert len(r) == len(header), r
    return header, rows


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory) -> tuple[Path, str, str]:
    # checks the PNG, the command, the machine and the wall time in the report
    return quick_benchmark("exploding", tmp_path_factory, min_png_bytes=10_000, wall_time="Total wall time:")


def test_quick_prints_the_table(quick_report):
    assert "| method | diverged / seeds |" in quick_report[2]


def test_every_method_has_a_row(quick_report):
    _, md, _ = quick_report
    _, rows = _parse_table(md)
    names = [r[0] for r in rows]
    for prefix in EXPECTED_PREFIXES:
        assert sum(n.startswith(prefix) for n in names) == 1, (prefix, names)
    has_zclip_row = any(n.startswith("zclip.") for n in names)
    assert has_zclip_row == _zclip_installed()
    if not has_zclip_row:
        assert "`zclip` (PyPI) is not installed" in md
    assert len(rows) == len(EXPECTED_PREFIXES) + int(has_zclip_row)


def test_numbers_are_sane(quick_report):
    _, md, _ = quick_report
    header, rows = _parse_table(md)
    col = {h.split(" (")[0].split(":")[0]: i for i, h in enumerate(header)}
    for r in rows:
        m = re.fullmatch(r"(\d+)/(\d+)", r[col["diverged / seeds"]])
        assert m, r
        diverged, seeds = int(m.group(1)), int(m.group(2))
        assert seeds == 1 and 0 <= diverged <= seeds
        final = r[col["final val MSE"]]
        if final == "diverged":
            assert diverged == seeds
        else:
            mean, sd = (float(x) for x in final.split(" ± "))
            assert math.isfinite(mean) and mean >= 0 and math.isfinite(sd) and sd >= 0
        rate = float(r[col["clip rate"]])
        assert 0.0 <= rate <= 1.0
        steps = re.fullmatch(r"(\d+|—) \((\d+)/(\d+)\)", r[col["steps to val MSE < 0.1"]])
        assert steps and int(steps.group(2)) <= int(steps.group(3)) == seeds
        assert float(r[col["wall s / run"]]) >= 0 and float(r[col["ms / step"]]) > 0
    by_name = {r[0]: r for r in rows}
    assert float(by_name["none"][col["clip rate"]]) == 0.0


def test_our_fixed_clipping_matches_lightnings(quick_report):
    """Same seed, same threshold: GradientClipping(fixed=v) reproduces Trainer(gradient_clip_val=v)."""
    _, md, _ = quick_report
    header, rows = _parse_table(md)
    col = {h.split(" (")[0]: i for i, h in enumerate(header)}
    ours = next(r for r in rows if r[0].startswith("GradientClipping(fixed="))
    value = re.search(r"fixed=([0-9.e+-]+)\)", ours[0]).group(1)
    lightning = next(r for r in rows if r[0] == f"lightning clip_val={value}")
    for key in ("diverged / seeds", "clip rate"):
        assert ours[col[key]] == lightning[col[key]]
    if ours[col["final val MSE"]] != "diverged":
        a = float(ours[col["final val MSE"]].split(" ± ")[0])
        b = float(lightning[col["final val MSE"]].split(" ± ")[0])
        assert a == pytest.approx(b, rel=1e-3, abs=1e-4)
