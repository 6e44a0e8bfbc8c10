"""``ARCDDPStrategy``: DDP whose gradient aggregation is protected by ARC, registered as ``"ddp_arc"``.

Each rank's local gradient is clipped by Adaptive Robust Clipping (arXiv 2405.14432) across the ranks
*before* it is aggregated, so up to ``num_byzantine`` misbehaving ranks (NaN/Inf, huge or reversed
gradients) cannot dominate the update. The settings are one :class:`~lightning_clip.robust.options.ARCConfig`
(what each does is documented there); the work happens in the communication hook
(:mod:`lightning_clip.distributed.hook`, which Lightning's ``DDPStrategy`` would register on CUDA only:
this strategy registers it on every device type).

================= ======================================== =========================================
aggregator        gradient traffic per step                extra memory per rank
================= ======================================== =========================================
``"mean"``        plain DDP's all-reduce + ``n`` floats    none (buffers scaled in place)
robust rules,     all-to-all + all-gather of ``d``         ``~d`` to ``2 d`` (the shards)
NNM (sharded)     (``~2 (n-1) d / n`` sent) + ``O(n^2)``
robust rules,     all-gather of ``n x d``                  ``~2 n x d`` (gathered + clipped copies)
``"gather"``
================= ======================================== =========================================

Logged per optimizer step at Lightning's ``log_every_n_steps`` cadence (``log_arc=True``): ``arc/threshold``,
``arc/clipped_ranks`` and ``arc/norm_rank<i>`` (see :mod:`lightning_clip.tags`).

Checkpoints: every full checkpoint holds the hook's state under the one key :data:`ARC_STATE_KEY`
(``{"names", "world_size", "shared": {name: state}, "per_rank": [{name: state}, ...]}``, in the
LightningModule's ``named_parameters()`` order): the state that is the same on every rank (the centre of
centered clipping, the adaptive DP clip bound) once, and every rank's own (worker momentum) gathered to
rank 0 (a collective). On resume each rank takes the shared state and its own row back before the first
resumed step. A checkpoint from another world size restarts the per-rank state from zero with a warning;
one from a model with other parameter names raises ``ValueError``. The checkpoint keys of earlier versions
(``arc_worker_momentum``, ``arc_center``, ``arc_dp``) are read too. The hook's step counter (which seeds the
bucketing permutation, the privacy noise and simulated attacks) is re-derived from ``trainer.global_step``
when training starts.

Client-level DP (``dp_noise_multiplier > 0``): ``dp/epsilon`` (and ``dp/clip_bound``) are logged with the
ARC tags, :meth:`ARCDDPStrategy.dp_epsilon` gives epsilon for any number of steps, and the end of ``fit``
prints :meth:`ARCDDPStrategy.dp_summary`.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from lightning_clip.distributed.hook import ARCHookState, arc_hook, check_transforms, check_world_size
from lightning_clip.exceptions import check_bool
from lightning_clip.robust import privacy
from lightning_clip.robust.arc import ARCStats
from lightning_clip.robust.options import ARCConfig
from lightning_clip.robust.transforms import SendTransform
from lightning_clip.tags import ARC_CLIPPED_RANKS, ARC_THRESHOLD, DP_CLIP_BOUND, DP_EPSILON, arc_norm_tag

__all__ = ["ARC_STATE_KEY", "ARCDDPStrategy"]

#: Checkpoint key of the hook's state (worker momentum per rank, the centered-clipping centre, the DP bound).
ARC_STATE_KEY = "arc_state"
#: The keys of earlier versions, read on resume: per-rank momentum, the centre, the DP state.
_LEGACY_KEYS = ("arc_worker_momentum", "arc_center", "arc_dp")

_OWN_HOOK_ARGS = ("ddp_comm_state", "ddp_comm_hook", "ddp_comm_wrapper", "model_averaging_period")
#: Former simulation arguments: what to write instead.
_MOVED = {
    "byzantine": "simulated attacks are send transforms: write `send_transforms=[ByzantineTransform(ranks=[1], "
                 "attack='sign_flip')]` (from lightning_clip.sim import ByzantineTransform)",
    "seed": "the simulated attack's seed is an argument of the transform: "
            "`send_transforms=[ByzantineTransform(..., seed=0)]` (from lightning_clip.sim import ByzantineTransform)",
}


def _parameter_names(fn: Any) -> set[str]:
    return {name for name, p in inspect.signature(fn).parameters.items()
            if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _check_ddp_kwargs(ddp_kwargs: dict[str, Any]) -> None:
    """Raise ``TypeError`` for a keyword that neither ``DDPStrategy`` nor ``DistributedDataParallel`` takes."""
    own = _parameter_names(ARCDDPStrategy.__init__)
    known = _parameter_names(DDPStrategy.__init__) | (_parameter_names(DistributedDataParallel.__init__) - {"module"})
    for name in ddp_kwargs:
        if name in _MOVED:
            raise TypeError(f"ARCDDPStrategy does not take `{name}=`: {_MOVED[name]}")
        if name not in known:
            close = difflib.get_close_matches(name, sorted(own | known), n=1)
            hint = f"; did you mean `{close[0]}`?" if close else ""
            raise TypeError(f"ARCDDPStrategy got an unexpected keyword argument `{name}`{hint}")
    clashing = [name for name in _OWN_HOOK_ARGS if ddp_kwargs.get(name) is not None]
    if clashing:
        raise ValueError(
            f"ARCDDPStrategy installs its own DDP communication hook; got {', '.join(clashing)}. "
            "Remove these arguments or use DDPStrategy."
        )


def _legacy_state(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The :data:`ARC_STATE_KEY` entry that a checkpoint with the earlier keys stands for (``None`` without them)."""
    momentum, center, dp_state = (checkpoint.get(key) for key in _LEGACY_KEYS)
    if momentum is None and center is None and dp_state is None:
        return None
    shared: dict[str, Any] = {} if dp_state is None else {"dp": dp_state}
    if center is not None:
        shared["center"] = {"vector": center["vector"]}
    rows = [] if momentum is None else [{"worker_momentum": {"vector": row}} for row in momentum["buffers"]]
    return {"names": (momentum or center or {}).get("names"), "shared": shared, "per_rank": rows}


class ARCDDPStrategy(DDPStrategy):
    """DDP with Adaptive Robust Clipping of the ranks' local gradients before they are aggregated.

    Example::

        Trainer(accelerator="gpu", devices=8, strategy=ARCDDPStrategy(num_byzantine=2))
        Trainer(accelerator="cpu", devices=3, strategy="ddp_arc")          # num_byzantine=1
        Trainer(devices=11, strategy=ARCDDPStrategy(arc_config=ARCConfig(num_byzantine=1, aggregator="cwtm",
                                                                          nnm=True, worker_momentum=0.9)))

    Args:
        num_byzantine, aggregator, nnm, arc, static_clip, worker_momentum, dp_noise_multiplier, dp_seed,
            dp_delta, dp_sampling_rate, dp_clip_quantile, dp_clip_learning_rate, dp_clipped_count_stddev,
            robust_comm, bucket_size, bucket_seed, cclip_tau, cclip_iters: The fields of
            :class:`~lightning_clip.robust.options.ARCConfig` (documented there; this signature is generated
            from them); give these or ``arc_config``, not both.
        arc_config: The whole configuration as one object.
        send_transforms: Callables ``(sent, ctx) -> None`` run, in order, on what each rank sends, after worker
            momentum (:class:`~lightning_clip.robust.transforms.SendTransform`), e.g. the simulated attacks of
            :class:`lightning_clip.sim.ByzantineTransform` for experiments.
        log_arc: Log ``arc/threshold``, ``arc/clipped_ranks`` and ``arc/norm_rank<i>`` (with client-level
            DP also ``dp/epsilon`` and ``dp/clip_bound``).
        **kwargs: What :class:`~lightning.pytorch.strategies.DDPStrategy` and
            ``DistributedDataParallel`` accept (``start_method``, ``find_unused_parameters``,
            ``bucket_cap_mb``, ...), except the communication-hook arguments; unknown names raise.
    """

    def __init__(
        self,
        *,
        arc_config: ARCConfig | None = None,
        send_transforms: Sequence[SendTransform] = (),
        log_arc: bool = True,
        **kwargs: Any,
    ) -> None:
        config = ARCConfig.from_keywords("ARCDDPStrategy", arc_config, kwargs)
        if config.dp_noise_multiplier > 0.0 and (config.dp_sampling_rate < 1.0 or config.dp_accountant == "rdp"):
            privacy.require_accountant()  # epsilon is reported: fail now, naming the extra, when it cannot be
        check_bool("log_arc", log_arc)
        check_transforms(send_transforms)
        _check_ddp_kwargs(kwargs)
        super().__init__(**kwargs)
        self.arc_config = config
        self.send_transforms = list(send_transforms)
        self._log_arc = log_arc
        self._arc_state: ARCHookState | None = None
        self._arc_logged_step = -1

    @property
    def arc_state(self) -> ARCHookState | None:
        """The communication hook's state (``None`` before the process group is set up or a checkpoint is read)."""
        return self._arc_state

    @property
    def last_arc_stats(self) -> ARCStats | None:
        """ARC's statistics of the last synchronized step: norms ``[n]``, threshold, scales, clipped mask."""
        return None if self._arc_state is None else self._arc_state.last_stats

    def _hook_state(self) -> ARCHookState:
        if self._arc_state is None:
            self._arc_state = ARCHookState(self.arc_config, transforms=self.send_transforms)
        return self._arc_state

    def _configure_launcher(self) -> None:
        # The expected world size is known before any process starts: fail in the launching process.
        if self.parallel_devices is not None:
            check_world_size(self.arc_config, self.send_transforms, self.num_nodes * self.num_processes)
        super()._configure_launcher()

    def setup_distributed(self) -> None:
        super().setup_distributed()
        # A fresh hook state per run, checked against the group actually formed (multi-node too); a checkpoint
        # read next restores into it, before the model is wrapped.
        self._arc_state = None
        self._hook_state()

    def _register_ddp_hooks(self) -> None:
        # Lightning's DDPStrategy registers hooks on CUDA only; ARC must run on every device type.
        if not isinstance(self.model, DistributedDataParallel):
            raise RuntimeError("ARCDDPStrategy: the model is not wrapped in DistributedDataParallel")
        self.model.register_comm_hook(self._hook_state(), arc_hook)

    def on_train_start(self) -> None:
        super().on_train_start()
        if self._arc_state is not None and self.lightning_module is not None:
            self._arc_state.iter = self.lightning_module.trainer.global_step

    # -- checkpoints ---------------------------------------------------------------------------------

    def _named_params(self) -> tuple[list[str], list[Tensor]]:
        """The order of the checkpointed vectors: the module's trainable parameters."""
        module = self.lightning_module
        if module is None:
            return [], []
        named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
        return [name for name, _ in named], [p for _, p in named]

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """Put the hook's state into ``checkpoint`` under :data:`ARC_STATE_KEY`, then save it from rank 0.

        ``Trainer.save_checkpoint`` calls this on every rank; with per-rank state (worker momentum) all ranks
        take part in gathering it to rank 0. Weights-only checkpoints (no ``"optimizer_states"``) skip it.
        """
        state = self._hook_state()
        if "optimizer_states" in checkpoint and state.stateful:
            names, params = self._named_params()
            local = state.state_dict(params)
            world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
            rows: list[Any] = [local["per_rank"]] if local["per_rank"] else []
            if rows and world_size > 1:
                gathered: list[Any] | None = [None] * world_size if dist.get_rank() == 0 else None
                dist.gather_object(local["per_rank"], gathered, dst=0)
                rows = gathered or []  # complete on rank 0, which writes the file
            checkpoint[ARC_STATE_KEY] = {"names": names, "world_size": world_size, "shared": local["shared"],
                                         "per_rank": rows}
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def load_checkpoint(self, checkpoint_path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Load the checkpoint on this rank and restore the hook's state from it (this rank's row of the
        per-rank state), before the model is wrapped in DDP, so before the first resumed step."""
        checkpoint = super().load_checkpoint(checkpoint_path, *args, **kwargs)
        entry = checkpoint.get(ARC_STATE_KEY)
        self._restore(_legacy_state(checkpoint) if entry is None else entry, full="optimizer_states" in checkpoint)
        return checkpoint

    def _restore(self, entry: dict[str, Any] | None, full: bool) -> None:
        state = self._hook_state()
        parts = state.stateful
        if entry is None:
            if full and parts:
                rank_zero_warn(f"The checkpoint has no ddp_arc state (key {ARC_STATE_KEY!r}): "
                               f"{', '.join(parts)} restart from their initial values.")
            return
        names, params = self._named_params()
        saved_names = entry.get("names")
        if saved_names is not None and list(saved_names) != names:
            raise ValueError(
                f"The checkpoint's ddp_arc state was saved for the parameters {list(saved_names)[:4]}... "
                f"({len(saved_names)} in all) but the model has {names[:4]}... ({len(names)}); the model "
                "changed since the checkpoint was written, so the state cannot be restored"
            )
        saved = dict(entry.get("shared") or {})
        rows = entry.get("per_rank") or []
        world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if rows and len(rows) != world_size:
            rank_zero_warn(
                f"The checkpoint's per-rank ddp_arc state ({', '.join(rows[0])}) comes from {len(rows)} ranks but "
                f"this run has {world_size}: there is no rank-to-rank mapping, so it restarts from zero."
            )
            saved.update(dict.fromkeys(rows[0]))  # known, deliberately not restored
        elif rows:
            saved.update(rows[dist.get_rank() if world_size > 1 else 0])
        unused = sorted(set(saved) - set(parts))
        if unused:
            rank_zero_warn(f"The checkpoint holds ddp_arc state that this configuration does not use "
                           f"({', '.join(unused)}): it is ignored.")
        missing = [name for name in parts if name not in saved]
        if full and missing:
            rank_zero_warn(f"The checkpoint has no ddp_arc state for {', '.join(missing)}: it restarts from its "
                           "initial value.")
        state.load_state_dict({k: v for k, v in saved.items() if v is not None}, params)

    # -- logging -------------------------------------------------------------------------------------

    def optimizer_step(self, optimizer: Optimizer, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        if self._log_arc:
            self._log_arc_stats()
        return output

    def _log_arc_stats(self) -> None:
        state = self._arc_state
        pl_module = self.lightning_module
        if state is None or pl_module is None or state.last_stats is None:
            return
        if state.last_step == self._arc_logged_step:
            return  # several optimizers stepping on one backward pass: log once
        self._arc_logged_step = state.last_step
        trainer = pl_module.trainer
        if not (trainer.loggers and trainer._logger_connector.should_update_logs):
            return
        stats = state.last_stats
        values = torch.cat(
            [
                stats.threshold.reshape(1).to(torch.float32),
                stats.clipped.sum().reshape(1).to(torch.float32),
                stats.norms.to(torch.float32),
            ]
        ).tolist()  # the only device-to-host copy
        metrics = {ARC_THRESHOLD: values[0], ARC_CLIPPED_RANKS: values[1]}
        metrics.update({arc_norm_tag(i): v for i, v in enumerate(values[2:])})
        eps = self.dp_epsilon()
        if eps is not None:
            metrics[DP_EPSILON] = eps
        if state.dp is not None and state.dp.bound is not None:
            metrics[DP_CLIP_BOUND] = float(state.dp.bound)
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, logger=True, batch_size=1, sync_dist=False)

    # -- differential privacy ------------------------------------------------------------------------

    def dp_epsilon(self, steps: int | None = None) -> float | None:
        """Epsilon at ``dp_delta`` after ``steps`` noisy steps (default: the steps so far); ``None`` without noise.

        :func:`lightning_clip.robust.privacy.epsilon` for ``dp_noise_multiplier``, ``dp_sampling_rate``, the steps
        and ``dp_accountant``. A guarantee only where the configuration's warning did not say otherwise.
        """
        cfg = self.arc_config
        if cfg.dp_noise_multiplier == 0.0:
            return None
        if steps is None:
            steps = 0 if self._arc_state is None else self._arc_state.iter
        return privacy.epsilon(cfg.dp_noise_multiplier, cfg.dp_sampling_rate, steps, cfg.dp_delta, cfg.dp_accountant)

    def dp_summary(self) -> str | None:
        """The end-of-fit line on the privacy spent (``None`` without noise)."""
        eps = self.dp_epsilon()
        if eps is None:
            return None
        cfg = self.arc_config
        steps = 0 if self._arc_state is None else self._arc_state.iter
        established = not cfg.arc and cfg.uses_all_reduce
        caveat = "" if established else " (not a guarantee with ARC, NNM or a robust rule)"
        return (f"ddp_arc client-level DP: epsilon = {eps:.4g} at delta = {cfg.dp_delta:g} after {steps} steps "
                f"(noise multiplier {cfg.dp_noise_multiplier:g}, sampling rate {cfg.dp_sampling_rate:g}){caveat}")

    def on_train_end(self) -> None:
        super().on_train_end()
        summary = self.dp_summary()
        if summary is not None:
            rank_zero_info(summary)

    # -- registry ------------------------------------------------------------------------------------

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            "ddp_arc",
            cls,
            description="DDP with Adaptive Robust Clipping across ranks (num_byzantine=1, mean)",
            override=True,
        )
        strategy_registry.register(
            "ddp_arc_spawn",
            cls,
            description="DDP with Adaptive Robust Clipping across ranks, `start_method='spawn'`",
            override=True,
            start_method="spawn",
        )


ARCDDPStrategy.__init__.__signature__ = ARCConfig.signature_with_fields(ARCDDPStrategy.__init__)  # type: ignore[attr-defined]
ARCDDPStrategy.register_strategies(StrategyRegistry)
