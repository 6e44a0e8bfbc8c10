"""`lightning-clip report` and the reading/summarising logic behind it; the TensorBoard layout; the demo's logs."""

from __future__ import annotations

import contextlib
import io
import math
import re

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from lightning_clip import GradientClipping, GradientNormMonitor
from lightning_clip.callbacks.tb_layout import build_layout, write_layout
from lightning_clip.tools.cli import main
from lightning_clip.tools.report import (
    clip_rate_advice,
    clip_rate_band,
    find_runs,
    format_report,
    load_reports,
    plot_report,
    read_scalars,
    summarize,
)
from tests.helpers.models import TinyRegressor, make_loader, make_trainer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _independent_scalars(run_dir) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read every scalar straight from the event files (not through lightning_clip.tools.report)."""
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        out[tag] = (np.array([e.step for e in events]), np.array([e.value for e in events], dtype=np.float64))
    return out


# ---------------------------------------------------------------------------------------------------
# Clip-rate interpretation.


@pytest.mark.parametrize(
    ("rate", "band", "words"),
    [
        (0.0, "< 1%", "too high"),
        (0.005, "< 1%", "too high"),
        (0.03, "1-5%", "rare"),
        (0.10, "5-25%", "healthy"),
        (0.30, "25-50%", "lower learning rate"),
        (0.75, "> 50%", "excessive"),
        (1.0, "> 50%", "excessive"),
    ],
)
def test_clip_rate_bands(rate, band, words):
    assert clip_rate_band(rate) == band
    assert words in clip_rate_advice(rate)


# ---------------------------------------------------------------------------------------------------
# Synthetic runs with known numbers: two optimizers, per-parameter norms, a NaN step, ARC tags.

PRE0 = [2.0, 0.5, float("nan"), 4.0, 1.0]
THR0 = [1.0, 1.0, 1.0, 1.0, 1.0]
POST0 = [1.0, 0.5, float("nan"), 1.0, 1.0]
RATE0 = [1.0, 0.5, 1 / 3, 0.5, 0.4]  # the callback's cumulative clip rate
PRE1 = [0.1, 0.2, 0.3, 0.4, 0.5]
THR1 = [0.25] * 5
POST1 = [0.1, 0.2, 0.25, 0.25, 0.25]
RATE1 = [0.0, 0.0, 1 / 3, 0.5, 0.6]
SKIPPED = [0.0, 0.0, 1.0, 1.0, 1.0]
ARC_THR = [1.0, 2.0, 1.5, 1.0, 1.0]
ARC_CLIPPED = [1.0, 0.0, 1.0, 2.0, 0.0]
ARC_RANKS = {0: [0.5, 1.0, 1.0, 1.0, 0.5], 1: [0.6, 2.0, 1.5, 1.0, 0.7], 2: [5.0, 1.0, 3.0, float("inf"), 0.9]}
PARAM = {"net.0.weight_opt0": [1.5, 0.4, float("nan"), 3.9, 0.9], "net.2.bias_opt0": [0.1, 0.1, 0.1, 0.1, 0.1]}


def _series() -> dict[str, list[float]]:
    data = {
        "grad_norm/total_opt0": PRE0, "grad_clip/threshold_opt0": THR0, "grad_norm/clipped_total_opt0": POST0,
        "grad_clip/clip_rate_opt0": RATE0, "grad_norm/total_opt1": PRE1, "grad_clip/threshold_opt1": THR1,
        "grad_norm/clipped_total_opt1": POST1, "grad_clip/clip_rate_opt1": RATE1,
        "grad_nonfinite/skipped_opt0": SKIPPED, "arc/threshold": ARC_THR, "arc/clipped_ranks": ARC_CLIPPED,
        "train/loss": [1.0, 0.9, 0.8, 0.7, 0.6],
    }
    data.update({f"arc/norm_rank{r}": v for r, v in ARC_RANKS.items()})
    data.update({f"grad_norm/{k}": v for k, v in PARAM.items()})
    return data


def _write_tensorboard(run_dir) -> None:
    writer = SummaryWriter(str(run_dir))
    for tag, values in _series().items():
        for step, v in enumerate(values):
            writer.add_scalar(tag, v, 10 * step)
    writer.close()


def _write_csv(run_dir) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    series = _series()
    keys = sorted(series)
    lines = [",".join(["epoch", "step", *keys])]
    for step in range(5):
        lines.append(",".join(["0", str(10 * step), *(repr(float(series[k][step])) for k in keys)]))
    lines.append(",".join(["0", "40", *("" for _ in keys)]))  # an epoch-end row: empty cells are skipped
    (run_dir / "metrics.csv").write_text("\n".join(lines) + "\n")


def _check_synthetic(report) -> None:
    assert [h.optimizer for h in report.optimizers] == [0, 1]
    h0, h1 = report.optimizers
    finite0 = [v for v in PRE0 if math.isfinite(v)]
    assert h0.logged_steps == 5 and (h0.first_step, h0.last_step) == (0, 40)
    assert h0.clip_rate == pytest.approx(0.4)
    assert h0.clipped_logged == pytest.approx(2 / 5)  # 2.0 -> 1.0 and 4.0 -> 1.0
    assert h0.mean_norm == pytest.approx(np.mean(finite0))
    assert h0.median_norm == pytest.approx(np.median(finite0))
    assert h0.max_norm == pytest.approx(4.0)
    assert h0.nonfinite_steps == 1 and h0.skipped_steps == 1
    assert h0.mean_threshold == pytest.approx(1.0)
    assert h0.band == clip_rate_band(0.4) == "25-50%"
    assert h0.top_parameters[0][0] == "net.0.weight"
    assert h0.top_parameters[0][1] == pytest.approx(3.9)
    assert h1.clip_rate == pytest.approx(0.6) and h1.advice == clip_rate_advice(0.6)
    assert h1.mean_norm == pytest.approx(0.3) and h1.max_norm == pytest.approx(0.5)
    assert h1.clipped_logged == pytest.approx(3 / 5)
    assert h1.skipped_steps is None and h1.nonfinite_steps == 0
    arc = report.arc
    assert arc is not None and arc.logged_steps == 5
    assert arc.mean_clipped_ranks == pytest.approx(0.8)
    assert arc.max_clipped_ranks == 2
    assert arc.steps_with_clipping == pytest.approx(3 / 5)
    assert arc.mean_threshold == pytest.approx(np.mean(ARC_THR))
    assert arc.rank_mean_norm[1] == pytest.approx(np.mean(ARC_RANKS[1]))
    assert arc.rank_mean_norm[2] == pytest.approx(np.mean([5.0, 1.0, 3.0, 0.9]))  # inf left out
    # rank 2: 5 > 1, 1 < 2, 3 > 1.5, inf, 0.9 < 1  -> 3 of 5
    assert arc.rank_clip_fraction == {0: 0.0, 1: 0.0, 2: pytest.approx(0.6)}  # ties are not clipped
    text = format_report(report)
    assert "optimizer 0" in text and "optimizer 1" in text
    assert "40.0% [25-50%]" in text and "60.0% [> 50%]" in text
    assert "skipped steps: 1" in text and "ARC" in text and "rank 2" in text


def test_summary_of_a_tensorboard_run_with_two_optimizers_and_arc(tmp_path):
    _write_tensorboard(tmp_path / "tb" / "version_0")
    (run,) = find_runs(tmp_path / "tb")
    report = summarize(read_scalars(run), run)
    _check_synthetic(report)


def test_summary_of_a_csv_run_equals_the_tensorboard_one(tmp_path):
    _write_csv(tmp_path / "csv" / "version_0")
    (report,) = load_reports(tmp_path / "csv")
    assert report.source == "csv"
    _check_synthetic(report)


def test_single_optimizer_tags_without_suffix(tmp_path):
    writer = SummaryWriter(str(tmp_path))
    for step, (pre, post) in enumerate([(3.0, 1.0), (0.5, 0.5), (0.8, 0.8), (0.9, 0.9), (0.7, 0.7)]):
        writer.add_scalar("grad_norm/total", pre, step)
        writer.add_scalar("grad_norm/clipped_total", post, step)
        writer.add_scalar("grad_clip/threshold", 1.0, step)
    writer.close()
    (report,) = load_reports(tmp_path)
    (h,) = report.optimizers
    assert h.optimizer is None and h.name == "gradients"
    # no grad_clip/clip_rate tag: the clip rate comes from the logged pre/post norms
    assert h.clip_rate == pytest.approx(0.2) and h.band == "5-25%" and h.advice == "healthy"
    assert report.arc is None


def test_single_optimizer_parameter_names_that_look_like_suffixes(tmp_path):
    # One optimizer (no suffix on the totals): "scale_opt2" is a parameter, not optimizer 2's "scale".
    writer = SummaryWriter(str(tmp_path))
    for step in range(3):
        writer.add_scalar("grad_norm/total", 2.0, step)
        writer.add_scalar("grad_norm/scale_opt2", float(step), step)
        writer.add_scalar("grad_norm/block/attn.weight", 5.0, step)
    writer.close()
    (report,) = load_reports(tmp_path)
    (h,) = report.optimizers
    assert h.optimizer is None
    assert h.top_parameters == [("block/attn.weight", 5.0), ("scale_opt2", 2.0)]


def test_monitor_only_run_has_no_clip_rate(tmp_path):
    writer = SummaryWriter(str(tmp_path))
    for step in range(3):
        writer.add_scalar("grad_norm/total", float(step + 1), step)
    writer.close()
    (report,) = load_reports(tmp_path)
    (h,) = report.optimizers
    assert h.clip_rate is None and h.mean_norm == pytest.approx(2.0)
    assert "monitoring only" in format_report(report)


def test_find_runs_recurses_and_reports_missing(tmp_path):
    _write_tensorboard(tmp_path / "a" / "version_0")
    _write_tensorboard(tmp_path / "a" / "version_1")
    _write_csv(tmp_path / "b" / "csv")
    runs = find_runs(tmp_path)
    assert [r.relative_to(tmp_path).as_posix() for r in runs] == ["a/version_0", "a/version_1", "b/csv"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_runs(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="No TensorBoard event files"):
        find_runs(tmp_path / "empty")


def test_plot_writes_png(tmp_path):
    _write_tensorboard(tmp_path / "run")
    (report,) = load_reports(tmp_path / "run")
    out = plot_report(report, tmp_path / "plots" / "norms.png")
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_report_command_on_several_runs(tmp_path, capsys):
    _write_tensorboard(tmp_path / "logs" / "version_0")
    _write_csv(tmp_path / "logs" / "version_1")
    assert main(["report", str(tmp_path / "logs"), "--plot", str(tmp_path / "p.png")]) == 0
    out = capsys.readouterr().out
    assert out.count("Run: ") == 2
    assert (tmp_path / "p-version_0.png").read_bytes()[:8] == PNG_MAGIC
    assert (tmp_path / "p-version_1.png").read_bytes()[:8] == PNG_MAGIC


def test_report_command_missing_dir(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not exist" in err


# ---------------------------------------------------------------------------------------------------
# Against the callback's own bookkeeping (an independent computation of the same numbers).


def test_report_matches_gradient_clipping_health(tmp_path, seed):
    clipping = GradientClipping(0.5, summary=False)
    logger = TensorBoardLogger(str(tmp_path), name="run", version=0)
    trainer = make_trainer(tmp_path, callbacks=[GradientNormMonitor(), clipping], max_steps=12, logger=logger)
    trainer.fit(TinyRegressor(lr=0.02), make_loader())
    logger.experiment.flush()
    health = clipping.health()[0]
    (report,) = load_reports(tmp_path / "run")
    (h,) = report.optimizers
    assert h.logged_steps == 12 == health["steps"]
    assert h.clip_rate == pytest.approx(health["clip_rate"], abs=1e-7)
    assert h.clipped_logged == pytest.approx(health["clip_rate"], abs=1e-7)
    assert h.mean_norm == pytest.approx(health["mean_norm"], rel=1e-6)
    assert h.max_norm == pytest.approx(health["max_norm"], rel=1e-6)


# ---------------------------------------------------------------------------------------------------
# TensorBoard custom-scalars layout.


def test_layout_groups_and_regexes():
    layout = build_layout(1)
    chart = layout["gradient clipping"]["norm vs threshold"]
    assert chart[0] == "Multiline"
    for tag in ("grad_norm/total", "grad_norm/clipped_total", "grad_clip/threshold"):
        assert sum(bool(re.search(rx, tag)) for rx in chart[1]) == 1
    (per_param,) = layout["per-parameter gradient norms"]["norm per parameter"][1]
    assert re.search(per_param, "grad_norm/rnn.weight_hh_l0")
    assert not re.search(per_param, "grad_norm/total")
    assert not re.search(per_param, "grad_norm/clipped_total_opt1")
    assert "ARC (robust DDP)" in layout and "ARC (robust DDP)" not in build_layout(1, arc=False)
    two = build_layout(2)["gradient clipping"]
    assert any(re.search(rx, "grad_norm/total_opt1") for rx in two["norm vs threshold (optimizer 1)"][1])
    assert not any(re.search(rx, "grad_norm/total_opt0") for rx in two["norm vs threshold (optimizer 1)"][1])
    with pytest.raises(ValueError, match="num_optimizers"):
        build_layout(0)


def test_write_layout_is_idempotent_per_logger(tmp_path):
    logger = TensorBoardLogger(str(tmp_path), name="layout", version=0)
    trainer = make_trainer(tmp_path, logger=logger)
    assert write_layout(trainer) == 1
    assert write_layout(trainer) == 0
    other = TensorBoardLogger(str(tmp_path), name="layout", version=1)
    assert write_layout(make_trainer(tmp_path, logger=[logger, other])) == 1


# ---------------------------------------------------------------------------------------------------
# The demo: its logs, the layout in them, and `report` on them.


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    threads = torch.get_num_threads()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["demo", "--max-steps", "40", "--seq-len", "10", "--out", str(out), "--plot",
                     str(out / "demo.png")])
    assert torch.get_num_threads() == threads  # the demo restores the thread count
    runs = find_runs(out)
    assert [r.name for r in runs] == ["clipping", "no_clipping"]
    return code, buf.getvalue(), out, runs[0]


def test_demo_writes_logs_and_prints_where(demo_run):
    code, stdout, out, run = demo_run
    assert code == 0
    assert f"tensorboard --logdir {out}" in stdout
    assert str(run) in stdout and str(run.parent / "no_clipping") in stdout
    assert "clip rate:" in stdout and "pre-clip norm" in stdout
    assert (out / "demo.png").read_bytes()[:8] == PNG_MAGIC
    scalars = _independent_scalars(run)
    for tag in ("grad_norm/total", "grad_clip/threshold", "grad_norm/clipped_total", "grad_clip/clip_rate",
                "grad_norm/rnn.weight_hh_l0"):
        assert tag in scalars and len(scalars[tag][1]) == 40


def test_demo_logs_hold_the_custom_scalars_layout(demo_run):
    from tensorboard.plugins.custom_scalar import layout_pb2

    _, _, _, run = demo_run
    acc = EventAccumulator(str(run), size_guidance={"tensors": 0})
    acc.Reload()
    (event,) = acc.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    assert charts["norm vs threshold"] == ["^grad_norm/total$", "^grad_norm/clipped_total$", "^grad_clip/threshold$"]
    assert "norm per parameter" in charts


def test_report_on_demo_matches_the_event_files(demo_run, tmp_path, capsys):
    _, _, out, run = demo_run
    png = tmp_path / "report.png"
    assert main(["report", str(run), "--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    assert png.read_bytes()[:8] == PNG_MAGIC

    scalars = _independent_scalars(run)
    pre = scalars["grad_norm/total"][1]
    thr = scalars["grad_clip/threshold"][1]
    post = scalars["grad_norm/clipped_total"][1]
    rate = scalars["grad_clip/clip_rate"][1][-1]
    # every step is logged in the demo: the cumulative clip rate is the fraction of steps clipped
    assert rate == pytest.approx(np.mean(pre > thr), abs=1e-6)
    assert rate == pytest.approx(np.mean(post < pre), abs=1e-6)

    (report,) = load_reports(run)
    (h,) = report.optimizers
    assert h.logged_steps == 40
    assert h.clip_rate == pytest.approx(rate, abs=1e-9)
    assert h.mean_norm == pytest.approx(pre[np.isfinite(pre)].mean(), rel=1e-12)
    assert h.max_norm == pytest.approx(pre[np.isfinite(pre)].max(), rel=1e-12)
    assert h.skipped_steps == 0
    assert f"clip rate: {rate:.1%}" in printed
    assert f"max {pre.max():.4g}" in printed


# ---------------------------------------------------------------------------------------------------
# Divergence: a non-finite loss, or a loss above 1000x its first value, is reported with its step.


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([0.5, 0.4, 0.3, 0.2], None),
        ([0.5, 2.0, 499.0, 500.0], None),  # 500 = 1000 x 0.5 exactly: not above it
        ([0.5, 2.0, 500.5, 0.1], (20, 500.5)),  # the first step above, even if the loss comes back
        ([0.5, 0.4, float("nan"), 1e30], (20, math.nan)),
        ([0.5, float("inf")], (10, math.inf)),
        ([float("nan"), 0.4], (0, math.nan)),
        ([-2.0, -1.0, 1e9], None),  # a loss that starts negative: only NaN/Inf count
        ([-2.0, float("nan")], (10, math.nan)),
    ],
)
def test_detect_divergence(values, expected):
    from lightning_clip.tools.logs import Series
    from lightning_clip.tools.report import detect_divergence

    s = Series(steps=np.arange(len(values)) * 10, values=np.array(values, dtype=np.float64))
    got = detect_divergence(s)
    if expected is None:
        assert got is None
    else:
        assert got is not None and got[0] == expected[0]
        np.testing.assert_equal(got[1], expected[1])


def _write_run(run_dir, series: dict[str, list[float]]) -> None:
    writer = SummaryWriter(str(run_dir))
    for tag, values in series.items():
        for step, v in enumerate(values):
            writer.add_scalar(tag, v, step)
    writer.close()


def test_a_diverged_run_is_reported_as_diverged_never_as_a_low_threshold(tmp_path, capsys):
    # Clipped on 90% of steps (the "threshold too low" band) while the loss explodes at step 3.
    _write_run(tmp_path / "run", {
        "train/loss": [0.4, 0.3, 50.0, 2e28, float("nan")],
        "grad_norm/total": [1.0, 5.0, 50.0, 1e6, float("nan")],
        "grad_norm/clipped_total": [1.0, 2.0, 3.0, 4.0, float("nan")],
        "grad_clip/threshold": [1.0, 2.0, 3.0, 4.0, 4.0],
        "grad_clip/clip_rate": [0.0, 0.5, 0.67, 0.75, 0.9],
    })
    assert "too low" in clip_rate_advice(0.9)  # what the band alone would say
    (report,) = load_reports(tmp_path / "run")
    assert report.diverged and report.loss is not None
    assert (report.loss.diverged_step, report.loss.diverged_value) == (3, pytest.approx(2e28, rel=1e-6))
    (h,) = report.optimizers
    assert "diverged at step 3" in h.advice and "too low" not in h.advice
    assert main(["report", str(tmp_path / "run"), "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "DIVERGED: diverged at step 3: train/loss = 2e+28" in out
    for line in out.splitlines():
        assert "too low" not in line or "diverged" in line, line


def test_a_run_that_did_not_diverge_says_so(tmp_path):
    _write_run(tmp_path / "run", {"train/loss": [0.4, 0.3, 0.2], "grad_norm/total": [1.0, 2.0, 1.5]})
    (report,) = load_reports(tmp_path / "run")
    assert not report.diverged and report.loss is not None and report.loss.minimum == pytest.approx(0.2)
    text = format_report(report)
    assert "did not diverge" in text and "DIVERGED" not in text
    _write_run(tmp_path / "noloss", {"grad_norm/total": [1.0, 2.0]})
    (report,) = load_reports(tmp_path / "noloss")
    assert report.loss is None and "divergence not checked" in format_report(report)


def test_report_counts_the_spike_guards_spikes(tmp_path, capsys):
    _write_run(tmp_path / "run", {"train/loss": [0.4, 0.3, 9.0, 0.3], "grad_norm/total": [1.0, 1.1, 30.0, 1.0],
                                  "grad_spike/skipped": [0.0, 0.0, 1.0, 1.0],
                                  "grad_spike/zscore": [float("nan"), 0.5, 41.0, -0.2]})
    (report,) = load_reports(tmp_path / "run")
    (h,) = report.optimizers
    assert (h.spikes, h.max_spike_zscore) == (1, pytest.approx(41.0))
    assert main(["report", str(tmp_path / "run"), "--no-plot"]) == 0
    assert "spike guard: 1 spike(s); largest logged z-score 41" in capsys.readouterr().out
    _write_run(tmp_path / "plain", {"grad_norm/total": [1.0, 2.0]})
    (report,) = load_reports(tmp_path / "plain")
    assert report.optimizers[0].spikes is None and "spike guard" not in format_report(report)


class _LossLoggingRegressor(TinyRegressor):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("train/loss", loss)
        return loss


def test_report_on_a_real_diverging_fit(tmp_path, seed, capsys):
    # SGD at lr 3 on the tiny regressor, clipping at a threshold no norm reaches: the loss blows up.
    logger = TensorBoardLogger(str(tmp_path), name="run", version=0)
    trainer = make_trainer(tmp_path, callbacks=[GradientNormMonitor(), GradientClipping(1e30, summary=False)],
                           max_steps=30, logger=logger)
    trainer.fit(_LossLoggingRegressor(lr=3.0), make_loader())
    logger.experiment.flush()
    loss = _independent_scalars(tmp_path / "run" / "version_0")["train/loss"]
    bad = ~np.isfinite(loss[1]) | (loss[1] > 1e3 * loss[1][0])
    assert bad.any(), loss  # the reference: the first logged step whose loss is NaN/Inf or > 1000x the first
    first_bad = int(loss[0][np.argmax(bad)])
    assert main(["report", str(tmp_path / "run"), "--no-plot"]) == 0
    assert f"diverged at step {first_bad}:" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------
# The PNG: written by default next to the logs; --plot elsewhere; --no-plot none; without matplotlib, how.


def test_report_writes_the_png_next_to_the_logs_by_default(tmp_path, capsys):
    _write_tensorboard(tmp_path / "logs" / "version_0")
    _write_csv(tmp_path / "logs" / "version_1")
    assert main(["report", str(tmp_path / "logs")]) == 0
    out = capsys.readouterr().out
    for run in ("version_0", "version_1"):
        png = tmp_path / "logs" / run / "gradient_norms.png"
        assert png.read_bytes()[:8] == PNG_MAGIC
        assert f"Plot: {png}" in out
    assert main(["report", str(tmp_path / "logs" / "version_1" / "metrics.csv"), "--no-plot"]) == 0
    (tmp_path / "logs" / "version_0" / "gradient_norms.png").unlink()
    assert main(["report", str(tmp_path / "logs" / "version_0"), "--no-plot"]) == 0
    assert not (tmp_path / "logs" / "version_0" / "gradient_norms.png").exists()
    assert "Plot:" not in capsys.readouterr().out


def test_report_without_matplotlib_says_how_to_get_the_png(tmp_path, capsys, monkeypatch):
    import sys

    _write_tensorboard(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    assert main(["report", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "Run: " in out and "pip install matplotlib" in out
    assert not (tmp_path / "run" / "gradient_norms.png").exists()


def test_report_on_an_event_file_of_random_bytes_is_an_error_naming_it(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    bad = run / "events.out.tfevents.1.host"
    bad.write_bytes(np.random.default_rng(0).bytes(4000))
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(bad) in err and "no readable TensorBoard event" in err
    assert not (run / "gradient_norms.png").exists()  # no empty PNG


def test_a_bad_metrics_csv_value_names_the_file_line_and_column(tmp_path, capsys):
    _write_csv(tmp_path / "run")
    csv_file = tmp_path / "run" / "metrics.csv"
    lines = csv_file.read_text().splitlines()
    header = lines[0].split(",")
    row = lines[2].split(",")
    col = next(i for i, h in enumerate(header) if h not in ("step", "epoch") and row[i] != "")
    row[col] = "abc"
    lines[2] = ",".join(row)
    csv_file.write_text("\n".join(lines) + "\n")
    assert main(["report", str(tmp_path / "run"), "--no-plot"]) == 2
    err = capsys.readouterr().err
    assert f"{str(csv_file)!r}, line 3, column {header[col]!r}: expected a number but got 'abc'" in err


def test_plot_path_without_png_suffix_is_written_and_printed_as_written(tmp_path, capsys):
    _write_tensorboard(tmp_path / "run")
    assert main(["report", str(tmp_path / "run"), "--plot", str(tmp_path / "out" / "noext")]) == 0
    written = tmp_path / "out" / "noext.png"
    assert written.read_bytes()[:8] == PNG_MAGIC and not (tmp_path / "out" / "noext").exists()
    assert f"Plot: {written}\n" in capsys.readouterr().out
