"""Picklable helpers for the multi-process DDP tests (imported by spawned children, so module level only).

Two kinds of runs:

* :func:`raw_worker` -- ``torch.multiprocessing.spawn`` target: a gloo process group, plain
  ``DistributedDataParallel`` models with :func:`~lightning_clip.distributed.hook.arc_hook`
  registered directly, many small scenarios in one process group; results saved per rank.
* :class:`ARCModule` -- a LightningModule for ``Trainer(strategy=ARCDDPStrategy(start_method="spawn"))``.

The parent recomputes everything from :func:`rank_batch` and :func:`make_net` in a single process.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset

from lightning_clip import ARCDDPStrategy
from lightning_clip.distributed.hook import ARCHookState, arc_hook
from lightning_clip.robust.options import ARCConfig
from lightning_clip.sim.byzantine import ByzantineTransform
from tests.helpers.gloo import close_group

#: Per-rank loss multipliers: rank 2's gradient is the largest, so ARC (f=1, n=3, k=1) clips it.
LOSS_SCALE = (1.0, 3.0, 10.0)
#: Tiny DDP buckets (bytes ~ 10): one parameter per bucket after DDP's rebuild, so buckets are held.
TINY_BUCKET_MB = 1e-5
LR = 0.1

#: Robust scenarios: (aggregator, nnm, byzantine spec or None).
ROBUST_CASES: tuple[tuple[str, bool, dict[str, Any] | None], ...] = (
    ("cwtm", False, None),
    ("geomed", False, None),
    ("median", False, None),
    ("krum", False, None),
    ("multikrum", True, None),
    ("mean", True, None),
    ("cwtm", False, {"ranks": [1], "attack": "scale", "factor": 1e6}),
    ("geomed", True, {"ranks": [1], "attack": "sign_flip"}),
)

#: Attack scenarios on rank 1 (ranks 0 and 2 honest), ARC with f=1 and the mean.
ATTACK_CASES: tuple[dict[str, Any], ...] = (
    {"ranks": [1], "attack": "nan"},
    {"ranks": [1], "attack": "inf"},
    {"ranks": [1], "attack": "scale", "factor": 1e6},
    {"ranks": [1], "attack": "sign_flip"},
    {"ranks": [1], "attack": "foe"},
    {"ranks": [1], "attack": "alie"},
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _WithUnused(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.unused = nn.Linear(3, 3)  # never called in forward

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def make_net(seed: int = 0, unused: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    return _WithUnused(net) if unused else net


def rank_batch(rank: int, idx: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + idx)
    x = torch.randn(6, 4, generator=g)
    y = torch.randn(6, 2, generator=g)
    return x.to(dtype), y.to(dtype)


def rank_loss(net: nn.Module, rank: int, idx: int, dtype: torch.dtype = torch.float32) -> Tensor:
    x, y = rank_batch(rank, idx, dtype)
    return nn.functional.mse_loss(net(x), y) * LOSS_SCALE[rank]


def grad_vector(params: list[Tensor]) -> Tensor:
    return torch.cat([p.grad.reshape(-1) for p in params])


def param_vector(net: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


def hook_state(byzantine: dict[str, Any] | None = None, seed: int = 0, **config: Any) -> ARCHookState:
    """``ARCHookState`` for ``ARCConfig(**config)``, with a simulated attack appended as the strategy does."""
    extra = [] if byzantine is None else [ByzantineTransform.from_config(byzantine, seed=seed)]
    return ARCHookState(ARCConfig(**config), transforms=extra)


# ---------------------------------------------------------------------------------------------------
# Single-process references (never call the hook)


def hand_arc(g: Tensor, f: int) -> tuple[Tensor, float, list[bool]]:
    """ARC by hand on finite rows: sort the norms, clip the k largest to the (k+1)-th largest."""
    n = g.shape[0]
    norms = [float(row.double().norm()) for row in g]
    k = (2 * f * (n - f)) // n
    threshold = sorted(norms, reverse=True)[k]
    out = g.clone()
    clipped = []
    for i, norm in enumerate(norms):
        clipped.append(norm > threshold)
        if norm > threshold:
            out[i] = g[i] * (threshold / norm)
    return out, threshold, clipped


def rank_grads(net: nn.Module, idx: int | list[int], dtype: torch.dtype = torch.float32, divide: float = 1.0,
               n: int = 3) -> Tensor:
    """Every rank's local gradient ``[n, d]`` (parameter order) at ``net``'s current weights.

    ``idx`` is the batch index, or several whose gradients accumulate (each loss divided by ``divide``).
    """
    rows = []
    for rank in range(n):
        net.zero_grad()
        for i in [idx] if isinstance(idx, int) else idx:
            (rank_loss(net, rank, i, dtype) / divide).backward()
        rows.append(grad_vector(list(net.parameters())).clone())
    net.zero_grad()
    return torch.stack(rows)


def sgd_step(net: nn.Module, grad: Tensor) -> None:
    """``p <- p - LR * grad`` with ``grad`` flat in parameter order (cast to each parameter's dtype)."""
    with torch.no_grad():
        offset = 0
        for p in net.parameters():
            p -= LR * grad[offset : offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()


# ---------------------------------------------------------------------------------------------------
# Raw torch.multiprocessing worker


def _ddp(net: nn.Module, state: ARCHookState | None, **kwargs: Any) -> DDP:
    model = DDP(net, bucket_cap_mb=kwargs.pop("bucket_cap_mb", TINY_BUCKET_MB), **kwargs)
    if state is not None:
        model.register_comm_hook(state, arc_hook)
    return model


def hook_stats(state: ARCHookState) -> dict[str, Any]:
    """The hook's statistics of its last step, as plain copies."""
    stats = state.last_stats
    return {
        "norms": stats.norms.clone(),
        "threshold": stats.threshold.clone(),
        "clipped": stats.clipped.clone(),
        "scales": stats.scales.clone(),
        "num_buckets": state.last_num_buckets,
        "comm": dict(state.last_comm_bytes),
        "iter": state.iter,
    }


def _train(model: DDP, rank: int, steps: int, state: ARCHookState | None = None) -> list[dict[str, Any]]:
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    out = []
    for step in range(steps):
        opt.zero_grad()
        rank_loss(model, rank, step).backward()
        opt.step()
        rec = {"params": param_vector(model.module)}
        if state is not None:
            rec.update(hook_stats(state))
        out.append(rec)
    return out


def _one_backward(model: DDP, rank: int, dtype: torch.dtype = torch.float32) -> Tensor:
    model.zero_grad()
    rank_loss(model, rank, 0, dtype).backward()
    return grad_vector([p for p in model.parameters() if p.grad is not None]).clone()


def raw_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        res: dict[str, Any] = {}
        # ARC + mean over 3 SGD steps (step 0: one bucket; later: one bucket per parameter).
        state = hook_state(num_byzantine=1)
        res["arc_mean"] = _train(_ddp(make_net(), state), rank, 3, state)
        # num_byzantine=0 against plain DDP, same buckets.
        res["plain"] = _train(_ddp(make_net(), None), rank, 2)
        s0 = hook_state(num_byzantine=0)
        res["f0"] = _train(_ddp(make_net(), s0), rank, 2, s0)
        # Byzantine rank 1 with several attacks.
        for i, spec in enumerate(ATTACK_CASES):
            st = hook_state(num_byzantine=1, byzantine=spec)
            grad = _one_backward(_ddp(make_net(), st), rank)
            res[f"attack{i}"] = {"grad": grad, **hook_stats(st)}
        # Robust aggregators on the gathered, ARC-clipped gradients.
        for i, (name, nnm, spec) in enumerate(ROBUST_CASES):
            st = hook_state(num_byzantine=1, aggregator=name, nnm=nnm, byzantine=spec)
            grad = _one_backward(_ddp(make_net(), st), rank)
            res[f"robust{i}"] = {"grad": grad, **hook_stats(st)}
        # Gradient accumulation: the first micro-batch under no_sync does not call the hook.
        st = hook_state(num_byzantine=1)
        model = _ddp(make_net(), st)
        with model.no_sync():
            rank_loss(model, rank, 0).backward()
        iter_after_no_sync = st.iter
        rank_loss(model, rank, 1).backward()
        res["accumulate"] = {"grad": grad_vector(list(model.parameters())), "iter_no_sync": iter_after_no_sync,
                             **hook_stats(st)}
        # bf16 gradients: norms in float32.
        st = hook_state(num_byzantine=1)
        grad = _one_backward(_ddp(make_net().to(torch.bfloat16), st), rank, torch.bfloat16)
        res["bf16"] = {"grad": grad, **hook_stats(st)}
        # find_unused_parameters=True: the unused parameter's bucket entries are zeros.
        st = hook_state(num_byzantine=1)
        model = _ddp(make_net(unused=True), st, find_unused_parameters=True)
        model.zero_grad()
        rank_loss(model, rank, 0).backward()
        res["unused"] = {
            "grads": {n: (None if p.grad is None else p.grad.clone()) for n, p in model.module.named_parameters()},
            **hook_stats(st),
        }
        torch.save(res, Path(out_dir) / f"rank{rank}.pt")
    except BaseException:
        dist.destroy_process_group()
        raise
    else:
        close_group()


def peer_failure_worker(rank: int, world_size: int, port: int, out_dir: str, dead_rank: int, dead_step: int,
                        hang_seconds: float = 0.0) -> None:
    """Train with ARC; rank ``dead_rank`` exits abruptly at ``dead_step`` (or, with ``hang_seconds``, sleeps that
    long there, past the process group's 3 s timeout, then exits); the others save what they raised."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    timeout = {"timeout": datetime.timedelta(seconds=3)} if hang_seconds else {}
    dist.init_process_group("gloo", rank=rank, world_size=world_size, **timeout)
    model = _ddp(make_net(), hook_state(num_byzantine=1))
    try:
        for step in range(dead_step + 2):
            if rank == dead_rank and step == dead_step:
                time.sleep(hang_seconds)  # hung: alive, holding its connections, not taking part
                os._exit(3)  # a crash: no clean shutdown of the process group
            model.zero_grad()
            rank_loss(model, rank, step).backward()
        outcome = {"type": None, "message": "finished"}
    except BaseException as exc:
        outcome = {"type": type(exc).__name__, "message": str(exc)}
    torch.save(outcome, Path(out_dir) / f"peer{rank}.pt")


# ---------------------------------------------------------------------------------------------------
# Lightning


class ARCModule(pl.LightningModule):
    """The MLP of :func:`make_net`; each rank's batch ``batch_idx`` comes from :func:`rank_batch`."""

    def __init__(self, out_dir: str | None = None) -> None:
        super().__init__()
        self.net = make_net()
        self.out_dir = out_dir

    def on_train_end(self) -> None:
        # What the strategy exposes to users, saved per rank for the parent to check.
        if self.out_dir is not None:
            stats = self.trainer.strategy.last_arc_stats
            torch.save(stats._asdict(), Path(self.out_dir) / f"stats{self.global_rank}.pt")

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return rank_loss(self.net, self.global_rank, batch_idx)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR)

    def train_dataloader(self) -> DataLoader:
        # Contents are ignored (rank_batch makes the data); 4 batches per rank with 3 ranks.
        return DataLoader(TensorDataset(torch.zeros(12, 1)), batch_size=1)


class RecordingModule(pl.LightningModule):
    """The MLP of :func:`make_net`; step ``t`` of every rank uses :meth:`loss` (``rank_loss(rank, t)``, independent
    of the loader) and records ``(step, weights)`` after every step. Subclasses :meth:`save` what they check at the
    end under ``out_dir`` as ``<tag>_rank<rank>.pt``.
    """

    def __init__(self, out_dir: str, tag: str, num_samples: int = 60) -> None:
        super().__init__()
        self.net = make_net()
        self.out_dir = out_dir
        self.tag = tag
        self.num_samples = num_samples
        self.records: list[tuple[Any, ...]] = []

    def loss(self, rank: int, step: int) -> Tensor:
        return rank_loss(self.net, rank, step)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.loss(self.global_rank, self.global_step)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.records.append((self.global_step, param_vector(self.net).clone()))

    def save(self, **extra: Any) -> None:
        torch.save({"records": self.records, **extra}, Path(self.out_dir) / f"{self.tag}_rank{self.global_rank}.pt")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR)  # momentum-free, as in the paper

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.zeros(self.num_samples, 1)), batch_size=1)  # contents are ignored


def fit_resumable(module: pl.LightningModule, strategy: ARCDDPStrategy, devices: int, max_steps: int, root: Path,
                  ckpt_dir: Path | None = None, ckpt_path: Path | None = None, **trainer_kwargs: Any) -> None:
    """One ``Trainer.fit`` on this rank: checkpoints every 2 steps into ``ckpt_dir``, or resumes from ``ckpt_path``."""
    callbacks = []
    if ckpt_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=str(ckpt_dir), filename="{step}", every_n_train_steps=2,
                                         save_top_k=-1))
    trainer_kwargs.setdefault("logger", False)
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, max_steps=max_steps, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=ckpt_dir is not None, callbacks=callbacks,
        strategy=strategy, default_root_dir=str(root), **trainer_kwargs,
    )
    trainer.fit(module, ckpt_path=None if ckpt_path is None else str(ckpt_path))
