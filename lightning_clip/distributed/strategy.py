"""``ARCDDPStrategy``: DDP whose gradient averaging is protected by ARC, registered as ``"ddp_arc"``.

Each rank's local gradient is clipped by Adaptive Robust Clipping (arXiv 2405.14432) across the ranks
*before* the average, so up to ``num_byzantine`` misbehaving ranks (NaN/Inf, huge or reversed
gradients) cannot dominate the update. The work happens in the DDP communication hook
:func:`~lightning_clip.distributed.hook.arc_hook`; see that module for the algorithm and its traffic:

================= ======================================== =========================================
aggregator        gradient traffic per step                extra memory per rank
================= ======================================== =========================================
``"mean"``        plain DDP's all-reduce + ``n`` floats    none (buffers scaled in place)
robust rules      all-gather of ``n x d`` (no all-reduce)  ``~2 n x d`` (gathered + clipped copies)
================= ======================================== =========================================

Logged metrics (``log_arc=True``), once per optimizer step at Lightning's ``log_every_n_steps``
cadence, logged by the strategy itself right after the optimizer step (no extra callback):

========================= ===================================================
tag                       value
========================= ===================================================
``arc/threshold``         ARC's clipping threshold across the ranks
``arc/clipped_ranks``     number of ranks ARC scaled down (or zeroed) this step
``arc/norm_rank<i>``      rank ``i``'s local gradient norm before ARC
========================= ===================================================

Worker momentum (``worker_momentum=beta``, the ARC paper's Robust D-SHB): every rank sends
``m <- beta m + (1 - beta) g`` (``m_0 = 0``) of its local gradient instead of the gradient; ARC and the
aggregator run on the momenta and the optimizer steps on their aggregate. Use it with a momentum-free
optimizer (``SGD(momentum=0)``, as the paper); a momentum optimizer on top is "double momentum" (see
:mod:`lightning_clip.distributed.hook`). Example::

    Trainer(devices=8, strategy=ARCDDPStrategy(num_byzantine=1, aggregator="cwtm", nnm=True,
                                               worker_momentum=0.9))
    # and in configure_optimizers: torch.optim.SGD(self.parameters(), lr=..., momentum=0.0)

Ablations and baselines: ``arc=False`` runs the same pipeline without ARC (a non-finite rank is then not
zeroed, as in plain DDP) and ``static_clip=C`` clips every rank's vector to norm ``C`` after ARC and
before NNM and the aggregator (the ARC paper's static-clipping baseline); the logged ``arc/threshold`` is
then ``C`` (``+inf`` with neither).

Checkpoints: ARC is stateless across steps. The worker-momentum buffers are per rank, but Lightning
writes the checkpoint from rank 0 only, so :meth:`ARCDDPStrategy.save_checkpoint` (called on every
rank by ``Trainer.save_checkpoint``) first gathers every rank's buffer to rank 0 -- a collective, in
a canonical parameter order (the LightningModule's ``named_parameters()`` that require a gradient) --
and stores them under the checkpoint key ``"arc_worker_momentum"``::

    {"worker_momentum": beta, "world_size": n, "names": [...], "numels": [...],
     "buffers": Tensor [n, D]}          # row i: rank i's flat momentum (float32, on CPU)

On resume (``fit(ckpt_path=...)``) every rank reads the checkpoint, :meth:`ARCDDPStrategy.load_checkpoint`
keeps row ``global_rank`` and puts it into the hook's state as soon as the hook exists, before the first
resumed step. A checkpoint from another world size (or without buffers) restarts the buffers from zero
with a warning; one from a model with other parameter names raises ``ValueError``. Weights-only
checkpoints do not carry the buffers (like the optimizer state). Cost at save: an ``n x D`` gather to
rank 0 (``n`` copies of the gradient size in rank 0's memory and in the file).

The hook's step counter (which only labels statistics and seeds the ``gaussian`` attack simulation)
is re-derived from ``trainer.global_step`` when training starts; it equals the number of optimizer
steps for automatic optimization with one optimizer.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from lightning_clip.callbacks.step import should_log
from lightning_clip.distributed.hook import (
    ARCHookState,
    _as_spec,
    arc_hook,
    check_arc_arguments,
    check_world_size,
)
from lightning_clip.robust.arc import ARCStats
from lightning_clip.sim.attacks import ByzantineSpec
from lightning_clip.tags import ARC_CLIPPED_RANKS, ARC_THRESHOLD, arc_norm_tag

__all__ = ["WORKER_MOMENTUM_KEY", "ARCDDPStrategy"]

#: Checkpoint key of the gathered per-rank worker-momentum buffers.
WORKER_MOMENTUM_KEY = "arc_worker_momentum"

_OWN_HOOK_ARGS = ("ddp_comm_state", "ddp_comm_hook", "ddp_comm_wrapper", "model_averaging_period")


class ARCDDPStrategy(DDPStrategy):
    """DDP with Adaptive Robust Clipping of the ranks' local gradients before they are aggregated.

    Example::

        Trainer(accelerator="gpu", devices=8, strategy=ARCDDPStrategy(num_byzantine=2))
        Trainer(accelerator="cpu", devices=3, strategy="ddp_arc")          # num_byzantine=1

    Args:
        num_byzantine: ``f``, the number of ranks that may misbehave; ``0 <= f < world_size / 2``
            (checked against the world size before launching and again at setup). ARC clips the
            ``floor(2 f (n - f) / n)`` largest local gradients to the next largest norm; non-finite
            local gradients are zeroed. ``0`` gives plain DDP's result.
        aggregator: ``"mean"`` (all-reduce, plain DDP's traffic) or a robust rule: ``"cwtm"``,
            ``"median"``, ``"geomed"``, ``"krum"``, ``"multikrum"`` (all-gather of every gradient).
        nnm: Apply nearest-neighbour mixing before the aggregator (forces the all-gather path).
        byzantine: Simulated Byzantine ranks for experiments and tests: a
            :class:`~lightning_clip.sim.attacks.ByzantineSpec` or its config dict, e.g.
            ``{"ranks": [1], "attack": "sign_flip"}``. ``None`` (the default) in real runs.
        log_arc: Log ``arc/threshold``, ``arc/clipped_ranks`` and ``arc/norm_rank<i>``.
        seed: Seed of the ``gaussian`` attack simulation.
        worker_momentum: ``beta`` in ``[0, 1)``. With ``beta > 0`` each rank sends the momentum
            ``m <- beta m + (1 - beta) g`` (``m_0 = 0``) of its local gradient instead of the gradient
            (the ARC paper's setting, typically ``0.9`` with ``SGD(momentum=0)``); the buffers are saved
            per rank in checkpoints. ``0.0`` (the default) is the plain gradient, bitwise as before.
        arc: Apply ARC (the default). ``False`` runs the same pipeline without ARC (vectors reach the
            aggregator unclipped, non-finite ones are not zeroed): the ablation that shows what ARC adds.
        static_clip: If set, clip every rank's vector to this L2 norm after ARC and before NNM and the
            aggregator (the ARC paper's static-clipping baseline, e.g. ``arc=False, static_clip=2.0``).
        **ddp_kwargs: Everything :class:`~lightning.pytorch.strategies.DDPStrategy` accepts
            (``start_method``, ``find_unused_parameters``, ``bucket_cap_mb``, ...), except the
            communication-hook arguments, which this strategy sets itself.
    """

    def __init__(
        self,
        num_byzantine: int = 1,
        aggregator: str = "mean",
        nnm: bool = False,
        byzantine: ByzantineSpec | dict[str, Any] | None = None,
        log_arc: bool = True,
        seed: int = 0,
        worker_momentum: float = 0.0,
        arc: bool = True,
        static_clip: float | None = None,
        **ddp_kwargs: Any,
    ) -> None:
        worker_momentum, static_clip = check_arc_arguments(
            num_byzantine, aggregator, nnm, seed, worker_momentum, arc, static_clip
        )
        if not isinstance(log_arc, bool):
            raise TypeError(f"Expected argument `log_arc` to be a bool but got {log_arc!r}")
        clashing = [name for name in _OWN_HOOK_ARGS if ddp_kwargs.get(name) is not None]
        if clashing:
            raise ValueError(
                f"ARCDDPStrategy installs its own DDP communication hook; got {', '.join(clashing)}. "
                "Remove these arguments or use DDPStrategy."
            )
        self._byzantine = _as_spec(byzantine)
        super().__init__(**ddp_kwargs)
        self._num_byzantine = num_byzantine
        self._aggregator = aggregator
        self._nnm = nnm
        self._log_arc = log_arc
        self._seed = seed
        self._worker_momentum = worker_momentum
        self._arc = arc
        self._static_clip = static_clip
        self._arc_state: ARCHookState | None = None
        # This rank's momentum read from a checkpoint, waiting for the hook state to exist.
        self._pending_momentum: Tensor | None = None
        self._arc_logged_step = -1
        if self._byzantine is not None and self._byzantine.num_byzantine > num_byzantine:
            # Allowed (it is how one shows ARC's breakdown point), but say so.
            rank_zero_warn(
                f"The Byzantine spec makes {self._byzantine.num_byzantine} ranks misbehave but "
                f"`num_byzantine={num_byzantine}`: ARC is only guaranteed to tolerate `num_byzantine` of them."
            )

    # -- configuration -------------------------------------------------------------------------------

    @property
    def num_byzantine(self) -> int:
        """``f``, the number of ranks ARC tolerates."""
        return self._num_byzantine

    @property
    def aggregator(self) -> str:
        """The aggregation rule applied after ARC."""
        return self._aggregator

    @property
    def worker_momentum(self) -> float:
        """``beta`` of the worker momentum (``0.0``: the ranks send their gradients)."""
        return self._worker_momentum

    @property
    def arc(self) -> bool:
        """Whether ARC is applied (``False``: the ablation without ARC)."""
        return self._arc

    @property
    def static_clip(self) -> float | None:
        """The static-clipping bound applied to every rank's vector, or ``None``."""
        return self._static_clip

    @property
    def arc_state(self) -> ARCHookState | None:
        """The communication hook's state (``None`` before the model is wrapped in DDP)."""
        return self._arc_state

    @property
    def last_arc_stats(self) -> ARCStats | None:
        """ARC's statistics of the last synchronized step: norms ``[n]``, threshold, scales, clipped mask."""
        return None if self._arc_state is None else self._arc_state.last_stats

    def _check_world_size(self, world_size: int) -> None:
        check_world_size(world_size, self._num_byzantine)
        if self._byzantine is not None:
            self._byzantine.check_world_size(world_size)

    def _configure_launcher(self) -> None:
        # The expected world size is known before any process starts: fail in the launching process.
        if self.parallel_devices is not None:
            self._check_world_size(self.num_nodes * self.num_processes)
        super()._configure_launcher()

    def setup_distributed(self) -> None:
        super().setup_distributed()
        # The authoritative check, against the process group actually formed (multi-node included).
        self._check_world_size(dist.get_world_size())

    def _register_ddp_hooks(self) -> None:
        # Lightning's DDPStrategy registers hooks on CUDA only; ARC must run on every device type.
        assert isinstance(self.model, DistributedDataParallel)
        self._arc_state = ARCHookState(
            process_group=None,
            num_byzantine=self._num_byzantine,
            aggregator=self._aggregator,
            nnm=self._nnm,
            byzantine=self._byzantine,
            seed=self._seed,
            worker_momentum=self._worker_momentum,
            arc=self._arc,
            static_clip=self._static_clip,
        )
        self._apply_pending_momentum()
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
        self._arc_state.load_momentum_vector(self._pending_momentum, params)
        self._pending_momentum = None

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """Gather every rank's worker momentum into ``checkpoint`` (collective), then save it from rank 0.

        ``Trainer.save_checkpoint`` calls this on every rank; with ``worker_momentum > 0`` all ranks
        take part in a gather of their flat momenta to rank 0, which writes them under
        :data:`WORKER_MOMENTUM_KEY`. Weights-only checkpoints (no ``"optimizer_states"``) skip it.
        """
        if self._worker_momentum > 0.0 and "optimizer_states" in checkpoint:
            entry = self._gather_momentum()
            if entry is not None:
                checkpoint[WORKER_MOMENTUM_KEY] = entry
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def _gather_momentum(self) -> dict[str, Any] | None:
        names, params = self._momentum_params()
        if self._arc_state is not None:
            vec = self._arc_state.momentum_vector(params)
        elif self._pending_momentum is not None:
            vec = self._pending_momentum.to(self.root_device)  # saved before the hook exists: keep what was loaded
        else:
            vec = ARCHookState(num_byzantine=0).momentum_vector(params)
        vec = vec.to(self.root_device)
        if dist.is_available() and dist.is_initialized():
            world_size = dist.get_world_size()
            rank = dist.get_rank()
            rows = [torch.empty_like(vec) for _ in range(world_size)] if rank == 0 else None
            dist.gather(vec, gather_list=rows, dst=0)
        else:
            world_size, rank, rows = 1, 0, [vec]
        if rank != 0:
            return None
        return {
            "worker_momentum": self._worker_momentum,
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
        return checkpoint

    def _restore_momentum(self, checkpoint: dict[str, Any]) -> None:
        entry = checkpoint.get(WORKER_MOMENTUM_KEY)
        if self._worker_momentum == 0.0:
            if entry is not None:
                rank_zero_warn(
                    "The checkpoint holds worker-momentum buffers but `worker_momentum=0.0`: they are ignored."
                )
            return
        if entry is None:
            if "optimizer_states" in checkpoint:  # a full checkpoint, written without worker momentum
                rank_zero_warn(
                    f"The checkpoint has no worker-momentum buffers (key {WORKER_MOMENTUM_KEY!r}); with "
                    f"`worker_momentum={self._worker_momentum}` every rank's buffer restarts from zero."
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
        if state is None or pl_module is None or state.last_norms is None:
            return
        if state.last_step == self._arc_logged_step:
            return  # several optimizers stepping on one backward pass: log once
        self._arc_logged_step = state.last_step
        if not should_log(pl_module.trainer):
            return
        norms = state.last_norms
        values = torch.cat(
            [
                state.last_threshold.reshape(1).to(torch.float32),
                state.last_clipped.sum().reshape(1).to(torch.float32),
                norms.to(torch.float32),
            ]
        ).tolist()  # the only device-to-host copy
        metrics = {ARC_THRESHOLD: values[0], ARC_CLIPPED_RANKS: values[1]}
        metrics.update({arc_norm_tag(i): v for i, v in enumerate(values[2:])})
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, logger=True, batch_size=1, sync_dist=False)

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
