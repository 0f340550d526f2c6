"""``covidct evaluate``: a model scored on any folder with CT_COVID/ and CT_NonCOVID/."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from classifier import metrics as M
from classifier.errors import ClassifierError, UnusableInputError
from classifier.inference import Classifier
from classifier.preprocess import to_model_input

POSITIVE_DIR, NEGATIVE_DIR = "CT_COVID", "CT_NonCOVID"
SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm"}


@dataclass
class EvaluationResult:
    metrics: M.Metrics
    model_version: str
    skipped: list[tuple[str, str]]

    def as_json(self) -> dict[str, Any]:
        m = self.metrics
        return {
            "accuracy": m.accuracy,
            "auc": m.auc,
            "sensitivity": m.sensitivity,
            "specificity": m.specificity,
            "f1": m.f1,
            "n": m.n,
            "threshold": m.threshold,
            "model_version": self.model_version,
            "ci95": m.ci95,
            "confusion": m.confusion,
            "skipped": len(self.skipped),
        }


def load_folder(data: Path) -> tuple[list[Path], np.ndarray]:
    files, labels = [], []
    for sub, label in ((POSITIVE_DIR, 1), (NEGATIVE_DIR, 0)):
        folder = data / sub
        if not folder.is_dir():
            raise ClassifierError(
                f"{folder} is missing: expected {POSITIVE_DIR}/ and {NEGATIVE_DIR}/"
            )
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.suffix.lower() in SUFFIXES:
                files.append(path)
                labels.append(label)
    if not files:
        raise ClassifierError(f"no PNG, JPEG or DICOM files under {data}")
    return files, np.array(labels)


def evaluate_folder(
    data: Path,
    model_path: Path,
    *,
    threshold: float | None = None,
    bootstrap: int = 1000,
    batch_size: int = 32,
) -> EvaluationResult:
    files, labels = load_folder(data)
    clf = Classifier(model_path, threshold=threshold)
    probs: list[float] = []
    kept: list[int] = []
    skipped: list[tuple[str, str]] = []
    batch: list[np.ndarray] = []
    for i, path in enumerate(files):
        try:
            batch.append(to_model_input(path))
            kept.append(i)
        except UnusableInputError as exc:
            skipped.append((str(path), str(exc)))
        if len(batch) == batch_size:
            probs.extend(clf.probabilities(np.stack(batch)))
            batch.clear()
    if batch:
        probs.extend(clf.probabilities(np.stack(batch)))
    if not kept:
        raise ClassifierError("no file in the folder could be used")
    result = M.evaluate(labels[kept], np.array(probs), clf.threshold, bootstrap=bootstrap)
    return EvaluationResult(result, clf.version, skipped)


def format_report(r: EvaluationResult) -> str:
    m = r.metrics
    lines = [f"model {r.model_version}, threshold {m.threshold:.4f}, n={m.n}"]
    for key in ("accuracy", "auc", "sensitivity", "specificity", "f1"):
        lo, hi = m.ci95.get(key, (float("nan"), float("nan")))
        lines.append(f"  {key:<12} {getattr(m, key):.4f}  (95% CI {lo:.4f}-{hi:.4f})")
    c = m.confusion
    lines.append(f"  confusion    TP {c['tp']}  FP {c['fp']}  TN {c['tn']}  FN {c['fn']}")
    if r.skipped:
        lines.append(f"  skipped {len(r.skipped)} files, e.g. {r.skipped[0][0]}: {r.skipped[0][1]}")
    return "\n".join(lines)
