"""Small statistics for the seed comparisons of bench/experiment_grounded.py (no scipy here).

- :func:`t_sf`, :func:`t_ppf`: Student's t upper tail and quantile;
- :func:`welch`: one-sided Welch test that mean(a) > mean(b), with the two-sided 90% interval
  of the difference from the Welch t quantile;
- :func:`welch_power`: its power for a true difference (noncentral t at the Welch-Satterthwaite
  degrees of freedom of the assumed spreads), :func:`simulated_power` the same by Monte Carlo
  with the real test (random df), and :func:`seeds_for_power`;
- :func:`holm`: Holm's step-down correction.

docs/experiment.md ("Protocol") says which contrasts use which.
"""
from __future__ import annotations

import math
import random
import statistics
from typing import Mapping, Sequence

__all__ = ["t_sf", "t_ppf", "norm_cdf", "welch", "welch_power", "simulated_power",
           "seeds_for_power", "holm"]


def norm_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def _simpson(f, a: float, b: float, steps: int) -> float:
    steps += steps % 2
    h = (b - a) / steps
    return h / 3 * (f(a) + f(b) + sum((4 if i % 2 else 2) * f(a + i * h)
                                      for i in range(1, steps)))


def t_sf(t: float, df: float, steps: int = 4000) -> float:
    """P(T > t) for Student's t with ``df`` degrees of freedom (Simpson's rule on the density).
    Accurate to ~1e-6 for the |t| < 40, df >= 1 a seed comparison gives."""
    if t < 0:
        return 1.0 - t_sf(-t, df, steps)
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    return 0.5 - _simpson(lambda x: c * (1 + x * x / df) ** (-(df + 1) / 2), 0.0, t, steps)


def t_ppf(q: float, df: float) -> float:
    """The t with P(T <= t) = q (bisection on :func:`t_sf`), for 0.5 <= q < 1."""
    if not 0.5 <= q < 1:
        raise ValueError(f"q must be in [0.5, 1), got {q}")
    lo, hi = 0.0, 1.0
    while 1 - t_sf(hi, df) < q:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 1 - t_sf(mid, df) < q else (lo, mid)
    return (lo + hi) / 2


def _welch_df(va: float, vb: float, na: int, nb: int) -> float:
    return (va + vb) ** 2 / (va * va / (na - 1) + vb * vb / (nb - 1))


def welch(a: Sequence[float], b: Sequence[float], level: float | None = 0.90) -> dict:
    """One-sided Welch test that mean(a) > mean(b), from the per-seed values.

    Returns ``diff`` (mean a − mean b), ``se``, ``t``, ``df``, ``p`` (one-sided) and ``ci``
    (the two-sided ``level`` interval of the difference, diff ± t_{(1+level)/2, df} · se).
    Fewer than 2 values on a side, or no spread at all, gives NaN statistics.
    """
    na, nb = len(a), len(b)
    diff = (statistics.mean(a) - statistics.mean(b)) if na and nb else math.nan
    nan = {"diff": diff, "se": math.nan, "t": math.nan, "df": math.nan, "p": math.nan,
           "ci": (math.nan, math.nan), "n": (na, nb)}
    if na < 2 or nb < 2:
        return nan
    va, vb = statistics.variance(a) / na, statistics.variance(b) / nb
    if va + vb == 0:
        return nan
    se = math.sqrt(va + vb)
    df = _welch_df(va, vb, na, nb)
    # level=None skips the interval (its quantile search is the slow part in simulations)
    half = t_ppf((1 + level) / 2, df) * se if level else math.nan
    return {"diff": diff, "se": se, "t": diff / se, "df": df, "p": t_sf(diff / se, df),
            "ci": (diff - half, diff + half), "n": (na, nb)}


def welch_power(delta: float, sigma: float, n_a: int, n_b: int | None = None, *,
                alpha: float = 0.05, sigma_b: float | None = None) -> float:
    """Power of the one-sided Welch test at ``alpha`` for a true difference ``delta``.

    The statistic is taken as noncentral t with the Welch-Satterthwaite df of the true
    spreads. That ignores the df's own randomness, so with few seeds it is optimistic
    (3 seeds: 0.42 against the real test's 0.37 at delta/sigma = 5/3.5); the protocol states
    :func:`simulated_power`. The spreads are (``sigma`` for a, ``sigma_b`` for b, default equal):
    power = E_u[1 − Φ(c·u/√ν − λ)], u ~ chi(ν), c = t_{1−α,ν}, λ = delta / se.
    :func:`simulated_power` checks it against the real test.
    """
    n_b = n_a if n_b is None else n_b
    sigma_b = sigma if sigma_b is None else sigma_b
    if min(n_a, n_b) < 2 or sigma <= 0 or sigma_b <= 0:
        raise ValueError(f"welch_power needs n >= 2 per arm and sigma > 0, got n = "
                         f"({n_a}, {n_b}), sigma = ({sigma}, {sigma_b})")
    va, vb = sigma * sigma / n_a, sigma_b * sigma_b / n_b
    nu, lam = _welch_df(va, vb, n_a, n_b), delta / math.sqrt(va + vb)
    c = t_ppf(1 - alpha, nu)
    log_k = (1 - nu / 2) * math.log(2) - math.lgamma(nu / 2)

    def f(u: float) -> float:
        dens = math.exp(log_k + (nu - 1) * math.log(u) - u * u / 2) if u > 0 else (
            math.exp(log_k) if nu == 1 else 0.0)
        return dens * (1 - norm_cdf(c * u / math.sqrt(nu) - lam))

    return _simpson(f, 0.0, math.sqrt(nu) + 12.0, 4000)


def simulated_power(delta: float, sigma: float, n_a: int, n_b: int | None = None, *,
                    alpha: float = 0.05, draws: int = 4000, seed: int = 0) -> float:
    """Monte Carlo power of :func:`welch` (normal seeds, equal spreads)."""
    n_b = n_a if n_b is None else n_b
    rng = random.Random(seed)
    hits = 0
    for _ in range(draws):
        a = [rng.gauss(delta, sigma) for _ in range(n_a)]
        b = [rng.gauss(0.0, sigma) for _ in range(n_b)]
        hits += welch(a, b, level=None)["p"] < alpha
    return hits / draws


def seeds_for_power(delta: float, sigma: float, power: float = 0.9, *, alpha: float = 0.05,
                    most: int = 200) -> int | None:
    """The fewest seeds per arm (equal arms) with :func:`welch_power` >= ``power``; None above
    ``most``."""
    for n in range(2, most + 1):
        if welch_power(delta, sigma, n, alpha=alpha) >= power:
            return n
    return None


def holm(pvalues: Mapping[str, float], alpha: float = 0.05) -> dict:
    """Holm's step-down correction: ``{name: {"p", "p_holm", "reject"}}``. NaN p-values (a
    contrast that could not be computed) count in the family and are never rejected."""
    names = sorted(pvalues, key=lambda k: (math.isnan(pvalues[k]), pvalues[k]))
    m, running, out, stopped = len(names), 0.0, {}, False
    for i, name in enumerate(names):
        p = pvalues[name]
        adj = math.nan if math.isnan(p) else min(1.0, max(running, (m - i) * p))
        running = running if math.isnan(adj) else adj
        stopped = stopped or math.isnan(p) or p * (m - i) >= alpha
        out[name] = {"p": p, "p_holm": adj, "reject": not stopped}
    return out
