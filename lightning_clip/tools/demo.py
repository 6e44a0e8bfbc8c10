"""Demo models and data that ship with the package (no downloads).

- :class:`AddingProblemDataModule` + :class:`AddingRNN`: the adding problem of Pascanu et al. (2013).
  Each input is a sequence of ``(value, marker)`` pairs; the target is the sum of the two values
  whose marker is 1. A vanilla tanh RNN over long sequences has genuinely exploding gradients.
- :class:`DigitsDataModule` + :class:`DigitsClassifier`: an MLP on scikit-learn's bundled 8x8
  digits. The classifier has ``label_flip`` and ``gradient_ascent`` switches that turn the ranks
  listed in ``byzantine_ranks`` into data/loss-level attackers for DDP experiments.

:func:`run_demo` is the ``lightning-clip demo`` command: the RNN trained from the same weights without and
with clipping (the threshold found by :class:`~lightning_clip.ClipThresholdFinder` at fit start), the two
validation MSEs side by side, then the health reports and a plot.

Validation metrics are torchmetrics objects logged with ``self.log``: each epoch's value is computed
over every validation sample of every rank (not a mean of per-batch or per-rank means).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MeanMetric, MeanSquaredError
from torchmetrics.classification import MulticlassAccuracy

from lightning_clip.exceptions import check_choice, check_fraction, check_positive_float, check_positive_int
from lightning_clip.sim.data import ShardSampler, adding_problem, load_digits_tensors

if TYPE_CHECKING:
    from lightning_clip.callbacks import ClipThresholdFinder, GradientClipping

__all__ = [
    "AddingProblemDataModule",
    "AddingRNN",
    "DigitsClassifier",
    "DemoRun",
    "DigitsDataModule",
    "TRIVIAL_MSE",
    "run_demo",
]


class AddingProblemDataModule(pl.LightningDataModule):
    """The adding problem as a datamodule (generated in memory, deterministic by ``seed``).

    Args:
        seq_len: sequence length (longer = harder, gradients explode more).
        num_train: training samples.
        num_val: validation samples.
        batch_size: batch size.
        seed: generator seed.
    """

    def __init__(self, seq_len: int = 100, num_train: int = 4096, num_val: int = 512, batch_size: int = 64,
                 seed: int = 0) -> None:
        super().__init__()
        self.seq_len = seq_len
        self.num_train = check_positive_int("num_train", num_train)
        self.num_val = check_positive_int("num_val", num_val)
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.seed = seed
        self.save_hyperparameters()

    def setup(self, stage: str | None = None) -> None:
        x, y = adding_problem(self.num_train + self.num_val, self.seq_len, self.seed)
        self.train_set = TensorDataset(x[: self.num_train], y[: self.num_train])
        self.val_set = TensorDataset(x[self.num_train :], y[self.num_train :])

    def train_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=g)

    def val_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        return DataLoader(self.val_set, batch_size=self.batch_size)


class AddingRNN(pl.LightningModule):
    """A single-layer RNN regressor for the adding problem.

    Args:
        hidden_size: RNN width.
        cell: ``"rnn"`` (vanilla tanh, explodes) or ``"lstm"``.
        lr: SGD learning rate.
        momentum: SGD momentum.
        init_scale: the recurrent weights are initialised orthogonal times this gain; > 1 makes
            exploding gradients likely (Pascanu et al.).
    """

    def __init__(self, hidden_size: int = 64, cell: str = "rnn", lr: float = 0.05, momentum: float = 0.9,
                 init_scale: float = 1.2) -> None:
        super().__init__()
        check_positive_int("hidden_size", hidden_size)
        check_choice("cell", cell, ("rnn", "lstm"))
        check_positive_float("lr", lr)
        check_fraction("momentum", momentum, low=0.0, high=1.0, open_high=True)
        check_positive_float("init_scale", init_scale)
        self.save_hyperparameters()
        rnn_cls = nn.RNN if cell == "rnn" else nn.LSTM
        self.rnn = rnn_cls(input_size=2, hidden_size=hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, 1)
        self.val_mse = MeanSquaredError()
        self.lr, self.momentum = lr, momentum
        for name, p in self.rnn.named_parameters():
            if name.startswith("weight_hh"):
                for chunk in p.data.chunk(1 if cell == "rnn" else 4, dim=0):
                    nn.init.orthogonal_(chunk, gain=init_scale)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.val_mse.update(self(x), y)
        self.log("val/loss", self.val_mse, prog_bar=True)  # MSE over the whole validation set

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


class DigitsDataModule(pl.LightningDataModule):
    """scikit-learn digits, split deterministically into train/test.

    Under DDP every rank draws its own shard (Lightning's DistributedSampler); with
    ``dirichlet_alpha`` set, ranks get label-skewed shards instead (heterogeneous data).

    Args:
        batch_size: per-rank batch size.
        test_fraction: fraction of samples held out for validation.
        dirichlet_alpha: ``None`` for an iid split, else the concentration of a Dirichlet label split.
        seed: split seed.
    """

    def __init__(self, batch_size: int = 32, test_fraction: float = 0.2, dirichlet_alpha: float | None = None,
                 seed: int = 0) -> None:
        super().__init__()
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.test_fraction = check_fraction("test_fraction", test_fraction, open_low=True, open_high=True)
        self.dirichlet_alpha = None if dirichlet_alpha is None else check_positive_float(
            "dirichlet_alpha", dirichlet_alpha)
        self.seed = seed

    def setup(self, stage: str | None = None) -> None:
        x, y = load_digits_tensors()
        g = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(len(y), generator=g)
        n_test = int(len(y) * self.test_fraction)
        test, train = perm[:n_test], perm[n_test:]
        self.test_set = TensorDataset(x[test], y[test])
        self.train_x, self.train_y = x[train], y[train]
        rank, world = 0, 1
        if self.trainer is not None:
            rank, world = self.trainer.global_rank, self.trainer.world_size
        self.rank, self.world = rank, world
        if self.dirichlet_alpha is not None and world > 1:
            from lightning_clip.sim.partition import dirichlet_split

            shards = dirichlet_split(self.train_y, world, self.dirichlet_alpha, seed=self.seed)
            idx = shards[rank]
            self.train_set = TensorDataset(self.train_x[idx], self.train_y[idx])
            self._presharded = True
        else:
            self.train_set = TensorDataset(self.train_x, self.train_y)
            self._presharded = False

    def train_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        if self._presharded:
            # Already this rank's shard: the same number of draws on every rank, and Lightning must not re-shard it.
            sampler = ShardSampler(self.train_set, len(self.train_y) // self.world, seed=self.seed * 7_919 + self.rank)
            return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler)
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=g)

    def val_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        return DataLoader(self.test_set, batch_size=256)


class DigitsClassifier(pl.LightningModule):
    """An MLP (64-hidden-10) on the digits, with data/loss-level Byzantine switches.

    Args:
        hidden: hidden width.
        lr: SGD learning rate.
        momentum: SGD momentum (use 0 with worker momentum in ``ddp_arc``, as the ARC paper does).
        weight_decay: SGD weight decay.
        byzantine_ranks: ranks whose data/loss are corrupted (only with ``label_flip`` or ``gradient_ascent``).
        label_flip: Byzantine ranks train on ``y -> 9 - y``.
        gradient_ascent: Byzantine ranks minimise the negated loss.
    """

    def __init__(self, hidden: int = 64, lr: float = 0.1, momentum: float = 0.0, weight_decay: float = 1e-4,
                 byzantine_ranks: Sequence[int] = (), label_flip: bool = False, gradient_ascent: bool = False) -> None:
        super().__init__()
        check_positive_int("hidden", hidden)
        check_positive_float("lr", lr)
        check_fraction("momentum", momentum, open_high=True)
        check_positive_float("weight_decay", weight_decay, allow_zero=True)
        self.save_hyperparameters()
        self.byzantine_ranks = tuple(int(r) for r in byzantine_ranks)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.label_flip, self.gradient_ascent = label_flip, gradient_ascent
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
        self.val_loss = MeanMetric(nan_strategy=float("nan"))  # NaN is kept, not dropped: divergence shows
        self.val_acc = MulticlassAccuracy(num_classes=10, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    @property
    def is_byzantine(self) -> bool:
        return self._trainer is not None and self.global_rank in self.byzantine_ranks

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        if self.is_byzantine and self.label_flip:
            y = 9 - y
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        if self.is_byzantine and self.gradient_ascent:
            return -loss
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_loss.update(nn.functional.cross_entropy(logits, y, reduction="none"))  # one weight per sample
        self.val_acc.update(logits, y)
        self.log("val/loss", self.val_loss)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)


# --------------------------------------------------------------------------------------------------
# The `lightning-clip demo` command.

#: Validation MSE of always predicting the mean target 1.0: the variance of a sum of two U(0, 1) values, 1/6.
TRIVIAL_MSE = 1.0 / 6.0


class _StopOnDivergence(pl.Callback):
    """Stops training at the first step whose loss is not finite or above 1000x the first step's loss.

    It counts batches, so its step is the logged step with ``accumulate_grad_batches=1`` (the demo's).
    """

    def __init__(self) -> None:
        self.first: float | None = None
        self.batches = 0
        self.step: int | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, Tensor):
            return
        value = float(loss.detach())
        self.batches += 1
        if self.first is None:
            self.first = value
        if not math.isfinite(value) or (self.first > 0 and value > 1e3 * self.first):
            self.step = self.batches - 1  # the step this loss is logged at
            trainer.should_stop = True


@dataclass
class DemoRun:
    """One training run of the demo.

    Attributes:
        name: ``"no clipping"`` or the clipping policy.
        log_dir: its TensorBoard log directory.
        val_mse: validation MSE of the final weights (``nan`` when they are not finite).
        diverged_step: the step its loss diverged at (the run stopped there), ``None`` if it did not.
        steps: optimizer steps taken.
    """

    name: str
    log_dir: Path
    val_mse: float
    diverged_step: int | None
    steps: int

    def describe(self) -> str:
        """The MSE, or where it diverged."""
        if self.diverged_step is not None:
            return f"diverged at step {self.diverged_step}"
        return f"{self.val_mse:.4f}"


def _demo_fit(name: str, version: str, clipping: GradientClipping | None, seq_len: int, lr: float, max_steps: int,
              out: str, seed: int, finder: ClipThresholdFinder | None = None) -> DemoRun:
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_clip.callbacks import GradientNormMonitor, NonFiniteGradientGuard
    from lightning_clip.callbacks.tb_layout import TensorBoardLayout

    pl.seed_everything(seed, verbose=False)
    model = AddingRNN(hidden_size=64, cell="rnn", lr=lr, momentum=0.9, init_scale=1.2)
    data = AddingProblemDataModule(seq_len=seq_len, num_train=4096, num_val=512, batch_size=64, seed=seed)
    logger = TensorBoardLogger(save_dir=out, name="demo", version=version)
    stop = _StopOnDivergence()
    callbacks: list[pl.Callback] = [GradientNormMonitor(per_parameter=True), TensorBoardLayout(), stop]
    if clipping is not None:  # the three callbacks; the run without clipping shows what the data does alone
        callbacks[1:1] = [clipping, NonFiniteGradientGuard("skip")]
    if finder is not None:
        callbacks.append(finder)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        max_epochs=-1,
        logger=logger,
        log_every_n_steps=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=sys.stderr.isatty(),
        callbacks=callbacks,
    )
    search = "" if finder is None else " after the threshold search"
    print(f"Training {name}: up to {max_steps} steps{search} ...", flush=True)
    trainer.fit(model, datamodule=data)
    logger.experiment.flush()
    x, y = data.val_set.tensors
    with torch.no_grad():
        mse = float(nn.functional.mse_loss(model(x), y))
    return DemoRun(name=name, log_dir=Path(logger.log_dir), val_mse=mse, diverged_step=stop.step,
                   steps=trainer.global_step)


def run_demo(max_steps: int = 800, out: str = "lightning_logs", threshold: float | None = None,
             percentile: float | None = None, lr: float = 0.05, seq_len: int = 15, seed: int = 0,
             plot: str | None = None) -> int:
    """Train the exploding-gradient RNN without and with clipping; print both validation MSEs and the report.

    A vanilla tanh RNN (recurrent gain 1.2, SGD with momentum 0.9) on the adding problem: without
    clipping its loss diverges within a few dozen steps (the run stops there); clipped, it learns
    the task, below the 1/6 of always predicting 1.0. The clipped run uses the recommended set-up:
    :class:`~lightning_clip.ClipThresholdFinder` searches the threshold when fit starts (its steps come
    before the ``max_steps`` of training) and sets it on the ``GradientClipping``.

    Args:
        max_steps: Optimizer steps per run.
        out: TensorBoard ``save_dir`` (runs ``demo/no_clipping`` and ``demo/clipping``).
        threshold: A fixed clipping threshold instead of the search (and the warmup threshold of the adaptive one).
        percentile: Clip at this percentile of the last 200 clipped norms; its warmup threshold is the search's
            choice (or ``threshold``).
        lr: SGD learning rate (momentum 0.9).
        seq_len: Adding-problem sequence length.
        seed: Random seed (the same initial weights and batches for both runs).
        plot: PNG path of the clipped run's norms (default ``<its log dir>/gradient_norms.png``).

    Returns:
        The exit status, 0.
    """
    from lightning_clip.callbacks import ClipThresholdFinder, GradientClipping
    from lightning_clip.core.thresholds import PercentileThreshold
    from lightning_clip.tools.report import format_report, load_reports, plot_report

    start = 1.0 if threshold is None else threshold
    policy: Any = start
    if percentile is not None:
        policy = PercentileThreshold(percentile=percentile, warmup_steps=25, warmup_threshold=start, window=200,
                                     history="clipped")
    clipping = GradientClipping(policy, summary=False)  # validates the threshold
    finder = ClipThresholdFinder(plot=False) if threshold is None else None
    AddingRNN(lr=lr)  # validates lr before anything runs
    check_positive_int("seq_len", seq_len)
    how = (f"{clipping.policy!r}" if finder is None else
           f"{type(clipping.policy).__name__} at the threshold ClipThresholdFinder finds at fit start")
    print(f"A vanilla tanh RNN on the adding problem (seq_len={seq_len}, SGD lr={lr}, momentum 0.9), the same initial "
          f"weights and batches twice on CPU: without clipping, then with {how}.", flush=True)
    # A 64-unit RNN gains nothing from intra-op threads, and oversubscribed threads slow it down
    # by an order of magnitude on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        plain_run = _demo_fit("without clipping", "no_clipping", None, seq_len, lr, max_steps, out, seed)
        clipped_run = _demo_fit(f"with {how}", "clipping", clipping, seq_len, lr, max_steps, out, seed, finder)
    finally:
        torch.set_num_threads(threads)
    if finder is not None and finder.threshold is not None:
        adaptive = "" if percentile is None else f", then p{percentile:g} of the clipped norms"
        clipped_run.name = f"with clipping at {finder.threshold:.3g} (found){adaptive}"
    runs = [plain_run, clipped_run]
    plain, clipped = runs
    print(f"\nValidation MSE after {max_steps} steps (always predicting 1.0 gives {TRIVIAL_MSE:.3f}):")
    width = max(len(r.name) for r in runs)
    for r in runs:
        verdict = ""
        if r.diverged_step is None:
            verdict = (f"  {TRIVIAL_MSE / r.val_mse:.1f}x below always predicting 1.0" if r.val_mse < TRIVIAL_MSE
                       else "  no better than always predicting 1.0")
        print(f"  {r.name:<{width}}  {r.describe():>22}{verdict}")
    print(f"\nTensorBoard logs: {plain.log_dir} and {clipped.log_dir}")
    print(f"Open them with:   tensorboard --logdir {out}")
    print("  (Custom Scalars tab: pre-clip norm, post-clip norm and threshold in one chart)\n")
    for r in runs:
        for rep in load_reports(r.log_dir):
            print(format_report(rep))
            if r is clipped:
                png = Path(plot) if plot else r.log_dir / "gradient_norms.png"
                plot_report(rep, png)
                print(f"\nPlot: {png}")
            print()
    print(f"Report again later with: lightning-clip report {Path(out) / 'demo'}")
    return 0
