from __future__ import annotations

import numpy as np
import pytest

from classifier import aggregate
from classifier import metrics as M

pytestmark = pytest.mark.unit


def test_auc_known_values() -> None:
    assert M.auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert M.auc([0, 1], [0.2, 0.9]) == 1.0
    assert M.auc([0, 1], [0.9, 0.2]) == 0.0
    assert M.auc([0, 0, 1, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5  # ties count half


def test_point_metrics_by_hand() -> None:
    y = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    p = np.array([0.9, 0.8, 0.3, 0.2, 0.6, 0.1, 0.4, 0.7])
    m = M.evaluate(y, p, 0.5, bootstrap=200)
    assert m.confusion == {"tp": 3, "fp": 1, "tn": 3, "fn": 1}
    assert m.accuracy == 0.75 and m.sensitivity == 0.75 and m.specificity == 0.75
    assert m.f1 == pytest.approx(0.75)
    lo, hi = m.ci95["accuracy"]
    assert 0.0 <= lo <= 0.75 <= hi <= 1.0


def test_youden_threshold_separates() -> None:
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.8])
    t = M.youden_threshold(y, p)
    assert 0.3 < t <= 0.6
    assert M.evaluate(y, p, t, bootstrap=0).accuracy == 1.0


def test_temperature_scaling_reduces_overconfidence() -> None:
    rng = np.random.default_rng(0)
    group = rng.integers(0, 2, 4000)
    true_p = np.where(group == 1, 0.7, 0.3)
    y = (rng.random(4000) < true_p).astype(int)
    overconfident = M.apply_temperature(true_p, 0.25)  # logits x4
    t = M.fit_temperature(y, overconfident)
    assert 3.0 < t < 5.0
    calibrated = M.apply_temperature(overconfident, t)
    assert M.expected_calibration_error(y, calibrated) < M.expected_calibration_error(
        y, overconfident
    )


def test_study_aggregation_rule() -> None:
    probs = [0.1] * 45 + [0.9] * 5
    p, top = aggregate.study_probability(probs)
    assert p == pytest.approx(0.9) and sorted(top) == list(range(45, 50))
    p, top = aggregate.study_probability([0.2, 0.4])  # fewer than min_k: all of them
    assert p == pytest.approx(0.3) and len(top) == 2
    assert aggregate.top_k_count(300) == 30
    assert aggregate.verdict(0.52, 0.5, 0.05) == "Indeterminate"
    assert aggregate.verdict(0.56, 0.5, 0.05) == "Present"
    assert aggregate.verdict(0.2, 0.5, 0.05) == "Absent"
    with pytest.raises(ValueError, match="no slice"):
        aggregate.study_probability([])
