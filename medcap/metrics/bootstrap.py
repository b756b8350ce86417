"""Bootstrap over images: percentile confidence intervals for every corpus metric, and a paired comparison of
two systems scored on the same images (the same resamples for both)."""

import numpy as np

from medcap.metrics.result import Scored


def _indices(n: int, resamples: int, seed: int) -> np.ndarray:
    if n == 0:
        raise ValueError("cannot bootstrap an empty set of samples")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def bootstrap_ci(scored: Scored, resamples: int = 1000, seed: int = 0, level: float = 0.95,
                 chunk: int = 100) -> dict[str, tuple[float, float]]:
    """{metric: (low, high)}: the central ``level`` percentile interval of the corpus score over ``resamples``
    resamples of the images (with replacement), seeded."""
    index = _indices(len(scored.ids), resamples, seed)
    draws = _concat([scored.resample(index[i:i + chunk]) for i in range(0, resamples, chunk)])
    tail = (1 - level) / 2 * 100
    return {k: (float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))) for k, v in draws.items()}


def paired_bootstrap(a: Scored, b: Scored, resamples: int = 1000, seed: int = 0, level: float = 0.95,
                     chunk: int = 100) -> dict[str, dict[str, float]]:
    """{metric: {"difference": a - b, "low", "high", "p_value"}} where ``p_value`` is the two-sided bootstrap
    p-value of "no difference": twice the share of resamples on the rarer side of 0 (ties count on both), at most
    1. (The share on the side opposite the observed difference alone picks its side after seeing the data: p < 0.05
    for about 10% of equally good pairs.)"""
    if a.ids != b.ids:
        raise ValueError("paired comparison needs both systems scored on the same ids in the same order")
    index = _indices(len(a.ids), resamples, seed)
    draws_a = _concat([a.resample(index[i:i + chunk]) for i in range(0, resamples, chunk)])
    draws_b = _concat([b.resample(index[i:i + chunk]) for i in range(0, resamples, chunk)])
    tail = (1 - level) / 2 * 100
    out = {}
    for name in draws_a.keys() & draws_b.keys():
        observed = a.corpus[name] - b.corpus[name]
        diff = draws_a[name] - draws_b[name]
        rarer = min((diff <= 0).mean(), (diff >= 0).mean())
        out[name] = {"difference": observed, "low": float(np.percentile(diff, tail)),
                     "high": float(np.percentile(diff, 100 - tail)), "p_value": float(min(1.0, 2 * rarer))}
    return dict(sorted(out.items()))


def p_text(p_value: float, resamples: int) -> str:
    """A two-sided bootstrap p-value as text: 0 reads "< 2/resamples" (the test cannot resolve less)."""
    return f"<{2 / resamples:.2g}" if p_value == 0 else f"{p_value:.3f}"


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([np.atleast_1d(p[k]) for p in parts]) for k in parts[0]}
