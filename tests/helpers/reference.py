"""Independent reference computations the tests compare the library against."""

from __future__ import annotations

import math


def exact_gaussian_epsilon(z: float, steps: int, delta: float) -> float:
    """The tight epsilon at ``delta`` of ``steps`` Gaussian mechanisms of multiplier ``z`` (one of multiplier
    ``z / sqrt(steps)``), solved on Balle & Wang's curve with scipy's normal CDF."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    m = z / math.sqrt(steps)

    def excess(eps: float) -> float:
        return norm.cdf(0.5 / m - eps * m) - math.exp(eps + norm.logcdf(-0.5 / m - eps * m)) - delta

    return brentq(excess, 0.0, 1e4, xtol=1e-13, rtol=1e-13)
