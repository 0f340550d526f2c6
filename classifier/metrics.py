"""Binary classification metrics with bootstrap intervals, calibration, threshold choice.

Plain numpy, so the same code scores a model in training, in ``covidct evaluate`` and in tests
with known outputs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np


def auc(y: np.ndarray, p: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties counted half)."""
    y = np.asarray(y).astype(bool)
    p = np.asarray(p, dtype=np.float64)
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(p, kind="mergesort")
    ranks = np.empty(len(p), dtype=np.float64)
    sorted_p = p[order]
    # average ranks for ties
    i = 0
    while i < len(p):
        j = i
        while j + 1 < len(p) and sorted_p[j + 1] == sorted_p[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[y].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def roc_curve(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False-positive rate, true-positive rate and thresholds, from high to low threshold."""
    y = np.asarray(y).astype(bool)
    thresholds = np.unique(np.asarray(p, dtype=np.float64))[::-1]
    thresholds = np.concatenate([[np.inf], thresholds])
    pos, neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    tpr = np.array([(p[y] >= t).sum() / pos for t in thresholds])
    fpr = np.array([(p[~y] >= t).sum() / neg for t in thresholds])
    return fpr, tpr, thresholds


def confusion(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, int]:
    y = np.asarray(y).astype(bool)
    pred = np.asarray(p) >= threshold
    return {
        "tp": int((pred & y).sum()),
        "fp": int((pred & ~y).sum()),
        "tn": int((~pred & ~y).sum()),
        "fn": int((~pred & y).sum()),
    }


def _point_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    c = confusion(y, p, threshold)
    n = max(sum(c.values()), 1)
    sens = c["tp"] / (c["tp"] + c["fn"]) if c["tp"] + c["fn"] else float("nan")
    spec = c["tn"] / (c["tn"] + c["fp"]) if c["tn"] + c["fp"] else float("nan")
    prec = c["tp"] / (c["tp"] + c["fp"]) if c["tp"] + c["fp"] else 0.0
    f1 = 2 * prec * sens / (prec + sens) if prec + sens and not np.isnan(sens) else 0.0
    return {
        "accuracy": (c["tp"] + c["tn"]) / n,
        "auc": auc(y, p),
        "sensitivity": sens,
        "specificity": spec,
        "f1": f1,
    }


@dataclass
class Metrics:
    """Point estimates and bootstrap 95% intervals at one threshold."""

    n: int
    threshold: float
    accuracy: float
    auc: float
    sensitivity: float
    specificity: float
    f1: float
    confusion: dict[str, int]
    ci95: dict[str, tuple[float, float]] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def evaluate(
    y: np.ndarray, p: np.ndarray, threshold: float, *, bootstrap: int = 1000, seed: int = 0
) -> Metrics:
    """Metrics at ``threshold`` with percentile bootstrap intervals (``bootstrap=0``: none)."""
    y = np.asarray(y).astype(int)
    p = np.asarray(p, dtype=np.float64)
    point = _point_metrics(y, p, threshold)
    ci: dict[str, tuple[float, float]] = {}
    if bootstrap and len(y) > 1:
        rng = np.random.default_rng(seed)
        samples: dict[str, list[float]] = {k: [] for k in point}
        for _ in range(bootstrap):
            idx = rng.integers(0, len(y), len(y))
            for k, v in _point_metrics(y[idx], p[idx], threshold).items():
                samples[k].append(v)
        for k, vals in samples.items():
            arr = np.array(vals, dtype=np.float64)
            arr = arr[~np.isnan(arr)]
            if len(arr):
                ci[k] = (float(np.percentile(arr, 2.5)), float(np.percentile(arr, 97.5)))
    return Metrics(
        n=len(y), threshold=threshold, confusion=confusion(y, p, threshold), ci95=ci, **point
    )


def youden_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The threshold that maximises sensitivity + specificity - 1 (ties: the middle one)."""
    fpr, tpr, thr = roc_curve(y, p)
    j = tpr - fpr
    best = np.flatnonzero(j == j.max())
    t = float(thr[best[len(best) // 2]])
    return 0.5 if not np.isfinite(t) else t


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        mask = idx == b
        if mask.any():
            ece += mask.mean() * abs(p[mask].mean() - y[mask].mean())
    return float(ece)


def reliability(y: np.ndarray, p: np.ndarray, bins: int = 10) -> list[tuple[float, float, int]]:
    """(mean predicted, observed frequency, count) per probability bin."""
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    out = []
    for b in range(bins):
        mask = idx == b
        if mask.any():
            out.append((float(p[mask].mean()), float(y[mask].mean()), int(mask.sum())))
    return out


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def apply_temperature(p: np.ndarray, temperature: float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logit(p) / temperature))


def fit_temperature(y: np.ndarray, p: np.ndarray) -> float:
    """The temperature that minimises the negative log-likelihood on (y, p)."""
    y = np.asarray(y, dtype=np.float64)
    z = logit(p)
    best_t, best_nll = 1.0, np.inf
    for t in np.exp(np.linspace(np.log(0.05), np.log(20.0), 400)):
        q = np.clip(1.0 / (1.0 + np.exp(-z / t)), 1e-7, 1 - 1e-7)
        nll = -np.mean(y * np.log(q) + (1 - y) * np.log(1 - q))
        if nll < best_nll:
            best_t, best_nll = float(t), nll
    return best_t


def wilson(successes: int, trials: int, z: float = 1.959964) -> tuple[float, float] | None:
    """95% Wilson score interval of a proportion (sound for small counts and for 0 or 1,
    where the normal approximation is not); None without trials."""
    if trials <= 0:
        return None
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = (
        z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    )
    return max(0.0, centre - half), min(1.0, centre + half)
