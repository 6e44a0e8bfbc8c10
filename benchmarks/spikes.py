"""Do the guards catch corrupted batches, and only those? Digits MLP, real Lightning Trainer.

An MLP on scikit-learn's digits (SGD, momentum 0.9) trains for ``--steps`` optimizer steps. At known
steps after the first 300 a corrupted batch is injected, cycling through three kinds:

* ``x-1e3``: the inputs multiplied by -1000 (a sign and scaling bug). Not plain x1000: a ReLU network's
  prediction barely depends on the inputs' scale, so a batch it classifies right at x1 it classifies
  right at x1000 with near-zero loss and gradient: harmless, and no spike (measured: two of four such
  batches had loss 0 and gradient 0);
* ``labels``: the batch's labels shuffled (a mislabelled shard);
* ``noise``: the inputs replaced by Gaussian noise of standard deviation 10 (a corrupt record).

Rows: no guard, a fixed clip, a z-score clip, ``SpikeGuard("grad_norm")``, ``SpikeGuard("loss")`` and
``SpikeGuard(("grad_norm", "loss"))`` at their defaults (z > 6 over the last 128 accepted steps, armed
once the window is full). Columns: validation accuracy at the end, injected steps skipped, clean steps
skipped (false positives), and the false positives of the same guard on the same run without
injections. A skipped step is one where the guard took the gradients away (the optimizer did not move).

Usage::

    python benchmarks/spikes.py            # 2,000 steps, 3 seeds (a few minutes on 2 cores)
    python benchmarks/spikes.py --quick    # 600 steps, 1 seed, into a temporary directory
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine  # noqa: E402
from _results import add_output_arguments, output_dir, write_results  # noqa: E402

KINDS = ("x-1e3", "labels", "noise")
FIRST_INJECTION = 300
#: rows: name -> (callbacks factory description, whether it can skip)
ROWS = ("no guard", "fixed clip 1.0", "z-score clip", "SpikeGuard grad_norm", "SpikeGuard loss",
        "SpikeGuard both", "SpikeGuard both, scale='log'")


def injected_steps(steps: int, every: int) -> list[int]:
    """The steps that get a corrupted batch: every ``every`` steps from step 300 on."""
    return list(range(FIRST_INJECTION, steps, every))


def _callbacks(row: str) -> list[Any]:
    from lightning_clip import GradientClipping, SpikeGuard, ZScoreThreshold

    return {
        "no guard": lambda: [],
        "fixed clip 1.0": lambda: [GradientClipping(1.0)],
        "z-score clip": lambda: [GradientClipping(ZScoreThreshold())],
        "SpikeGuard grad_norm": lambda: [SpikeGuard("grad_norm")],
        "SpikeGuard loss": lambda: [SpikeGuard("loss")],
        "SpikeGuard both": lambda: [SpikeGuard(("grad_norm", "loss"))],
        "SpikeGuard both, scale='log'": lambda: [SpikeGuard(("grad_norm", "loss"), scale="log")],
    }[row]()


@dataclass
class Result:
    row: str
    seed: int
    injected: bool
    accuracy: float
    skipped: list[int]
    seconds: float


def run(row: str, seed: int, steps: int, inject: list[int]) -> Result:
    """Train once; return the validation accuracy and the steps whose optimizer step was skipped."""
    import warnings

    import lightning.pytorch as pl
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_clip.sim.data import load_digits_tensors

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    pl.seed_everything(seed, verbose=False)
    x, y = load_digits_tensors()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
    x, y = x[perm], y[perm]
    n_val = 360
    val_x, val_y, train_x, train_y = x[:n_val], y[:n_val], x[n_val:], y[n_val:]
    injected = set(inject)

    class MLP(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
            self.corrupt = torch.Generator().manual_seed(seed + 1)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            xb, yb = batch
            step = self.global_step
            if step in injected:
                kind = KINDS[sorted(injected).index(step) % len(KINDS)]
                if kind == "x-1e3":
                    xb = xb * -1e3
                elif kind == "labels":
                    yb = yb[torch.randperm(len(yb), generator=self.corrupt)]
                else:
                    xb = torch.randn(xb.shape, generator=self.corrupt) * 10.0
            return nn.functional.cross_entropy(self.net(xb), yb)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    class Skips(pl.Callback):
        def __init__(self) -> None:
            self.skipped: list[int] = []

        def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
            if all(p.grad is None for p in pl_module.parameters()):
                self.skipped.append(trainer.global_step)

    skips = Skips()
    loader = DataLoader(TensorDataset(train_x, train_y), batch_size=32, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, callbacks=[*_callbacks(row), skips],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)
    model = MLP()
    start = time.perf_counter()
    trainer.fit(model, loader)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        logits = model.net(val_x)
        accuracy = float((logits.argmax(dim=1) == val_y).float().mean()) if torch.isfinite(logits).all() else 0.0
    return Result(row, seed, bool(inject), accuracy, skips.skipped, seconds)


def _run(args: tuple[str, int, int, list[int]]) -> Result:
    return run(*args)


def table(results: list[Result], inject: list[int], steps: int) -> list[str]:
    clean_steps = steps - len(inject)
    lines = ["| method | val accuracy (mean, min) | injected steps skipped | clean steps skipped "
             "(false positives) | run without injections: false positives | run without injections: val accuracy |",
             "|---|---|---|---|---|---|"]
    for row in ROWS:
        mine = [r for r in results if r.row == row and r.injected]
        clean = [r for r in results if r.row == row and not r.injected]
        acc = [r.accuracy for r in mine]
        caught = sum(len(set(r.skipped) & set(inject)) for r in mine)
        false_pos = sum(len(set(r.skipped) - set(inject)) for r in mine)
        total_inj = len(inject) * len(mine)
        fp_clean = f"{sum(len(r.skipped) for r in clean)} / {steps * len(clean)}" if clean else "—"
        acc_clean = f"{statistics.mean(r.accuracy for r in clean):.3f}" if clean else "—"
        lines.append(
            f"| {row} | {statistics.mean(acc):.3f}, {min(acc):.3f} | {caught} / {total_inj} "
            f"({100 * caught / total_inj:.0f}%) | {false_pos} / {clean_steps * len(mine)} | {fp_clean} | {acc_clean} |"
        )
    return lines


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_output_arguments(parser, "600 steps, 1 seed (a smoke run)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 2000)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3)")
    parser.add_argument("--workers", type=int, default=2, help="runs in parallel (processes)")
    args = parser.parse_args(argv)
    steps = args.steps or (600 if args.quick else 2000)
    seeds = list(range(args.seeds or (1 if args.quick else 3)))
    every = 25 if args.quick else 85
    inject = injected_steps(steps, every)
    out = output_dir(args.out, args.quick, "spikes")
    print(f"machine: {machine()}", flush=True)
    jobs = [(row, seed, steps, inject) for row in ROWS for seed in seeds]
    jobs += [(row, seed, steps, []) for row in ROWS if row == "no guard" or row.startswith("SpikeGuard")
             for seed in seeds]
    start = time.perf_counter()
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(args.workers, mp_context=ctx) as pool:
        results = list(pool.map(_run, jobs))
    wall = time.perf_counter() - start
    cmd = "python benchmarks/spikes.py" + (" --quick" if args.quick else "")
    lines = [
        "# Spike guards on corrupted batches: digits MLP, real Lightning Trainer",
        "",
        f"Command: `{cmd}`",
        "",
        f"Machine: {machine()}.",
        f"Total wall time: {wall:.0f} s ({args.workers} worker processes, 1 torch thread each).",
        "",
        f"Setting: MLP 64-128-10 on scikit-learn's digits (1,437 train / 360 validation), SGD lr 0.05 momentum "
        f"0.9, batch 32, {steps} optimizer steps, seeds {seeds}. {len(inject)} corrupted batches injected at steps "
        f"{inject[0]}, {inject[1]}, ... every {every} steps, cycling through {', '.join(KINDS)} (inputs x-1000; "
        "labels shuffled; inputs replaced by N(0, 10^2) noise). Guards at their defaults: SpikeGuard z > 6 over "
        "the last 128 accepted steps, armed once the window is full; the z-score clip is "
        "`GradientClipping(ZScoreThreshold())`. A skipped step is one whose gradients the guard took away.",
        "",
        *table(results, inject, steps),
        "",
        f"Mean wall time per run: {statistics.mean(r.seconds for r in results):.1f} s.",
    ]
    text = "\n".join(lines)
    print(text, flush=True)
    path = os.path.join(out, "spikes.md")
    write_results(path, text)
    print(f"wrote {path}", flush=True)
    return results


if __name__ == "__main__":
    main()
