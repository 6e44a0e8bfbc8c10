"""Client-level differential privacy for the aggregation of clipped vectors (DP-FedAvg), pure torch.

The mechanism (McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models"):
every one of the ``n`` clients (here: DDP ranks) clips its vector to L2 norm ``C``; Gaussian noise
``N(0, sigma^2 C^2 I)`` is added once to the *sum* of the clipped vectors, and the sum is divided by
``n``. Adding or removing one client moves the sum by at most ``C`` (:func:`sum_sensitivity`), so each
step is a Gaussian mechanism of noise multiplier ``sigma``; :func:`epsilon` composes the steps: exactly
when every client takes part in every step (:func:`gaussian_epsilon`), else with the privacy-loss
distribution accountant of Google's ``dp-accounting`` (the optional extra ``lightning-clip[dp]``), or its
RDP accountant on request.

The adaptive clip bound (Andrew et al. 2021, "Differentially Private Learning with Adaptive
Clipping"): the bound follows a target quantile of the clients' norms through
:func:`~lightning_clip.core.functional.geometric_quantile_update`, fed with a noisy fraction of
unclipped clients (:func:`noisy_unclipped_fraction`). Part of the privacy budget goes to that count:
the vectors then get the larger noise multiplier of :func:`adaptive_noise_multiplier`, so that the pair
of mechanisms together has multiplier ``sigma``.

The noise of a step is a pure function of ``(seed, step)`` (:func:`noise_seed`), drawn on the given
device: a resumed run replays it, and every process drawing it gets the same numbers. :class:`DPState` is
what the ``ddp_arc`` hook keeps: the adaptive bound and the noise laid out on DDP's buckets.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from lightning_clip.core.functional import clip_coefficient, geometric_quantile_update
from lightning_clip.exceptions import (
    check_choice,
    check_fraction,
    check_non_negative_int,
    check_positive_float,
    check_seed,
)
from lightning_clip.robust.arc import ARCStats
from lightning_clip.robust.transforms import SendBuffers

if TYPE_CHECKING:
    from lightning_clip.robust.options import ARCConfig

__all__ = [
    "ACCOUNTANTS",
    "DP_EXTRA_HINT",
    "VECTOR_STREAM",
    "COUNT_STREAM",
    "DPState",
    "adaptive_noise_multiplier",
    "bound_stats",
    "epsilon",
    "gaussian_epsilon",
    "gaussian_noise",
    "noise_seed",
    "noisy_unclipped_fraction",
    "require_accountant",
    "sum_sensitivity",
    "update_clip_bound",
]

#: The accountants :func:`epsilon` offers: ``"pld"`` (tight, the default) and ``"rdp"`` (Renyi DP, looser).
ACCOUNTANTS = ("pld", "rdp")
#: The PLD accountant's discretisation of the privacy loss (pessimistic, so the epsilon stays an upper bound):
#: within 0.1% of a 10x finer grid on the settings tested, about 10x faster.
PLD_DISCRETIZATION = 1e-3
#: How to install the accountant when it is missing.
DP_EXTRA_HINT = "pip install 'lightning-clip[dp]'  (or: pip install dp-accounting)"
#: Noise streams of one step: the noise on the vectors, and the noise on the unclipped count.
VECTOR_STREAM = 0
COUNT_STREAM = 1

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def noise_seed(seed: int, step: int, stream: int = VECTOR_STREAM) -> int:
    """The generator seed of ``stream`` at ``step`` for the run seed ``seed`` (a 63-bit integer).

    Distinct ``(seed, step, stream)`` give distinct seeds (a bijective 64-bit mix of the three; ``seed`` and
    ``step`` are below ``2**32``), so two steps, two runs or the two streams never share their noise.
    """
    check_seed("seed", seed)
    check_seed("step", step)
    check_non_negative_int("stream", stream)
    x = (seed << 32 | step) ^ ((stream * _GOLDEN) & _MASK64)
    # splitmix64's finaliser: a bijection on 64 bits that spreads nearby inputs apart
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) >> 1  # torch seeds are taken modulo 2^64; keep them non-negative


def gaussian_noise(numel: int, std: Tensor | float, seed: int, step: int, *, stream: int = VECTOR_STREAM,
                   device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
    """``numel`` independent ``N(0, std^2)`` samples of step ``step``, a pure function of ``(seed, step, stream)``.

    Drawn with a generator of ``device`` seeded by :func:`noise_seed` (the same device type gives the
    same numbers in every process). ``std`` may be a 0-d tensor on ``device`` (no host read).
    """
    check_non_negative_int("numel", numel)
    gen = torch.Generator(device=device)
    gen.manual_seed(noise_seed(seed, step, stream))
    return torch.randn(numel, generator=gen, device=device, dtype=dtype) * std


def sum_sensitivity(clip_bound: float) -> float:
    """L2 sensitivity of the sum of vectors clipped to ``clip_bound`` when one client is added or removed.

    A client's clipped vector has norm at most ``C``, and nothing else in the sum depends on it: ``C``.
    """
    return check_positive_float("clip_bound", clip_bound)


def adaptive_noise_multiplier(noise_multiplier: float, clipped_count_stddev: float) -> float:
    """The vectors' noise multiplier when the clip bound is adaptive (Andrew et al. 2021, Theorem 1).

    The unclipped count is released with noise of standard deviation ``sigma_b`` and sensitivity ``1/2``
    (indicators centred at ``1/2``): a Gaussian mechanism of multiplier ``2 sigma_b``. For the pair to
    compose like one mechanism of multiplier ``z``, the vectors get ``z_v = (z^-2 - (2 sigma_b)^-2)^-1/2``.

    Raises:
        ValueError: Unless ``2 * clipped_count_stddev > noise_multiplier`` (the count would spend the whole budget).
    """
    z = check_positive_float("dp_noise_multiplier", noise_multiplier)
    sb = check_positive_float("dp_clipped_count_stddev", clipped_count_stddev)
    if 2.0 * sb <= z:
        raise ValueError(
            f"Expected argument `dp_clipped_count_stddev` to be more than dp_noise_multiplier / 2 = {z / 2:g} but got "
            f"{sb:g}: the noisy count of unclipped ranks would use the whole privacy budget. Raise "
            "`dp_clipped_count_stddev` (Andrew et al. suggest n / 20 for n clients) or use a fixed clip bound."
        )
    return (z ** -2 - (2.0 * sb) ** -2) ** -0.5


def noisy_unclipped_fraction(norms: Tensor, bound: Tensor, clipped_count_stddev: float, seed: int,
                             step: int) -> Tensor:
    """``(#{i : norms[i] <= bound} + N(0, sigma_b^2)) / n`` as a 0-d float tensor (a NaN norm counts as clipped)."""
    n = norms.shape[0]
    below = (norms <= bound).sum(dtype=torch.float32)
    if clipped_count_stddev > 0.0:
        below = below + gaussian_noise(1, clipped_count_stddev, seed, step, stream=COUNT_STREAM,
                                       device=norms.device)[0]
    return below / n


def update_clip_bound(bound: Tensor, norms: Tensor, quantile: float, learning_rate: float,
                      clipped_count_stddev: float, seed: int, step: int) -> Tensor:
    """The next adaptive clip bound: the geometric quantile step on the noisy unclipped fraction.

    ``C <- C * exp(-lr * (b - quantile))`` with ``b`` from :func:`noisy_unclipped_fraction` of the
    ``n`` norms measured against the current ``C``.
    """
    below = noisy_unclipped_fraction(norms, bound, clipped_count_stddev, seed, step)
    return geometric_quantile_update(bound, below, quantile, learning_rate)


def bound_stats(stats: ARCStats, bound: Tensor, arc: bool) -> ARCStats:
    """``stats`` (ARC's, or unit scales) with every vector then clipped to the tensor ``bound``.

    The static clip of :func:`~lightning_clip.robust.pipeline.preaggregation_stats` for a bound held
    on the device (the adaptive one): the factor ``min(1, C / (norm_after_ARC + 1e-6))`` is multiplied in.
    Without ARC the reported threshold is ``C``.
    """
    post = stats.norms * stats.scales
    if arc:  # a vector ARC zeroes has norm 0 afterwards
        post = torch.where(torch.isfinite(stats.norms), post, torch.zeros_like(post))
    scales = stats.scales * clip_coefficient(bound.to(post.dtype), post)
    threshold = stats.threshold if arc else bound.to(stats.threshold.dtype).reshape(())
    return stats._replace(scales=scales, clipped=scales < 1, threshold=threshold)


def require_accountant() -> Any:
    """Return the ``dp_accounting`` module, or raise ``ImportError`` naming the extra to install."""
    try:
        import dp_accounting
    except ImportError as exc:
        raise ImportError(f"Privacy accounting needs Google's dp-accounting: {DP_EXTRA_HINT}") from exc
    return dp_accounting


def _log_ndtr(x: float) -> float:
    """``log Phi(x)`` of the standard normal CDF, accurate far into the lower tail."""
    if x > -30.0:
        return math.log(0.5 * math.erfc(-x / math.sqrt(2.0)))
    # Phi(x) = phi(x) / |x| * (1 - 1/x^2 + 3/x^4 - ...) for x -> -inf
    return -0.5 * x * x - math.log(-x) - 0.5 * math.log(2.0 * math.pi) + math.log1p(-1.0 / x**2 + 3.0 / x**4)


def _gaussian_delta(eps: float, mult: float) -> float:
    """The smallest delta of the Gaussian mechanism of noise multiplier ``mult`` at ``eps`` (Balle & Wang 2018)."""
    a, b = 0.5 / mult - eps * mult, -0.5 / mult - eps * mult
    return math.exp(_log_ndtr(a)) - math.exp(eps + _log_ndtr(b))


def gaussian_epsilon(noise_multiplier: float, steps: int, delta: float) -> float:
    """Exact epsilon at ``delta`` of ``steps`` compositions of the Gaussian mechanism of multiplier ``sigma``.

    ``T`` Gaussian mechanisms of multiplier ``sigma`` compose to one of multiplier ``sigma / sqrt(T)``, whose
    tight ``(epsilon, delta)`` curve is known in closed form (Balle & Wang 2018, Theorem 8); epsilon is found
    on it by bisection to a relative ``1e-12``. The case ``sampling_rate = 1`` of :func:`epsilon`.
    """
    z = check_positive_float("dp_noise_multiplier", noise_multiplier, allow_zero=True)
    t = check_non_negative_int("steps", steps)
    d = check_fraction("dp_delta", delta, open_low=True, open_high=True)
    if t == 0:
        return 0.0
    if z == 0.0:
        return math.inf
    mult = z / math.sqrt(t)
    if _gaussian_delta(0.0, mult) <= d:
        return 0.0
    lo, hi = 0.0, 1.0
    while _gaussian_delta(hi, mult) > d:
        lo, hi = hi, 2.0 * hi
    while hi - lo > 1e-12 * hi:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _gaussian_delta(mid, mult) > d else (lo, mid)
    return hi


@functools.lru_cache(maxsize=128)
def _accounted_epsilon(z: float, q: float, t: int, d: float, accountant: str) -> float:
    dp_accounting = require_accountant()
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
    if accountant == "pld":
        acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    else:
        acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(event, t)
    return float(acc.get_epsilon(d))


def epsilon(noise_multiplier: float, sampling_rate: float, steps: int, delta: float,
            accountant: str = "pld") -> float:
    """Epsilon of ``steps`` compositions of the sampled Gaussian mechanism at ``delta``.

    The event is ``PoissonSampled(sampling_rate, Gaussian(noise_multiplier))`` composed ``steps`` times.
    ``accountant="pld"`` (the default): exact for ``sampling_rate = 1`` (:func:`gaussian_epsilon`), else
    ``dp_accounting``'s privacy-loss-distribution accountant with a pessimistic discretisation
    (:data:`PLD_DISCRETIZATION`): an upper bound within about 0.1% of the tight value. ``"rdp"``: its RDP
    accountant (default orders), faster but looser (at sigma 0.5, q 0.1, 1000 steps, delta 1e-5: 236.5
    against the PLD's 126.2). ``0`` steps give ``0``; a zero noise multiplier gives ``inf``. Results are
    cached per arguments.

    Raises:
        ImportError: When ``dp-accounting`` is needed (``sampling_rate < 1`` or ``"rdp"``) and not installed.
    """
    z = check_positive_float("dp_noise_multiplier", noise_multiplier, allow_zero=True)
    q = check_fraction("dp_sampling_rate", sampling_rate, open_low=True)
    t = check_non_negative_int("steps", steps)
    d = check_fraction("dp_delta", delta, open_low=True, open_high=True)
    check_choice("dp_accountant", accountant, ACCOUNTANTS)
    if accountant == "pld" and q == 1.0:
        return gaussian_epsilon(z, t, d)
    require_accountant()
    if t == 0:
        return 0.0
    if z == 0.0:
        return math.inf
    return _accounted_epsilon(z, q, t, d, accountant)


class DPState:
    """What the ``ddp_arc`` hook needs for client-level DP: the adaptive clip bound and the noise's layout.

    The noise of a step is one flat vector of ``d`` samples in a canonical parameter order: the order of the
    parameters in DDP's buckets at the first step this state sees. A fresh DDP model always starts with the
    same buckets (DDP rebuilds them in gradient-ready order after its first step), so a resumed run maps the
    noise of a step onto the parameters exactly as the uninterrupted run did.

    Args:
        config: The validated settings (``static_clip`` and the ``dp_*`` fields).

    Attributes:
        bound: The adaptive clip bound ``C_t`` (0-d float32 tensor), ``None`` with a fixed bound: the only
            state (:meth:`state_dict`), the same on every rank.
    """

    __slots__ = ("config", "bound", "_offsets", "_perms")
    per_rank: ClassVar[bool] = False

    def __init__(self, config: ARCConfig) -> None:
        self.config = config
        self.bound: Tensor | None = None
        if config.dp_clip_quantile is not None and config.static_clip is not None:
            self.bound = torch.tensor(config.static_clip, dtype=torch.float32)
        self._offsets: dict[int, int] | None = None  # id(parameter) -> offset in the canonical order
        self._perms: dict[tuple[int, ...], Tensor | None] = {}

    def clip_bound(self, device: torch.device) -> Tensor | float:
        """The clip bound ``C`` in force: the adaptive one on ``device``, else ``static_clip``."""
        if self.bound is None:
            return float(self.config.static_clip or 0.0)
        if self.bound.device != device:
            self.bound = self.bound.to(device)
        return self.bound

    def stats(self, stats: ARCStats, device: torch.device) -> ARCStats:
        """``stats`` computed without the static clip, with the adaptive bound applied (fixed bound: unchanged)."""
        bound = self.clip_bound(device)
        return stats if not isinstance(bound, Tensor) else bound_stats(stats, bound, self.config.arc)

    def update_bound(self, norms: Tensor, step: int) -> None:
        """Move the adaptive bound one geometric step towards the target quantile of ``norms [n]`` (same everywhere)."""
        cfg = self.config
        bound = self.clip_bound(norms.device)
        if not isinstance(bound, Tensor) or cfg.dp_clip_quantile is None:
            return
        self.bound = update_clip_bound(bound, norms.to(bound.dtype), cfg.dp_clip_quantile, cfg.dp_clip_learning_rate,
                                       cfg.dp_count_stddev(norms.shape[0]), cfg.dp_seed, step)

    def add_noise_(self, sent: SendBuffers, step: int, world_size: int) -> None:
        """Add ``N(0, (sigma C / n)^2)`` noise of step ``step`` to the buffers, in the canonical parameter order."""
        multiplier = self.config.dp_vector_noise_multiplier(world_size)
        if multiplier == 0.0:
            return
        device = sent.buffers[0].device
        numel = sum(b.numel() for b in sent.buffers)
        std = self.clip_bound(device) * (multiplier * (1.0 / world_size))
        noise = gaussian_noise(numel, std, self.config.dp_seed, step, device=device)
        perm = self._perm(sent, numel)
        if perm is not None:
            noise = noise[perm.to(device)]
        offset = 0
        for b in sent.buffers:
            b.add_(noise[offset : offset + b.numel()].view_as(b).to(b.dtype))
            offset += b.numel()

    def _perm(self, sent: SendBuffers, numel: int) -> Tensor | None:
        """Indices into the canonical noise vector, in the order of this step's buckets (``None``: the same order)."""
        ids = tuple(id(p) for ps in sent.params for p in ps)
        if ids in self._perms:
            return self._perms[ids]
        params = [p for ps in sent.params for p in ps]
        held = sum(p.numel() for p in params)
        if held != numel:
            raise RuntimeError(
                f"ddp_arc: the gradient buckets hold {numel} elements but their parameters {held}; "
                "privacy noise needs buckets laid out parameter by parameter"
            )
        if self._offsets is None:
            self._offsets, offset = {}, 0
            for p in params:
                self._offsets[id(p)] = offset
                offset += p.numel()
        parts = [torch.arange(self._offsets[id(p)], self._offsets[id(p)] + p.numel()) for p in params]
        perm: Tensor | None = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
        if perm is not None and torch.equal(perm, torch.arange(numel)):
            perm = None
        self._perms[ids] = perm
        return perm

    def state_dict(self, params: Sequence[Tensor] = ()) -> dict[str, Any]:
        """The adaptive bound (``{}`` with a fixed bound): the only state; the noise is seeded per step."""
        return {} if self.bound is None else {"clip_bound": self.bound.detach().cpu().clone()}

    def load_state_dict(self, state: Mapping[str, Any], params: Sequence[Tensor] = ()) -> None:
        """Restore :meth:`state_dict`'s output (a missing bound keeps the current one)."""
        if self.bound is not None and state.get("clip_bound") is not None:
            self.bound = torch.as_tensor(state["clip_bound"], dtype=torch.float32).clone().reshape(())

    def __getstate__(self) -> dict[str, Any]:
        """Everything but the parameter layout (keyed by object ids, meaningless in another process)."""
        return {"config": self.config, "bound": self.bound}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore ``state`` with an empty layout."""
        self.config, self.bound = state["config"], state["bound"]
        self._offsets = None
        self._perms = {}
