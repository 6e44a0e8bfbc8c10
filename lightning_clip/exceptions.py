"""Exceptions and argument checks shared by the whole package (torch-free, Lightning-free)."""

from __future__ import annotations

import difflib
import math
from collections.abc import Collection, Sequence
from fnmatch import fnmatchcase
from typing import Any

__all__ = [
    "GradientSpikeError",
    "NonFiniteGradientError",
    "PeerFailureError",
    "check_bool",
    "check_choice",
    "check_finite_float",
    "check_fraction",
    "check_non_negative_int",
    "check_optional_positive_int",
    "check_patterns",
    "check_patterns_match",
    "check_positive_float",
    "check_positive_int",
    "check_seed",
    "check_threshold",
]

#: The smallest positive normal float32 and the largest finite one: a threshold outside this range is 0 or inf
#: (or loses its precision) in the float32 arithmetic it is used in.
FLOAT32_TINY = 1.1754943508222875e-38
FLOAT32_MAX = 3.4028234663852886e38


class NonFiniteGradientError(RuntimeError):
    """Raised when gradients contain NaN or Inf and the configured action is ``"raise"``."""


class GradientSpikeError(RuntimeError):
    """Raised by ``SpikeGuard`` on a spike with ``action="raise"``, or after too many spikes in a row."""


class PeerFailureError(RuntimeError):
    """Raised on a rank when a collective of the ``ddp_arc`` hook fails, typically because a peer rank died."""


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_positive_float(name: str, value: Any, *, allow_zero: bool = False, allow_inf: bool = False) -> float:
    """Return ``float(value)`` or raise naming ``name`` when it is not a positive finite number."""
    if not _is_real(value):
        raise TypeError(f"Expected argument `{name}` to be a number but got {value!r} of type {type(value).__name__}")
    value = float(value)
    bad = math.isnan(value) or (value < 0 if allow_zero else value <= 0) or (math.isinf(value) and not allow_inf)
    if bad:
        rng = "a non-negative" if allow_zero else "a positive"
        fin = "" if allow_inf else " finite"
        raise ValueError(f"Expected argument `{name}` to be {rng}{fin} number but got {value!r}")
    return value


def check_threshold(name: str, value: Any, *, allow_inf: bool = False) -> float:
    """Return ``float(value)`` or raise naming ``name`` when it is not a positive number that float32 holds.

    Thresholds are used in float32 (the gradients' norms): a value below the smallest normal float32
    (``1.2e-38``) would become 0 or lose its precision, one above the largest (``3.4e38``) would become inf.
    With ``allow_inf``, ``inf`` itself is accepted (no clipping).
    """
    value = check_positive_float(name, value, allow_inf=allow_inf)
    if math.isinf(value):
        return value
    if not FLOAT32_TINY <= value <= FLOAT32_MAX:
        becomes = "0" if value < FLOAT32_TINY else "inf"
        raise ValueError(f"Expected argument `{name}` to be in [{FLOAT32_TINY:.4g}, {FLOAT32_MAX:.4g}] (thresholds "
                         f"are used in float32, where {value!r} is {becomes}) but got {value!r}")
    return value


def check_finite_float(name: str, value: Any) -> float:
    """Return ``float(value)`` or raise naming ``name`` when it is not a finite number (any sign)."""
    if not _is_real(value):
        raise TypeError(f"Expected argument `{name}` to be a number but got {value!r} of type {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"Expected argument `{name}` to be a finite number but got {value!r}")
    return float(value)


def check_positive_int(name: str, value: Any) -> int:
    """Return ``value`` or raise naming ``name`` when it is not an integer >= 1."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"Expected argument `{name}` to be a positive integer but got {value!r}")
    if value < 1:
        raise ValueError(f"Expected argument `{name}` to be a positive integer but got {value}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """Return ``value`` or raise ``TypeError`` naming ``name`` when it is not a bool."""
    if not isinstance(value, bool):
        raise TypeError(f"Expected argument `{name}` to be a bool but got {value!r}")
    return value


def check_optional_positive_int(name: str, value: Any) -> int | None:
    """Return ``value`` or raise ``ValueError`` naming ``name`` when it is neither ``None`` nor an integer >= 1."""
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"Expected argument `{name}` to be a positive integer or None but got {value!r}")
    return value


def check_non_negative_int(name: str, value: Any) -> int:
    """Return ``value`` or raise naming ``name`` when it is not an integer >= 0."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"Expected argument `{name}` to be a non-negative integer but got {value!r}")
    if value < 0:
        raise ValueError(f"Expected argument `{name}` to be a non-negative integer but got {value}")
    return value


def check_seed(name: str, value: Any) -> int:
    """Return ``value`` or raise naming ``name`` when it is not an integer in ``[0, 2**32)``.

    Seeds are mixed with a step counter into one 64-bit generator seed: a larger value would wrap
    around (two seeds giving the same numbers) or overflow.
    """
    check_non_negative_int(name, value)
    if value >= 1 << 32:
        raise ValueError(f"Expected argument `{name}` to be an integer in [0, 2**32) but got {value}")
    return int(value)


def check_fraction(name: str, value: Any, *, low: float = 0.0, high: float = 1.0, open_low: bool = False,
                   open_high: bool = False) -> float:
    """Return ``float(value)`` or raise naming ``name`` when it is outside ``[low, high]``."""
    if not _is_real(value):
        raise TypeError(f"Expected argument `{name}` to be a number but got {value!r} of type {type(value).__name__}")
    value = float(value)
    too_low = value <= low if open_low else value < low
    too_high = value >= high if open_high else value > high
    if math.isnan(value) or too_low or too_high:
        lb = "(" if open_low else "["
        rb = ")" if open_high else "]"
        raise ValueError(f"Expected argument `{name}` to be in {lb}{low:g}, {high:g}{rb} but got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: Collection[str]) -> str:
    """Return ``value`` or raise naming ``name`` and the allowed values."""
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"Expected argument `{name}` to be one of {allowed} but got {value!r}")
    return value


def check_patterns(name: str, value: Any) -> tuple[str, ...]:
    """Return ``value`` (a string or a sequence of non-empty strings) as a tuple, or raise naming ``name``."""
    items = (value,) if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(p, str) and p for p in items):
        raise TypeError(f"Expected argument `{name}` to be a parameter-name pattern or a list of non-empty "
                        f"patterns (strings, fnmatch style) but got {value!r}")
    return tuple(items)


def check_patterns_match(name: str, patterns: Sequence[str], names: Sequence[str]) -> None:
    """Raise ``ValueError`` naming ``name`` when a pattern matches none of the parameter ``names`` (a typo).

    The message shows the closest parameter names, or the first few.
    """
    for pattern in patterns:
        if any(fnmatchcase(n, pattern) for n in names):
            continue
        close = difflib.get_close_matches(pattern, list(names), n=3, cutoff=0.5)
        shown = close or list(names[:5])
        more = "" if close or len(names) <= 5 else ", ..."
        label = "the closest parameter names" if close else "the module's parameters"
        raise ValueError(f"Expected every pattern of argument `{name}` to match a parameter name but {pattern!r} "
                         f"matches none ({label}: {', '.join(repr(x) for x in shown)}{more})")
