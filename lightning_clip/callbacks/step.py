"""One optimizer step as this package's callbacks see it, whatever their order in ``trainer.callbacks``.

Contract:

Every callback of this package that acts before an optimizer step (the guards, the monitor, the clippers) is
a :class:`StepCallback`. Lightning calls their ``on_before_optimizer_step`` one after the other; the FIRST of
them to be called in an optimizer step runs the whole step for all of them (:meth:`StepRunner.run`), and the
others find it done. The step runs in this order:

1. **measure**: one foreach pass over the optimizer's gradients gives :attr:`StepState.stats`, the norms before
   any clipping, shared by every callback. It runs when a callback first reads them (a monitor alone costs
   nothing off its logging steps).
2. **decide**: every guard (:attr:`Stage.GUARD`) hands its flags as device tensors (:meth:`StepCallback.step_flags`),
   computed from the pre-clip statistics and its own state only; all of them are read on the host in ONE copy
   (:attr:`StepState.host`). If any guard skips the step (:meth:`StepCallback.skips`), the gradients become
   ``None`` at once (:meth:`StepState.skip`).
3. **act**: each callback's :meth:`StepCallback.on_step`, by :class:`Stage` (:func:`step_callbacks`): the
   guards (count, warn, raise; the values of a step that any guard skipped enter no guard's window), the
   monitor (the pre-clip norms and gradients), then, unless the step was skipped, the clippers in a fixed
   order: unit-wise (``AdaptiveGradientClipping``), per tensor (``AdaGCClipping``), global
   (``GradientClipping``). Each clipper reads the gradients as the one before left them
   (:meth:`StepState.current`). A skipped step reaches no clipper, no threshold policy and no clipping counter.
4. **log**: what the callbacks asked for (:meth:`StepState.log`), in one device-to-host copy and one
   ``log_metrics`` call per logger. ``grad_norm/total`` is the norm before any clipping and
   ``grad_norm/clipped_total`` the norm after all of it, whichever callback logs them.

The list order therefore changes nothing: the stages fix the order, and the callbacks within a stage commute
(each guard decides on its own; the monitor only reads) and still act in a fixed order (by class name). What
would depend on it, two clippers of one kind (the second clips what the first left), is refused in ``setup``
(:func:`check_stack`).

A callback of another kind placed before the first of ours sees the step's own gradients; one placed after
or between ours sees the step done (clipped, or ``None`` when skipped). Every rank runs the same callbacks in
the same order, so the collectives inside a step (the FSDP1 norm reduction, the max of the ranks' loss
z-scores) match, and every rank takes the same decision from the same flags.

Where the state lives: one :class:`StepRunner` per Trainer, attached to it (:func:`step_runner`), holds the
current :class:`StepState` (dropped at every backward pass and at ``setup``) and each optimizer's parameter
index; nothing is kept at module level. What a callback keeps across steps is its own, and in its
``state_dict``. A callback of another kind that needs the step's norms calls :func:`step_state`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torch.optim import Optimizer

from lightning_clip import tags
from lightning_clip.core.grads import GradientStats, gradient_stats

__all__ = [
    "Stage", "StepCallback", "StepRunner", "StepState", "check_stack", "check_strategy", "fsdp1_shards",
    "is_deepspeed", "optimizer_index", "should_log", "step_callbacks", "step_runner", "step_state", "unwrap_optimizer",
    "uses_grad_scaler",
]


class Stage(IntEnum):
    """When a :class:`StepCallback` acts within an optimizer step (lower first)."""

    GUARD = 0
    """decides on the pre-clip gradients and may skip the step"""
    OBSERVE = 1
    """reads the pre-clip gradients"""
    CLIP_UNITS = 2
    """clips each unit of each tensor (``AdaptiveGradientClipping``)"""
    CLIP_TENSORS = 3
    """clips each tensor (``AdaGCClipping``)"""
    CLIP_TOTAL = 4
    """clips all gradients together (``GradientClipping``)"""

    @property
    def clips(self) -> bool:
        """Whether callbacks of this stage change the gradients (and so never see a skipped step)."""
        return self >= Stage.CLIP_UNITS


@dataclass
class _ParamIndex:
    optimizer: Optimizer
    params: list[Tensor]
    names: list[str]


@dataclass(eq=False)
class StepState:
    """The gradients of one optimizer at one step, measured once, and what the callbacks did with them.

    Attributes:
        token: identifies the optimizer step this state belongs to.
        optimizer: the (unwrapped) optimizer about to step.
        optimizer_idx: position of the optimizer in ``trainer.optimizers``.
        num_optimizers: ``len(trainer.optimizers)``.
        params: the optimizer's parameters that have a gradient.
        names: their names in the LightningModule.
        grads: their gradients (still held here after :meth:`skip`).
        shards: under FSDP1, the sharding group and which gradients are shards (see :func:`fsdp1_shards`).
        host: every guard's flags, read on the host in one copy (empty without guards).
        skipped: a guard dropped this step (the parameters' gradients are ``None``).
    """

    token: tuple[int, ...]
    optimizer: Optimizer
    optimizer_idx: int
    num_optimizers: int
    params: list[Tensor]
    names: list[str]
    grads: list[Tensor]
    shards: tuple[Any, list[bool]] | None = None
    host: dict[str, float] = field(default_factory=dict)
    skipped: bool = False
    _stats: GradientStats | None = field(default=None, repr=False)
    _changed: bool = field(default=False, repr=False)
    _current: GradientStats | None = field(default=None, repr=False)
    _clipped_total: Tensor | None = field(default=None, repr=False)
    _pending: dict[str, Tensor | float] = field(default_factory=dict, repr=False)
    _log_clipped_total: bool = field(default=False, repr=False)

    def measure(self) -> GradientStats:
        """One pass over :attr:`grads` as they are now (under FSDP1 reduced over the sharding group)."""
        if self.shards is None:
            return gradient_stats(self.grads)
        return gradient_stats(self.grads, shard_group=self.shards[0], sharded=self.shards[1])

    @property
    def stats(self) -> GradientStats:
        """The norms before any clipping (measured on first use, then shared)."""
        if self._stats is None:
            self._stats = self.measure()
        return self._stats

    def current(self) -> GradientStats:
        """The norms of the gradients as the clippers so far left them (measured again only when unknown)."""
        if not self._changed:
            return self.stats
        if self._current is None:
            self._current = self.measure()
        return self._current

    def clipped(self, stats: GradientStats | None = None, total: Tensor | None = None) -> None:
        """Tell the state that a clipper changed the gradients: their new norms, or only their new total norm,
        where the clipper knows them (``None``: measured when a later callback or the log needs them)."""
        self._changed = True
        self._current = stats
        self._clipped_total = total if total is not None or stats is None else stats.total_norm

    def clipped_total(self) -> Tensor:
        """The total norm of the gradients now (after every clipper that ran)."""
        if not self._changed:
            return self.stats.total_norm
        if self._clipped_total is None:
            self._clipped_total = self.current().total_norm
        return self._clipped_total

    def log(self, values: Mapping[str, Tensor | float], clipped_total: bool = False) -> None:
        """Ask for ``values`` (tags without the optimizer suffix) to be logged at the end of the step, and, with
        ``clipped_total``, for ``grad_norm/clipped_total``: the norm after all the clippers. A tag asked for
        twice keeps its first value (the callbacks that share a tag log the same quantity)."""
        for tag, value in values.items():
            self._pending.setdefault(tag, value)
        self._log_clipped_total |= clipped_total

    def skip(self) -> None:
        """Drop this optimizer step: the gradients become ``None`` (the optimizer then moves neither the
        weights nor its state) and :attr:`skipped` keeps every clipper away from it."""
        for p in self.params:
            p.grad = None
        self.skipped = True

    def flush(self, trainer: pl.Trainer) -> dict[str, float]:
        """Send what :meth:`log` collected to every logger: one device-to-host copy, one ``log_metrics`` call
        per logger at the step Lightning uses for the current batch (as ``LearningRateMonitor`` does)."""
        if self._log_clipped_total:
            self._pending.setdefault(tags.GRAD_NORM_CLIPPED, self.clipped_total())
        if not self._pending:
            return {}
        values, self._pending = self._pending, {}
        device = next((v.device for v in values.values() if isinstance(v, Tensor)), torch.device("cpu"))
        tensors = [
            v.detach().reshape(()).to(device, torch.float32) if isinstance(v, Tensor)
            else torch.tensor(float(v), dtype=torch.float32, device=device)
            for v in values.values()
        ]
        floats = torch.stack(tensors).tolist()  # the only device-to-host copy
        suffix = {tag: tags.with_optimizer(tag, self.optimizer_idx, self.num_optimizers) for tag in values}
        metrics = {suffix[tag]: v for tag, v in zip(values, floats)}
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        return metrics


class StepCallback(Callback):
    """Base of this package's callbacks that act before an optimizer step (the contract is in this module's
    docstring). A subclass sets :attr:`step_stage` and implements :meth:`on_step`; a guard also implements
    :meth:`step_flags` and :meth:`skips`. A subclass that overrides ``setup`` calls ``super().setup``."""

    step_stage: ClassVar[Stage]

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_stack(trainer)
        step_runner(trainer).reset()

    def step_flags(self, trainer: pl.Trainer, pl_module: pl.LightningModule, state: StepState) -> dict[str, Tensor]:
        """This step's flags, as 0-d device tensors, keyed by names unique to this callback (guards only).

        Computed from :attr:`StepState.stats` and the callback's own state only; must not change that state."""
        return {}

    def skips(self, host: Mapping[str, float]) -> bool:
        """Whether this callback drops the step, given every guard's flags read on the host (guards only)."""
        return False

    def on_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, state: StepState) -> None:
        """Act on this optimizer step (called once per step by the :class:`StepRunner`, in stage order)."""
        raise NotImplementedError

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step_runner(trainer).state = None  # new gradients: the next optimizer step is a new step, whatever its counters

    @torch.no_grad()
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        step_runner(trainer).run(trainer, pl_module, optimizer, self)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Resume the state saved by this callback under other settings, with a warning naming them.

        A callback's ``state_key`` holds its settings (so that two instances coexist in one checkpoint); a
        setting changed between the run and its resumption changes the key, and Lightning would drop the
        saved state without a word. When the checkpoint has no state under this key but exactly one state of
        this class that no other callback of the trainer claims, that state is loaded (the callback's own
        checks still refuse one it cannot continue, e.g. another percentile window). Several such states:
        ``ValueError``, since which one is meant cannot be told.
        """
        saved = checkpoint.get("callbacks") or {}
        if self.state_key in saved:
            return
        mine = type(self).__qualname__
        claimed = {getattr(c, "state_key", None) for c in getattr(trainer, "callbacks", [])}
        candidates = [k for k in saved if isinstance(k, str) and k.split("{", 1)[0] == mine and k not in claimed]
        if not candidates:
            return
        if len(candidates) > 1:
            raise ValueError(f"{mine}: the checkpoint holds {len(candidates)} states of {mine} saved under other "
                             f"settings ({', '.join(candidates)}) and none under this one's ({self.state_key}): "
                             "resume with the settings of the run that wrote it")
        warnings.warn(f"{mine}: the checkpoint's state was saved with the settings {candidates[0][len(mine):]}; "
                      f"it is resumed under this callback's settings {self.state_key[len(mine):]}", UserWarning,
                      stacklevel=2)
        self.load_state_dict(saved[candidates[0]])


def step_callbacks(trainer: pl.Trainer, caller: StepCallback | None = None) -> list[StepCallback]:
    """The trainer's :class:`StepCallback` objects (and ``caller``, when it is not among them), in the order they
    act: by stage, then by class name (so that of two guards raising on one step, the same one raises first
    whatever the list order), then by position in the list (instances of one class commute)."""
    found = [c for c in getattr(trainer, "callbacks", []) if isinstance(c, StepCallback)]
    if caller is not None and not any(c is caller for c in found):
        found.append(caller)
    return sorted(found, key=lambda c: (c.step_stage, type(c).__name__))


_HINTS = {
    Stage.CLIP_TOTAL: " (different thresholds for parts of the model: one GradientClipping with `groups=`)",
    Stage.CLIP_UNITS: " (several parameter-name patterns to leave out: one `exclude`)",
}


def check_stack(trainer: Any) -> None:
    """Raise ``ValueError`` when the trainer holds two clippers of one kind: the second would clip what the first
    left, so their order in ``Trainer(callbacks=...)`` would decide the result."""
    seen: dict[Stage, StepCallback] = {}
    for callback in step_callbacks(trainer):
        stage = callback.step_stage
        if not stage.clips:
            continue
        if stage in seen:
            name = type(seen[stage]).__name__
            raise ValueError(
                f"`Trainer(callbacks=...)` holds two {name} callbacks ({seen[stage].state_key} and "
                f"{callback.state_key}): the one later in the list would clip what the first left, so their order "
                f"would decide the result. Use one {name}{_HINTS.get(stage, '')}."
            )
        seen[stage] = callback


class StepRunner:
    """Runs each optimizer step for all of a trainer's :class:`StepCallback` objects, once (see the module
    docstring); holds the step's :class:`StepState` and each optimizer's parameter index."""

    def __init__(self) -> None:
        self.state: StepState | None = None
        self._params: dict[int, _ParamIndex] = {}

    def reset(self) -> None:
        """Forget the current step and the parameter indices (a new fit, or new optimizers)."""
        self.state = None
        self._params = {}

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any,
            caller: StepCallback | None = None) -> StepState:
        """Run the current optimizer step for every step callback, unless it ran already; return its state."""
        optimizer = unwrap_optimizer(optimizer)
        token = _token(trainer)
        state = self.state
        if state is not None and state.token == token and state.optimizer is optimizer:
            return state
        state = self.state = self._new_state(trainer, pl_module, optimizer, token)
        if not state.grads:
            return state
        callbacks = step_callbacks(trainer, caller)
        guards = [c for c in callbacks if c.step_stage == Stage.GUARD]
        flags: dict[str, Tensor] = {}
        for guard in guards:
            flags.update(guard.step_flags(trainer, pl_module, state))
        if flags:  # the one host read of the step, shared by every guard
            device = state.stats.total_norm.device
            values = torch.stack([f.detach().reshape(()).to(device, torch.float32) for f in flags.values()]).tolist()
            state.host = dict(zip(flags, values))
        if any(guard.skips(state.host) for guard in guards):
            state.skip()
        for callback in callbacks:
            if not (state.skipped and callback.step_stage.clips):
                callback.on_step(trainer, pl_module, state)
        state.flush(trainer)
        return state

    def _param_index(self, pl_module: pl.LightningModule, optimizer: Optimizer, idx: int) -> _ParamIndex:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        cached = self._params.get(idx)
        if cached is not None and cached.optimizer is optimizer and len(cached.params) == len(params):
            return cached
        names_by_id = {id(p): n for n, p in pl_module.named_parameters()}
        names = [names_by_id.get(id(p), f"param{i}") for i, p in enumerate(params)]
        index = self._params[idx] = _ParamIndex(optimizer=optimizer, params=params, names=names)
        return index

    def _new_state(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer,
                   token: tuple[int, ...]) -> StepState:
        idx = optimizer_index(trainer, optimizer)
        index = self._param_index(pl_module, optimizer, idx)
        shards = fsdp1_shards(trainer, index.params)
        params, names, grads, sharded = [], [], [], []
        for i, (p, n) in enumerate(zip(index.params, index.names)):
            if p.grad is not None or shards is not None:  # under FSDP1 every rank passes the same layout
                params.append(p)
                names.append(n)
                grads.append(p.grad if p.grad is not None else p.new_zeros(0))
                sharded.append(shards is not None and shards[1][i])
        return StepState(
            token=token, optimizer=optimizer, optimizer_idx=idx, num_optimizers=max(1, len(trainer.optimizers)),
            params=params, names=names, grads=grads, shards=None if shards is None else (shards[0], sharded),
        )


_RUNNER = "_lightning_clip_step_runner"


def step_runner(trainer: Any) -> StepRunner:
    """The trainer's :class:`StepRunner` (attached to the trainer on first use)."""
    runner = getattr(trainer, _RUNNER, None)
    if runner is None:
        runner = StepRunner()
        setattr(trainer, _RUNNER, runner)
    return runner


def step_state(trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> StepState:
    """The :class:`StepState` of the current optimizer step, for a callback of another kind in
    ``on_before_optimizer_step``: runs the step for the trainer's step callbacks if none of them ran it yet."""
    return step_runner(trainer).run(trainer, pl_module, optimizer)


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


def should_log(trainer: pl.Trainer, every_n_steps: int | None = None) -> bool:
    """Whether this optimizer step is a logging step (``log_every_n_steps`` or an override)."""
    if not trainer.loggers:
        return False
    if every_n_steps is None:
        return bool(trainer._logger_connector.should_update_logs)
    step = trainer.fit_loop.epoch_loop._batches_that_stepped + 1
    return step % every_n_steps == 0 or trainer.should_stop


def uses_grad_scaler(trainer: Any) -> bool:
    """Whether the trainer's precision plugin has a ``GradScaler`` (fp16 mixed precision), which skips the steps
    with non-finite gradients itself."""
    plugin = getattr(trainer, "precision_plugin", None)
    return getattr(plugin, "scaler", None) is not None


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
