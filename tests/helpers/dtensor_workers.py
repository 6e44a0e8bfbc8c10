"""Spawned workers for the sharded-norm tests (module level: the children import this file).

Each worker builds the same MLP on every rank, shards it with FSDP2 (``fully_shard``) on a 1-D mesh, or
with tensor parallelism plus FSDP2 on a 2-D (data x tensor) mesh, runs one backward on its own batch,
and saves what :func:`lightning_clip.core.grads.gradient_stats` and torch measured, with the number of
collectives each issued.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from tests.helpers.gloo import close_group

SIZES = (5, 8, 7, 1)  # widths: tensor-parallel dims even, FSDP shards uneven (7 rows), a 1-element bias


def make_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(SIZES) - 1):
        layers += [nn.Linear(SIZES[i], SIZES[i + 1]), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def batch(data_rank: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(100 + data_rank)
    return torch.randn(6, SIZES[0], generator=g) * 3.0, torch.randn(6, SIZES[-1], generator=g)


def loss_of(net: nn.Module, data_rank: int) -> Tensor:
    x, y = batch(data_rank)
    return nn.functional.mse_loss(net(x), y)


def _groups(mesh: Any = None) -> list[Any]:
    """The process groups a collective of this test can run on: the world and each dimension of ``mesh``."""
    groups = [dist.group.WORLD]
    if mesh is not None:
        groups += [mesh.get_group(i) for i in range(mesh.ndim)]
    return list({id(g): g for g in groups}.values())


def _count_collectives(fn: Any, groups: list[Any]) -> tuple[Any, int, int]:
    """Run ``fn()``; return its result, its calls to ``dist.all_reduce`` and the collectives it ran on ``groups``.

    The collectives are counted by each group's sequence number, which every collective on the group advances
    whichever API issued it (``dist.*``, DTensor's functional collectives): exact, where a profiler's count of
    gloo events depends on the timing of the gloo worker threads (an FSDP2 reduce-scatter still finishing when
    profiling starts is counted too).
    """
    calls = []
    original = dist.all_reduce

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    before = [g._get_sequence_number_for_group() for g in groups]
    dist.all_reduce = counting  # type: ignore[assignment]
    try:
        result = fn()
    finally:
        dist.all_reduce = original
    issued = sum(g._get_sequence_number_for_group() - b for g, b in zip(groups, before))
    return result, len(calls), issued


def worker(rank: int, world_size: int, port: int, out_dir: str, layout: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from lightning_clip.core.grads import gradient_stats

        net = make_mlp()
        linears = [m for m in net if isinstance(m, nn.Linear)]
        if layout == "fsdp":
            mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("dp",))
            dp_mesh, data_rank, data_world = mesh, rank, world_size
        else:  # "2d": data parallel x tensor parallel
            from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

            mesh = init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("dp", "tp"))
            dp_mesh = mesh["dp"]
            plan = {"0": ColwiseParallel(), "2": RowwiseParallel()}
            parallelize_module(net, mesh["tp"], plan)
            data_rank, data_world = mesh.get_local_rank("dp"), 2
        for m in linears:
            fully_shard(m, mesh=dp_mesh)
        fully_shard(net, mesh=dp_mesh)
        loss_of(net, data_rank).backward()
        grads = [p.grad for p in net.parameters()]
        dist.barrier()  # every rank's backward (and FSDP2's reduce-scatters) done before counting
        stats, calls, issued = _count_collectives(lambda: gradient_stats(grads), _groups(mesh))
        try:  # torch's own norm of the same DTensor gradients (it refuses gradients on several meshes)
            torch_total, _, torch_issued = _count_collectives(
                lambda: torch.nn.utils.get_total_norm(grads).full_tensor(), _groups(mesh))  # type: ignore[union-attr]
            torch_error = None
        except Exception as exc:  # noqa: BLE001 - recorded for the parent to check
            torch_total, torch_issued, torch_error = None, 0, f"{type(exc).__name__}: {exc}"
        # A gradient still Partial (not yet reduced) falls back to torch's own DTensor norm, in place.
        from torch.distributed.tensor import DTensor, Partial

        partial = DTensor.from_local(torch.full((3,), float(rank + 1)), mesh, [Partial()] * mesh.ndim)
        with_partial = gradient_stats([grads[0], partial, *grads[1:]]).norms
        placements = [str(g.placements) for g in grads]  # type: ignore[union-attr]
        meshes = {str(g.device_mesh) for g in grads}  # type: ignore[union-attr]
        torch.save({"norms": stats.norms, "total": stats.total_norm, "calls": calls, "collectives": issued,
                    "torch_total": torch_total, "torch_collectives": torch_issued, "torch_error": torch_error,
                    "placements": placements, "data_world": data_world, "mesh_ndim": mesh.ndim,
                    "num_meshes": len(meshes), "with_partial": with_partial},
                   Path(out_dir) / f"{layout}{rank}.pt")
    except BaseException:
        dist.destroy_process_group()
        raise
    else:
        close_group()


# ---------------------------------------------------------------------------------------------------
# Lightning ModelParallelStrategy (FSDP2) with the callbacks


CLIP = 0.05  # below every step's norm: each step is clipped
LR = 0.1
STEPS = 3


def lightning_batch_index(rank: int, step: int) -> int:
    return 100 * rank + step


def make_fsdp_module(out_dir: str) -> Any:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    class FSDPModule(pl.LightningModule):
        """The MLP, sharded with ``fully_shard`` over the data-parallel mesh; rank r's step t uses batch 100 r + t."""

        def __init__(self) -> None:
            super().__init__()
            self.net = make_mlp()

        def configure_model(self) -> None:
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for m in self.net:
                if isinstance(m, nn.Linear):
                    fully_shard(m, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            return loss_of(self.net, lightning_batch_index(self.global_rank, self.global_step))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=LR)

        def train_dataloader(self) -> DataLoader:
            return DataLoader(TensorDataset(torch.zeros(2 * STEPS, 1)), batch_size=1)

        def on_train_end(self) -> None:
            full = [p.full_tensor().detach().clone() for p in self.parameters()]  # type: ignore[attr-defined]
            torch.save(full, Path(out_dir) / f"lightning_final{self.global_rank}.pt")

    return FSDPModule()


def lightning_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """``Trainer.fit`` under ``ModelParallelStrategy`` in a process launched like an external launcher would."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size), "NODE_RANK": "0"})
    torch.set_num_threads(1)
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_clip import GradientClipping, GradientNormMonitor, NonFiniteGradientGuard

    trainer = pl.Trainer(
        accelerator="cpu", devices=world_size, max_steps=STEPS, log_every_n_steps=1,
        strategy=ModelParallelStrategy(data_parallel_size=world_size, tensor_parallel_size=1),
        logger=pl.loggers.CSVLogger(out_dir, name=f"rank{rank}", version=0),
        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
        callbacks=[GradientNormMonitor(), GradientClipping(CLIP), NonFiniteGradientGuard("skip")],
    )
    trainer.fit(make_fsdp_module(out_dir))


# ---------------------------------------------------------------------------------------------------
# FSDP1 emulated: disjoint shards of flat parameters (FSDP1 needs an accelerator; the shard sums do not)

FLAT_UNITS = ([(5, 8), (8,)], [(8, 7), (7,), (3, 3)])  # two FSDP units, each one flat parameter
REPLICATED = (4,)  # a parameter FSDP does not manage (ignored module): whole on every rank


def full_grads(seed: int = 7) -> list[list[Tensor]]:
    """The unsharded gradients of every unit, and the replicated one last, the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    units = [[torch.randn(*shape, generator=g) * (3.0 ** i) for i, shape in enumerate(unit)] for unit in FLAT_UNITS]
    return [*units, [torch.randn(*REPLICATED, generator=g)]]


def flat_shard(unit: list[Tensor], rank: int, world: int) -> Tensor:
    """Rank ``rank``'s piece of the unit's flat parameter, padded with zeros to a multiple of ``world`` (FSDP1)."""
    flat = torch.cat([t.reshape(-1) for t in unit])
    chunk = -(-flat.numel() // world)
    padded = torch.cat([flat, flat.new_zeros(chunk * world - flat.numel())])
    return padded[rank * chunk:(rank + 1) * chunk].clone()


def orig_param_shards(unit: list[Tensor], rank: int, world: int) -> list[Tensor]:
    """``use_orig_params=True``: each original parameter's part inside this rank's flat shard (may be empty)."""
    flat_numel = sum(t.numel() for t in unit)
    chunk = -(-flat_numel // world)
    lo, hi = rank * chunk, (rank + 1) * chunk
    pieces, start = [], 0
    for t in unit:
        a, b = max(lo, start), min(hi, start + t.numel())
        pieces.append(t.reshape(-1)[a - start:b - start].clone() if a < b else t.new_zeros(0))
        start += t.numel()
    return pieces


def fsdp1_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        from lightning_clip.core.functional import clip_grads_with_norm_
        from lightning_clip.core.grads import gradient_stats

        *units, replicated = full_grads()
        out: dict[str, Any] = {}
        layouts = {
            "flat": ([flat_shard(u, rank, world_size) for u in units], [True] * len(units)),
            "orig": ([p for u in units for p in orig_param_shards(u, rank, world_size)],
                     [True] * sum(len(u) for u in units)),
        }
        for name, (shards, sharded) in layouts.items():
            grads = [*shards, replicated[0].clone()]
            mask = [*sharded, False]
            stats, calls, issued = _count_collectives(
                lambda grads=grads, mask=mask: gradient_stats(grads, shard_group=dist.group.WORLD, sharded=mask),
                _groups())
            coef = clip_grads_with_norm_(grads, 1.0, stats.total_norm)
            gathered = []
            for s in grads[:-1]:  # rebuild every clipped flat shard / piece for the parent to compare
                parts = [torch.zeros(0)] * world_size
                dist.all_gather_object(parts, s)
                gathered.append(torch.cat(parts))
            out[name] = {"norms": stats.norms, "total": stats.total_norm, "calls": calls, "collectives": issued,
                         "coef": coef, "clipped": gathered, "replicated": grads[-1]}
        # a NaN in one rank's shard only: every rank must see the gradients as non-finite
        shards = [flat_shard(u, rank, world_size) for u in units]
        if rank == world_size - 1:
            shards[0][0] = float("nan")
        out["nan_finite"] = bool(gradient_stats(shards, shard_group=dist.group.WORLD).finite)
        torch.save(out, Path(out_dir) / f"fsdp1_{rank}.pt")
    except BaseException:
        dist.destroy_process_group()
        raise
    else:
        close_group()


# ---------------------------------------------------------------------------------------------------
# Every policy and guard decides alike on every rank (DDP and FSDP2), ranks holding different losses

AGREE_STEPS = 8
NAN_STEP, NAN_RANK = 5, 1  # a NaN gradient on one rank only: every rank must skip


def agreement_callbacks() -> list[Any]:
    from lightning_clip import (
        GradientClipping,
        NonFiniteGradientGuard,
        PercentileThreshold,
        QuantileThreshold,
        SpikeGuard,
        WarmupThreshold,
        ZScoreThreshold,
    )

    return [  # three policies in one GradientClipping (two clippers of one kind are refused): one per layer
        GradientClipping(PercentileThreshold(80.0, warmup_steps=2, window=4), groups={
            "net.0.*": WarmupThreshold(2, 0.5, then=ZScoreThreshold(warmup_steps=2, z_thresh=1.0, max_norm=None)),
            "net.2.*": QuantileThreshold(quantile=0.5, initial=0.2)}),
        NonFiniteGradientGuard("skip"),
        SpikeGuard(("grad_norm", "loss"), z_thresh=0.5, window=4, warmup_steps=2),  # low: spikes happen
    ]


def agreement_worker(rank: int, world_size: int, port: int, out_dir: str, strategy: str) -> None:
    """``Trainer.fit`` with :func:`agreement_callbacks` under DDP or FSDP2; saves every callback's state, the
    per-step skip decisions and the final (full) weights of this rank."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size), "NODE_RANK": "0"})
    torch.set_num_threads(1)
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    module = make_fsdp_module(out_dir)
    if strategy == "ddp":
        module.configure_model = lambda: None  # type: ignore[method-assign]  # plain DDP: nothing sharded
    base_step = module.training_step

    def training_step(batch: Any, batch_idx: int) -> Tensor:
        loss = base_step(batch, batch_idx)
        return loss * float("nan") if module.global_step == NAN_STEP and module.global_rank == NAN_RANK else loss

    module.training_step = training_step  # type: ignore[method-assign]
    module.on_train_end = lambda: None  # type: ignore[method-assign]
    skipped: list[bool] = []

    class Skips(pl.Callback):
        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            skipped.append(all(p.grad is None for p in pl_module.parameters()))

    callbacks = agreement_callbacks()
    trainer = pl.Trainer(
        accelerator="cpu", devices=world_size, max_steps=AGREE_STEPS, logger=False,
        strategy=ModelParallelStrategy(data_parallel_size=world_size, tensor_parallel_size=1) if strategy == "fsdp2"
        else DDPStrategy(process_group_backend="gloo"),
        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
        callbacks=[*callbacks, Skips()],
    )
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module)
    params = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in module.parameters()]
    states = []
    for cb in callbacks:
        st = cb.state_dict()
        if "windows" in st:  # SpikeGuard: each rank keeps its own loss window by design; decisions must agree
            st = {k: v for k, v in st.items() if k != "windows"}
            st["grad_norm_window"] = cb.state_dict()["windows"].get("grad_norm/0")
        states.append(st)
    torch.save({"states": states, "skipped": skipped, "weights": [p.detach().clone() for p in params]},
               Path(out_dir) / f"agree_{strategy}{rank}.pt")
