"""Simulated Byzantine ranks: which ranks misbehave and what they send.

:class:`ByzantineSpec` (validated, YAML-friendly) names the ranks and the attack; :class:`ByzantineTransform`
is the send transform that makes those ranks send the attack (pass it to the ``ddp_arc`` strategy's
``send_transforms``); :func:`simulate_sends` runs the same chains of transforms for ``n`` simulated ranks in
one process, the gathers answered from the rows it holds, so a simulation and a real DDP run send the same bits.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_clip.exceptions import check_choice, check_finite_float, check_non_negative_int, check_positive_float
from lightning_clip.robust.checks import check_floating
from lightning_clip.robust.transforms import SendBuffers, SendContext, SendTransform
from lightning_clip.sim.adaptive import (
    ADAPTIVE_ATTACKS,
    Aggregation,
    alie_ls,
    check_aggregation,
    check_grid,
    check_search,
    check_sign,
    check_target,
    foe_ls,
    mimic,
)
from lightning_clip.sim.attacks import ATTACKS, alie, alie_z, check_correction, fixed_clip_defence, gaussian

__all__ = ["ATTACK_NAMES", "ByzantineSpec", "ByzantineTransform", "simulate_sends"]

#: Every attack name :class:`ByzantineSpec` accepts: :data:`ATTACKS` then :data:`ADAPTIVE_ATTACKS`.
ATTACK_NAMES: tuple[str, ...] = (*ATTACKS, *ADAPTIVE_ATTACKS)

_NEEDS_HONEST = frozenset({"alie", "foe", "ipm", "mimic", "foe_ls", "alie_ls"})
_NEEDS_AGGREGATION = frozenset({"foe_ls", "alie_ls"})


def _foe_grid(name: str, value: Any) -> tuple[float, ...]:
    return check_grid(name, value, positive=True)


def _alie_grid(name: str, value: Any) -> tuple[float, ...]:
    return check_grid(name, value, positive=False)


# Parameters each attack accepts in a spec, with their validators (name, value) -> value.
_PARAMS: dict[str, dict[str, Callable[[str, Any], Any]]] = {
    "sign_flip": {},
    "scale": {"factor": check_finite_float},
    "gaussian": {"std": check_positive_float, "mean": check_finite_float},
    "nan": {},
    "inf": {},
    "zero": {},
    "alie": {"z": check_finite_float, "correction": lambda _, v: check_correction(v)},
    "foe": {"eps": check_finite_float},
    "ipm": {"eps": check_positive_float},
    "mimic": {"target": check_target},
    "foe_ls": {"grid": _foe_grid, "refine": check_non_negative_int, "search": lambda _, v: check_search(v),
               "sign": lambda _, v: check_sign(v)},
    "alie_ls": {"grid": _alie_grid, "refine": check_non_negative_int, "correction": lambda _, v: check_correction(v),
                "search": lambda _, v: check_search(v), "sign": lambda _, v: check_sign(v)},
}
_REQUIRED: dict[str, tuple[str, ...]] = {"scale": ("factor",)}


@dataclass(frozen=True, init=False)
class ByzantineSpec:
    """Which ranks are Byzantine and what they send; validated on construction.

    Example:
        ``ByzantineSpec(ranks=[1], attack="scale", factor=-100.0)`` or, from YAML,
        ``ByzantineSpec.from_config({"ranks": [1], "attack": "sign_flip"})``.

    Attributes:
        ranks: The Byzantine ranks, sorted, unique, non-negative.
        attack: One of :data:`ATTACK_NAMES` (a key of :data:`ATTACKS` or :data:`ADAPTIVE_ATTACKS`).
        params: Keyword arguments of the attack (see the attack functions); a ``grid`` is stored as
            a tuple of floats.
        fixed_clip: If set, the Byzantine vector is then clipped to this norm with
            :func:`~lightning_clip.sim.attacks.fixed_clip_defence` (a baseline); ``None`` disables it.
    """

    ranks: tuple[int, ...]
    attack: str
    params: dict[str, Any]
    fixed_clip: float | None

    def __init__(
        self, ranks: Sequence[int], attack: str, fixed_clip: float | None = None, **params: Any
    ) -> None:
        if isinstance(ranks, (str, bytes)) or not isinstance(ranks, Sequence):
            raise TypeError(f"Expected argument `ranks` to be a sequence of integers but got {ranks!r}")
        for r in ranks:
            if not isinstance(r, int) or isinstance(r, bool) or r < 0:
                raise ValueError(f"Expected argument `ranks` to hold non-negative integers but got {list(ranks)!r}")
        if not ranks:
            raise ValueError("Expected argument `ranks` to name at least one rank but got []")
        if len(set(ranks)) != len(ranks):
            raise ValueError(f"Expected argument `ranks` to hold distinct ranks but got {list(ranks)!r}")
        if not isinstance(attack, str):
            raise TypeError(f"Expected argument `attack` to be a string but got {attack!r}")
        check_choice("attack", attack, ATTACK_NAMES)
        allowed = _PARAMS[attack]
        checked: dict[str, Any] = {}
        for key, value in params.items():
            if key not in allowed:
                names = ", ".join(f"`{k}`" for k in allowed) or "none"
                raise ValueError(
                    f"Attack {attack!r} got an unexpected parameter `{key}` = {value!r}; allowed: {names}"
                )
            checked[key] = allowed[key](key, value)
        for key in _REQUIRED.get(attack, ()):
            if key not in checked:
                raise ValueError(f"Attack {attack!r} needs the parameter `{key}` but it was not given")
        if fixed_clip is not None:
            fixed_clip = check_positive_float("fixed_clip", fixed_clip)
        object.__setattr__(self, "ranks", tuple(sorted(ranks)))
        object.__setattr__(self, "attack", attack)
        object.__setattr__(self, "params", checked)
        object.__setattr__(self, "fixed_clip", fixed_clip)

    def __hash__(self) -> int:
        return hash((self.ranks, self.attack, tuple(sorted(self.params.items())), self.fixed_clip))

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ByzantineSpec:
        """Build a spec from a plain mapping such as YAML's ``{ranks: [1], attack: sign_flip}``.

        Keys other than ``ranks``, ``attack`` and ``fixed_clip`` are attack parameters; they may
        also be nested under ``params``.
        """
        if not isinstance(config, Mapping):
            raise TypeError(f"Expected argument `config` to be a mapping but got {type(config).__name__}")
        missing = [key for key in ("ranks", "attack") if key not in config]
        if missing:
            raise ValueError(f"Expected argument `config` to have the keys `ranks` and `attack` but {missing} missing")
        rest = {k: v for k, v in config.items() if k not in ("ranks", "attack", "fixed_clip", "params")}
        nested = config.get("params") or {}
        if not isinstance(nested, Mapping):
            raise TypeError(f"Expected `params` in argument `config` to be a mapping but got {nested!r}")
        both = sorted(set(rest) & set(nested))
        if both:
            raise ValueError(f"Expected each attack parameter once in argument `config` but {both} given twice")
        ranks = config["ranks"]
        if isinstance(ranks, int) and not isinstance(ranks, bool):
            ranks = [ranks]
        return cls(ranks=ranks, attack=config["attack"], fixed_clip=config.get("fixed_clip"), **rest, **nested)

    def to_config(self) -> dict[str, Any]:
        """Return the flat plain-value mapping :meth:`from_config` reads back."""
        params = {k: list(v) if isinstance(v, tuple) else v for k, v in self.params.items()}
        config: dict[str, Any] = {"ranks": list(self.ranks), "attack": self.attack, **params}
        if self.fixed_clip is not None:
            config["fixed_clip"] = self.fixed_clip
        return config

    @property
    def needs_honest(self) -> bool:
        """Whether :meth:`apply` needs the honest vectors (``alie``, ``foe``, ``ipm`` and the adaptive attacks)."""
        return self.attack in _NEEDS_HONEST

    @property
    def needs_aggregation(self) -> bool:
        """Whether :meth:`apply` needs the server's aggregation (``foe_ls``, ``alie_ls``)."""
        return self.attack in _NEEDS_AGGREGATION

    @property
    def num_byzantine(self) -> int:
        """The number of Byzantine ranks."""
        return len(self.ranks)

    def is_byzantine(self, rank: int) -> bool:
        """Return whether ``rank`` is one of the Byzantine ranks."""
        return rank in self.ranks

    def honest_ranks(self, world_size: int) -> list[int]:
        """The ranks of ``range(world_size)`` that are not Byzantine, in rank order."""
        return [r for r in range(world_size) if r not in self.ranks]

    def check_world_size(self, world_size: int) -> None:
        """Raise ``ValueError`` unless every rank exists and the attack can run with ``world_size`` workers."""
        if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
            raise ValueError(f"Expected argument `world_size` to be a positive integer but got {world_size!r}")
        if self.ranks[-1] >= world_size:
            raise ValueError(
                f"Expected the Byzantine `ranks` to be in [0, world_size) = [0, {world_size}) but got "
                f"{list(self.ranks)}"
            )
        if self.needs_honest and self.num_byzantine >= world_size:
            raise ValueError(
                f"Attack {self.attack!r} needs at least one honest rank but all {world_size} ranks are Byzantine"
            )
        if self.attack == "alie" and "z" not in self.params:
            alie_z(world_size, self.num_byzantine)
        target = self.params.get("target")
        if self.attack == "mimic" and isinstance(target, int) and target >= world_size - self.num_byzantine:
            raise ValueError(
                f"Expected the mimic `target` to index an honest rank, 0 <= target < "
                f"{world_size - self.num_byzantine} (world size {world_size}, {self.num_byzantine} Byzantine), "
                f"but got {target}"
            )

    def apply(
        self,
        own: Tensor,
        honest: Tensor | None = None,
        generator: torch.Generator | int | None = None,
        aggregation: Aggregation | None = None,
    ) -> Tensor:
        """Return the vector a Byzantine worker sends instead of ``own``.

        The line-searched attacks assume all :attr:`num_byzantine` Byzantine workers send the same
        vector (what every Byzantine rank computes from the same inputs).

        Args:
            own: The worker's own (honest) vector; the result has its shape, dtype and device.
            honest: The honest workers' vectors ``[h, *own.shape]``; required when :attr:`needs_honest`.
            generator: Randomness of ``gaussian`` (a ``torch.Generator``, an int seed, or ``None``).
            aggregation: The server's aggregation, a callable ``[n, d] -> [d]``; required when
                :attr:`needs_aggregation`. A ``fixed_clip`` applies after the attack and is not seen
                by the line search.
        """
        own = check_floating("own", own)
        if self.needs_aggregation and aggregation is None:
            raise ValueError(
                f"Attack {self.attack!r} line-searches against the server's aggregation: pass `aggregation`, "
                "a callable [n, d] -> [d] such as functools.partial(aggregate, rule='cwtm', num_byzantine=1, "
                "nnm=True, arc=True)"
            )
        if self.needs_honest:
            if honest is None:
                raise ValueError(f"Attack {self.attack!r} needs the honest vectors: pass `honest` of shape [h, d]")
            if not isinstance(honest, Tensor) or tuple(honest.shape[1:]) != tuple(own.shape) or honest.ndim < 2:
                shape = tuple(honest.shape) if isinstance(honest, Tensor) else type(honest).__name__
                raise ValueError(
                    f"Expected argument `honest` to have shape [h, *own.shape] = [h, {', '.join(map(str, own.shape))}]"
                    f" but got {shape}"
                )
            flat = honest.reshape(honest.shape[0], -1)
            if self.attack == "alie":
                out = alie(flat, num_byzantine=self.num_byzantine, **self.params)
            elif self.attack == "mimic":
                out = mimic(flat, **self.params)
            elif self.needs_aggregation:
                fn = foe_ls if self.attack == "foe_ls" else alie_ls
                out = fn(flat, self.num_byzantine, check_aggregation(aggregation), **self.params)
            else:
                out = ATTACKS[self.attack](flat, **self.params)
            out = out.reshape(own.shape).to(device=own.device, dtype=own.dtype)
        elif self.attack == "gaussian":
            out = gaussian(own, generator=generator, **self.params)
        else:
            out = ATTACKS[self.attack](own, **self.params)
        if self.fixed_clip is not None:
            out = fixed_clip_defence(out, self.fixed_clip)
        return out


class ByzantineTransform:
    """A send transform: the Byzantine ranks send their attack, the honest ranks what they hold.

    Give it to the strategy, ``ARCDDPStrategy(send_transforms=[ByzantineTransform(ranks=[2], attack="sign_flip")])``,
    or in YAML as ``{class_path: lightning_clip.sim.ByzantineTransform, init_args: {ranks: [2], attack: sign_flip}}``.
    An omniscient attack (``spec.needs_honest``) gathers every rank's vector first; every rank takes
    part in that gather, so the ranks call the same collectives. Each Byzantine rank computes the
    attack from the same gathered rows, so they all send the same vector. The ``gaussian`` attack
    draws from a generator seeded by ``(seed, rank, step)``: a resumed run replays the same noise.

    Args:
        ranks: The Byzantine ranks (see :class:`ByzantineSpec`).
        attack: One of :data:`ATTACK_NAMES`.
        params: The attack's parameters, e.g. ``{"factor": -100.0}`` for ``"scale"``.
        fixed_clip: Clip the Byzantine vector to this norm after the attack (a baseline), or ``None``.
        seed: Seed of the ``gaussian`` attack.

    Attributes:
        spec: The validated :class:`ByzantineSpec`.
    """

    __slots__ = ("seed", "spec")

    def __init__(self, ranks: Sequence[int] | int, attack: str, params: Mapping[str, Any] | None = None,
                 fixed_clip: float | None = None, seed: int = 0) -> None:
        if params is not None and not isinstance(params, Mapping):
            raise TypeError(f"Expected argument `params` to be a mapping of attack parameters but got {params!r}")
        self.spec = ByzantineSpec.from_config({"ranks": ranks, "attack": attack, "fixed_clip": fixed_clip,
                                               "params": params or {}})
        self.seed = check_non_negative_int("seed", seed)

    @classmethod
    def from_spec(cls, spec: ByzantineSpec, seed: int = 0) -> ByzantineTransform:
        """The transform of an existing ``spec``."""
        if not isinstance(spec, ByzantineSpec):
            raise TypeError(f"Expected argument `spec` to be a ByzantineSpec but got {type(spec).__name__}")
        return cls(list(spec.ranks), spec.attack, dict(spec.params), spec.fixed_clip, seed)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], seed: int = 0) -> ByzantineTransform:
        """The transform of :meth:`ByzantineSpec.from_config` ``(config)``, e.g. ``{"ranks": [1], "attack": "nan"}``."""
        return cls.from_spec(ByzantineSpec.from_config(config), seed)

    def check_world_size(self, world_size: int, num_byzantine: int) -> None:
        """Raise unless the attack can run with ``world_size`` ranks; warn when it makes more ranks misbehave
        than the ``num_byzantine`` the aggregation is set to tolerate (allowed: it shows the breakdown point)."""
        self.spec.check_world_size(world_size)
        if self.spec.num_byzantine > num_byzantine:
            warnings.warn(f"The simulated attack makes {self.spec.num_byzantine} ranks misbehave but "
                          f"`num_byzantine={num_byzantine}`: ARC is only guaranteed to tolerate `num_byzantine` "
                          "of them.", UserWarning, stacklevel=2)

    def generator(self, rank: int, step: int) -> torch.Generator:
        """The generator of rank ``rank``'s ``gaussian`` draw at ``step`` (a fresh seed per pair)."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + rank * 1_009 + step * 7_919 + 1)

    def __call__(self, sent: SendBuffers, ctx: SendContext) -> None:
        spec = self.spec
        byzantine = spec.is_byzantine(ctx.rank)
        if not (byzantine or spec.needs_honest):
            return
        flat = sent.flatten()
        honest: Tensor | None = None
        if spec.needs_honest:  # every rank takes part in the gather
            honest = ctx.gather(flat)[spec.honest_ranks(ctx.world_size)]
        if not byzantine:
            return
        aggregation = ctx.aggregation if spec.needs_aggregation else None
        sent.write_(spec.apply(flat, honest, generator=self.generator(ctx.rank, ctx.step), aggregation=aggregation))

    def __repr__(self) -> str:
        return f"ByzantineTransform.from_spec({self.spec!r}, seed={self.seed})"


def simulate_sends(
    chains: Sequence[Sequence[SendTransform]],
    sends: Sequence[SendBuffers],
    step: int,
    aggregation: Callable[[Tensor], Tensor],
) -> Tensor:
    """Run rank ``r``'s chain ``chains[r]`` on ``sends[r]`` for every rank, as the hook does; return ``[n, d]``.

    Transform ``i`` runs on every rank before transform ``i + 1`` on any; a gather inside transform
    ``i`` returns the rows every rank held before it, as the all-gather in DDP does.

    Args:
        chains: One chain per rank, all of the same length (rank ``r``'s state, e.g. its momentum, lives
            in its own transforms).
        sends: What each rank sends (changed in place).
        step: The step counter the transforms see.
        aggregation: The server's pipeline ``[n, d] -> [d]`` (for attacks that search against it).
    """
    n = len(sends)
    if len(chains) != n:
        raise ValueError(f"Expected one chain per rank ({n}) but got {len(chains)}")
    depths = {len(chain) for chain in chains}
    if len(depths) > 1:
        raise ValueError(f"Expected chains of one length but got lengths {sorted(depths)}")
    for i in range(depths.pop() if depths else 0):
        held = torch.stack([s.flatten() for s in sends])

        def gather(flat: Tensor, held: Tensor = held) -> Tensor:
            return held

        for rank in range(n):
            chains[rank][i](sends[rank], SendContext(rank, n, step, gather, aggregation))
    return torch.stack([s.flatten() for s in sends])
