"""Synthetic chest CT studies with realistic tags, for the demo, tests and benchmarks.

Pixel data are drawn, not copied from any dataset: a body ellipse of soft tissue, two lungs of
air, a spine, a table, noise, and optionally ground-glass patches in the lungs.  Stored values
are HU + 1024 with RescaleIntercept -1024, as many scanners write them.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

ROOT = "1.2.826.0.1.3680043.10.1404."  # covidct's synthetic-data UID prefix
# patient and study attributes every instance of a study repeats
STUDY_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "StudyDescription",
    "ReferringPhysicianName",
)


@dataclass
class SeriesSpec:
    slices: int = 40
    kind: str = "axial"  # axial | localizer | derived
    description: str = "Chest 1.0 B70f"
    ground_glass: bool = False
    rows: int = 512


def _phantom(rows: int, z: float, ground_glass: bool, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:rows, 0:rows].astype(np.float32) / rows
    hu = np.full((rows, rows), -1000.0, np.float32)  # air
    body = ((xx - 0.5) / 0.42) ** 2 + ((yy - 0.5) / 0.32) ** 2 < 1
    hu[body] = 40.0
    lung_h = 0.22 * (1.0 - 0.6 * abs(z - 0.5))  # lungs shrink towards apex and base
    for cx in (0.33, 0.67):
        lung = ((xx - cx) / 0.13) ** 2 + ((yy - 0.47) / lung_h) ** 2 < 1
        hu[lung & body] = -860.0
        if ground_glass:
            gg = ((xx - cx - 0.03) / 0.06) ** 2 + ((yy - 0.52) / 0.05) ** 2 < 1
            hu[gg & lung & body] = -450.0
    spine = ((xx - 0.5) / 0.05) ** 2 + ((yy - 0.74) / 0.05) ** 2 < 1
    hu[spine] = 700.0
    hu[(yy > 0.86) & (yy < 0.88) & (xx > 0.1) & (xx < 0.9)] = 200.0  # table
    hu += rng.normal(0.0, 15.0, hu.shape).astype(np.float32)
    return np.clip(hu, -1024, 3071)


def make_series(
    study: Dataset, spec: SeriesSpec, series_number: int, seed: int = 0
) -> Iterator[Dataset]:
    """Yield the instances of one series of ``study`` (a dataset with the study-level tags)."""
    rng = np.random.default_rng(seed)
    series_uid = generate_uid(prefix=ROOT)
    frame_of_ref = generate_uid(prefix=ROOT)
    count = 1 if spec.kind == "localizer" else spec.slices
    for i in range(count):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        sop_uid = generate_uid(prefix=ROOT)
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        for kw in STUDY_KEYWORDS:
            setattr(ds, kw, getattr(study, kw))
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.Modality = "CT"
        ds.Manufacturer = "covidct synthetic"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.SeriesDescription = spec.description if spec.kind != "localizer" else "Topogram"
        ds.InstanceNumber = i + 1
        ds.FrameOfReferenceUID = frame_of_ref
        ds.ContentDate, ds.ContentTime = study.StudyDate, study.StudyTime
        ds.BodyPartExamined = "CHEST"
        z = i / max(count - 1, 1)
        if spec.kind == "localizer":
            ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
            ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
            ds.ImagePositionPatient = [-250, 0, 0]
        else:
            ds.ImageType = (
                ["DERIVED", "SECONDARY", "AXIAL"]
                if spec.kind == "derived"
                else ["ORIGINAL", "PRIMARY", "AXIAL"]
            )
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.ImagePositionPatient = [-175.0, -175.0, -100.0 - 2.5 * i]
            ds.SliceLocation = -100.0 - 2.5 * i
        ds.SliceThickness = 2.5
        ds.PixelSpacing = [350.0 / spec.rows, 350.0 / spec.rows]
        ds.KVP = 120
        ds.Rows = ds.Columns = spec.rows
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter, ds.WindowWidth = -600, 1500
        hu = _phantom(spec.rows, z, spec.ground_glass, rng)
        ds.PixelData = (np.rint(hu) + 1024).astype(np.uint16).tobytes()
        yield ds


def make_study(
    series: list[SeriesSpec] | None = None,
    *,
    patient_name: str = "Synthetic^Patient",
    patient_id: str = "SYN0001",
    accession: str = "ACC0001",
    seed: int = 0,
) -> list[Dataset]:
    """A whole study: by default one axial series of 40 slices and a localizer."""
    series = series if series is not None else [SeriesSpec(), SeriesSpec(kind="localizer")]
    study = Dataset()
    study.PatientName = patient_name
    study.PatientID = patient_id
    study.PatientBirthDate = "19700101"
    study.PatientSex = "O"
    study.StudyInstanceUID = generate_uid(prefix=ROOT)
    now = dt.datetime.now()
    study.StudyDate = now.strftime("%Y%m%d")
    study.StudyTime = now.strftime("%H%M%S")
    study.AccessionNumber = accession
    study.StudyID = "1"
    study.StudyDescription = "CT Chest"
    study.ReferringPhysicianName = ""
    out: list[Dataset] = []
    for n, spec in enumerate(series, start=1):
        out.extend(make_series(study, spec, n, seed=seed + n))
    return out


def write_study(datasets: list[Dataset], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
