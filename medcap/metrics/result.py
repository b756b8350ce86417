"""What a scorer returns: corpus scores, per-sample scores and a way to recompute the corpus scores on
resampled images (for bootstrap confidence intervals)."""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass
class Scored:
    ids: list[str]
    corpus: dict[str, float]
    per_sample: dict[str, np.ndarray]
    # index array [..., N] of positions into ``ids`` -> {metric: corpus score of each resample, shape [...]}
    resample: Callable[[np.ndarray], dict[str, np.ndarray]]

    def merge(self, other: "Scored") -> "Scored":
        if other.ids != self.ids:
            raise ValueError("cannot merge scores of different samples")

        def resample(index: np.ndarray) -> dict[str, np.ndarray]:
            return {**self.resample(index), **other.resample(index)}

        return Scored(self.ids, {**self.corpus, **other.corpus}, {**self.per_sample, **other.per_sample}, resample)


def mean_scored(ids: list[str], per_sample: dict[str, np.ndarray]) -> Scored:
    """Metrics whose corpus score is the mean over images."""
    per_sample = {k: np.asarray(v, dtype=np.float64) for k, v in per_sample.items()}
    corpus = {k: float(v.mean()) for k, v in per_sample.items()}
    return Scored(ids, corpus, per_sample, lambda index: {k: v[index].mean(-1) for k, v in per_sample.items()})
