"""The study verdict: how slice probabilities become one study probability.

Rule: the mean of the top ``fraction`` of slice probabilities (at least ``min_k`` slices, or all
of them when fewer).  COVID-19 shows in part of the lungs, so a plain mean over the whole study
would dilute it; the maximum alone would let one noisy slice decide.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

TOP_FRACTION = 0.1
MIN_K = 5
RULE = "mean of the top 10% of slice probabilities (at least 5 slices)"


def top_k_count(n: int, fraction: float = TOP_FRACTION, min_k: int = MIN_K) -> int:
    return min(n, max(min_k, math.ceil(n * fraction)))


def study_probability(
    probabilities: Sequence[float] | np.ndarray, fraction: float = TOP_FRACTION, min_k: int = MIN_K
) -> tuple[float, list[int]]:
    """Return the study probability and the indices of the slices that made it."""
    p = np.asarray(probabilities, dtype=np.float64)
    if p.size == 0:
        raise ValueError("no slice probabilities to aggregate")
    k = top_k_count(p.size, fraction, min_k)
    top = np.argsort(-p, kind="stable")[:k]
    return float(p[top].mean()), [int(i) for i in top]


def verdict(probability: float, threshold: float, band: float) -> str:
    """Present / Absent, or Indeterminate within ``band`` of the threshold."""
    if abs(probability - threshold) < band:
        return "Indeterminate"
    return "Present" if probability >= threshold else "Absent"
