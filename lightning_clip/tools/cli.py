"""The ``lightning-clip`` command: LightningCLI training from YAML, a demo, log reports and a threshold finder.

::

    lightning-clip fit --config configs/percentile.yaml           # train (fit/validate/test/predict)
    lightning-clip fit --config configs/fixed.yaml --trainer.max_steps=50 \\
        --trainer.callbacks.init_args.threshold=2.0               # any option from the command line
    lightning-clip fit --trainer.callbacks.help lightning_clip.GradientClipping   # a class's options
    lightning-clip demo [--max-steps N] [--out DIR]               # ~1 min CPU: without vs with clipping
    lightning-clip report LOG_DIR [--plot out.png | --no-plot]    # gradient-health summary + PNG of a run
    lightning-clip find-threshold --config configs/fixed.yaml [--num-batches N] [--candidates 0.1,0.3,1]
    lightning-clip fit --config configs/auto.yaml                 # ClipThresholdFinder picks it inside fit

``fit`` (and ``validate``/``test``/``predict``) is a :class:`~lightning.pytorch.cli.LightningCLI` over
any LightningModule/LightningDataModule (``model: {class_path: lightning_clip.tools.demo.AddingRNN}``);
callbacks, threshold policies and the strategy are ``class_path``/``init_args`` entries, nested as
deep as needed. Invalid values exit with status 2 and a one-paragraph ``error:`` line naming the
option (set ``LIGHTNING_CLIP_DEBUG=1`` for the full traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from lightning_clip.tools.errors import UsageError, describe_error

if TYPE_CHECKING:
    from lightning.pytorch.cli import LightningCLI

__all__ = ["cli_class", "describe_error", "main"]

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
#: Set on an exception raised once batches have run: a runtime failure, not a configuration error.
_RUNTIME = "_lightning_clip_runtime"
EXIT_USAGE = 2

_DESCRIPTION = "Observable, adaptive and robust gradient clipping for PyTorch Lightning."

_EPILOG = """\
examples:
  lightning-clip demo                                   # ~1 min on CPU: an RNN without vs with clipping
  lightning-clip fit --config configs/percentile.yaml --trainer.max_steps=200
  lightning-clip fit --config configs/percentile.yaml \\
      --trainer.callbacks.init_args.threshold.init_args.percentile=95
  lightning-clip report lightning_logs/percentile    # also writes gradient_norms.png next to the logs
  lightning-clip fit --config configs/auto.yaml        # the threshold found at fit start (ClipThresholdFinder)
  lightning-clip find-threshold --config configs/fixed.yaml    # the same search alone, like lr_find

fit/validate/test/predict are LightningCLI subcommands over any LightningModule/LightningDataModule;
callbacks, threshold policies and the strategy are class_path/init_args entries in the YAML, and every
option can be overridden on the command line. Options of one class:
  lightning-clip fit --help                                           trainer/model/data options
  lightning-clip fit --trainer.callbacks.help lightning_clip.GradientClipping
                     (also lightning_clip.GradientNormMonitor, lightning_clip.NonFiniteGradientGuard)
  lightning-clip fit --trainer.strategy.help lightning_clip.distributed.strategy.ARCDDPStrategy
  lightning-clip fit --model.help lightning_clip.tools.demo.AddingRNN
Invalid values exit with status 2 and one `error:` line naming the option
(LIGHTNING_CLIP_DEBUG=1 prints the full traceback).
"""


# --------------------------------------------------------------------------------------------------
# Errors: one line naming the option (lightning_clip.tools.errors) instead of a deep stack trace.


def _config_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ValueError, TypeError, UsageError, FileNotFoundError]
    try:
        from jsonargparse import ArgumentError

        errors.append(ArgumentError)
    except ImportError:  # pragma: no cover - jsonargparse is a dependency of the CLI extra
        pass
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    errors.append(MisconfigurationException)
    return tuple(errors)


def _fail(exc: BaseException) -> int:
    if os.environ.get("LIGHTNING_CLIP_DEBUG"):
        traceback.print_exception(type(exc), exc, exc.__traceback__)
    print(f"error: {describe_error(exc)}", file=sys.stderr)
    return EXIT_USAGE


# --------------------------------------------------------------------------------------------------
# LightningCLI.


def _register_strategies() -> None:
    """Import the optional strategy module so that ``strategy: ddp_arc`` and its class_path resolve."""
    with contextlib.suppress(ImportError):
        import lightning_clip.distributed.strategy  # noqa: F401  (registers "ddp_arc")


@functools.cache
def cli_class() -> type[LightningCLI]:
    """The :class:`~lightning.pytorch.cli.LightningCLI` subclass behind ``lightning-clip fit`` (needs jsonargparse).

    It adds :class:`~lightning_clip.callbacks.tb_layout.TensorBoardLayout` when a TensorBoardLogger is
    configured and tells configuration errors from runtime failures.
    """
    try:
        from lightning.pytorch.cli import LightningCLI
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise UsageError("The `lightning-clip` command needs jsonargparse: pip install 'lightning-clip[cli]'") from err
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_clip.callbacks.tb_layout import TensorBoardLayout

    class ClipLightningCLI(LightningCLI):
        """LightningCLI that adds the TensorBoard custom-scalars layout and remembers which phase failed."""

        def instantiate_trainer(self, **kwargs: Any) -> Any:
            trainer = super().instantiate_trainer(**kwargs)
            callbacks = trainer.callbacks  # type: ignore[attr-defined]  # set at runtime, not declared on Trainer
            if any(isinstance(lg, TensorBoardLogger) for lg in trainer.loggers) and not any(
                isinstance(cb, TensorBoardLayout) for cb in callbacks
            ):
                callbacks.append(TensorBoardLayout())
            return trainer

        def _run_subcommand(self, subcommand: str) -> None:
            try:
                super()._run_subcommand(subcommand)
            except Exception as exc:
                # Errors once batches have run are runtime failures, not configuration errors: keep
                # their traceback. Errors in setup (e.g. a callback's trainer-compatibility check) are not.
                loop = self.trainer.fit_loop
                setattr(exc, _RUNTIME, bool(
                    self.trainer.global_step > 0 or loop.epoch_loop.batch_progress.total.ready > 0
                ))
                raise

    return ClipLightningCLI


def _cli_kwargs(run: bool) -> dict[str, Any]:
    import lightning.pytorch as pl

    parser_kwargs: dict[str, Any] = {"exit_on_error": False}
    if run:
        parser_kwargs.update({sub: {"exit_on_error": False} for sub in LIGHTNING_SUBCOMMANDS})
    return dict(
        model_class=pl.LightningModule,
        datamodule_class=pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs=parser_kwargs,
        save_config_kwargs={"overwrite": True},
        run=run,
    )


def _lightning_cli(args: list[str], run: bool) -> Any:
    _register_strategies()
    cls = cli_class()
    with warnings.catch_warnings():
        # We pass `args` on purpose (main(argv) is the entry point); Lightning warns when sys.argv has args too.
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
        return cls(args=args, **_cli_kwargs(run))


def _run_lightning(args: list[str]) -> int:
    try:
        _lightning_cli(args, run=True)
    except _config_errors() as exc:
        if getattr(exc, _RUNTIME, False):
            raise
        return _fail(exc)
    return 0


# --------------------------------------------------------------------------------------------------
# demo / report / find-threshold.


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer but got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer but got {value}")
    return value


def _number(text: str, allowed: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in {allowed} but got {text!r}") from None


def _at_least_two(text: str) -> int:
    """``find-threshold --num-batches``: an integer >= 2 (the rule needs the spread of a run's losses)."""
    value = _positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"expected an integer >= 2 but got {value}")
    return value


def _non_negative(text: str) -> float:
    value = _number(text, "[0, inf)")
    if not 0.0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number in [0, inf) but got {text!r}")
    return value


def _candidates(text: str) -> list[float]:
    """``find-threshold --candidates``: comma-separated positive numbers."""
    values = []
    for part in text.split(","):
        value = _number(part.strip(), "(0, inf)")
        if not 0.0 < value < float("inf"):
            raise argparse.ArgumentTypeError(f"expected comma-separated positive numbers but got {part.strip()!r}")
        values.append(value)
    return values


def _adaptive_percentile(text: str) -> float:
    """PercentileThreshold's percentile, in ``(0, 100)``: 0 would clip nearly every step and 100 never."""
    value = _number(text, "(0, 100)")
    if not 0.0 < value < 100.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 100) but got {value:g}: 0 clips nearly every "
                                         "step and 100 never clips")
    return value


class _ArgumentParser(argparse.ArgumentParser):
    """argparse with errors as the one ``error:`` line the LightningCLI subcommands print too."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog="lightning-clip", description=_DESCRIPTION, epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from lightning_clip import __version__
    from lightning_clip.core.search import CHOICES

    parser.add_argument("--version", action="version", version=f"lightning-clip {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command")
    for name in LIGHTNING_SUBCOMMANDS:
        sub.add_parser(name, help=f"LightningCLI `{name}` (see `lightning-clip {name} --help`)", add_help=False)

    demo = sub.add_parser(
        "demo", help="about a minute on CPU: an exploding RNN trained without and with clipping, side by side",
        description="Train a vanilla tanh RNN on the adding problem (Pascanu et al. 2013; recurrent gain 1.2, SGD "
        "lr 0.05 with momentum 0.9) twice from the same initial weights on CPU: without clipping (its loss diverges "
        "and the run stops there), then with GradientClipping at the threshold ClipThresholdFinder finds at fit "
        "start; print the two validation MSEs side by side against "
        "the 1/6 of always predicting 1.0, write TensorBoard logs and print their gradient-health reports. About a "
        "minute for the default 800 steps.")
    demo.add_argument("--max-steps", type=_positive_int, default=800, help="optimizer steps per run (default: 800)")
    demo.add_argument("--out", default="lightning_logs", help="TensorBoard save_dir (default: lightning_logs)")
    demo.add_argument("--threshold", type=float, default=None,
                      help="a fixed clipping threshold (max norm) instead of ClipThresholdFinder's search")
    demo.add_argument("--percentile", type=_adaptive_percentile, default=None,
                      help="clip adaptively at this percentile, in (0, 100), of the last 200 clipped norms "
                      "(PercentileThreshold, history='clipped'; warmup threshold: the search's choice or --threshold)")
    demo.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (default: 0.05)")
    demo.add_argument("--seq-len", type=_positive_int, default=15, help="adding-problem sequence length (15)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.add_argument("--plot", default=None,
                      help="PNG of the clipped run's norms (default: gradient_norms.png in its log directory)")

    report = sub.add_parser("report", help="gradient-health summary of a run's logs",
                            description="Read the TensorBoard event files or CSVLogger metrics.csv under LOG_DIR "
                            "(searched recursively) and print a gradient-health summary per run and optimizer.")
    report.add_argument("log_dir", help="a run's log directory (or a parent of several runs)")
    report.add_argument("--plot", default=None,
                        help="where to write the PNG of pre-clip norm, post-clip norm and threshold (default: "
                        "gradient_norms.png in each run's log directory; several runs with --plot: one file per "
                        "run, suffixed with the run's directory name)")
    report.add_argument("--no-plot", dest="no_plot", action="store_true", help="write no PNG")

    finder = sub.add_parser(
        "find-threshold", help="the clipping-threshold search alone: print the threshold and the fit command",
        description="Instantiate the model/data/trainer of a LightningCLI config and run the search of "
        "ClipThresholdFinder (the same search and rule as in `fit`): probe the median gradient norm m0 of the "
        "starting weights, train num-batches optimizer steps per candidate threshold (m0 * 10**(-3 + k/2) unless "
        "--candidates), each run from the same weights and batches, clipping the total norm there; among the "
        "thresholds whose mean loss is within --tolerance standard errors of the best, choose the middle of their "
        "band (or the largest, --choice largest), refined at c * 10**(+-1/4); restore the weights and print the table "
        "and the `fit` command that uses the threshold "
        "in place of the config's GradientClipping. Other LightningCLI options (e.g. --model.init_args.lr=0.01) "
        "are passed through.")
    finder.add_argument("--config", "-c", required=True, action="append", help="LightningCLI YAML config")
    finder.add_argument("--num-batches", type=_at_least_two, default=50,
                        help="optimizer steps per candidate, >= 2 (default: 50)")
    finder.add_argument("--candidates", type=_candidates, default=None,
                        help="comma-separated thresholds to try, e.g. 0.03,0.1,0.3,1 (default: half-decade steps "
                        "from m0/1000, m0 the median gradient norm of the starting weights)")
    finder.add_argument("--num-candidates", type=_positive_int, default=9,
                        help="size of the default grid (default: 9, up to 10 m0)")
    finder.add_argument("--num-probe-batches", type=_positive_int, default=8,
                        help="steps (updates dropped) that measure m0 (default: 8)")
    finder.add_argument("--tolerance", type=_non_negative, default=2.0,
                        help="near-tie width in standard errors of the best run's mean loss (default: 2)")
    finder.add_argument("--choice", choices=CHOICES, default="middle",
                        help="which near-tie: the middle of the near-tie band, or the largest (default: middle)")
    finder.add_argument("--no-refine", dest="refine", action="store_false",
                        help="no refinement runs at c * 10**(+-1/4)")
    finder.add_argument("--plot", default=None, help="write a PNG of loss against threshold and the loss curves")
    return parser


def _demo(ns: argparse.Namespace) -> int:
    from lightning_clip.tools.demo import run_demo

    return run_demo(max_steps=ns.max_steps, out=ns.out, threshold=ns.threshold, percentile=ns.percentile, lr=ns.lr,
                    seq_len=ns.seq_len, seed=ns.seed, plot=ns.plot)


#: The PNG ``report`` writes in each run's log directory unless ``--plot`` says where.
REPORT_PNG = "gradient_norms.png"


def _report_png(plot: str | None, log_dir: Path, run: Path, several: bool) -> Path:
    """Where ``report`` writes the PNG of ``run``: ``--plot`` (suffixed per run when several), else next to its logs."""
    if plot is None:
        return (run.parent if run.is_file() else run) / REPORT_PNG
    out = Path(plot)
    if several:
        name = "-".join(run.relative_to(log_dir).parts) if log_dir.is_dir() else ""
        out = out.with_name(f"{out.stem}-{name or 'run'}{out.suffix or '.png'}")
    return out


def _report(ns: argparse.Namespace) -> int:
    from lightning_clip.tools.report import format_report, load_reports, plot_report

    reports = load_reports(ns.log_dir)
    for i, rep in enumerate(reports):
        if i:
            print()
        print(format_report(rep))
    if ns.no_plot:
        return 0
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("Plot: not written: matplotlib is not installed (pip install matplotlib, or the package's [plot] "
              "extra: pip install 'lightning-clip[plot]')")
        return 0
    for rep in reports:
        out = plot_report(rep, _report_png(ns.plot, Path(ns.log_dir), rep.path, len(reports) > 1))
        print(f"Plot: {out}")
    return 0


def _as_plain(value: Any) -> Any:
    """A parsed config value as plain JSON data (jsonargparse namespaces become dicts)."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: _as_plain(v) for k, v in value.items() if not k.startswith("__")}
    if isinstance(value, (list, tuple)):
        return [_as_plain(v) for v in value]
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def _is_class(entry: Any, name: str) -> bool:
    return isinstance(entry, dict) and str(entry.get("class_path", "")).rsplit(".", 1)[-1] == name


def callbacks_with_threshold(callbacks: Any, threshold: float) -> list[Any]:
    """The config's ``trainer.callbacks`` with its ``GradientClipping`` at ``threshold`` (added if it had none).

    Every other callback is kept as configured, except a ``ClipThresholdFinder``, which would search again;
    several ``GradientClipping`` entries become one, at the first one's place, with the first one's other options.
    """
    entries = [_as_plain(c) for c in (callbacks or [])]
    if isinstance(callbacks, dict) or hasattr(callbacks, "as_dict"):
        entries = [_as_plain(callbacks)]
    out: list[Any] = []
    placed = False
    for entry in entries:
        if _is_class(entry, "ClipThresholdFinder"):
            continue
        if _is_class(entry, "GradientClipping"):
            if not placed:
                init_args = dict(entry.get("init_args") or {})
                init_args["threshold"] = threshold
                out.append({"class_path": entry["class_path"], "init_args": init_args})
                placed = True
            continue
        out.append(entry)
    if not placed:
        out.append({"class_path": "lightning_clip.GradientClipping", "init_args": {"threshold": threshold}})
    return out


def _find_threshold(ns: argparse.Namespace, passthrough: list[str]) -> int:
    import json
    import shlex

    from lightning_clip.tools.finder import find_clip_threshold

    args: list[str] = []
    for cfg in ns.config:
        args += ["--config", cfg]
    args += passthrough
    cli = _lightning_cli(args, run=False)
    try:
        result = find_clip_threshold(cli.trainer, cli.model, datamodule=cli.datamodule, num_batches=ns.num_batches,
                                     candidates=ns.candidates, num_candidates=ns.num_candidates,
                                     num_probe_batches=ns.num_probe_batches, tolerance=ns.tolerance,
                                     refine=ns.refine, choice=ns.choice)
    except RuntimeError as err:  # every candidate diverged: the message holds the table
        if "every candidate threshold diverged" not in str(err):
            raise
        print(err)
        return 1
    print(result)
    if ns.plot:
        from lightning_clip.callbacks.finder import plot_search

        try:
            print(f"Plot: {plot_search(result, ns.plot)}")
        except ImportError:
            print("Plot: not written: matplotlib is not installed (pip install 'lightning-clip[plot]')")
    threshold = float(f"{result.threshold:.4g}")
    callbacks = callbacks_with_threshold(cli.config.get("trainer", {}).get("callbacks"), threshold)
    command = ["lightning-clip", "fit", *args, "--trainer.callbacks=" + json.dumps(callbacks, separators=(",", ":"))]
    print(f"\nTrain with it (the config's GradientClipping at threshold {threshold:g}, every other callback as "
          f"configured):\n  {shlex.join(command)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``lightning-clip`` command with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser()
    if not args:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        if args[0] in LIGHTNING_SUBCOMMANDS:
            return _run_lightning(args)
        if args[0] == "find-threshold":
            ns, rest = parser.parse_known_args(args)
        else:
            ns, rest = parser.parse_args(args), []
        try:
            if ns.command == "demo":
                return _demo(ns)
            if ns.command == "report":
                return _report(ns)
            if ns.command == "find-threshold":
                return _find_threshold(ns, rest)
        except _config_errors() as exc:
            return _fail(exc)
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # --help, --version, argparse errors
        code = exc.code
        if code is None:
            return 0
        return code if isinstance(code, int) else EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
