"""``ARCDDPStrategy``: DDP whose gradient aggregation is protected by ARC, registered as ``"ddp_arc"``.

Each rank's local gradient is clipped by Adaptive Robust Clipping (arXiv 2405.14432) across the ranks
*before* it is aggregated, so up to ``num_byzantine`` misbehaving ranks (NaN/Inf, huge or reversed
gradients) cannot dominate the update. The settings are one :class:`~lightning_clip.distributed.config.ARCConfig`
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

Checkpoints: with worker momentum, every rank's buffer is gathered to rank 0 when a full checkpoint is
saved (a collective, in the LightningModule's ``named_parameters()`` order) under the key
:data:`WORKER_MOMENTUM_KEY` (``{"worker_momentum", "world_size", "names", "numels", "buffers": [n, D]}``),
and each rank takes its own row back on resume, before the first resumed step. A checkpoint from another
world size restarts the buffers from zero with a warning; one from a model with other parameter names
raises ``ValueError``. With ``aggregator="cclip"`` the centre (the last aggregate, the same on every rank)
is saved under :data:`CENTER_KEY` (``{"names", "vector"}``) and restored on resume. The hook's step counter
(which seeds the ``gaussian`` attack simulation and the bucketing permutation) is re-derived from
``trainer.global_step`` when training starts; so is the privacy noise's, a function of
``(dp_seed, step)``. With an adaptive clip bound (``dp_clip_quantile``), the bound (identical on every
rank) is saved under :data:`DP_STATE_KEY` and restored before the first resumed step.

Client-level DP (``dp_noise_multiplier > 0``): ``dp/epsilon`` (and ``dp/clip_bound``) are logged with the
ARC tags, :meth:`ARCDDPStrategy.dp_epsilon` gives epsilon for any number of steps, and the end of ``fit``
prints :meth:`ARCDDPStrategy.dp_summary`.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from lightning_clip.callbacks.step import should_log
from lightning_clip.distributed.config import ARCConfig
from lightning_clip.distributed.hook import ARCHookState, arc_hook
from lightning_clip.exceptions import check_bool, check_non_negative_int
from lightning_clip.robust import privacy
from lightning_clip.robust.arc import ARCStats
from lightning_clip.robust.transforms import WorkerMomentum
from lightning_clip.sim.byzantine import ByzantineSpec, ByzantineTransform
from lightning_clip.tags import ARC_CLIPPED_RANKS, ARC_THRESHOLD, DP_CLIP_BOUND, DP_EPSILON, arc_norm_tag

__all__ = ["CENTER_KEY", "DP_STATE_KEY", "WORKER_MOMENTUM_KEY", "ARCDDPStrategy"]

#: Checkpoint key of the gathered per-rank worker-momentum buffers.
WORKER_MOMENTUM_KEY = "arc_worker_momentum"
#: Checkpoint key of the differential-privacy state (the adaptive clip bound, identical on every rank).
DP_STATE_KEY = "arc_dp"
#: Checkpoint key of centered clipping's centre (the last aggregate, the same on every rank).
CENTER_KEY = "arc_center"

_OWN_HOOK_ARGS = ("ddp_comm_state", "ddp_comm_hook", "ddp_comm_wrapper", "model_averaging_period")


def _parameter_names(fn: Any) -> set[str]:
    return {name for name, p in inspect.signature(fn).parameters.items()
            if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _check_ddp_kwargs(ddp_kwargs: dict[str, Any]) -> None:
    """Raise ``TypeError`` for a keyword that neither ``DDPStrategy`` nor ``DistributedDataParallel`` takes."""
    own = _parameter_names(ARCDDPStrategy.__init__)
    known = _parameter_names(DDPStrategy.__init__) | (_parameter_names(DistributedDataParallel.__init__) - {"module"})
    for name in ddp_kwargs:
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


def _as_spec(byzantine: Any) -> ByzantineSpec | None:
    if byzantine is None or isinstance(byzantine, ByzantineSpec):
        return byzantine
    if isinstance(byzantine, dict):
        return ByzantineSpec.from_config(byzantine)
    raise TypeError(
        f"Expected argument `byzantine` to be a ByzantineSpec, a dict or None but got {type(byzantine).__name__}"
    )


class ARCDDPStrategy(DDPStrategy):
    """DDP with Adaptive Robust Clipping of the ranks' local gradients before they are aggregated.

    Example::

        Trainer(accelerator="gpu", devices=8, strategy=ARCDDPStrategy(num_byzantine=2))
        Trainer(accelerator="cpu", devices=3, strategy="ddp_arc")          # num_byzantine=1
        Trainer(devices=11, strategy=ARCDDPStrategy(arc_config=ARCConfig(num_byzantine=1, aggregator="cwtm",
                                                                          nnm=True, worker_momentum=0.9)))

    Args:
        num_byzantine, aggregator, nnm, worker_momentum, arc, static_clip, dp_noise_multiplier, dp_seed,
            dp_delta, dp_sampling_rate, dp_clip_quantile, dp_clip_learning_rate, dp_clipped_count_stddev,
            robust_comm, bucket_size, bucket_seed, cclip_tau, cclip_iters: Build the
            :class:`~lightning_clip.distributed.config.ARCConfig` (documented there); give these or
            ``arc_config``, not both.
        arc_config: The whole configuration as one object.
        byzantine: Simulated Byzantine ranks, for experiments and tests only: a
            :class:`~lightning_clip.sim.byzantine.ByzantineSpec` or its config dict, e.g.
            ``{"ranks": [1], "attack": "sign_flip"}``; ``None`` (the default) in real runs.
        seed: Seed of the simulated ``gaussian`` attack.
        log_arc: Log ``arc/threshold``, ``arc/clipped_ranks`` and ``arc/norm_rank<i>`` (with client-level
            DP also ``dp/epsilon`` and ``dp/clip_bound``).
        **ddp_kwargs: What :class:`~lightning.pytorch.strategies.DDPStrategy` and
            ``DistributedDataParallel`` accept (``start_method``, ``find_unused_parameters``,
            ``bucket_cap_mb``, ...), except the communication-hook arguments; unknown names raise.
    """

    def __init__(
        self,
        num_byzantine: int = 1,
        aggregator: str = "mean",
        nnm: bool = False,
        worker_momentum: float = 0.0,
        arc: bool = True,
        static_clip: float | None = None,
        dp_noise_multiplier: float = 0.0,
        dp_seed: int = 0,
        dp_delta: float = 1e-5,
        dp_sampling_rate: float = 1.0,
        dp_clip_quantile: float | None = None,
        dp_clip_learning_rate: float = 0.2,
        dp_clipped_count_stddev: float | None = None,
        robust_comm: str = "sharded",
        bucket_size: int = 1,
        bucket_seed: int = 0,
        cclip_tau: float = 1.0,
        cclip_iters: int = 1,
        arc_config: ARCConfig | None = None,
        byzantine: ByzantineSpec | dict[str, Any] | None = None,
        seed: int = 0,
        log_arc: bool = True,
        **ddp_kwargs: Any,
    ) -> None:
        built = ARCConfig(num_byzantine=num_byzantine, aggregator=aggregator, nnm=nnm,
                          worker_momentum=worker_momentum, arc=arc, static_clip=static_clip,
                          dp_noise_multiplier=dp_noise_multiplier, dp_seed=dp_seed, dp_delta=dp_delta,
                          dp_sampling_rate=dp_sampling_rate, dp_clip_quantile=dp_clip_quantile,
                          dp_clip_learning_rate=dp_clip_learning_rate,
                          dp_clipped_count_stddev=dp_clipped_count_stddev, robust_comm=robust_comm,
                          bucket_size=bucket_size, bucket_seed=bucket_seed, cclip_tau=cclip_tau,
                          cclip_iters=cclip_iters)
        if arc_config is not None:
            if not isinstance(arc_config, ARCConfig):
                raise TypeError(f"Expected argument `arc_config` to be an ARCConfig but got {arc_config!r}")
            if built != ARCConfig():
                raise ValueError("Give ARCDDPStrategy either `arc_config` or the keyword arguments that build one "
                                 f"(num_byzantine, aggregator, ...), not both; got arc_config={arc_config} and {built}")
            built = arc_config
        if built.dp_noise_multiplier > 0.0:
            privacy.require_accountant()  # epsilon is reported: fail now, naming the extra, when it cannot be
        check_bool("log_arc", log_arc)
        _check_ddp_kwargs(ddp_kwargs)
        self._byzantine = _as_spec(byzantine)
        self._seed = check_non_negative_int("seed", seed)
        super().__init__(**ddp_kwargs)
        self.arc_config = built
        self._log_arc = log_arc
        self._arc_state: ARCHookState | None = None
        self._pending_momentum: Tensor | None = None  # this rank's momentum from a checkpoint, awaiting the hook
        self._pending_center: Tensor | None = None  # centered clipping's centre from a checkpoint
        self._pending_dp: dict[str, Any] | None = None  # the DP state from a checkpoint, awaiting the hook
        self._arc_logged_step = -1
        if self._byzantine is not None and self._byzantine.num_byzantine > built.num_byzantine:
            rank_zero_warn(  # allowed (it shows ARC's breakdown point), but say so
                f"The Byzantine spec makes {self._byzantine.num_byzantine} ranks misbehave but "
                f"`num_byzantine={built.num_byzantine}`: ARC is only guaranteed to tolerate `num_byzantine` of them."
            )

    @property
    def byzantine(self) -> ByzantineSpec | None:
        """The simulated Byzantine ranks, or ``None``."""
        return self._byzantine

    @property
    def arc_state(self) -> ARCHookState | None:
        """The communication hook's state (``None`` before the model is wrapped in DDP)."""
        return self._arc_state

    @property
    def last_arc_stats(self) -> ARCStats | None:
        """ARC's statistics of the last synchronized step: norms ``[n]``, threshold, scales, clipped mask."""
        return None if self._arc_state is None else self._arc_state.last_stats

    def _check_world_size(self, world_size: int) -> None:
        self.arc_config.check_world_size(world_size)
        if self._byzantine is not None:
            self._byzantine.check_world_size(world_size)

    def _configure_launcher(self) -> None:
        # The expected world size is known before any process starts: fail in the launching process.
        if self.parallel_devices is not None:
            self._check_world_size(self.num_nodes * self.num_processes)
        super()._configure_launcher()

    def setup_distributed(self) -> None:
        super().setup_distributed()
        self._check_world_size(dist.get_world_size())  # against the group actually formed (multi-node too)

    def _register_ddp_hooks(self) -> None:
        # Lightning's DDPStrategy registers hooks on CUDA only; ARC must run on every device type.
        if not isinstance(self.model, DistributedDataParallel):
            raise RuntimeError("ARCDDPStrategy: the model is not wrapped in DistributedDataParallel")
        simulated = [] if self._byzantine is None else [ByzantineTransform(self._byzantine, seed=self._seed)]
        self._arc_state = ARCHookState(self.arc_config, transforms=simulated)
        self._apply_pending_momentum()
        self._apply_pending_dp()
        self._apply_pending_center()
        self.model.register_comm_hook(self._arc_state, arc_hook)

    def on_train_start(self) -> None:
        super().on_train_start()
        if self._arc_state is not None and self.lightning_module is not None:
            self._arc_state.iter = self.lightning_module.trainer.global_step

    # -- worker-momentum checkpoints ------------------------------------------------------------------

    def _momentum_params(self) -> tuple[list[str], list[Tensor]]:
        """The canonical parameter order of the momentum vectors: the module's trainable parameters."""
        module = self.lightning_module
        if module is None:
            return [], []
        named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
        return [name for name, _ in named], [p for _, p in named]

    def _apply_pending_momentum(self) -> None:
        if self._pending_momentum is None or self._arc_state is None:
            return
        _, params = self._momentum_params()
        momentum = self._arc_state.worker_momentum
        if momentum is not None:
            momentum.load_vector(self._pending_momentum, params)
        self._pending_momentum = None

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """Gather every rank's worker momentum into ``checkpoint`` (collective), then save it from rank 0.

        ``Trainer.save_checkpoint`` calls this on every rank; with ``worker_momentum > 0`` all ranks
        take part in a gather of their flat momenta to rank 0, which writes them under
        :data:`WORKER_MOMENTUM_KEY`. Weights-only checkpoints (no ``"optimizer_states"``) skip it.
        """
        if self.arc_config.worker_momentum > 0.0 and "optimizer_states" in checkpoint:
            entry = self._gather_momentum()
            if entry is not None:
                checkpoint[WORKER_MOMENTUM_KEY] = entry
        if self.arc_config.uses_dp and "optimizer_states" in checkpoint:
            dp = None if self._arc_state is None else self._arc_state.dp
            checkpoint[DP_STATE_KEY] = dp.state_dict() if dp is not None else dict(self._pending_dp or {})
        if self.arc_config.aggregator == "cclip" and "optimizer_states" in checkpoint:
            entry = self._center_entry()
            if entry is not None:
                checkpoint[CENTER_KEY] = entry
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    # -- centered clipping's centre --------------------------------------------------------------------

    def _center_entry(self) -> dict[str, Any] | None:
        names, params = self._momentum_params()
        center = None if self._arc_state is None else self._arc_state.center
        vec = center.vector(params) if center is not None else None
        if vec is None:
            vec = self._pending_center  # saved before the first step: keep what was loaded
        return None if vec is None else {"names": names, "vector": vec.detach().cpu()}

    def _restore_center(self, checkpoint: dict[str, Any]) -> None:
        entry = checkpoint.get(CENTER_KEY)
        if entry is None or self.arc_config.aggregator != "cclip":
            return
        names, _ = self._momentum_params()
        if list(entry.get("names", [])) != names:
            raise ValueError(
                f"The checkpoint's centered-clipping centre was saved for the parameters {list(entry['names'])[:4]}... "
                f"but the model has {names[:4]}...; the model changed since the checkpoint was written"
            )
        self._pending_center = entry["vector"]
        self._apply_pending_center()

    def _apply_pending_center(self) -> None:
        state = self._arc_state
        if self._pending_center is None or state is None or state.center is None:
            return
        _, params = self._momentum_params()
        state.center.load_vector(self._pending_center, params)
        self._pending_center = None

    def _gather_momentum(self) -> dict[str, Any] | None:
        names, params = self._momentum_params()
        momentum = None if self._arc_state is None else self._arc_state.worker_momentum
        if momentum is not None:
            vec = momentum.vector(params)
        elif self._pending_momentum is not None:
            vec = self._pending_momentum.to(self.root_device)  # saved before the hook exists: keep what was loaded
        else:
            vec = WorkerMomentum(self.arc_config.worker_momentum).vector(params)  # zeros: m_0
        vec = vec.to(self.root_device)
        rows: list[Tensor] = [vec]
        world_size, rank = 1, 0
        if dist.is_available() and dist.is_initialized():
            world_size, rank = dist.get_world_size(), dist.get_rank()
            rows = [torch.empty_like(vec) for _ in range(world_size)] if rank == 0 else []
            dist.gather(vec, gather_list=rows if rank == 0 else None, dst=0)
        if rank != 0:
            return None
        return {
            "worker_momentum": self.arc_config.worker_momentum,
            "world_size": world_size,
            "names": names,
            "numels": [p.numel() for p in params],
            "buffers": torch.stack(rows).cpu(),
        }

    def load_checkpoint(self, checkpoint_path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Load the checkpoint on this rank and keep this rank's worker momentum for the hook.

        The momentum goes into the hook's state as soon as it exists (the model is wrapped in DDP after
        the checkpoint is read), so before the first resumed step.
        """
        checkpoint = super().load_checkpoint(checkpoint_path, *args, **kwargs)
        self._restore_momentum(checkpoint)
        self._restore_center(checkpoint)
        if self.arc_config.uses_dp:
            self._pending_dp = checkpoint.get(DP_STATE_KEY)
            self._apply_pending_dp()
        return checkpoint

    def _apply_pending_dp(self) -> None:
        if self._pending_dp is None or self._arc_state is None:
            return
        if self._arc_state.dp is not None:
            self._arc_state.dp.load_state_dict(self._pending_dp)
        self._pending_dp = None

    def _restore_momentum(self, checkpoint: dict[str, Any]) -> None:
        entry = checkpoint.get(WORKER_MOMENTUM_KEY)
        if self.arc_config.worker_momentum == 0.0:
            if entry is not None:
                rank_zero_warn(
                    "The checkpoint holds worker-momentum buffers but `worker_momentum=0.0`: they are ignored."
                )
            return
        if entry is None:
            if "optimizer_states" in checkpoint:  # a full checkpoint, written without worker momentum
                rank_zero_warn(
                    f"The checkpoint has no worker-momentum buffers (key {WORKER_MOMENTUM_KEY!r}); with "
                    f"`worker_momentum={self.arc_config.worker_momentum}` every rank's buffer restarts from zero."
                )
            return
        names, _ = self._momentum_params()
        saved_names = list(entry.get("names", []))
        if saved_names != names:
            raise ValueError(
                f"The checkpoint's worker-momentum buffers were saved for the parameters {saved_names[:4]}... "
                f"({len(saved_names)} in all) but the model has {names[:4]}... ({len(names)}); the model "
                "changed since the checkpoint was written, so the per-rank momentum cannot be restored"
            )
        buffers = entry["buffers"]
        world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        saved_world = int(entry.get("world_size", buffers.shape[0]))
        if saved_world != world_size or buffers.shape[0] != world_size:
            rank_zero_warn(
                f"The checkpoint's worker-momentum buffers come from {saved_world} ranks but this run has "
                f"{world_size}: there is no rank-to-rank mapping, so every rank's buffer restarts from zero."
            )
            return
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self._pending_momentum = buffers[rank].clone()
        self._apply_pending_momentum()

    def teardown(self) -> None:
        self._pending_momentum = None
        self._pending_dp = None
        super().teardown()

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
        if not should_log(pl_module.trainer):
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

        The accountant's (:func:`lightning_clip.robust.privacy.epsilon`) for ``dp_noise_multiplier``,
        ``dp_sampling_rate`` and the steps. A guarantee only where the configuration's warning did not say otherwise.
        """
        cfg = self.arc_config
        if cfg.dp_noise_multiplier == 0.0:
            return None
        if steps is None:
            steps = 0 if self._arc_state is None else self._arc_state.iter
        return privacy.epsilon(cfg.dp_noise_multiplier, cfg.dp_sampling_rate, steps, cfg.dp_delta)

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


ARCDDPStrategy.register_strategies(StrategyRegistry)
