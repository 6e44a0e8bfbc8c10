"""Tiny models, data, trainers and recorders shared by the tests (deterministic, CPU only)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[2]


class TwoOptimizers(pl.LightningModule):
    """Manual optimization with two optimizers over disjoint parameter sets."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.a = nn.Linear(8, 1)
        self.b = nn.Linear(8, 1)
        self.seen: list[tuple[int, list[float]]] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt_a, opt_b = self.optimizers()
        loss_a = nn.functional.mse_loss(self.a(x), y) * 100
        opt_a.zero_grad()
        self.manual_backward(loss_a)
        opt_a.step()
        loss_b = nn.functional.mse_loss(self.b(x), y) * 0.001
        opt_b.zero_grad()
        self.manual_backward(loss_b)
        opt_b.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.a.parameters(), lr=0.01), torch.optim.SGD(self.b.parameters(), lr=0.01)


class TinyRegressor(pl.LightningModule):
    """A small MLP on random regression data; `lr` large enough that clipping matters."""

    def __init__(self, lr: float = 0.05, momentum: float = 0.0, optimizer: str = "sgd", nan_at: set[int] | None = None,
                 scale_loss: float = 1.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        self.lr = lr
        self.momentum = momentum
        self.optimizer_name = optimizer
        self.nan_at = nan_at or set()
        self.scale_loss = scale_loss

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y) * self.scale_loss
        if self.global_step in self.nan_at:
            loss = loss * float("nan")
        return loss

    def configure_optimizers(self):
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


class SpikyRegressor(TinyRegressor):
    """TinyRegressor whose loss is multiplied by ``factor`` at the optimizer steps in ``spike_at``."""

    def __init__(self, spike_at: set[int], factor: float = 50.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.spike_at = spike_at
        self.factor = factor

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * self.factor if self.global_step in self.spike_at else loss


def make_loader(n: int = 64, batch_size: int = 8, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x.sum(dim=1, keepdim=True) ** 2) + torch.randn(n, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def make_trainer(tmp_path, callbacks=(), max_steps: int = 8, **kwargs) -> pl.Trainer:
    defaults = dict(
        default_root_dir=str(tmp_path),
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
        logger=False,
        deterministic=True,
    )
    defaults.update(kwargs)
    return pl.Trainer(callbacks=list(callbacks), **defaults)


class RecordingLogger(pl.loggers.Logger):
    """Keeps every logged metric in memory: {name: [(step, value), ...]}."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: dict[str, list[tuple[int, float]]] = {}

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        return None  # hyperparameters are not under test

    def log_metrics(self, metrics, step=None) -> None:
        for k, v in metrics.items():
            self.metrics.setdefault(k, []).append((step, float(v)))

    def series(self, name: str) -> list[float]:
        return [v for _, v in self.metrics.get(name, [])]


class NormRecorder(pl.Callback):
    """Writes, per rank, the grad norm it sees before each optimizer step (after all ranks' all-reduce)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.norms: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(float(torch.nn.utils.get_total_norm(grads)))

    def on_fit_end(self, trainer, pl_module):
        import json

        path = os.path.join(self.out_dir, f"rank{trainer.global_rank}.json")
        metrics = getattr(trainer.logger, "metrics", {})
        logged = {k: float(v[-1][1]) for k, v in metrics.items()}
        with open(path, "w") as f:
            json.dump({"norms": self.norms, "logged": logged,
                       "weights": [p.detach().flatten().tolist() for p in pl_module.parameters()]}, f)


class Snapshot(pl.Callback):
    """Records weights and optimizer state before and after each optimizer step."""

    def __init__(self) -> None:
        self.before: dict[int, tuple] = {}
        self.after: dict[int, tuple] = {}

    def _snap(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        return ([p.detach().clone() for p in pl_module.parameters()], copy.deepcopy(opt.state_dict()))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before[trainer.global_step] = self._snap(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after[trainer.global_step - 1] = self._snap(trainer, pl_module)


def states_equal(a, b) -> bool:
    """Nested dicts / lists / tensors equal bit for bit (NaN equal to NaN in the same place)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(states_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(states_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                      and torch.equal(a.nan_to_num(), b.nan_to_num()))
    return a == b


def quick_benchmark(name: str, tmp_path_factory: pytest.TempPathFactory, min_png_bytes: int,
                    wall_time: str) -> tuple[Path, str, str]:
    """Run ``python -m benchmarks.<name> --quick --out <new dir>`` in a fresh process: ``(out, <name>.md, stdout)``.

    Fails the calling test, with the end of the script's output, when it exits non-zero; checks what
    every benchmark report holds: its PNG (at least ``min_png_bytes``), the command that made it, the
    machine and the line starting with ``wall_time``.
    """
    out = tmp_path_factory.mktemp(name)
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--quick", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    md = (out / f"{name}.md").read_text()
    png = (out / f"{name}.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > min_png_bytes
    assert f"Command: `python -m benchmarks.{name} --quick --out " in md
    assert "nproc=" in md and "torch " in md and wall_time in md
    return out, md, proc.stdout
