"""Score the serving path on whole studies: ``covidct evaluate-studies ROOT``.

ROOT holds class folders ``covid/``, ``pneumonia/`` (any non-COVID pneumonia) and
``normal/``; each holds study folders of DICOM files (any order, any transfer syntax, UIDs as
they come: files are keyed by path, never by SOP Instance UID).  Every study goes through
:func:`worker.analysis.analyse`, the exact code the worker runs, without the results store or
the network.

A call is right when a COVID-19 study is Present and a pneumonia or normal study is Absent;
``non_covid_present`` counts the calls the product must never make.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from classifier.inference import Classifier
from classifier.metrics import auc
from core.settings import Settings
from worker.analysis import analyse

CLASSES = ("covid", "pneumonia", "normal")
OUTCOMES = ("Present", "Indeterminate", "Absent", "not_analysable")


@dataclass
class StudyLine:
    path: str
    label: str
    verdict: str
    probability: float | None
    percent_opacity: float | None
    severity_score: int | None
    seconds: float
    reason: str = ""
    lung_volume_ml: float | None = None  # both lungs
    lung_slices: int | None = None  # slices with lung
    lungs_ok: bool | None = None  # the segmentation's quality gate (classifier.lungcheck)
    series_instance_uid: str = ""  # the series the lungs were segmented on
    series_description: str = ""
    slices_unreadable: int = 0  # of the series read: not decoded, so neither scored nor measured

    def format(self) -> str:
        p = "-" if self.probability is None else f"{self.probability:.3f}"
        o = "-" if self.percent_opacity is None else f"{self.percent_opacity:.1f}%"
        s = "-" if self.severity_score is None else str(self.severity_score)
        v = "-" if self.lung_volume_ml is None else f"{self.lung_volume_ml:.0f}mL"
        n = "-" if self.lung_slices is None else str(self.lung_slices)
        gate = {None: "-", True: "ok", False: "FAILED"}[self.lungs_ok]
        extra = f"  ({self.reason})" if self.reason else ""
        if self.slices_unreadable:
            extra += f"  [unreadable slices: {self.slices_unreadable}]"
        return (
            f"{self.label:<10} {self.verdict:<14} p={p:<6} opacity={o:<7} severity={s:<3}"
            f" lungs={v:<7} on {n:>3} slices gate={gate:<6} {self.seconds:5.1f}s  {self.path}"
            f"  series {self.series_instance_uid} {self.series_description!r}{extra}"
        )


def find_studies(root: Path) -> list[tuple[str, Path]]:
    """(class, study folder) for every study folder under ROOT's class folders."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    found = []
    for label in CLASSES:
        folder = root / label
        if folder.is_dir():
            found += [(label, d) for d in sorted(folder.iterdir()) if d.is_dir()]
    if not found:
        raise FileNotFoundError(
            f"{root} holds no study folders under {', '.join(c + '/' for c in CLASSES)}"
        )
    return found


def evaluate_study(label: str, folder: Path, settings: Settings, clf: Classifier) -> StudyLine:
    files = sorted(str(p) for p in folder.rglob("*") if p.is_file())
    t0 = time.perf_counter()
    a = analyse(list(enumerate(files)), settings, clf)
    seconds = time.perf_counter() - t0
    q = a.lungs.quantification if a.lungs is not None else None
    chosen = a.selection.chosen  # the series the CNN and the lungs read, and why
    series_uid = chosen.uid if chosen is not None else ""
    description = f"{chosen.description}; {chosen.why}" if chosen is not None else ""
    check = q.check if q is not None else None
    if check is not None and not check.ok:
        q = None  # the opacity figures stand only on lungs that passed the gate
    return StudyLine(
        path=str(folder),
        label=label,
        verdict=a.verdict if a.verdict and not a.reason else "not_analysable",
        probability=None if a.probability is None else round(a.probability, 4),
        percent_opacity=None if q is None else round(q.total.opacity_percent, 2),
        severity_score=None if q is None else q.severity_score,
        seconds=round(seconds, 2),
        reason=a.reason,
        lung_volume_ml=None if check is None else round(check.volume_ml, 1),
        lung_slices=None if check is None else check.lung_slices,
        lungs_ok=None if check is None else check.ok,
        series_instance_uid=series_uid,
        series_description=description,
        slices_unreadable=a.slices_unreadable(),
    )


def metrics(lines: list[StudyLine]) -> dict[str, object]:
    """Accuracy of the calls, the confusion table, AUC of COVID-19 against the rest."""
    confusion = {c: dict.fromkeys(OUTCOMES, 0) for c in CLASSES}
    right = 0
    for line in lines:
        confusion[line.label][line.verdict] += 1
        expected = "Present" if line.label == "covid" else "Absent"
        right += line.verdict == expected
    scored = [line for line in lines if line.probability is not None]
    y = np.array([line.label == "covid" for line in scored], dtype=np.float64)
    p = np.array([line.probability for line in scored], dtype=np.float64)
    both = bool(y.size and 0 < y.sum() < y.size)
    return {
        "studies": len(lines),
        "accuracy": round(right / len(lines), 4) if lines else None,
        "confusion": {c: v for c, v in confusion.items() if any(v.values())},
        "non_covid_present": sum(
            1 for line in lines if line.label != "covid" and line.verdict == "Present"
        ),
        "auc_covid_vs_rest": round(auc(y, p), 4) if both else None,
    }


def as_json(lines: list[StudyLine]) -> dict[str, object]:
    return {"studies": [asdict(line) for line in lines], "metrics": metrics(lines)}


def format_metrics(m: dict[str, object]) -> str:
    auc_text = "-" if m["auc_covid_vs_rest"] is None else m["auc_covid_vs_rest"]
    out = [
        f"{m['studies']} studies; calls right: {m['accuracy']}; "
        f"non-COVID called Present: {m['non_covid_present']}; AUC COVID-19 vs rest: {auc_text}",
        f"{'':<10} " + " ".join(f"{o:>14}" for o in OUTCOMES),
    ]
    confusion = m["confusion"]
    assert isinstance(confusion, dict)
    for label, row in confusion.items():
        out.append(f"{label:<10} " + " ".join(f"{row[o]:>14}" for o in OUTCOMES))
    return "\n".join(out)
