"""The DICOM SR: one small function of ours, :func:`build_sr`, hides highdicom.

A Comprehensive 3D SR holding a TID 1500 Imaging Measurement Report, in the same study as the
CT, in a new series labelled as unverified AI output not for diagnostic use:

* observer: a device whose UID is derived from the model version (same model, same UID);
* one measurement group (TID 1501): finding type Disease caused by SARS-CoV-2 (SCT 840539006),
  finding site Lung (SCT 39607008), the algorithm with its version and parameters, the study
  probability (DCM 122157 Probability, UCUM "1") and a qualitative evaluation Present / Absent
  / Indeterminate, with the slices that drove the verdict as source images;
* every analysed instance in CurrentRequestedProcedureEvidenceSequence;
* a report for a later generation of the study names the earlier one as predecessor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    Comprehensive3DSR,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    QualitativeEvaluation,
    SourceImageForMeasurementGroup,
    TrackingIdentifier,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from classifier.quantify import Quantification

UID_ROOT = "1.2.826.0.1.3680043.10.1404."
COVID19 = CodedConcept("840539006", "SCT", "Disease caused by SARS-CoV-2")
LUNG = CodedConcept("39607008", "SCT", "Lung")
# TID 1500 Procedure Reported from CID 100 (Quantitative Diagnostic Imaging Procedures), as
# PixelMed's validator and the IHE AI Results profile expect: "CT of chest" is not in it
PROCEDURE = CodedConcept("25045-6", "LN", "CT unspecified body region")
UNIT_ONE = CodedConcept("1", "UCUM", "no units")
VALUES = {
    "Present": CodedConcept("52101004", "SCT", "Present"),
    "Absent": CodedConcept("272519000", "SCT", "Absent"),
    "Indeterminate": CodedConcept("82334004", "SCT", "Indeterminate"),
}
OPACITY = CodedConcept("112001", "DCM", "Opacity")
VOLUME = CodedConcept("118565006", "SCT", "Volume")
PERCENT_OPACITY = CodedConcept("COVIDCT01", "99COVIDCT", "Percent of lung volume opacified")
PERCENT_CONSOLIDATION = CodedConcept(
    "COVIDCT02", "99COVIDCT", "Percent of lung volume consolidated"
)
SEVERITY = CodedConcept("246112005", "SCT", "Severity")
UNIT_ML = CodedConcept("mL", "UCUM", "milliliter")
UNIT_PERCENT = CodedConcept("%", "UCUM", "percent")
UNIT_SCORE = CodedConcept("{score}", "UCUM", "score")
LATERALITY = {"right": codes.SCT.Right, "left": codes.SCT.Left}
SERIES_DESCRIPTION = "AI OUTPUT - NOT FOR DIAGNOSTIC USE"
MANUFACTURER = "covidct"
SR_SERIES_NUMBER = 9901


@dataclass(frozen=True)
class Finding:
    """What the report says: the study probability and how it was reached."""

    probability: float
    verdict: str  # Present | Absent | Indeterminate
    threshold: float
    band: float
    aggregation: str
    model_version: str
    slices_analysed: int
    # why the study may lack instances (ingest.completeness); "" = received whole
    incomplete: str = ""
    # the lung segmentation's quality gate (classifier.lungcheck): failed means no lung
    # measurement group, and an algorithm parameter that says why
    lungs_ok: bool = True
    # the series read (worker.selection): description, thickness, kernel, and why
    series: tuple[str, ...] = ()


@dataclass(frozen=True)
class LungMeasurement:
    """One lung, or both (``side`` "both"): what the SR reports of it."""

    side: str  # right | left | both
    volume_ml: float
    opacity_percent: float
    consolidation_percent: float
    severity: int  # Pan et al.'s zone scores summed over the zones of this side


def lung_measurements(q: Quantification) -> list[LungMeasurement]:
    """The lung groups to report: none when the segmentation failed its gate, since its
    opacity figures would rest on lung it lost."""
    if not q.lungs_ok:
        return []
    scores = q.zone_scores()
    out = []
    for side, key in (("right", "right"), ("left", "left"), ("both", "total")):
        region = q.lungs.get(key)
        if region is None:
            continue
        zone_sum = sum(v for k, v in scores.items() if side == "both" or k.startswith(side))
        out.append(
            LungMeasurement(
                side,
                region.volume_ml,
                region.opacity_percent,
                region.consolidation_percent,
                zone_sum,
            )
        )
    return out


def deterministic_uid(*parts: str) -> str:
    """The same inputs always give the same UID: re-running a task makes no second SR."""
    return str(generate_uid(prefix=UID_ROOT, entropy_srcs=list(parts)))


def device_identity(model_version: str) -> DeviceObserverIdentifyingAttributes:
    """The observer device of every object we write: one UID per model version."""
    return DeviceObserverIdentifyingAttributes(
        uid=deterministic_uid("device", model_version),
        name="covidct",
        manufacturer_name=MANUFACTURER,
        model_name=model_version[:64],
    )


def build_sr(
    evidence: Sequence[Dataset],
    key_images: Sequence[tuple[Dataset, int | None]],
    finding: Finding,
    lungs: Sequence[LungMeasurement] = (),
    *,
    generation: int = 0,
    predecessor: Dataset | None = None,
    companions: Sequence[Dataset] = (),
) -> Comprehensive3DSR:
    """Build the report.  ``evidence``: headers of every analysed instance (pixel data not
    needed); ``key_images``: (header, frame number or None) of the slices behind the verdict;
    ``companions``: the key images and key object selection sent with it, named in the
    Pertinent Other Evidence Sequence (evidence the report's creator holds pertinent, PS3.3
    C.17.2.3) so that a reader of the report finds them.

    Raises ValueError if the finding is inconsistent (highdicom validates the rest).
    """
    if finding.verdict not in VALUES:
        raise ValueError(f"verdict must be one of {', '.join(VALUES)}")
    if not 0.0 <= finding.probability <= 1.0:
        raise ValueError("probability must lie in [0, 1]")
    if not evidence:
        raise ValueError("an SR needs at least one evidence instance")
    study_uid = str(evidence[0].StudyInstanceUID)
    evidence = [with_type2_defaults(evidence[0]), *evidence[1:]]
    device = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=device_identity(finding.model_version),
    )
    algorithm = AlgorithmIdentification(
        name="covidct COVID-19 CT classifier",
        version=finding.model_version[:64],
        parameters=[
            f"threshold={finding.threshold:.4f}",
            f"indeterminate_band={finding.band:.4f}",
            f"aggregation={finding.aggregation}"[:64],
            f"slices_analysed={finding.slices_analysed}",
            "lung_segmentation="
            + ("checked" if finding.lungs_ok else "failed its checks, no lung figures"),
            *finding.series,
        ],
    )
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=deterministic_uid("tracking", study_uid, finding.model_version, str(generation)),
            identifier="COVID-19 study classification",
        ),
        finding_type=COVID19,
        algorithm_id=algorithm,
        finding_sites=[FindingSite(LUNG)],
        measurements=[
            Measurement(
                name=codes.DCM.Probability,
                value=round(float(finding.probability), 6),
                unit=UNIT_ONE,
                algorithm_id=algorithm,
            )
        ],
        qualitative_evaluations=[QualitativeEvaluation(COVID19, VALUES[finding.verdict])],
        source_images=[
            SourceImageForMeasurementGroup.from_source_image(
                ds, referenced_frame_numbers=[frame] if frame else None
            )
            for ds, frame in key_images
        ]
        or None,
    )
    groups = [group] + [
        _lung_group(m, algorithm, study_uid, finding.model_version, generation) for m in lungs
    ]
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=device),
        procedure_reported=PROCEDURE,
        imaging_measurements=groups,
    )
    sr = Comprehensive3DSR(
        evidence=list(evidence),
        content=report,
        series_instance_uid=deterministic_uid("series", study_uid, finding.model_version),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=deterministic_uid("sr", study_uid, finding.model_version, str(generation)),
        instance_number=generation + 1,
        manufacturer=MANUFACTURER,
        is_complete=not finding.incomplete,
        is_final=False,
        is_verified=False,
        series_description=SERIES_DESCRIPTION,
        previous_versions=[predecessor] if predecessor is not None else None,
    )
    if companions:
        sr.PertinentOtherEvidenceSequence = references(companions)
    if finding.incomplete:  # CompletionFlag PARTIAL says so; LO: 64 characters
        sr.CompletionFlagDescription = _partial_description(
            finding.slices_analysed, finding.incomplete
        )
    return sr


def references(objects: Sequence[Dataset]) -> list[Dataset]:
    """The study / series / instance hierarchy of an evidence sequence (PS3.3 C.17.2.3)."""
    studies: dict[str, dict[str, list[Dataset]]] = {}
    for ds in objects:
        item = Dataset()
        item.ReferencedSOPClassUID = ds.SOPClassUID
        item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        series = studies.setdefault(str(ds.StudyInstanceUID), {})
        series.setdefault(str(ds.SeriesInstanceUID), []).append(item)
    out = []
    for study_uid, by_series in studies.items():
        study = Dataset()
        study.StudyInstanceUID = study_uid
        study.ReferencedSeriesSequence = []
        for series_uid, items in by_series.items():
            entry = Dataset()
            entry.SeriesInstanceUID = series_uid
            entry.ReferencedSOPSequence = items
            study.ReferencedSeriesSequence.append(entry)
        out.append(study)
    return out


def _partial_description(slices: int, reason: str) -> str:
    if "refused" in reason:
        why = "instances refused"
    elif "release" in reason or "listener" in reason or "open" in reason:
        why = "transfer interrupted"
    else:
        why = "sender may not have sent all"
    return f"may be incomplete: {why}; {slices} slices analysed"[:64]


def _lung_group(
    m: LungMeasurement,
    algorithm: AlgorithmIdentification,
    study_uid: str,
    model_version: str,
    generation: int,
) -> MeasurementsAndQualitativeEvaluations:
    """TID 1501 group of one lung (or both): volume, opacity, consolidation, severity."""
    site = FindingSite(LUNG, laterality=LATERALITY.get(m.side))
    values = [
        (VOLUME, round(m.volume_ml, 1), UNIT_ML),
        (PERCENT_OPACITY, round(m.opacity_percent, 2), UNIT_PERCENT),
        (PERCENT_CONSOLIDATION, round(m.consolidation_percent, 2), UNIT_PERCENT),
        (SEVERITY, m.severity, UNIT_SCORE),
    ]
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=deterministic_uid("lung", m.side, study_uid, model_version, str(generation)),
            identifier=f"{'both lungs' if m.side == 'both' else m.side + ' lung'} opacity",
        ),
        finding_type=OPACITY,
        algorithm_id=algorithm,
        finding_sites=[site],
        measurements=[
            Measurement(name=name, value=value, unit=unit, algorithm_id=algorithm)
            for name, value, unit in values
        ],
    )


TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


def with_type2_defaults(ds: Dataset) -> Dataset:
    """De-identified studies often omit Type 2 patient/study attributes that the SR, the key
    images and the key object selection copy from a source instance; give them the empty
    value the standard allows."""
    missing = [kw for kw in TYPE2_PATIENT_STUDY if kw not in ds]
    if not missing:
        return ds
    copy = Dataset()
    copy.update(ds)
    if hasattr(ds, "file_meta"):
        copy.file_meta = ds.file_meta
    for kw in missing:
        setattr(copy, kw, "")
    return copy
