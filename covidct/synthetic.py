"""Synthetic chest CT studies with realistic tags, for the demo, tests and benchmarks.

Pixel data are drawn, not copied from any dataset (:class:`Chest`): a body ellipse of soft
tissue, two lungs of air with vessels, a trachea and main bronchi, a spine, a table, noise, and
optionally ground-glass and consolidation spheres in the lungs.  Stored values
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
    kind: str = "axial"  # axial | localizer | derived | dose (a report saved as CT images)
    description: str = "Chest 1.0 B70f"
    ground_glass: bool = False
    rows: int = 512
    # with ground_glass: 40 patches scattered over both lungs' periphery at every height
    # (multifocal, as in typical COVID-19 pneumonia) instead of four in the lower zones
    multifocal: bool = False
    # keyword arguments of :class:`Chest` for sick anatomy (wall, blankets, leak, ...)
    chest: tuple[tuple[str, object], ...] = ()
    # how hospitals' series differ: ImageType (None: by kind), ConvolutionKernel, the plane
    # (axial or coronal: a reformat), slice positions left out (a gap), a dose report
    image_type: tuple[str, ...] | None = None
    kernel: str = ""
    plane: str = "axial"
    missing: tuple[int, ...] = ()


@dataclass(frozen=True)
class Blob:
    """A sphere of opacity: centre (x, y, z) in mm in the chest's frame, radius in mm."""

    centre: tuple[float, float, float]
    radius: float
    hu: float


LUNG_CENTRES = {"right": -68.0, "left": 68.0}  # x in mm: patient's right is -x (LPS)


@dataclass(frozen=True)
class Chest:
    """A drawn chest in mm, for tests that need a known truth.

    x runs to the patient's left, y to the back, z from the bottom of the series (0) to its
    top (``height``).  Lungs: two half-ellipsoids of -860 HU spanning 8-92% of the height,
    50 x 72 mm semi-axes at their widest; a trachea of 9 mm radius from the top to 70% of the
    height, then a main bronchus to each lung; three vessels of ``vessel_radius`` mm and
    ``vessel_hu`` running up each lung; ``blobs`` of ground glass or consolidation.  A lung
    listed in ``lungs`` only is drawn; ``dome`` raises the right diaphragm into the lung base.

    The sick and the thin: ``wall`` (mm) draws a body that is the lungs' widest outline grown by
    that much (a cachectic chest wall) around a mediastinum and spine, instead of the usual
    330 x 240 mm ellipse; ``blankets`` wraps it in a folded sheet 10 mm off the skin that
    touches it at eight folds, closing pockets of air between sheet and skin;
    ``emphysema`` (HU) sets the upper half of each lung to that density, with two bullae of
    pure air at the apex; ``consolidated_lobe`` fills the back of the right lung's lower third
    with consolidation (+30 HU) around air bronchograms (lung, and consolidation, in the truth);
    ``effusion`` (mm) lays fluid (+10 HU) that deep in the back of the right pleural space (not
    lung in the truth); ``leak`` opens the chest wall below the apices with a channel of -450 HU,
    so the lungs there join the room's air for the 3D segmentation (tissue above -400 HU)
    while the slice framing (body above -500 HU) still sees them closed: the lungs the
    segmentation lost in a real pneumonia.
    """

    height: float = 240.0
    lungs: tuple[str, ...] = ("right", "left")
    blobs: tuple[Blob, ...] = ()
    vessel_radius: float = 2.0
    vessel_hu: float = 40.0  # 200-400 with intravenous contrast
    dome: float = 0.0  # mm the right diaphragm's dome (liver, +40 HU) rises into the lung
    noise: float = 15.0
    wall: float | None = None
    blankets: bool = False
    emphysema: float | None = None
    consolidated_lobe: bool = False
    effusion: float = 0.0
    leak: bool = False

    def _lobe(self, xx: np.ndarray, yy: np.ndarray, z: float, lung: np.ndarray) -> np.ndarray:
        """The consolidated part of the right lung on this slice (empty unless drawn)."""
        if not self.consolidated_lobe or z > 0.35 * self.height:
            return np.zeros_like(lung)
        return lung & (yy > -5.0)

    def _fluid(self, yy: np.ndarray, z: float, lung: np.ndarray) -> np.ndarray:
        """The effusion on this slice: the back of the right pleural space."""
        if self.effusion <= 0:
            return np.zeros_like(lung)
        back = -5.0 + 72.0 * self._lung_shape(z)
        return lung & (yy > back - self.effusion)

    def _lung_shape(self, z: float) -> float:
        lo, hi = 0.08 * self.height, 0.92 * self.height
        if not lo <= z <= hi:
            return 0.0
        u = (z - (lo + hi) / 2) / ((hi - lo) / 2)
        return float(np.sqrt(max(0.0, 1.0 - u * u)))

    def body(self, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
        """The body's section (the same at every height)."""
        if self.wall is None:
            return (xx / 165.0) ** 2 + (yy / 120.0) ** 2 < 1
        out = (xx / 45.0) ** 2 + ((yy - 25.0) / 85.0) ** 2 < 1  # mediastinum and spine
        for cx in LUNG_CENTRES.values():
            out |= ((xx - cx) / (50 + self.wall)) ** 2 + ((yy + 5) / (72 + self.wall)) ** 2 < 1
        return out

    def masks(
        self, rows: int, pixel_mm: float, z: float
    ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
        """Truth on one slice: lung per side (vessels and blobs inside it included), airway,
        ground glass, consolidation; the image centre is x = y = 0."""
        c = (np.arange(rows, dtype=np.float32) - (rows - 1) / 2) * pixel_mm
        yy, xx = np.meshgrid(c, c, indexing="ij")
        scale = self._lung_shape(z)
        lungs: dict[str, np.ndarray] = {}
        for side in self.lungs:
            cx = LUNG_CENTRES[side]
            if scale > 0:
                lungs[side] = ((xx - cx) / (50 * scale)) ** 2 + ((yy + 5) / (72 * scale)) ** 2 < 1
            else:
                lungs[side] = np.zeros((rows, rows), dtype=bool)
        if "right" in lungs:
            lungs["right"] = lungs["right"] & ~self._fluid(yy, z, lungs["right"])
        if self.dome > 0 and "right" in lungs:
            radius = 45.0  # seen in section: a round island of liver inside the lung
            top = 0.08 * self.height + self.dome
            r2 = radius**2 - (z - (top - radius)) ** 2
            if r2 > 0:
                lungs["right"] &= (xx - LUNG_CENTRES["right"]) ** 2 + (yy - 5) ** 2 >= r2
        airway = np.zeros((rows, rows), dtype=bool)
        carina = 0.70 * self.height
        if z >= carina:
            airway |= xx**2 + (yy + 40) ** 2 < 9.0**2
        elif z >= carina - 0.12 * self.height:
            f = (carina - z) / (0.12 * self.height)
            for side in self.lungs:
                bx = LUNG_CENTRES[side] * 0.65 * f
                airway |= (xx - bx) ** 2 + (yy + 40 - 20 * f) ** 2 < 6.0**2
        ggo = np.zeros((rows, rows), dtype=bool)
        cons = np.zeros((rows, rows), dtype=bool)
        inside = np.zeros((rows, rows), dtype=bool)
        for m in lungs.values():
            inside |= m
        for blob in self.blobs:
            bx, by, bz = blob.centre
            r2 = blob.radius**2 - (z - bz) ** 2
            if r2 <= 0:
                continue
            sphere = ((xx - bx) ** 2 + (yy - by) ** 2 < r2) & inside
            if blob.hu >= -100:
                cons |= sphere
            else:
                ggo |= sphere
        if "right" in lungs:
            cons |= self._lobe(xx, yy, z, lungs["right"])
        ggo &= ~cons
        return lungs, airway & ~inside, ggo, cons

    def hu(self, rows: int, pixel_mm: float, z: float, rng: np.random.Generator) -> np.ndarray:
        """One axial slice in HU at height ``z`` mm."""
        c = (np.arange(rows, dtype=np.float32) - (rows - 1) / 2) * pixel_mm
        yy, xx = np.meshgrid(c, c, indexing="ij")
        hu = np.full((rows, rows), -1000.0, np.float32)
        body = self.body(xx, yy)
        hu[body] = 40.0
        if self.blankets:
            hu[_sheet(body, xx, yy, pixel_mm)] = -150.0
        lungs, airway, ggo, cons = self.masks(rows, pixel_mm, z)
        for side, m in lungs.items():
            hu[m] = -860.0
            if self.emphysema is not None and z > 0.5 * self.height:
                hu[m] = self.emphysema
                for bx in (-20.0, 15.0):  # bullae near the apex
                    bulla = (xx - LUNG_CENTRES[side] - bx) ** 2 + (yy + 20) ** 2
                    hu[m & (bulla < (12.0 * self._lung_shape(z)) ** 2)] = -1000.0
            cx = LUNG_CENTRES[side]
            for dx, dy in ((-20, -30), (10, 0), (-5, 35)):
                vessel = (xx - cx - dx) ** 2 + (yy - dy) ** 2 < self.vessel_radius**2
                hu[vessel & m] = self.vessel_hu
        hu[airway] = -1000.0
        if "right" in lungs:
            lobe = self._lobe(xx, yy, z, lungs["right"])
            hu[lobe] = 30.0
            cx = LUNG_CENTRES["right"]
            for dx, dy in ((-25.0, 20.0), (0.0, 30.0), (20.0, 15.0)):  # air bronchograms
                hu[lobe & ((xx - cx - dx) ** 2 + (yy - dy) ** 2 < 2.5**2)] = -900.0
            fluid_section = self.effusion > 0 and self._lung_shape(z) > 0
            if fluid_section:
                full = ((xx - cx) / (50 * self._lung_shape(z))) ** 2 + (
                    (yy + 5) / (72 * self._lung_shape(z))
                ) ** 2 < 1
                hu[self._fluid(yy, z, full)] = 10.0
        if self.leak and 0 < self._lung_shape(z) and z < 0.8 * self.height:
            for cx in LUNG_CENTRES.values():  # a channel from each lung's side to the outside
                channel = (np.abs(yy + 5) < 8.0) & (xx * np.sign(cx) > abs(cx))
                hu[channel & ((hu > -400) | (hu < -950))] = -450.0
        for blob in self.blobs:
            bx, by, bz = blob.centre
            r2 = blob.radius**2 - (z - bz) ** 2
            if r2 > 0:
                sphere = (xx - bx) ** 2 + (yy - by) ** 2 < r2
                hu[sphere & (ggo | cons)] = blob.hu
        hu[(xx / 20.0) ** 2 + ((yy - 80) / 20.0) ** 2 < 1] = 700.0  # spine
        hu[(yy > 135) & (yy < 140) & (np.abs(xx) < 170)] = 200.0  # table
        hu += rng.normal(0.0, self.noise, hu.shape).astype(np.float32)
        return np.clip(hu, -1024, 3071)


def _sheet(body: np.ndarray, xx: np.ndarray, yy: np.ndarray, pixel_mm: float) -> np.ndarray:
    """A sheet 3 mm thick, 10 mm off the skin over the front and sides, touching the skin at
    eight radial folds: pockets of air closed between sheet and skin."""
    from scipy import ndimage

    def grown(mm: float) -> np.ndarray:
        return ndimage.distance_transform_edt(~body, sampling=pixel_mm) <= mm

    sheet = grown(13.0) & ~grown(10.0) & (yy < 60.0)
    angle = np.arctan2(yy, xx)
    folds = np.zeros_like(body)
    for a in np.linspace(-np.pi * 0.95, -np.pi * 0.05, 8):
        folds |= np.abs(np.angle(np.exp(1j * (angle - a)))) * np.hypot(xx, yy) < 2.0
    return sheet | (folds & grown(13.0) & ~body & (yy < 60.0))


def typical_covid_blobs(height: float) -> tuple[Blob, ...]:
    """Peripheral, bilateral, lower-zone ground glass with a little consolidation."""
    z = 0.3 * height
    r = max(12.0, 0.1 * height)
    return (
        Blob((-105.0, 20.0, z), r, -500.0),
        Blob((105.0, 20.0, z), r, -500.0),
        Blob((-85.0, -30.0, z + 1.5 * r), 0.8 * r, -550.0),
        Blob((85.0, -30.0, z + 1.5 * r), 0.8 * r, 0.0),
    )


def multifocal_covid_blobs(height: float, seed: int = 0) -> tuple[Blob, ...]:
    """Ground glass (-650 to -350 HU) in 40 patches of 10-22 mm radius, alternating sides,
    in the outer half of each lung from 12% to 85% of the height: bilateral, peripheral,
    multifocal."""
    rng = np.random.default_rng(seed)
    blobs = []
    for i in range(40):
        side = -1.0 if i % 2 else 1.0
        angle = rng.uniform(-np.pi / 2, np.pi / 2)
        x = side * (LUNG_CENTRES["left"] + 38.0 * np.cos(angle))
        y = -5.0 + 60.0 * np.sin(angle)
        z = rng.uniform(0.12, 0.85) * height
        blobs.append(Blob((x, y, z), rng.uniform(10.0, 22.0), -500.0 + rng.uniform(-150, 150)))
    return tuple(blobs)


def make_series(
    study: Dataset, spec: SeriesSpec, series_number: int, seed: int = 0
) -> Iterator[Dataset]:
    """Yield the instances of one series of ``study`` (a dataset with the study-level tags)."""
    rng = np.random.default_rng(seed)
    series_uid = generate_uid(prefix=ROOT)
    frame_of_ref = generate_uid(prefix=ROOT)
    count = 1 if spec.kind == "localizer" else spec.slices
    # a whole adult chest (240 mm, slices of 2.5 mm or thicker so that the series covers it)
    # when the series can hold one; a short series (under 16 slices, for tests of single
    # slices and frames) shows the middle of a 240 mm chest in every slice
    height = max(240.0, 2.5 * (count - 1)) if count >= 16 else 240.0
    spacing = height / (count - 1) if count >= 16 else 2.5
    blobs: tuple[Blob, ...] = ()
    if spec.ground_glass:
        blobs = (
            multifocal_covid_blobs(height, seed) if spec.multifocal else typical_covid_blobs(height)
        )
    chest = Chest(height, blobs=blobs, **dict(spec.chest))  # type: ignore[arg-type]
    for i in range(count):
        if i in spec.missing:
            continue
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
                list(spec.image_type)
                if spec.image_type
                else (
                    ["DERIVED", "SECONDARY", "AXIAL"]
                    if spec.kind == "derived"
                    else ["ORIGINAL", "PRIMARY", "AXIAL"]
                )
            )
            if spec.plane == "coronal":  # a reformat: rows run head to foot
                ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
                ds.ImagePositionPatient = [-175.0, -175.0 + spacing * i, 0.0]
            else:
                ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
                ds.ImagePositionPatient = [-175.0, -175.0, -100.0 - spacing * i]
                ds.SliceLocation = -100.0 - spacing * i
        if spec.kernel:
            ds.ConvolutionKernel = spec.kernel
        if spec.kind == "dose":
            ds.SeriesDescription = "Dose Report"
        ds.SliceThickness = round(spacing, 3)
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
        # slice 0 is the highest (positions fall with i): the top of the chest
        top_down = (1.0 - z) if count >= 16 else 0.35 + 0.3 * (1.0 - z)
        hu = chest.hu(spec.rows, 350.0 / spec.rows, top_down * chest.height, rng)
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
