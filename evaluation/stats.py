"""Confidence intervals of per-clip metrics: percentile bootstrap over clips (resampled with replacement).

A difference between two models is bootstrapped over the clips both were scored on, pairing each clip with
itself, so the interval reflects how consistently one model beats the other rather than the spread of the clips.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BOOTSTRAP_SAMPLES = 2000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Estimate:
    """A mean over clips with its bootstrap interval."""

    mean: float
    low: float
    high: float
    n: int

    def as_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "ci_low": self.low, "ci_high": self.high, "n": self.n}


def bootstrap_mean(
    values: np.ndarray | list[float], samples: int = BOOTSTRAP_SAMPLES, confidence: float = CONFIDENCE, seed: int = 0
) -> Estimate:
    """The mean of the finite values and its percentile bootstrap interval (NaN without values)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(samples, len(values)))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return Estimate(float(values.mean()), float(low), float(high), len(values))


def bootstrap_difference(
    a: np.ndarray | list[float],
    b: np.ndarray | list[float],
    samples: int = BOOTSTRAP_SAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> Estimate:
    """Mean of b - a over the clips where both are finite (a[i] and b[i] are the same clip), with its interval."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values must have one shape, got {a.shape} and {b.shape}")
    return bootstrap_mean(b - a, samples, confidence, seed)  # NaN - x is NaN: unpaired clips drop out


# Metrics (the last part of their dotted name) where a smaller value is better, and ones with no better side.
_LOWER_IS_BETTER = {"lmd", "sync_d", "distance", "fid", "fvd", "error"}
_NO_DIRECTION = {"person", "num_frames", "num_persons"}


def better_direction(metric: str) -> int:
    """+1 when a higher value of `metric` is better, -1 when a lower one is, 0 when neither (offsets, counts)."""
    leaf = metric.lower().rsplit(".", 1)[-1]
    if "offset" in leaf or leaf in _NO_DIRECTION:
        return 0
    return -1 if leaf in _LOWER_IS_BETTER else 1
