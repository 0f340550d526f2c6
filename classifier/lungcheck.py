"""The quality gate on a lung segmentation: before any rule uses the lungs, are they believable?

A segmentation that lost lung (a chest wall the air leaked through, dense consolidation left
outside, a series cut short) measures too little lung and too little opacity, and the
near-normal rule would then call a sick chest Absent.  The gate checks what an adult chest
must show and, when it fails, the study is Indeterminate ("lungs not segmented reliably") with
the figures; the opacity figures and the near-normal rule are used only when it passes.

Checks (each named in the reasons when it fails):

* volume: both lungs together hold ``MIN_VOLUME_ML`` to ``MAX_VOLUME_ML``.  The lower bound is
  about the residual volume of a small adult, the air the lungs keep even after a full
  expiration (ERS 1993 reference equations, Quanjer et al., Eur Respir J 1993;6 Suppl 16:5-40:
  RV 1.2 L for a woman of 150 cm at 30); the upper bound is above the total lung capacity of
  a tall man with emphysema (predicted TLC 8.0 L at 190 cm, hyperinflation up to about 120%).
  A series that cuts the lungs at an end measures only part of them: the lower bound is then
  not applied, and the note says so.
* continuity: lung on every slice between the apex and the base; a slice without lung inside
  that span is lung the segmentation lost.
* both sides: a right and a left lung, the smaller at least ``MIN_SIDE_RATIO`` of the larger.
  The right lung holds about 55% of the total in health (left/right about 0.8); a side under
  half the other is a lost lobe, a collapsed or resected lung: each needs a reader.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from classifier.lungs import Lungs

MIN_VOLUME_ML = 1200.0
MAX_VOLUME_ML = 10000.0
MIN_SIDE_RATIO = 0.5


@dataclass(frozen=True)
class LungCheck:
    """The gate's figures and, when it fails, the reasons."""

    volume_ml: float
    right_ml: float
    left_ml: float
    lung_slices: int  # slices with lung
    span_slices: int  # slices from the apex to the base, both included
    reasons: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.reasons

    def summary(self) -> str:
        """One line for the verdict's basis, the SR and the study page."""
        figures = (
            f"{self.volume_ml:.0f} mL (right {self.right_ml:.0f}, left {self.left_ml:.0f}),"
            f" lung on {self.lung_slices} of {self.span_slices} slices from apex to base"
        )
        if self.ok:
            return f"lungs segmented: {figures}"
        return f"lungs not segmented reliably: {'; '.join(self.reasons)} ({figures})"

    def as_dict(self) -> dict[str, object]:
        return {
            "lungs_ok": self.ok,
            "lung_volume_ml": round(self.volume_ml, 1),
            "lung_slices": self.lung_slices,
            "lung_span_slices": self.span_slices,
            "lung_check": self.summary(),
            "lung_check_reasons": list(self.reasons),
        }


def check_lungs(lungs: Lungs, right: float, left: float) -> LungCheck:
    """Run the gate on a segmentation whose lungs measure ``right`` and ``left`` mL (as
    :func:`classifier.quantify.quantify` measured them)."""
    volume = right + left
    present = np.flatnonzero((lungs.labels > 0).any(axis=(1, 2)))
    span = int(present[-1] - present[0] + 1) if present.size else 0
    reasons: list[str] = []
    if volume > MAX_VOLUME_ML:
        reasons.append(f"{volume:.0f} mL of lung is more than an adult holds ({MAX_VOLUME_ML:.0f})")
    elif volume < MIN_VOLUME_ML and not lungs.cut_off:
        reasons.append(f"{volume:.0f} mL of lung is less than an adult holds ({MIN_VOLUME_ML:.0f})")
    if present.size and present.size < span:
        missing = span - present.size
        reasons.append(f"no lung on {missing} of the {span} slices between apex and base")
    small, large = sorted((right, left))
    if small == 0.0:
        reasons.append(f"only the {'right' if right else 'left'} lung was found")
    elif small < MIN_SIDE_RATIO * large:
        smaller = "right" if right < left else "left"
        reasons.append(
            f"the {smaller} lung measures {small / large:.0%} of the other"
            f" (under {MIN_SIDE_RATIO:.0%})"
        )
    return LungCheck(volume, right, left, int(present.size), span, reasons)
