"""GradientClipping: clip each optimizer's gradients by norm or by value, fixed or adaptive."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_clip import tags
from lightning_clip.callbacks.step import Stage, StepCallback, StepState, check_strategy, should_log, unwrap_optimizer
from lightning_clip.core.functional import clip_grads_by_value_, clip_grads_with_norm_
from lightning_clip.core.thresholds import FixedThreshold, ThresholdPolicy, as_policy
from lightning_clip.exceptions import (
    check_choice,
    check_non_negative_int,
    check_optional_positive_int,
    check_patterns,
    check_patterns_match,
)

__all__ = ["CLIP_RATE_BANDS", "GradientClipping", "GroupKey", "OptimizerClipState", "clip_rate_advice", "group_name"]

#: A key of ``GradientClipping(groups=...)``: a parameter-name pattern or an optimizer param-group index.
GroupKey = str | int

_COUNTERS = ("clipped", "norm_sum", "norm_max", "nonfinite")

#: How to read a clip rate: ``(upper bound, reading)``; a rate takes the first band it is below.
CLIP_RATE_BANDS: tuple[tuple[float, str], ...] = (
    (0.01, "threshold may be too high"),
    (0.05, "rare clipping"),
    (0.25, "healthy"),
    (0.50, "frequent: consider a lower learning rate"),
    (1.01, "excessive: clipped on most steps; if the loss is not falling, the threshold is too low or the "
           "learning rate too high (recurrent nets often train best clipped on most steps)"),
)


def clip_rate_advice(rate: float) -> str:
    """Return the reading of a clip rate in ``[0, 1]`` (<1% too high, 5-25% healthy, >50% excessive)."""
    for upper, text in CLIP_RATE_BANDS:
        if rate < upper:
            return text
    return CLIP_RATE_BANDS[-1][1]


@dataclass
class OptimizerClipState:
    """What :class:`GradientClipping` keeps for one optimizer: its policy and its counters.

    The counters are 0-d tensors on the gradients' device (moved there at the first update), so
    counting never synchronises the host with the device; reading them (:meth:`clip_rate`,
    :meth:`health`, :meth:`state_dict`) does.

    Attributes:
        policy: this optimizer's threshold policy.
        steps: optimizer steps seen.
        clipped: steps whose gradients were clipped (int64).
        norm_sum: sum of the finite pre-clip norms (fp64).
        norm_max: largest finite pre-clip norm (the norms' dtype, at least fp32).
        nonfinite: steps whose norm was NaN or Inf (int64).
    """

    policy: ThresholdPolicy
    steps: int = 0
    clipped: Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.long))
    norm_sum: Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))
    norm_max: Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float32))
    nonfinite: Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.long))

    def update(self, total: Tensor, finite: Tensor, was_clipped: Tensor) -> None:
        """Count one step with pre-clip norm ``total`` (0-d tensors; nothing is read on the host)."""
        if self.clipped.device != total.device:
            for k in _COUNTERS:
                setattr(self, k, getattr(self, k).to(total.device))
        finite_total = torch.where(finite, total, torch.zeros_like(total))
        self.steps += 1
        self.clipped = self.clipped + was_clipped.long()
        self.norm_sum = self.norm_sum + finite_total.double()
        self.norm_max = torch.maximum(self.norm_max, finite_total)
        self.nonfinite = self.nonfinite + (~finite).long()

    def clip_rate(self) -> float:
        """Fraction of the steps that were clipped (0 before the first step)."""
        return float(self.clipped) / self.steps if self.steps else 0.0

    def health(self) -> dict[str, float]:
        """Steps, clip rate, mean and max finite norm, non-finite steps."""
        nonfinite = int(self.nonfinite)
        return {
            "steps": float(self.steps),
            "clip_rate": self.clip_rate(),
            "mean_norm": float(self.norm_sum) / max(self.steps - nonfinite, 1),
            "max_norm": float(self.norm_max),
            "nonfinite_steps": float(nonfinite),
        }

    def state_dict(self) -> dict[str, Any]:
        """The policy's state and the counters (CPU tensors, dtypes kept, so resume is exact)."""
        counters = {k: getattr(self, k).detach().cpu().clone() for k in _COUNTERS}
        return {"policy": self.policy.state_dict(), "steps": self.steps, **counters}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (missing entries keep their current value)."""
        if "policy" in state:
            self.policy.load_state_dict(state["policy"])
        self.steps = int(state.get("steps", self.steps))
        for k in _COUNTERS:
            if k in state:
                setattr(self, k, torch.as_tensor(state[k]).detach().cpu().clone())


def group_name(key: GroupKey) -> str:
    """The name of a clipping group in tags and checkpoints: the pattern itself, or ``param_group<i>``."""
    return f"param_group{key}" if isinstance(key, int) else key


def _check_groups(groups: Any) -> dict[GroupKey, ThresholdPolicy]:
    if groups is None:
        return {}
    if not isinstance(groups, Mapping):
        raise TypeError(f"Expected argument `groups` to be a mapping from parameter-name patterns (str) or "
                        f"param-group indices (int) to thresholds but got {groups!r}")
    out: dict[GroupKey, ThresholdPolicy] = {}
    names: dict[str, GroupKey] = {}
    for key, value in groups.items():
        if isinstance(key, str):
            check_patterns("groups", key)
        elif isinstance(key, int) and not isinstance(key, bool):
            check_non_negative_int("groups", key)
        else:
            raise TypeError(f"Expected every key of argument `groups` to be a parameter-name pattern (str, fnmatch "
                            f"style) or a param-group index (int >= 0) but got {key!r}")
        name = group_name(key)
        if name in names:
            raise ValueError(f"Expected the keys of argument `groups` to name distinct groups but {names[name]!r} "
                             f"and {key!r} are both called {name!r}")
        names[name] = key
        policy = as_policy(value, name=f"groups[{key!r}]")
        if any(policy is other for other in out.values()):
            raise ValueError(f"Expected every group of argument `groups` to have its own threshold object but "
                             f"groups[{key!r}] is the same {policy!r} as another group's (each keeps its own history)")
        out[key] = policy
    return out


@dataclass
class _GroupLayout:
    """Which gradient tensors of one optimizer's step belong to which group (recomputed when they change).

    Attributes:
        names: the parameter names of the step's gradients, in order.
        members: per slot (the ``groups`` in order, then the ungrouped parameters), the gradient positions.
        index: ``members`` as index tensors, per device (made on first use there).
    """

    names: tuple[str, ...]
    members: list[list[int]]
    index: dict[torch.device, list[Tensor]] = field(default_factory=dict)

    def indices(self, device: torch.device) -> list[Tensor]:
        if device not in self.index:
            self.index[device] = [torch.tensor(m, dtype=torch.long, device=device) for m in self.members]
        return self.index[device]


class GradientClipping(StepCallback):
    """Clip the gradients of every optimizer in ``on_before_optimizer_step``.

    With a fixed threshold the result equals Lightning's ``Trainer(gradient_clip_val=...,
    gradient_clip_algorithm=...)``; a :class:`~lightning_clip.ThresholdPolicy` makes it adaptive.
    Each optimizer gets its own copy of the policy (its own history). The gradient norms are shared
    with :class:`GradientNormMonitor` and :class:`NonFiniteGradientGuard`: stacking all three costs one
    norm pass and one scale pass. Nothing synchronises the host with the device except on logging
    steps.

    Wherever it is in ``Trainer(callbacks=...)``, it clips after every guard decided (a step a guard skips
    never reaches the policy or the counters) and after the unit-wise and per-tensor clippers
    (:class:`AdaptiveGradientClipping`, :class:`AdaGCClipping`): its policy sees the norm they left. See
    :mod:`lightning_clip.callbacks.step`.

    Logged per optimizer step (suffix ``_opt<i>`` with several optimizers):

    ============================ ===================================================
    ``grad_norm/total``          norm before any clipping
    ``grad_clip/threshold``      threshold in force
    ``grad_norm/clipped_total``  norm after all clipping
    ``grad_clip/clip_rate``      fraction of this optimizer's steps clipped so far
    ============================ ===================================================

    Per-group thresholds: ``groups`` maps parameter-name patterns (``fnmatch`` style, e.g. ``"encoder.*"``) or
    optimizer param-group indices (``0``, ``1``, ...) to thresholds. Each group is clipped by its own norm with
    its own policy; the parameters in no group are clipped by their own norm with ``threshold``. A parameter
    belongs to the first group (in the mapping's order) that matches it. A group that matches no parameter,
    or only parameters an earlier group took, is an error at the start of ``fit``. With groups,
    ``grad_clip/threshold`` is the ungrouped parameters' threshold, ``grad_clip/clip_rate`` counts the steps
    on which any group was clipped, the two ``grad_norm`` totals stay those of all the gradients, and each
    group adds ``grad_clip/norm/<group>``, ``grad_clip/threshold/<group>`` and ``grad_clip/clip_rate/<group>``
    (``<group>`` is the pattern, or ``param_group<i>``).

    Args:
        threshold: a positive number (fixed) or a threshold policy.
        mode: ``"norm"`` scales all gradients by ``min(1, threshold / total_norm)``; ``"value"``
            clamps each entry to ``[-threshold, threshold]`` (fixed thresholds only).
        log: log the tags above.
        log_every_n_steps: override the trainer's ``log_every_n_steps`` for these tags.
        summary: print a one-line gradient-health summary per optimizer at the end of ``fit``.
        groups: per-group thresholds (``mode="norm"`` only): ``{pattern or param-group index: threshold}``.
    """

    step_stage = Stage.CLIP_TOTAL

    def __init__(
        self,
        threshold: ThresholdPolicy | float = 1.0,
        mode: str = "norm",
        log: bool = True,
        log_every_n_steps: int | None = None,
        summary: bool = True,
        groups: Mapping[str | int, ThresholdPolicy | float] | None = None,
    ) -> None:
        self.mode = check_choice("mode", mode, ("norm", "value"))
        self.policy = as_policy(threshold)
        if self.mode == "value" and not isinstance(self.policy, FixedThreshold):
            raise ValueError(
                f"Expected argument `threshold` to be a positive number or FixedThreshold when "
                f"mode='value' (adaptive policies track norms) but got {self.policy!r}"
            )
        self.groups = _check_groups(groups)
        if self.groups and self.mode != "norm":
            raise ValueError(f"Expected argument `groups` to be empty when mode={self.mode!r}: per-group "
                             f"thresholds clip each group by its norm (mode='norm') but got {groups!r}")
        if any(self.policy is p for p in self.groups.values()):
            raise ValueError("Expected argument `groups` to hold threshold objects other than `threshold` "
                             "(each group keeps its own history)")
        check_optional_positive_int("log_every_n_steps", log_every_n_steps)
        self.log = bool(log)
        self.log_every_n_steps = log_every_n_steps
        self.summary = bool(summary)
        self._optimizers: dict[int, OptimizerClipState] = {}
        #: per optimizer index: one state per group, in the order of ``groups``
        self._group_states: dict[int, list[OptimizerClipState]] = {}
        self._layouts: dict[int, _GroupLayout] = {}

    @property
    def state_key(self) -> str:
        if not self.groups:
            return self._generate_state_key(mode=self.mode, threshold=repr(self.policy))
        return self._generate_state_key(mode=self.mode, threshold=repr(self.policy),
                                        groups=[(group_name(k), repr(p)) for k, p in self.groups.items()])

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer, "GradientClipping")
        clip_val = getattr(trainer, "gradient_clip_val", None)
        if clip_val:
            raise ValueError(
                f"GradientClipping is in `Trainer(callbacks=...)` and the Trainer also has "
                f"`gradient_clip_val={clip_val}`: gradients would be clipped twice. Remove one of them."
            )
        super().setup(trainer, pl_module, stage)
        if not self.groups:
            return
        names = [n for n, _ in pl_module.named_parameters()]
        check_patterns_match("groups", [k for k in self.groups if isinstance(k, str)], names)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.groups:
            return
        names_by_id = {id(p): n for n, p in pl_module.named_parameters()}
        used: set[int] = set()
        for optimizer in trainer.optimizers:
            groups = unwrap_optimizer(optimizer).param_groups
            params = [p for g in groups for p in g["params"]]
            names = [names_by_id.get(id(p), f"param{i}") for i, p in enumerate(params)]
            group_idx = [gi for gi, g in enumerate(groups) for _ in g["params"]]
            for slot in self._assign(names, group_idx):
                if slot < len(self.groups):
                    used.add(slot)
        for slot, key in enumerate(self.groups):
            if slot not in used:
                what = (f"param group {key} is in no optimizer, or an earlier group took all its parameters"
                        if isinstance(key, int) else
                        f"{key!r} matches no optimizer's parameter that an earlier group did not take")
                raise ValueError(f"Expected every group of argument `groups` to get a parameter (the first "
                                 f"matching group wins) but {what}")

    def _assign(self, names: list[str], param_groups: list[int]) -> list[int]:
        """The slot of each parameter: the first matching group's position, or ``len(groups)`` for none."""
        keys = list(self.groups)
        slots = []
        for name, gi in zip(names, param_groups):
            slot = next((s for s, k in enumerate(keys)
                         if (k == gi if isinstance(k, int) else fnmatchcase(name, k))), len(keys))
            slots.append(slot)
        return slots

    def _layout(self, state: StepState) -> _GroupLayout:
        layout = self._layouts.get(state.optimizer_idx)
        if layout is not None and layout.names == tuple(state.names):
            return layout
        group_of = {id(p): gi for gi, g in enumerate(state.optimizer.param_groups) for p in g["params"]}
        slots = self._assign(list(state.names), [group_of.get(id(p), -1) for p in state.params])
        members: list[list[int]] = [[] for _ in range(len(self.groups) + 1)]
        for i, slot in enumerate(slots):
            members[slot].append(i)
        layout = self._layouts[state.optimizer_idx] = _GroupLayout(names=tuple(state.names), members=members)
        return layout

    def group_state(self, optimizer_idx: int, key: GroupKey) -> OptimizerClipState:
        """The policy and counters of group ``key`` of optimizer ``optimizer_idx`` (created on first use).

        Optimizer 0 uses the policy given in ``groups``; the others get a fresh copy of it.
        """
        return self._group_list(optimizer_idx)[list(self.groups).index(key)]

    def _group_list(self, optimizer_idx: int) -> list[OptimizerClipState]:
        """Optimizer ``optimizer_idx``'s group states, in the order of ``groups`` (created on first use)."""
        states = self._group_states.get(optimizer_idx)
        if states is None:
            states = self._group_states[optimizer_idx] = [
                OptimizerClipState(p if optimizer_idx == 0 else p.fresh()) for p in self.groups.values()]
        return states

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning_clip.callbacks.tb_layout import write_layout

        write_layout(trainer)  # TensorBoard custom-scalars layout, once per logger

    def optimizer_state(self, optimizer_idx: int) -> OptimizerClipState:
        """The policy and counters of optimizer ``optimizer_idx`` (created on first use).

        Optimizer 0 uses ``self.policy`` itself; the others get a fresh copy of it.
        """
        state = self._optimizers.get(optimizer_idx)
        if state is None:
            policy = self.policy if optimizer_idx == 0 else self.policy.fresh()
            state = self._optimizers[optimizer_idx] = OptimizerClipState(policy)
        return state

    def set_threshold(self, value: float) -> None:
        """Give the threshold policy (and every optimizer's copy of it) the threshold ``value``.

        What ``value`` becomes, per policy (:func:`lightning_clip.core.search.apply_threshold`):
        ``FixedThreshold``: ``max_norm``; ``PercentileThreshold`` and ``WarmupThreshold``: ``warmup_threshold``;
        ``ZScoreThreshold``: ``max_norm`` (the warmup threshold and the cap); ``QuantileThreshold``: ``initial``
        and the threshold in force. What the policies observed is kept; per-group thresholds are left as they
        are. The state key names the threshold, so it changes with it.
        """
        from lightning_clip.core.search import apply_threshold

        apply_threshold(self.policy, value)
        for state in self._optimizers.values():
            if state.policy is not self.policy:
                apply_threshold(state.policy, value)

    def policy_for(self, optimizer_idx: int) -> ThresholdPolicy:
        """The threshold policy of optimizer ``optimizer_idx`` (created on first use)."""
        return self.optimizer_state(optimizer_idx).policy

    def clip_rate(self, optimizer_idx: int = 0) -> float:
        """Fraction of optimizer ``optimizer_idx``'s steps that were clipped so far (in any group)."""
        state = self._optimizers.get(optimizer_idx)
        return state.clip_rate() if state is not None else 0.0

    @property
    def steps(self) -> dict[int, int]:
        """Optimizer steps seen so far, per optimizer index (optimizers that stepped only)."""
        return {i: s.steps for i, s in sorted(self._optimizers.items()) if s.steps}

    def on_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, state: StepState) -> None:
        opt = self.optimizer_state(state.optimizer_idx)
        current = state.current()  # the norms the unit-wise / per-tensor clippers left (the step's, without them)
        if self.groups:
            self._clip_groups(trainer, state, current.norms, current.total_norm, opt)
            return
        total = current.total_norm
        threshold = opt.policy(total)
        finite = torch.isfinite(total)
        if self.mode == "norm":
            coef = clip_grads_with_norm_(state.grads, threshold, total)
            state.clipped(total=total * coef)
            was_clipped = finite & (coef < 1.0)
        else:
            max_abs = torch.stack(torch._foreach_norm(state.grads, float("inf"))).max().float()
            clip_grads_by_value_(state.grads, cast(FixedThreshold, opt.policy).max_norm)  # checked in __init__
            was_clipped = finite & (max_abs > threshold)
            state.clipped()  # the post-clip norm: one more pass, on logging steps only
        opt.update(total, finite, was_clipped)
        if self.log and should_log(trainer, self.log_every_n_steps):
            state.log({tags.GRAD_NORM_TOTAL: state.stats.total_norm, tags.CLIP_THRESHOLD: threshold,
                       tags.CLIP_RATE: opt.clipped.double() / opt.steps}, clipped_total=True)

    def _clip_groups(self, trainer: pl.Trainer, state: StepState, norms: Tensor, total: Tensor,
                     opt: OptimizerClipState) -> None:
        """Clip each group (and the ungrouped parameters) by its own norm and policy."""
        layout = self._layout(state)
        index = layout.indices(norms.device)
        keys = list(self.groups)
        group_states = self._group_list(state.optimizer_idx)
        values: dict[str, Tensor | float] = {}
        clipped_sq: list[Tensor] = []
        any_clipped = torch.zeros((), dtype=torch.bool, device=total.device)
        threshold: Tensor | None = None
        for slot, members in enumerate(layout.members):
            if not members:
                continue
            ungrouped = slot == len(keys)
            gstate = opt if ungrouped else group_states[slot]
            group_total = torch.linalg.vector_norm(norms[index[slot]])  # as torch's get_total_norm on the group
            group_threshold = gstate.policy(group_total)
            coef = clip_grads_with_norm_([state.grads[i] for i in members], group_threshold, group_total)
            was_clipped = torch.isfinite(group_total) & (coef < 1.0)
            any_clipped = any_clipped | was_clipped
            clipped_sq.append((group_total * coef).square())
            if ungrouped:
                threshold = group_threshold
            else:
                gstate.update(group_total, torch.isfinite(group_total), was_clipped)
                name = group_name(keys[slot])
                values[tags.group_tag(tags.GROUP_NORM, name)] = group_total
                values[tags.group_tag(tags.CLIP_THRESHOLD, name)] = group_threshold
                values[tags.group_tag(tags.CLIP_RATE, name)] = gstate.clipped.double() / gstate.steps
        opt.update(total, torch.isfinite(total), any_clipped)
        if not (self.log and should_log(trainer, self.log_every_n_steps)):
            state.clipped()
            return
        state.clipped(total=torch.stack(clipped_sq).sum().sqrt())
        head: dict[str, Tensor | float] = {tags.GRAD_NORM_TOTAL: state.stats.total_norm}
        if threshold is not None:
            head[tags.CLIP_THRESHOLD] = threshold
        head[tags.CLIP_RATE] = opt.clipped.double() / opt.steps
        state.log({**head, **values}, clipped_total=True)

    def health(self) -> dict[int, dict[str, float]]:
        """Per optimizer that stepped: steps, clip rate, mean and max finite norm, non-finite steps."""
        return {i: s.health() for i, s in sorted(self._optimizers.items()) if s.steps}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.summary:
            return
        for idx, h in self.health().items():
            name = f"optimizer {idx}" if len(self.steps) > 1 else "gradients"
            rank_zero_info(
                f"[lightning_clip] {name}: {int(h['steps'])} steps, clip rate {h['clip_rate']:.1%} "
                f"({clip_rate_advice(h['clip_rate'])}), mean norm {h['mean_norm']:.4g}, max norm "
                f"{h['max_norm']:.4g}, non-finite steps {int(h['nonfinite_steps'])}"
            )

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"optimizers": {i: s.state_dict() for i, s in self._optimizers.items()}}
        if self.groups:
            out["groups"] = {i: {group_name(k): s.state_dict() for k, s in zip(self.groups, states)}
                             for i, states in self._group_states.items()}
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._optimizers = {}
        self._group_states = {}
        self._layouts = {}
        self.policy.reset()
        for policy in self.groups.values():
            policy.reset()
        for i, state in state_dict.get("optimizers", {}).items():
            self.optimizer_state(int(i)).load_state_dict(state)
        for i, groups in state_dict.get("groups", {}).items():
            for key in self.groups:
                if group_name(key) in groups:
                    self.group_state(int(i), key).load_state_dict(groups[group_name(key)])
