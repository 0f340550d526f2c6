"""Reading the service's SR back through highdicom, as a PACS or a reviewer would: what the
tests check the SR by (the service itself only writes SRs)."""

from __future__ import annotations

from collections.abc import Sequence

from highdicom.sr import Comprehensive3DSR
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from worker.sr import COVID19, OPACITY


def read_lung_measurements(sr: Dataset) -> dict[str, dict[str, float]]:
    """Read the lung groups back through highdicom: side -> measurement meaning -> value."""
    parsed = sr if isinstance(sr, Comprehensive3DSR) else Comprehensive3DSR.from_dataset(sr)
    out: dict[str, dict[str, float]] = {}
    for group in parsed.content.get_image_measurement_groups(finding_type=OPACITY):
        side = "both"
        for site in group.finding_sites:
            if site.laterality is not None:
                side = str(site.laterality.meaning).lower()
        out[side] = {str(m.name.meaning): float(m.value) for m in group.get_measurements()}
    return out


def read_finding(sr: Dataset) -> tuple[float, str, str]:
    """Read an SR back through highdicom: (probability, verdict, algorithm version)."""
    parsed = sr if isinstance(sr, Comprehensive3DSR) else Comprehensive3DSR.from_dataset(sr)
    groups = parsed.content.get_image_measurement_groups(finding_type=COVID19)
    if not groups:
        raise ValueError("no COVID-19 measurement group in the SR")
    group = groups[0]
    (measurement,) = group.get_measurements(name=codes.DCM.Probability)
    (evaluation,) = group.get_qualitative_evaluations(name=COVID19)
    return float(measurement.value), str(evaluation.value.meaning), _algorithm_version(group)


def _algorithm_version(items: Sequence[Dataset]) -> str:
    """The first Algorithm Version (DCM 111003) text item, searched depth first."""
    for item in items:
        if item.ConceptNameCodeSequence[0].CodeValue == "111003":
            return str(item.TextValue)
        found = _algorithm_version(item.get("ContentSequence", []))
        if found:
            return found
    return ""
