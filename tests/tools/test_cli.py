"""The `lightning-clip` command: every YAML in configs/ runs, bad values exit 2 naming the option, help, finder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_clip.tools.cli import main
from lightning_clip.tools.report import read_scalars

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SINGLE_DEVICE = ["monitor", "fixed", "percentile", "warmup", "zscore", "value", "guard_skip", "spike_guard", "auto"]
DDP = ["arc_ddp", "byzantine", "robust_dshb"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# A few steps, every step logged, one validation batch, a small training set.
FAST = ["--trainer.max_steps=3", "--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=1",
        "--trainer.limit_val_batches=1"]
FAST_ADDING = [*FAST, "--data.init_args.num_train=256", "--data.init_args.num_val=64"]
#: Each adding-problem config runs a little longer, at its own settings, to see its loss stay bounded.
ADDING_STEPS = 40
CONFIG_RUN = [*FAST_ADDING, f"--trainer.max_steps={ADDING_STEPS}", "--data.init_args.num_train=640"]
#: auto.yaml's search (50 steps per run) on a grid up to m0 instead of 10 m0; the finder is the last callback.
FAST_SEARCH = ["--trainer.callbacks.init_args.num_candidates=7",
               "--trainer.callbacks.init_args.num_probe_batches=4"]
#: A training loss above this (12x the 1/6 of always predicting 1.0 on the adding problem; 4.3x the
#: ln 10 of a uniform guess on the digits) means the config's run is diverging.
LOSS_BOUND = {"adding": 2.0, "digits": 10.0}


def _check_loss_bounded(scalars, bound: float) -> None:
    loss = scalars["train/loss"].values
    assert loss.size and np.all(np.isfinite(loss)), loss
    assert loss.max() < bound, loss

try:
    import lightning_clip.distributed.strategy  # noqa: F401

    HAS_STRATEGY, STRATEGY_ERROR = True, ""
except ImportError as err:  # the strategy is written in parallel; its configs wait for it
    HAS_STRATEGY, STRATEGY_ERROR = False, str(err)

needs_strategy = pytest.mark.skipif(
    not HAS_STRATEGY,
    reason=f"lightning_clip.distributed.strategy (ARCDDPStrategy) cannot be imported: {STRATEGY_ERROR}",
)


@pytest.fixture(autouse=True)
def _in_tmp_one_thread(tmp_path, monkeypatch):
    """Run in tmp_path (the configs log to ./lightning_logs) with one intra-op thread (tiny models)."""
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(name: str) -> str:
    return str(CONFIGS / f"{name}.yaml")


def _run_dir(tmp_path: Path, name: str) -> Path:
    runs = sorted((tmp_path / "lightning_logs" / name).glob("version_*"))
    assert runs, f"no TensorBoard run under {tmp_path / 'lightning_logs' / name}"
    return runs[-1]


def _error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0]


def test_every_config_is_covered():
    assert {p.stem for p in CONFIGS.glob("*.yaml")} == set(SINGLE_DEVICE) | set(DDP)


# ---------------------------------------------------------------------------------------------------
# Every YAML runs.


@pytest.mark.parametrize("name", SINGLE_DEVICE)
def test_single_device_config_fits(name, tmp_path):
    extra = FAST_SEARCH if name == "auto" else []
    assert main(["fit", "--config", _config(name), *CONFIG_RUN, *extra, f"--trainer.default_root_dir={tmp_path}"]) == 0
    run = _run_dir(tmp_path, name)
    assert (run / "config.yaml").exists()
    scalars = read_scalars(run)
    steps = ADDING_STEPS
    assert len(scalars["grad_norm/total"]) == steps
    _check_loss_bounded(scalars, LOSS_BOUND["adding"])
    if name == "monitor":
        assert "grad_norm/rnn.weight_hh_l0" in scalars and "grad_clip/threshold" not in scalars
    else:
        for tag in ("grad_clip/threshold", "grad_norm/clipped_total", "grad_clip/clip_rate"):
            assert len(scalars[tag]) == steps, tag
        post, thr = scalars["grad_norm/clipped_total"].values, scalars["grad_clip/threshold"].values
        if name != "value":  # norm clipping: the post-clip norm never exceeds the threshold
            assert np.all(post <= thr * (1 + 1e-5))
    if name in ("monitor", "guard_skip"):
        assert "grad_nonfinite/skipped" in scalars
    if name == "spike_guard":  # 40 steps: the 128-step window is not full, so nothing is a spike yet
        np.testing.assert_array_equal(scalars["grad_spike/skipped"].values, np.zeros(steps))
    if name == "auto":  # the finder's threshold is logged once and is the threshold of every step
        (found,) = scalars["grad_clip/finder_threshold"].values
        np.testing.assert_allclose(scalars["grad_clip/threshold"].values, found, rtol=1e-6)
        assert (run / "clip_threshold_finder.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.distributed
@needs_strategy
@pytest.mark.parametrize("name", DDP)
def test_ddp_config_fits_in_real_processes(name, tmp_path):
    # A subprocess, so that Lightning's default launcher can re-run this very command for ranks 1 and 2.
    cmd = [sys.executable, "-m", "lightning_clip.tools.cli", "fit", "--config", _config(name), *FAST,
           f"--trainer.default_root_dir={tmp_path}"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    scalars = read_scalars(_run_dir(tmp_path, name))
    _check_loss_bounded(scalars, LOSS_BOUND["digits"])
    for tag in ("grad_norm/total", "arc/threshold", "arc/clipped_ranks", "arc/norm_rank0", "arc/norm_rank2"):
        assert len(scalars[tag]) == 3, tag
    # ARC clips floor(2 f (n - f) / n) = 1 of the 3 ranks at most
    assert np.all(scalars["arc/clipped_ranks"].values <= 1)


@pytest.mark.distributed
@needs_strategy
def test_static_clipping_ablation_from_the_command_line(tmp_path):
    # arc=false + static_clip=2.0 on robust_dshb.yaml: the logged threshold is C on every step (ARC would log
    # a data-dependent norm), so the two options reached the hook state through LightningCLI.
    cmd = [sys.executable, "-m", "lightning_clip.tools.cli", "fit", "--config", _config("robust_dshb"), *FAST,
           f"--trainer.default_root_dir={tmp_path}", "--trainer.strategy.init_args.arc=false",
           "--trainer.strategy.init_args.static_clip=2.0"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = _run_dir(tmp_path, "robust_dshb")
    np.testing.assert_array_equal(read_scalars(run)["arc/threshold"].values, [2.0] * 3)
    config = (run / "config.yaml").read_text()
    assert "arc: false" in config and "static_clip: 2.0" in config and "worker_momentum: 0.9" in config


# ---------------------------------------------------------------------------------------------------
# Options from the command line reach nested classes.


def test_command_line_overrides_a_nested_policy(tmp_path):
    args = ["fit", "--config", _config("percentile"), *FAST_ADDING,
            "--trainer.callbacks.init_args.threshold.init_args.warmup_steps=10",
            "--trainer.callbacks.init_args.threshold.init_args.warmup_threshold=0.125"]
    assert main(args) == 0
    thr = read_scalars(_run_dir(tmp_path, "percentile"))["grad_clip/threshold"].values
    np.testing.assert_array_equal(thr, [0.125] * 3)


def test_command_line_appends_a_callback(tmp_path):
    args = ["fit", "--config", _config("monitor"), *FAST_ADDING,
            "--trainer.callbacks+=lightning_clip.GradientClipping", "--trainer.callbacks.threshold=0.25"]
    assert main(args) == 0
    scalars = read_scalars(_run_dir(tmp_path, "monitor"))
    np.testing.assert_array_equal(scalars["grad_clip/threshold"].values, [0.25] * 3)


# ---------------------------------------------------------------------------------------------------
# Bad values: exit status 2 and one line naming the option.


@pytest.mark.parametrize(
    ("config", "override", "named"),
    [
        ("fixed", "--trainer.callbacks.init_args.threshold=-1", "`threshold`"),
        ("percentile", "--trainer.callbacks.init_args.threshold.init_args.percentile=150", "`percentile`"),
        ("fixed", "--trainer.callbacks.init_args.mode=l3", "`mode`"),
        ("zscore", "--trainer.callbacks.init_args.threshold.init_args.alpha=1.5", "`alpha`"),
        ("guard_skip", "--trainer.callbacks.init_args.action=ignore", "`action`"),
        ("fixed", "--trainer.max_steps=abc", "trainer.max_steps"),
        ("fixed", "--model.init_args.lr=-0.1", "`lr`"),
        pytest.param("arc_ddp", "--trainer.strategy.init_args.num_byzantine=2", "`num_byzantine`",
                     marks=needs_strategy),
        pytest.param("byzantine", "--trainer.strategy.init_args.aggregator=mode", "`aggregator`",
                     marks=needs_strategy),
        pytest.param("robust_dshb", "--trainer.strategy.init_args.worker_momentum=1.0", "`worker_momentum`",
                     marks=needs_strategy),
        pytest.param("robust_dshb", "--trainer.strategy.init_args.static_clip=-2", "`static_clip`",
                     marks=needs_strategy),
        pytest.param("arc_ddp", "--trainer.strategy.init_args.robust_comm=scatter", "`robust_comm`",
                     marks=needs_strategy),
        pytest.param("arc_ddp", "--trainer.strategy.init_args.cclip_tau=0", "`cclip_tau`",
                     marks=needs_strategy),
    ],
)
def test_bad_values_exit_2_naming_the_option(config, override, named, capsys):
    assert main(["fit", "--config", _config(config), override]) == 2
    line = _error_line(capsys.readouterr().err)
    assert named in line


def test_bad_value_in_the_yaml_file(tmp_path, capsys):
    assert main(["fit", "--config", _with(tmp_path, "fixed", "threshold: 0.3", "threshold: -2.5")]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "GradientClipping" in line and "`threshold`" in line and "-2.5" in line


def _with(tmp_path: Path, config: str, old: str, new: str) -> str:
    """``configs/<config>.yaml`` with ``old`` replaced by ``new``, written under ``tmp_path``."""
    text = Path(_config(config)).read_text()
    assert old in text, old
    bad = tmp_path / f"bad_{config}.yaml"
    bad.write_text(text.replace(old, new))
    return str(bad)


@needs_strategy
@pytest.mark.parametrize(
    ("old", "new", "bad", "meant"),
    [
        ("num_byzantine: 1", "num_byzantines: 1", "num_byzantines", "num_byzantine"),
        ("worker_momentum: 0.0", "worker_momentun: 0.0", "worker_momentun", "worker_momentum"),
        # a DDP keyword argument the strategy forwards through **kwargs: found by the same introspection
        ("process_group_backend: gloo", "process_group_backen: gloo", "process_group_backen", "process_group_backend"),
    ],
)
def test_misspelt_strategy_option_in_yaml(tmp_path, capsys, old, new, bad, meant):
    assert main(["fit", "--config", _with(tmp_path, "arc_ddp", old, new)]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "trainer.strategy" in line and f"unknown option `{bad}`" in line and f"did you mean `{meant}`?" in line
    assert "Got value" not in line and "{" not in line  # no dump of the whole dict


@needs_strategy
def test_registered_strategy_name_with_misspelt_init_args(tmp_path, capsys):
    # `class_path: ddp_arc`: the registered name cannot take init_args; the misspelt key is named all the same.
    cfg = Path(_with(tmp_path, "arc_ddp", "class_path: lightning_clip.distributed.strategy.ARCDDPStrategy",
                     "class_path: ddp_arc"))
    cfg.write_text(cfg.read_text().replace("num_byzantine: 1", "num_byzantines: 1"))
    assert main(["fit", "--config", str(cfg)]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "trainer.strategy" in line and "unknown option `num_byzantines`" in line
    assert "did you mean `num_byzantine`?" in line
    assert "class_path: lightning_clip.distributed.strategy.ARCDDPStrategy" in line


@needs_strategy
def test_registered_strategy_name_with_init_args_from_the_command_line(capsys):
    args = ["fit", "--config", _config("arc_ddp"), "--trainer.strategy=ddp_arc",
            "--trainer.strategy.init_args.num_byzantine=1"]
    assert main(args) == 2
    line = _error_line(capsys.readouterr().err)
    assert "`ddp_arc` is a registered strategy name" in line
    assert "class_path: lightning_clip.distributed.strategy.ARCDDPStrategy" in line


def test_threshold_of_the_wrong_kind_in_yaml(tmp_path, capsys):
    assert main(["fit", "--config", _with(tmp_path, "fixed", "threshold: 0.3", "threshold: abc")]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "trainer.callbacks (GradientClipping)" in line and "invalid value 'abc' for `threshold`" in line
    assert "positive number" in line
    for policy in ("FixedThreshold", "PercentileThreshold", "WarmupThreshold", "ZScoreThreshold"):
        assert policy in line
    assert "dot import path" not in line


def test_misspelt_option_of_a_nested_policy(tmp_path, capsys):
    assert main(["fit", "--config", _with(tmp_path, "percentile", "percentile: 90.0", "percentil: 90.0")]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "trainer.callbacks (GradientClipping) > threshold (PercentileThreshold)" in line
    assert "unknown option `percentil`; did you mean `percentile`?" in line


def test_misspelt_model_option(capsys):
    assert main(["fit", "--config", _config("fixed"), "--model.init_args.lrr=0.1"]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "model (AddingRNN)" in line and "`lrr`" in line and "did you mean `lr`?" in line


def test_trainer_compatibility_error_in_setup(capsys):
    # raised by GradientClipping.setup (inside fit, before any batch): still a one-line error
    assert main(["fit", "--config", _config("fixed"), *FAST_ADDING, "--trainer.gradient_clip_val=1.0"]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "gradient_clip_val" in line and "clipped twice" in line


def test_num_byzantine_error_names_the_world_size(capsys):
    if not HAS_STRATEGY:
        pytest.skip(f"ARCDDPStrategy cannot be imported: {STRATEGY_ERROR}")
    assert main(["fit", "--config", _config("arc_ddp"), "--trainer.devices=2"]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "`num_byzantine`" in line and "world size 2" in line


# ---------------------------------------------------------------------------------------------------
# Help and entry points.


def test_top_level_help(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for word in ("fit", "demo", "report", "find-threshold", "--trainer.callbacks.help"):
        assert word in out
    assert main([]) == 2
    assert main(["frobnicate"]) == 2


def test_fit_help_documents_callback_and_policy_options(capsys):
    assert main(["fit", "--trainer.callbacks.help", "lightning_clip.GradientClipping"]) == 0
    out = capsys.readouterr().out
    assert "--trainer.callbacks.threshold" in out and "a positive number (fixed) or a threshold policy" in out
    assert "lightning_clip.PercentileThreshold" in out  # known subclasses listed
    assert main(["fit", "--trainer.callbacks.help", "lightning_clip.NonFiniteGradientGuard"]) == 0
    assert "max_consecutive_skips" in capsys.readouterr().out


@needs_strategy
def test_fit_help_documents_strategy_options(capsys):
    assert main(["fit", "--trainer.strategy.help", "lightning_clip.distributed.strategy.ARCDDPStrategy"]) == 0
    out = capsys.readouterr().out
    assert "--trainer.strategy.num_byzantine" in out and "--trainer.strategy.aggregator" in out
    for option in ("worker_momentum", "arc", "static_clip"):
        assert f"--trainer.strategy.{option} " in out, option


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "lightning_clip.tools.cli", "--version"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "lightning-clip" in proc.stdout


# ---------------------------------------------------------------------------------------------------
# find-threshold.


def _printed_fit_command(out: str) -> list[str]:
    """The `lightning-clip fit ...` command find-threshold printed, as argv (after `lightning-clip`)."""
    import shlex

    (line,) = [ln.strip() for ln in out.splitlines() if ln.strip().startswith("lightning-clip fit ")]
    argv = shlex.split(line)
    assert argv[:2] == ["lightning-clip", "fit"]
    return argv[2:]


def test_find_threshold_prints_a_command_with_exactly_one_clipping_at_the_suggestion(tmp_path, capsys):
    # guard_skip.yaml: GradientClipping sits between two callbacks. The printed command, parsed by LightningCLI,
    # holds exactly one GradientClipping, at the suggested threshold, and every other configured callback once.
    from lightning_clip import FixedThreshold, GradientClipping
    from lightning_clip.tools.cli import _lightning_cli

    png = tmp_path / "range.png"
    small = ["--data.init_args.seq_len=10", "--data.init_args.num_train=128", "--model.init_args.hidden_size=8"]
    name = "guard_skip"
    assert main(["find-threshold", "--config", _config(name), "--num-batches", "3", "--candidates", "0.5,0.05",
                 "--no-refine", "--plot", str(png), *small]) == 0
    out = capsys.readouterr().out
    assert "Clip-threshold search: 2 thresholds, 3 optimizer steps each" in out
    (line,) = [ln for ln in out.splitlines() if ln.strip().startswith("chosen:")]
    suggestion = float(line.split("chosen:")[1].split(",")[0])
    assert suggestion in (0.5, 0.05)
    assert png.read_bytes()[:8] == PNG_MAGIC

    argv = _printed_fit_command(out)
    assert argv[:2] == ["--config", _config(name)] and all(a in argv for a in small)
    cli = _lightning_cli([*argv, "--trainer.logger=false"], run=False)
    clipping = [cb for cb in cli.trainer.callbacks if isinstance(cb, GradientClipping)]
    assert len(clipping) == 1
    assert isinstance(clipping[0].policy, FixedThreshold) and clipping[0].policy.max_norm == suggestion
    configured = _lightning_cli(["--config", _config(name), "--trainer.logger=false"], run=False)
    others = sorted(type(cb).__name__ for cb in configured.trainer.callbacks if not isinstance(cb, GradientClipping))
    assert sorted(type(cb).__name__ for cb in cli.trainer.callbacks if not isinstance(cb, GradientClipping)) == others


def test_the_replacement_callbacks_hold_one_clipping():
    from lightning_clip.tools.cli import callbacks_with_threshold

    monitor = {"class_path": "lightning_clip.GradientNormMonitor", "init_args": {"per_parameter": True}}
    policy = {"class_path": "lightning_clip.GradientClipping", "init_args": {
        "mode": "norm", "threshold": {"class_path": "lightning_clip.PercentileThreshold", "init_args": {"window": 9}}}}
    guard = {"class_path": "lightning_clip.NonFiniteGradientGuard", "init_args": {"action": "skip"}}
    # none configured: one is appended
    assert callbacks_with_threshold([monitor], 0.3) == [
        monitor, {"class_path": "lightning_clip.GradientClipping", "init_args": {"threshold": 0.3}}]
    assert callbacks_with_threshold(None, 0.3) == [
        {"class_path": "lightning_clip.GradientClipping", "init_args": {"threshold": 0.3}}]
    # a policy becomes the number, the other options stay; a second GradientClipping is dropped
    fixed = {"class_path": "lightning_clip.GradientClipping", "init_args": {"mode": "norm", "threshold": 0.3}}
    assert callbacks_with_threshold([monitor, policy, guard, dict(policy)], 0.3) == [monitor, fixed, guard]
    # a ClipThresholdFinder would search again: the command that uses the found threshold drops it
    finder = {"class_path": "lightning_clip.ClipThresholdFinder", "init_args": {"num_batches": 20}}
    assert callbacks_with_threshold([monitor, policy, finder], 0.3) == [monitor, fixed]


@pytest.mark.parametrize(("bad", "named"), [(["--candidates", "0.1,-1"], "--candidates"),
                                           (["--candidates", "x"], "--candidates"),
                                           (["--num-candidates", "0"], "--num-candidates"),
                                           (["--num-batches", "0"], "--num-batches"),
                                           (["--num-batches", "1"], "--num-batches"),
                                           (["--tolerance", "-1"], "--tolerance"),
                                           (["--choice", "smallest"], "--choice"),
                                           (["--num-probe-batches", "0"], "--num-probe-batches"),
                                           (["--num-batches", "x"], "--num-batches")])
def test_find_threshold_bad_arguments(bad, named, capsys):
    assert main(["find-threshold", "--config", _config("monitor"), *bad]) == 2
    assert named in _error_line(capsys.readouterr().err)


@pytest.mark.parametrize("value", ["0", "100", "-5", "150", "nan", "x"])
def test_demo_percentile_is_in_the_open_interval(value, tmp_path, capsys):
    # 0 would clip nearly every step and 100 never: PercentileThreshold rejects both, and so does the demo.
    assert main(["demo", "--percentile", value, "--out", str(tmp_path)]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "--percentile" in line and "(0, 100)" in line
    assert not any(tmp_path.iterdir())  # rejected before anything ran
