"""benchmarks/tuning_free.py: ``--quick`` reports every task, schedule and method from real runs; the ratio
statistics are right on hand values; ClipThresholdFinder in a Trainer picks the plain-loop search's threshold."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import tuning_free as tf
from tests.helpers.models import ROOT, quick_benchmark

SETTINGS = [(task, sched) for task in tf.TASKS for sched in tf.SCHEDULES]


def _tables(md: str) -> dict[str, list[dict[str, str]]]:
    """Every markdown table, as rows keyed by the header, under the heading of its section."""
    out: dict[str, list[dict[str, str]]] = {}
    section, lines = "", []
    for ln in md.splitlines() + [""]:
        if ln.startswith("## "):
            section = ln[3:]
        if ln.startswith("|"):
            lines.append(ln)
        elif lines:
            head = [c.strip() for c in lines[0].strip().strip("|").split(" | ")]
            rows = [[c.strip() for c in x.strip().strip("|").split(" | ")] for x in lines[2:]]
            assert all(len(r) == len(head) for r in rows), lines
            out[section] = [dict(zip(head, r)) for r in rows]
            lines = []
    return out


def _section(task: str, sched: str) -> str:
    return f"`{task}`, {sched} learning rate: {tf.TASKS[task].title}"


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    return quick_benchmark("tuning_free", tmp_path_factory, min_png_bytes=10_000, wall_time="Total wall time:")


def test_summary_has_a_row_per_task_and_schedule(quick_report):
    _, md, stdout = quick_report
    assert "## Summary" in stdout
    rows = _tables(md)["Summary"]
    assert [(r["task"], r["schedule"]) for r in rows] == SETTINGS
    for r in rows:
        diverged = re.fullmatch(r"(\d+)/3", r["finder diverged"])
        assert diverged, r
        ratio = r["finder / tuned: geo. mean [90% CI]"]
        m = re.fullmatch(r"([0-9.]+) \[([0-9.]+), ([0-9.]+)\]", ratio)
        if int(diverged.group(1)):
            assert ratio.startswith("inf") or ratio == "diverged"
            assert r["meets the target"].startswith("**no**")
            continue
        gm, lo, hi = (float(x) for x in m.groups())
        assert lo <= gm <= hi
        limit = 1.05 if r["task"].startswith("lm") else 1.2
        assert (r["meets the target"] == "yes") == (gm <= limit and hi <= 1.5), r
        assert int(r["extra steps (+ probe batches)"].split()[0]) > 0
        assert float(r["tuned fixed (grid, tuning seeds)"]) in tf.TASKS[r["task"]].grid[::3]


def test_every_method_has_a_row(quick_report):
    _, md, _ = quick_report
    tables = _tables(md)
    for task, sched in SETTINGS:
        rows = tables[_section(task, sched)]
        names = [r["method"] for r in rows]
        assert names[0].startswith("tuned fixed ") and rows[0]["x tuned: geo. mean [90% CI]"] == "1 (reference)"
        assert names[1:] == [tf.CONTROL] + [n for n, _ in tf.BASELINES] + [n for n, _ in tf.FINDERS] + [tf.EQUAL_STEPS]
        for r in rows:  # the baselines at their defaults on the first seed only
            seeds = 1 if r["method"] in dict(tf.BASELINES) else 3
            assert re.fullmatch(rf"[0-{seeds}]/{seeds}", r["diverged"]), r


def test_numbers_come_from_real_runs(quick_report):
    """The tables' values are the cached runs' results, and each search's run at the chosen threshold is the
    first steps of the training run at that threshold (same weights, batches and schedule)."""
    out, md, _ = quick_report
    results = [json.loads(p.read_text()) for p in (out / "cache").glob("*.json")]
    train = {(r["job"]["task"], r["job"]["schedule"], tuple(r["job"]["spec"]), r["job"]["seed"], r["job"]["steps"]):
             r["result"] for r in results if r["job"]["kind"] == "train"}
    finds = [r for r in results if r["job"]["kind"] == "find"]
    # one search per rule and seed, except at a constant rate, where a compressed schedule is the plain one
    keys = {tf._key(tf.find_job(task, tf.quick_settings()[0][task], s, sched, {**f, **tf.quick_settings()[1]}))
            for task, sched in SETTINGS for _, f in tf.FINDERS for s in (0, 1, 2)}
    compressed = sum(f.get("horizon") == "compressed" for _, f in tf.FINDERS)
    assert len(keys) == len(SETTINGS) * 3 * len(tf.FINDERS) - len(tf.TASKS) * 3 * compressed
    assert {tf._key(f["job"]) for f in finds} == keys
    tables = _tables(md)
    for task, sched in SETTINGS:
        steps = tf.quick_settings()[0][task]["steps"]
        tuned_row = tables[_section(task, sched)][0]
        c = float(tuned_row["method"].removeprefix("tuned fixed "))
        finals = [train[task, sched, ("fixed", c), s, steps]["final_val"] for s in (0, 1, 2)]
        for s in (0, 1, 2):
            run = train[task, sched, ("fixed", c), s, steps]
            assert len(run["losses"]) == steps and len(run["norms"]) == steps and run["cpu_s"] > 0
        assert float(tuned_row["final " + tf.TASKS[task].metric + ": mean (min-max)"].split()[0]) == \
            pytest.approx(np.mean(finals), rel=1e-3)
    for f in finds:
        job, res = f["job"], f["result"]
        assert res["candidates"][res["chosen"]] == res["threshold"]
        run = train[job["task"], job["schedule"], ("fixed", res["threshold"]), job["seed"], job["cfg"]["steps"]]
        searched = res["losses"][res["chosen"]]
        if job["finder"].get("horizon") == "compressed":  # the cosine compressed into the run: the same first
            # two steps (the first update is at the schedule's first rate), then faster decay
            assert searched[:2] == run["losses"][:2] and searched[2:] != run["losses"][2: len(searched)]
        else:
            assert searched == run["losses"][: len(searched)]
        assert res["extra_steps"] == sum(len(x) for x in res["losses"])


def test_ratio_statistics_on_hand_values():
    gm, lo, hi = tf.gm_ratio([2.0, 8.0], [1.0, 2.0])
    assert gm == pytest.approx(math.sqrt(2.0 * 4.0)) and 2.0 - 1e-12 <= lo <= gm <= hi <= 4.0 + 1e-12
    assert tf.gm_ratio([1.0, 1.0, 1.0], [1.0, 1.0, 1.0]) == (1.0, 1.0, 1.0)
    assert tf.gm_ratio([math.inf, 1.0], [1.0, 1.0]) == (math.inf, math.inf, math.inf)
    sweep = {0.1: [1.0, 1.0], 1.0: [0.5, 2.0], 10.0: [0.1, math.inf]}  # geometric means 1.0, 1.0, inf
    assert tf.tuned_threshold([0.1, 1.0, 10.0], sweep) == 0.1  # a tie goes to the smaller threshold
    sweep[1.0] = [0.5, 1.0]
    assert tf.tuned_threshold([0.1, 1.0, 10.0], sweep) == 1.0


def test_lightning_finder_picks_the_plain_search_threshold(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.tuning_free", "--quick", "--lightning-check",
                           "--tasks", "adding", "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    m = re.search(r"ClipThresholdFinder chose ([0-9.e+-]+), the plain-loop search ([0-9.e+-]+); probe median "
                  r"([0-9.e+-]+) and ([0-9.e+-]+); (\d+) candidates, largest relative score difference (\S+)",
                  proc.stdout)
    assert m, proc.stdout
    assert m.group(1) == m.group(2) and m.group(3) == m.group(4) and int(m.group(5)) >= 5
    assert float(m.group(6)) < 1e-6
