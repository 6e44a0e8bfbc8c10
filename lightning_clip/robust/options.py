"""``ARCConfig``: every setting of the robust pipeline, declared and validated once (pure torch).

One object serves the one-process :func:`~lightning_clip.robust.pipeline.aggregate` (its
:data:`PIPELINE_FIELDS`), the DDP communication hook and the ``ddp_arc`` strategy, which takes it whole or
builds it from its keyword arguments (the strategy's signature is generated from the fields below).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lightning_clip.exceptions import (
    check_bool,
    check_choice,
    check_fraction,
    check_non_negative_int,
    check_positive_float,
    check_positive_int,
    check_seed,
)
from lightning_clip.robust import privacy
from lightning_clip.robust.arc import check_num_byzantine
from lightning_clip.robust.rules import RULES, Rule
from lightning_clip.robust.transforms import SendTransform, WorkerMomentum

__all__ = ["PIPELINE_FIELDS", "ROBUST_COMMS", "ARCConfig"]

#: How a robust rule's vectors travel: coordinate shards (all-to-all, all-gather) or every vector to every rank.
ROBUST_COMMS = ("sharded", "gather")

#: The fields that define the pipeline ``rule(NNM(bucket(clip_C(ARC(x)))))`` itself, the keywords of ``aggregate``.
PIPELINE_FIELDS = ("aggregator", "num_byzantine", "nnm", "arc", "static_clip", "bucket_size", "bucket_seed",
                   "cclip_tau", "cclip_iters")


@dataclass(frozen=True)
class ARCConfig:
    """How the ranks' vectors are aggregated: ``rule(NNM(bucket(clip_C(ARC(x)))))``, and what travels.

    Every rank sends its local gradient (or, with ``worker_momentum``, its local momentum); ARC clips
    the ``floor(2 f (n - f) / n)`` largest of the ``n`` vectors to the next largest norm and zeroes
    non-finite ones; then optional static clipping, bucketing, NNM and the rule. Validated on construction.

    Attributes:
        num_byzantine: ``f``, the number of ranks that may misbehave, ``0 <= f < world_size / 2``
            (checked against the world size when it is known). ``0`` gives plain DDP's result.
        aggregator: ``"mean"`` (an all-reduce: plain DDP's traffic plus ``n`` floats) or a robust rule of
            :data:`~lightning_clip.robust.rules.RULES`: ``"cwtm"``, ``"median"``, ``"geomed"``,
            ``"krum"``, ``"multikrum"``, ``"meamed"``, ``"cclip"`` (centered clipping from the previous
            step's aggregate, which the hook keeps).
        nnm: Nearest-neighbour mixing before the rule.
        arc: Apply ARC (the default). ``False`` is the ablation: vectors reach the rule unclipped and a
            non-finite one is not zeroed, as in plain DDP.
        static_clip: If set, clip every rank's vector to this L2 norm after ARC and before bucketing and NNM
            (the static-clipping baseline); ``None`` skips it.
        worker_momentum: ``beta`` in ``[0, 1)``: each rank sends ``m <- beta m + (1 - beta) g``
            (``m_0 = 0``) instead of its gradient (Robust D-SHB, the algorithm the ARC paper runs; pair it
            with ``SGD(momentum=0)``). ``0.0`` sends the gradient.
        dp_noise_multiplier: ``sigma >= 0``: client-level differential privacy (DP-FedAvg). After every
            rank's vector is clipped to ``C = static_clip``, noise ``N(0, sigma^2 C^2 I)`` is added once to
            the sum over the ranks, then the sum is divided by ``n`` (:mod:`lightning_clip.robust.privacy`).
            Needs ``static_clip``. ``0.0`` (the default) adds nothing. The guarantee is established for
            ``arc=False``, ``aggregator="mean"``, ``nnm=False``; other settings warn.
        dp_seed: Seed of the noise, in ``[0, 2**32)``; the noise of a step is a function of ``(dp_seed, step)``.
        dp_delta: ``delta`` in ``(0, 1)`` at which epsilon is reported.
        dp_sampling_rate: In ``(0, 1]``: the probability that a client takes part in a step, for the
            accountant (``1.0``: every rank's client contributes to every step).
        dp_clip_quantile: If set, in ``(0, 1)``: the clip bound adapts to this quantile of the ranks' norms
            (as sent, before ARC; Andrew et al. 2021), starting from ``static_clip``. ``"mean"`` without NNM only.
        dp_clip_learning_rate: Positive step size of the adaptive bound's geometric update.
        dp_clipped_count_stddev: Standard deviation (``>= 0``) of the noise on the count of unclipped ranks;
            ``None``: ``n / 20`` with noise, ``0`` without. With noise it must exceed ``dp_noise_multiplier / 2``.
        dp_accountant: How epsilon is computed (:func:`~lightning_clip.robust.privacy.epsilon`): ``"pld"``
            (the default: exact for ``dp_sampling_rate=1``, else the tight privacy-loss-distribution
            accountant) or ``"rdp"`` (Renyi DP, looser).
        robust_comm: How a robust rule (or NNM) moves the vectors: ``"sharded"`` (the default: each rank
            aggregates ``d / n`` coordinates after one all-to-all, then one all-gather; about an
            all-reduce's traffic and one gradient of extra memory, :mod:`lightning_clip.distributed.exchange`)
            or ``"gather"`` (every rank all-gathers every vector, ``n`` gradients of memory; a reference).
            Same maths.
        bucket_size: ``s >= 1``: average random buckets of ``s`` vectors before NNM and the rule (the
            permutation is a function of ``(bucket_seed, step)``, the same on every rank and on resume);
            needs ``num_byzantine < ceil(world_size / s) / 2``. ``1`` (the default) skips bucketing.
        bucket_seed: Seed of the bucketing permutation, in ``[0, 2**32)``.
        cclip_tau: Radius of centered clipping (``aggregator="cclip"``), positive.
        cclip_iters: Iterations of centered clipping per step, positive.
    """

    num_byzantine: int = 1
    aggregator: str = "mean"
    nnm: bool = False
    arc: bool = True
    static_clip: float | None = None
    worker_momentum: float = 0.0
    dp_noise_multiplier: float = 0.0
    dp_seed: int = 0
    dp_delta: float = 1e-5
    dp_sampling_rate: float = 1.0
    dp_clip_quantile: float | None = None
    dp_clip_learning_rate: float = 0.2
    dp_clipped_count_stddev: float | None = None
    dp_accountant: str = "pld"
    robust_comm: str = "sharded"
    bucket_size: int = 1
    bucket_seed: int = 0
    cclip_tau: float = 1.0
    cclip_iters: int = 1

    def __post_init__(self) -> None:
        def norm(name: str, value: Any) -> None:  # keep the checked value (an int given for a float becomes a float)
            object.__setattr__(self, name, value)

        check_non_negative_int("num_byzantine", self.num_byzantine)
        for name, choices in (("aggregator", tuple(RULES)), ("robust_comm", ROBUST_COMMS)):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise TypeError(f"Expected argument `{name}` to be a string but got {value!r}")
            check_choice(name, value, choices)
        check_bool("nnm", self.nnm)
        check_bool("arc", self.arc)
        if self.static_clip is not None:
            norm("static_clip", check_positive_float("static_clip", self.static_clip))
        norm("worker_momentum", check_fraction("worker_momentum", self.worker_momentum, low=0.0, high=1.0,
                                               open_high=True))
        check_positive_int("bucket_size", self.bucket_size)
        check_seed("bucket_seed", self.bucket_seed)
        norm("cclip_tau", check_positive_float("cclip_tau", self.cclip_tau))
        check_positive_int("cclip_iters", self.cclip_iters)
        norm("dp_noise_multiplier", check_positive_float("dp_noise_multiplier", self.dp_noise_multiplier,
                                                         allow_zero=True))
        check_seed("dp_seed", self.dp_seed)
        if not isinstance(self.dp_accountant, str):
            raise TypeError(f"Expected argument `dp_accountant` to be a string but got {self.dp_accountant!r}")
        check_choice("dp_accountant", self.dp_accountant, privacy.ACCOUNTANTS)
        norm("dp_delta", check_fraction("dp_delta", self.dp_delta, open_low=True, open_high=True))
        norm("dp_sampling_rate", check_fraction("dp_sampling_rate", self.dp_sampling_rate, open_low=True))
        norm("dp_clip_learning_rate", check_positive_float("dp_clip_learning_rate", self.dp_clip_learning_rate))
        if self.dp_clipped_count_stddev is not None:
            norm("dp_clipped_count_stddev", check_positive_float("dp_clipped_count_stddev",
                                                                 self.dp_clipped_count_stddev, allow_zero=True))
        if self.dp_clip_quantile is not None:
            norm("dp_clip_quantile", check_fraction("dp_clip_quantile", self.dp_clip_quantile, open_low=True,
                                                    open_high=True))
        self._check_dp()
        self._warn_unused()

    def _warn_unused(self) -> None:
        """Warn, naming them, about settings changed from their defaults that do nothing in this combination."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        unused: list[tuple[str, str]] = []
        if self.aggregator != "cclip":
            unused += [(n, f"aggregator={self.aggregator!r} is not 'cclip'") for n in ("cclip_tau", "cclip_iters")]
        if self.bucket_size == 1:
            unused.append(("bucket_seed", "bucket_size=1 (no bucketing)"))
        if self.dp_clip_quantile is None:
            unused.append(("dp_clip_learning_rate", "dp_clip_quantile=None (a fixed clip bound)"))
        if self.dp_noise_multiplier == 0.0:
            why = "dp_noise_multiplier=0 (no noise, no epsilon)"
            unused += [(n, why) for n in ("dp_delta", "dp_sampling_rate", "dp_accountant")]
            if self.dp_clip_quantile is None:
                unused += [(n, why + " and no adaptive bound") for n in ("dp_seed", "dp_clipped_count_stddev")]
        for name, why in unused:
            if getattr(self, name) != defaults[name]:
                warnings.warn(f"ARCConfig: `{name}={getattr(self, name)!r}` has no effect: {why}", UserWarning,
                              stacklevel=4)

    def _check_dp(self) -> None:
        sigma, q = self.dp_noise_multiplier, self.dp_clip_quantile
        if q is not None:
            if self.static_clip is None:
                raise ValueError(f"`dp_clip_quantile={q:g}` needs `static_clip`, the adaptive bound's starting value")
            if not self.uses_all_reduce:
                raise ValueError(f"`dp_clip_quantile={q:g}` (the adaptive clip bound) works with aggregator='mean' "
                                 f"and nnm=False only; got aggregator={self.aggregator!r}, nnm={self.nnm}")
        if sigma == 0.0:
            return
        if self.static_clip is None:
            raise ValueError(f"`dp_noise_multiplier={sigma:g}` needs `static_clip=C`: the noise N(0, sigma^2 C^2) is "
                             "calibrated to every rank's vector being clipped to C. Set static_clip, or "
                             "dp_noise_multiplier=0.0")
        if q is not None and self.dp_clipped_count_stddev is not None:
            privacy.adaptive_noise_multiplier(sigma, self.dp_clipped_count_stddev)  # raises when it cannot hold
        if self.arc or not self.uses_all_reduce:
            warnings.warn(
                f"dp_noise_multiplier={sigma:g} with arc={self.arc}, aggregator={self.aggregator!r}, nnm={self.nnm}: "
                "the noise is added, but the DP guarantee (sensitivity C of the sum) is established only for the "
                "mean of statically clipped vectors (arc=False, aggregator='mean', nnm=False). With ARC, NNM or a "
                "robust rule one rank's data can move the other ranks' contributions, so the reported epsilon is "
                "not a guarantee for this setting.",
                UserWarning,
                stacklevel=3,
            )

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """Every setting's name, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_keywords(cls, owner: str, arc_config: ARCConfig | None, keywords: dict[str, Any]) -> ARCConfig:
        """The config of an object that takes either ``arc_config`` or this class's fields as keyword arguments.

        The fields are *removed* from ``keywords`` (what remains belongs to ``owner``'s other arguments).

        Raises:
            TypeError: If ``arc_config`` is not an ``ARCConfig``.
            ValueError: If both ``arc_config`` and fields are given, or a field is out of range.
        """
        settings = {name: keywords.pop(name) for name in cls.field_names() if name in keywords}
        if arc_config is None:
            return cls(**settings)
        if not isinstance(arc_config, ARCConfig):
            raise TypeError(f"Expected argument `arc_config` to be an ARCConfig but got {arc_config!r}")
        if settings:
            raise ValueError(f"Give {owner} either `arc_config` or the keyword arguments that build one "
                             f"({', '.join(sorted(settings))}), not both")
        return arc_config

    @classmethod
    def signature_with_fields(cls, fn: Callable[..., Any]) -> inspect.Signature:
        """``fn``'s signature with this class's fields inserted as keyword-only arguments after ``self``.

        For an ``__init__`` that takes the fields through ``**kwargs`` (:meth:`from_keywords`): help(), IDEs and
        LightningCLI then show every setting with its type and default.
        """
        sig = inspect.signature(fn)
        self_param, *rest = sig.parameters.values()
        hints = typing.get_type_hints(cls)
        fields = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=getattr(cls, name),
                                    annotation=hints[name]) for name in cls.field_names()]
        return sig.replace(parameters=[self_param, *fields, *rest])

    @classmethod
    def of_pipeline(cls, **settings: Any) -> ARCConfig:
        """The config of :data:`PIPELINE_FIELDS` ``settings`` (the rest at their defaults).

        Raises:
            TypeError: Naming a setting that is not a pipeline field (DP, communication, worker momentum).
        """
        for name in settings:
            if name not in PIPELINE_FIELDS:
                raise TypeError(f"Unexpected keyword argument `{name}`: the pipeline's settings are "
                                f"{', '.join(PIPELINE_FIELDS)}")
        return cls(**settings)

    # -- derived -----------------------------------------------------------------------------------------

    @functools.cached_property
    def rule(self) -> Rule:
        """The rule object of ``aggregator`` with its settings (``cclip_tau``, ``cclip_iters``) from this config."""
        return RULES[self.aggregator].configured(self)

    @property
    def uses_all_reduce(self) -> bool:
        """Whether the reduction is an all-reduce (``"mean"`` without NNM) rather than a robust exchange."""
        return self.aggregator == "mean" and not self.nnm

    @property
    def uses_dp(self) -> bool:
        """Whether the hook adds privacy noise or adapts the clip bound."""
        return self.dp_noise_multiplier > 0.0 or self.dp_clip_quantile is not None

    def dp_count_stddev(self, world_size: int) -> float:
        """The noise on the unclipped count: ``dp_clipped_count_stddev``, else ``n / 20`` with noise, ``0`` without."""
        if self.dp_clipped_count_stddev is not None:
            return self.dp_clipped_count_stddev
        return world_size / 20.0 if self.dp_noise_multiplier > 0.0 else 0.0

    def dp_vector_noise_multiplier(self, world_size: int) -> float:
        """The multiplier of the noise on the vectors: ``dp_noise_multiplier``, larger with the adaptive bound."""
        if self.dp_noise_multiplier == 0.0 or self.dp_clip_quantile is None:
            return self.dp_noise_multiplier
        return privacy.adaptive_noise_multiplier(self.dp_noise_multiplier, self.dp_count_stddev(world_size))

    def send_chain(self, extra: Sequence[SendTransform] = ()) -> list[SendTransform]:
        """The transforms a rank applies to what it sends, in order: worker momentum (if any), then ``extra``."""
        chain: list[SendTransform] = [WorkerMomentum(self.worker_momentum)] if self.worker_momentum > 0.0 else []
        return chain + list(extra)

    # -- checks against the number of vectors ------------------------------------------------------------

    def check_rows(self, n: int) -> None:
        """Raise ``ValueError`` unless ``f < n/2`` for ``n`` vectors and, with bucketing, ``f < ceil(n / s) / 2``."""
        f = check_num_byzantine(n, self.num_byzantine)
        rows = -(-n // self.bucket_size)
        if self.bucket_size > 1 and 2 * f >= rows:
            raise ValueError(
                f"Expected argument `bucket_size` to leave more than 2 * num_byzantine = {2 * f} buckets "
                f"(num_byzantine={f}) of {n} vectors but got bucket_size={self.bucket_size} ({rows} buckets); use "
                f"bucket_size <= {max(1, (n - 1) // (2 * f)) if f else n}"
            )

    def check_world_size(self, world_size: int) -> None:
        """Raise ``ValueError`` unless ``num_byzantine < world_size / 2`` (and the buckets and the DP noise fit)."""
        f = self.num_byzantine
        if 2 * f >= world_size:
            raise ValueError(
                f"Expected argument `num_byzantine` to satisfy 0 <= num_byzantine < world_size / 2 = "
                f"{world_size / 2:g} (world size {world_size}) but got {f}; ARC needs a strict honest majority, so "
                f"use num_byzantine <= {(world_size - 1) // 2} or at least {2 * f + 1} ranks"
            )
        self.check_rows(world_size)
        self.dp_vector_noise_multiplier(world_size)
