"""Each figure the site or the README quotes is in the committed results file it names."""

from __future__ import annotations

import re

import pytest

from tests.docs.conftest import require
from tests.helpers import docs

require("mkdocs")
from docs import hooks  # noqa: E402  (the site's own check, run here on every page and on the README)

RESULTS = """| method | val loss | skipped |
|---|---|---|
| no guard | 1.800, 1.803 | 0 / 60 |
| SpikeGuard loss | 1.796, 1.800 | 60 / 60 |
| SpikeGuard loss, scale='log' | 1.797 | 60 / 60 |
ratio ours / torch: 0.783  (target <= 1.10)
Total wall time: 2,799 s
"""


def test_a_figure_is_its_numbers_as_written_or_rounded():
    assert hooks.figure_problem("0.783x", RESULTS) is None
    assert hooks.figure_problem("0.78x", RESULTS) is None  # rounded from 0.783
    assert hooks.figure_problem("2,799 s", RESULTS) is None
    assert "0.79" in hooks.figure_problem("0.79x", RESULTS)  # 0.783 does not round to it
    assert "0.7831" in hooks.figure_problem("0.7831", RESULTS)  # more digits than the file has
    assert "has no number" in hooks.figure_problem("most", RESULTS)


def test_a_row_title_pins_the_figure_to_its_row():
    assert hooks.figure_problem("60 / 60", RESULTS, "SpikeGuard loss") is None
    assert hooks.figure_problem("0 / 60", RESULTS, "SpikeGuard loss").startswith("0 of '0 / 60'")  # the no-guard row
    assert hooks.figure_problem("1.796", RESULTS, "SpikeGuard loss") is None
    assert hooks.figure_problem("1.797", RESULTS, "scale='log'") is None  # no exact cell: the lines containing it
    assert "no line" in hooks.figure_problem("1.8", RESULTS, "clip 1.0")


def _figures(path):
    """``(figure, results file, row)`` of every quoted figure of ``path``: ``[f](results:NAME "row")`` links, and in
    the README links into ``benchmarks/results/`` whose text holds a number."""
    text = docs.prose(path)
    found = [(m["figure"], m["name"], m["row"]) for m in hooks.FIGURE.finditer(text)]
    for m in re.finditer(r"\[(?P<figure>[^\]\n]*\d[^\]\n]*)\]\((?:\.\./)*benchmarks/results/(?P<name>[\w.-]+)"
                         r'(?: "(?P<row>[^"\n]+)")?\)', text):
        if not m["figure"].strip("`").startswith("benchmarks/"):
            found.append((m["figure"], m["name"], m["row"]))
    return found


@pytest.mark.parametrize("path", docs.markdown_files(), ids=docs.label)
def test_every_quoted_figure_is_in_its_results_file(path):
    problems = []
    for figure, name, row in _figures(path):
        results = hooks.RESULTS_DIR / name
        if not results.is_file():
            problems.append(f"{figure}: benchmarks/results/{name} does not exist")
            continue
        problem = hooks.figure_problem(figure, results.read_text(encoding="utf-8"), row)
        if problem:
            problems.append(f"{problem} (benchmarks/results/{name})")
    assert not problems, f"{docs.label(path)}:\n" + "\n".join(problems)


def test_the_benchmark_pages_show_every_results_file_once():
    shown = [name for page in docs.DOCS.rglob("*.md") for name in hooks.included_results(page.read_text())]
    committed = sorted(p.name for p in hooks.RESULTS_DIR.iterdir() if p.suffix != ".png")
    assert sorted(set(shown) & set(committed)) == committed, f"not shown: {sorted(set(committed) - set(shown))}"
    assert len(shown) == len(set(shown)), "a results file is shown on two pages"
