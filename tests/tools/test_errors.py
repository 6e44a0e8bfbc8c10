"""The command line's one-line errors for values of the wrong kind and cross-field errors (exit 2, the option named)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_clip.tools.cli import main

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _edited(tmp_path: Path, name: str, old: str, new: str) -> str:
    text = (CONFIGS / f"{name}.yaml").read_text()
    assert old in text
    path = tmp_path / f"{name}.yaml"
    path.write_text(text.replace(old, new, 1))
    return str(path)


def _error(capsys: pytest.CaptureFixture[str], args: list[str]) -> str:
    assert main(["fit", *args, "--trainer.max_steps=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "Namespace(" not in err and "Given value" not in err
    return err


@pytest.mark.parametrize("option", ["dp_noise_multiplier=1.0", "dp_clip_quantile=0.5"])
def test_a_cross_field_error_of_the_strategy_is_the_constructors_message(capsys, option):
    err = _error(capsys, ["--config", str(CONFIGS / "arc_ddp.yaml"), f"--trainer.strategy.init_args.{option}"])
    assert "ARCDDPStrategy" in err and f"`{option.split('=')[0]}=" in err and "static_clip" in err


def test_a_cross_field_error_names_the_rule_it_conflicts_with(capsys, tmp_path):
    cfg = _edited(tmp_path, "arc_ddp", "aggregator: mean", "aggregator: cwtm")
    err = _error(capsys, ["--config", cfg, "--trainer.strategy.init_args.static_clip=1.0",
                          "--trainer.strategy.init_args.dp_clip_quantile=0.5"])
    assert "`dp_clip_quantile=0.5`" in err and "aggregator='cwtm'" in err


def test_a_wrong_kind_of_value_in_yaml_names_the_class_and_option(capsys, tmp_path):
    err = _error(capsys, ["--config", _edited(tmp_path, "spike_guard", "z_thresh: 6.0", "z_thresh: high")])
    assert err.startswith("error: trainer.callbacks (SpikeGuard): invalid value 'high' for `z_thresh`: it takes a "
                          "number")
    err = _error(capsys, ["--config", _edited(tmp_path, "arc_ddp", "num_byzantine: 1", "num_byzantine: one")])
    assert err.startswith("error: trainer.strategy (ARCDDPStrategy): invalid value 'one' for `num_byzantine`: it "
                          "takes an integer")


def test_a_command_line_option_of_another_callback_says_which_callback_it_reaches(capsys):
    err = _error(capsys, ["--config", str(CONFIGS / "spike_guard.yaml"), "--trainer.callbacks.z_thresh=abc"])
    assert "sets an option of the LAST callback in the list (GradientClipping)" in err
    assert "`z_thresh` is an option of SpikeGuard" in err
    err = _error(capsys, ["--config", str(CONFIGS / "spike_guard.yaml"), "--trainer.callbacks.thresold=1"])
    assert err.endswith("unknown option `thresold`; did you mean `threshold`?")
