"""The study verdict: how slice probabilities become one study probability.

Rule: the mean of the top ``fraction`` of slice probabilities (at least ``min_k`` slices, or all
of them when fewer).  COVID-19 shows in part of the lungs, so a plain mean over the whole study
would dilute it; the maximum alone would let one noisy slice decide.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from classifier.quantify import Quantification

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


MULTIFOCAL_ZONES = 2
STUDY_RULE = (
    "CNN: mean of the top 10% slice probabilities (at least 5) over slices inside the lung;"
    " lungs that fail the segmentation's checks make it Indeterminate; Present needs opacity"
    " in at least 2 of 6 lung zones and a pattern that is not atypical (RSNA); fewer involved"
    " zones is near-normal lung and Absent, or Indeterminate when the CNN calls Present"
)


def study_verdict(
    probability: float, threshold: float, band: float, quantification: Quantification
) -> tuple[str, str]:
    """The study's call from the CNN's study probability and the measured lungs, with the
    reason in words.

    * Lungs that fail the quality gate (:mod:`classifier.lungcheck`) make the study
      Indeterminate, whatever the CNN says: the opacity figures and the near-normal rule
      would rest on lung the segmentation lost, so a failed segmentation never gives Absent.
    * Near-normal lung (opacity in fewer than ``MULTIFOCAL_ZONES`` zones: COVID-19 pneumonia
      is multifocal in the RSNA consensus's typical and indeterminate patterns) is Absent
      unless the CNN calls Present: a 2D model scores lung bases and apices high on normal
      chests, so the CNN alone never makes such a study Present, but the segmentation leaves
      out dense consolidation against the chest wall (a consolidated lobe) and then measures
      the sick lung as near-normal.  Two readers of the same slices that disagree make the
      study Indeterminate, never Absent.
    * Otherwise the CNN's call (:func:`verdict`), except that Present with the RSNA atypical
      pattern (unilateral, mostly consolidation: lobar pneumonia) becomes Indeterminate.
    """
    check = quantification.check
    if check is not None and not check.ok:
        return "Indeterminate", (
            f"{check.summary()}; CNN probability {probability:.3f} against {threshold:.3f}"
        )
    involved = sum(score > 0 for score in quantification.zone_scores().values())
    call = verdict(probability, threshold, band)
    if involved < MULTIFOCAL_ZONES:
        measured = (
            f"opacity in {involved} of {len(quantification.zones)} zones,"
            f" {quantification.total.opacity_percent:.1f}% of the segmented lung volume"
        )
        if call != "Present":
            return "Absent", f"near-normal lung: {measured}"
        return "Indeterminate", (
            f"the CNN scores COVID-19 ({probability:.3f} against {threshold:.3f}) but the"
            f" segmented lung is near-normal ({measured}): dense consolidation the segmentation"
            " left out, or a false positive of the CNN"
        )
    pattern = quantification.pattern
    if call == "Present" and pattern == "atypical":
        return "Indeterminate", (
            "the CNN scores COVID-19 but the opacity is unilateral and mostly consolidation"
            " (RSNA atypical pattern)"
        )
    return call, f"CNN probability {probability:.3f} against {threshold:.3f}; pattern {pattern}"


KEY_SLICES = 4
KEY_SLICE_GAP_MM = 10.0


def key_slice_indices(
    positions: Sequence[float | None],
    probabilities: Sequence[float | None],
    count: int = KEY_SLICES,
    min_gap_mm: float = KEY_SLICE_GAP_MM,
) -> list[int]:
    """The key slices of a study, best first: the highest-scoring, no two within
    ``min_gap_mm`` of each other, since neighbours show the same thing and a reader wants the
    best slice of each part of the lungs.  Slices without a position (one-image studies) are
    taken in order of score; unscored ones never."""
    ranked = sorted(
        (i for i, p in enumerate(probabilities) if p is not None),
        key=lambda i: -float(probabilities[i]),  # type: ignore[arg-type]
    )
    chosen: list[int] = []
    for i in ranked:
        if len(chosen) == count:
            break
        here = positions[i]
        if here is not None and any(
            positions[c] is not None and abs(positions[c] - here) < min_gap_mm  # type: ignore[operator]
            for c in chosen
        ):
            continue
        chosen.append(i)
    return chosen
