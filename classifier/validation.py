"""Threshold, temperature and per-dataset metrics of a trained model, all chosen and measured on
the validation splits (the test splits are withheld)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from classifier import metrics as M
from classifier.batches import jpeg_roundtrip
from classifier.datasets import Split
from classifier.preprocess import rgb_batch


def predict_arrays(model: Any, images: np.ndarray) -> np.ndarray:
    return model.predict(rgb_batch(images), batch_size=64, verbose=0).reshape(-1).astype(np.float64)


def summarise(
    model: Any,
    val_splits: Sequence[Split],
    *,
    bootstrap: int = 1000,
    calibrate: bool = True,
) -> dict[str, Any]:
    """Threshold, temperature and per-dataset metrics, all chosen and measured on val."""
    raw = {s.dataset: predict_arrays(model, s.images) for s in val_splits}
    labels = {s.dataset: s.labels for s in val_splits}
    pooled_y = np.concatenate(list(labels.values()))
    pooled_raw = np.concatenate(list(raw.values()))
    temperature = M.fit_temperature(pooled_y, pooled_raw) if calibrate else 1.0
    cal = {k: M.apply_temperature(v, temperature) for k, v in raw.items()}
    threshold = M.youden_threshold(pooled_y, np.concatenate(list(cal.values())))
    out: dict[str, Any] = {"threshold": threshold, "temperature": temperature, "datasets": {}}
    for s in val_splits:
        m = M.evaluate(s.labels, cal[s.dataset], threshold, bootstrap=bootstrap)
        jpeg = np.stack([jpeg_roundtrip(im, 90) for im in s.images])
        p_jpeg = M.apply_temperature(predict_arrays(model, jpeg), temperature)
        out["datasets"][s.dataset] = {
            "metrics": m.as_dict(),
            "auc_all_jpeg_q90": M.auc(s.labels, p_jpeg),
            "ece_before": M.expected_calibration_error(s.labels, raw[s.dataset]),
            "ece_after": M.expected_calibration_error(s.labels, cal[s.dataset]),
            "formats": {f: s.formats.count(f) for f in sorted(set(s.formats))},
        }
    out["pooled"] = {
        "ece_before": M.expected_calibration_error(pooled_y, pooled_raw),
        "ece_after": M.expected_calibration_error(pooled_y, np.concatenate(list(cal.values()))),
    }
    out["_raw"] = raw
    out["_cal"] = cal
    out["_labels"] = labels
    return out
