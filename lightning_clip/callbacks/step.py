"""What the callbacks share within one optimizer step: the gradient pass and the logging gate.

Every callback of this package asks :func:`step_state` for the current optimizer step; the first
one to ask measures the gradients (one foreach pass), the others reuse the result. The cache is
keyed by the optimizer and invalidated by the trainer's step counters.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_clip.core.grads import GradientStats, gradient_stats

__all__ = [
    "StepState", "check_strategy", "fsdp1_shards", "host_decisions", "is_deepspeed", "log_values", "optimizer_index",
    "should_log", "step_state", "unwrap_optimizer",
]


@dataclass
class _ParamIndex:
    params: list[Tensor]
    names: list[str]


@dataclass
class StepState:
    """The gradients of one optimizer at one step, measured once.

    Attributes:
        token: identifies the optimizer step this state belongs to.
        optimizer_idx: position of the optimizer in ``trainer.optimizers``.
        num_optimizers: ``len(trainer.optimizers)``.
        params: the optimizer's parameters that have a gradient.
        names: their names in the LightningModule.
        grads: their gradients.
        stats: norms before clipping.
        threshold: threshold applied by :class:`GradientClipping` this step, if any.
        clipped_total: norm after clipping, if clipping ran.
        logged: tags already logged this step (so two callbacks never log one tag twice).
        host: the guards' decisions read on the host this step (see :func:`host_decisions`), once read.
        skipped: a guard dropped this step (the gradients are ``None`` now): the callbacks after it leave
            the step alone, so a skipped step never reaches a clipping policy's history.
    """

    token: tuple[int, ...]
    optimizer_idx: int
    num_optimizers: int
    params: list[Tensor]
    names: list[str]
    grads: list[Tensor]
    stats: GradientStats
    threshold: Tensor | None = None
    clipped_total: Tensor | None = None
    logged: set[str] = field(default_factory=set)
    host: dict[str, float] | None = None
    skipped: bool = False

    def skip(self) -> None:
        """Drop this optimizer step: the gradients become ``None`` (the optimizer then moves neither the
        weights nor its state) and :attr:`skipped` tells the callbacks after the guard to leave it alone."""
        for p in self.params:
            p.grad = None
        self.skipped = True


_PARAMS: weakref.WeakKeyDictionary[Optimizer, _ParamIndex] = weakref.WeakKeyDictionary()
_STATES: weakref.WeakKeyDictionary[Optimizer, StepState] = weakref.WeakKeyDictionary()


def unwrap_optimizer(optimizer: Any) -> Optimizer:
    """The torch optimizer behind a ``LightningOptimizer`` (or the optimizer itself)."""
    inner: Optimizer = getattr(optimizer, "_optimizer", optimizer)
    return inner


def optimizer_index(trainer: pl.Trainer, optimizer: Optimizer) -> int:
    """Position of ``optimizer`` in ``trainer.optimizers`` (0 when it is not there)."""
    for i, opt in enumerate(trainer.optimizers):
        if unwrap_optimizer(opt) is optimizer:
            return i
    return 0


def _param_index(pl_module: pl.LightningModule, optimizer: Optimizer) -> _ParamIndex:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    cached = _PARAMS.get(optimizer)
    if cached is not None and len(cached.params) == len(params):
        return cached
    names_by_id = {id(p): n for n, p in pl_module.named_parameters()}
    names = [names_by_id.get(id(p), f"param{i}") for i, p in enumerate(params)]
    index = _ParamIndex(params=params, names=names)
    _PARAMS[optimizer] = index
    return index


def _token(trainer: pl.Trainer) -> tuple[int, ...]:
    loop = trainer.fit_loop
    return (id(trainer), trainer.global_step, loop.total_batch_idx, loop.epoch_loop._batches_that_stepped)


def fsdp1_shards(trainer: pl.Trainer, params: list[Tensor]) -> tuple[Any, list[bool]] | None:
    """Under Lightning's ``FSDPStrategy`` (FSDP1, sharded): the group the gradients are sharded over, and which
    of ``params`` are FSDP-managed shards (flat parameters, or original parameters with ``use_orig_params``).

    ``None`` for every other strategy and for ``NO_SHARD``. Raises ``ValueError`` when the FSDP units shard
    over different process groups (their norms would need several reductions).
    """
    if "FSDPStrategy" not in _strategy_names(trainer):
        return None
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

    model = getattr(trainer.strategy, "model", None)
    units = FullyShardedDataParallel.fsdp_modules(model) if model is not None else []
    if not units:
        return None
    groups = {id(unit.process_group): unit.process_group for unit in units}
    if len(groups) > 1:
        raise ValueError(
            "The FSDP units of this model shard over different process groups; lightning_clip measures FSDP1 "
            "gradients over one sharding group. Wrap every unit with the same process group."
        )
    if units[0].sharding_strategy == ShardingStrategy.NO_SHARD:
        return None
    managed: set[int] = set()
    for unit in units:
        for flat in getattr(unit, "params", None) or []:
            managed.add(id(flat))
            for orig in [*(getattr(flat, "_params", None) or []), *(getattr(flat, "_shared_params", None) or [])]:
                managed.add(id(orig))
    return next(iter(groups.values())), [id(p) in managed for p in params]


def step_state(trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> StepState:
    """The shared :class:`StepState` of ``optimizer`` for the current step (measured on first use).

    Under FSDP1 every rank holds disjoint shards: the local sums of squares are reduced over the sharding
    group (one all-reduce), and every parameter takes part (an empty gradient where this rank holds no
    piece of it), so every rank passes the same layout and gets the same norms.
    """
    optimizer = unwrap_optimizer(optimizer)
    token = _token(trainer)
    state = _STATES.get(optimizer)
    if state is not None and state.token == token:
        return state
    index = _param_index(pl_module, optimizer)
    shards = fsdp1_shards(trainer, index.params)
    params, names, grads, sharded = [], [], [], []
    for i, (p, n) in enumerate(zip(index.params, index.names)):
        if p.grad is not None or shards is not None:
            params.append(p)
            names.append(n)
            grads.append(p.grad if p.grad is not None else p.new_zeros(0))
            sharded.append(shards is not None and shards[1][i])
    stats = gradient_stats(grads, shard_group=shards[0], sharded=sharded) if shards is not None \
        else gradient_stats(grads)
    state = StepState(
        token=token,
        optimizer_idx=optimizer_index(trainer, optimizer),
        num_optimizers=max(1, len(trainer.optimizers)),
        params=params,
        names=names,
        grads=grads,
        stats=stats,
    )
    _STATES[optimizer] = state
    return state


@runtime_checkable
class StepDecider(Protocol):
    """A callback that decides on the host each step (a guard): it hands its device-side flags to
    :func:`host_decisions`, which reads every guard's flags in one device-to-host copy."""

    def step_flags(self, trainer: pl.Trainer, pl_module: pl.LightningModule, state: StepState) -> dict[str, Tensor]:
        """This step's flags, as 0-d device tensors, keyed by names unique to this callback.

        Must not change the callback's state (it may run inside another guard's hook)."""
        ...


FINITE = "finite"


def host_decisions(trainer: pl.Trainer, pl_module: pl.LightningModule, state: StepState) -> dict[str, float]:
    """Every guard's flags for this step, read on the host in ONE device-to-host copy (then cached).

    Holds :data:`FINITE` (``1.0`` when every gradient entry is finite) and the flags of every
    :class:`StepDecider` among the trainer's callbacks, so stacked guards (the non-finite guard and
    the spike guard) share one read per optimizer step, whichever of them asks first.
    """
    if state.host is None:
        flags: dict[str, Tensor] = {FINITE: state.stats.finite}
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(callback, StepDecider):
                flags.update(callback.step_flags(trainer, pl_module, state))
        device = state.stats.total_norm.device
        values = torch.stack([f.detach().reshape(()).to(device, torch.float32) for f in flags.values()]).tolist()
        state.host = dict(zip(flags, values))
    return state.host


def should_log(trainer: pl.Trainer, every_n_steps: int | None = None) -> bool:
    """Whether this optimizer step is a logging step (``log_every_n_steps`` or an override)."""
    if not trainer.loggers:
        return False
    if every_n_steps is None:
        return bool(trainer._logger_connector.should_update_logs)
    step = trainer.fit_loop.epoch_loop._batches_that_stepped + 1
    return step % every_n_steps == 0 or trainer.should_stop


def log_values(trainer: pl.Trainer, state: StepState, values: dict[str, Tensor | float]) -> dict[str, float]:
    """Send ``values`` (tags without the optimizer suffix) to every logger, once per tag and step.

    One device-to-host copy for all values, then one ``log_metrics`` call per logger at the step
    Lightning uses for the current batch (as ``LearningRateMonitor`` does). Returns what was logged.
    """
    from lightning_clip.tags import with_optimizer

    todo: dict[str, Tensor | float] = {}
    for tag, v in values.items():
        full = with_optimizer(tag, state.optimizer_idx, state.num_optimizers)
        if full not in state.logged:
            todo[full] = v
            state.logged.add(full)
    if not todo:
        return {}
    device = next((v.device for v in todo.values() if isinstance(v, Tensor)), torch.device("cpu"))
    tensors = [
        v.detach().reshape(()).to(device, torch.float32) if isinstance(v, Tensor)
        else torch.tensor(float(v), dtype=torch.float32, device=device)
        for v in todo.values()
    ]
    floats = torch.stack(tensors).tolist()  # the only device-to-host copy
    metrics = dict(zip(todo.keys(), floats))
    step = trainer.fit_loop.epoch_loop._batches_that_stepped
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)
    return metrics


def _strategy_names(trainer: Any) -> set[str]:
    strategy = getattr(trainer, "strategy", None)
    return {cls.__name__ for cls in type(strategy).__mro__}


def is_deepspeed(trainer: Any) -> bool:
    """Whether the trainer runs Lightning's ``DeepSpeedStrategy`` (recognised by name: DeepSpeed is optional)."""
    return "DeepSpeedStrategy" in _strategy_names(trainer)


def check_strategy(trainer: Any, callback: str) -> None:
    """Raise ``ValueError`` at setup under a strategy whose gradients ``callback`` cannot act on.

    ``DeepSpeedStrategy``: the engine clips (and skips overflowing steps) inside its own optimizer step,
    from its ``gradient_clipping`` config; the gradients seen before it may be partitioned (ZeRO).
    FSDP1 and FSDP2 are served: their sharded norms are reduced over the sharding group.
    """
    if is_deepspeed(trainer):
        raise ValueError(
            f"{callback} cannot act on DeepSpeed's gradients: the DeepSpeed engine clips inside its own optimizer "
            "step. Set `gradient_clipping` in the DeepSpeed config (DeepSpeedStrategy(config={..., "
            '"gradient_clipping": 1.0})) instead; GradientNormMonitor logs the engine\'s own global norm.'
        )
