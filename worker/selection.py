"""Which instances of a study the classifier should see.

Kept: CT, ORIGINAL/PRIMARY, axial (the slice normal within about 25 degrees of the patient's
z axis), in series of at least ``min_series_slices`` slices (frames count for Enhanced CT).
Skipped, with a reason per series: other modalities, localizers/scouts, derived or secondary
images, other orientations, short series.  Slices are ordered along the slice normal.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

AXIAL_MIN_COSINE = 0.9
DEFER_BYTES = 4096
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"


@dataclass(frozen=True)
class SliceRef:
    """One analysable frame: instance id in the store, file, frame index, position (mm)."""

    instance_id: int
    path: Path
    frame: int
    position: float
    series_uid: str


@dataclass
class Selection:
    slices: list[SliceRef] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # series UID -> reason
    headers: dict[int, Dataset] = field(default_factory=dict)  # instance id -> header

    def reason(self) -> str:
        if self.slices:
            return ""
        if not self.skipped:
            return "the study holds no instances"
        reasons = sorted(set(self.skipped.values()))
        return "nothing analysable: " + "; ".join(reasons)


def orientation(ds: Dataset, frame: int = 0) -> list[float] | None:
    """Image Orientation (Patient) of a frame: functional groups first, then the top level."""
    for seq_name in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        seq = ds.get(seq_name)
        if seq:
            item = seq[min(frame, len(seq) - 1)]
            pos = item.get("PlaneOrientationSequence")
            if pos and "ImageOrientationPatient" in pos[0]:
                return [float(v) for v in pos[0].ImageOrientationPatient]
    iop = ds.get("ImageOrientationPatient")
    return [float(v) for v in iop] if iop else None


def _position(ds: Dataset, frame: int, normal: np.ndarray) -> float:
    seq = ds.get("PerFrameFunctionalGroupsSequence")
    ipp = None
    if seq and len(seq) > frame:
        pps = seq[frame].get("PlanePositionSequence")
        if pps:
            ipp = pps[0].get("ImagePositionPatient")
    if ipp is None:
        ipp = ds.get("ImagePositionPatient")
    if ipp is None:
        return float(ds.get("SliceLocation", ds.get("InstanceNumber", 0)) or 0)
    return float(np.dot(np.array([float(v) for v in ipp]), normal))


def classify_instance(ds: Dataset) -> str:
    """Empty if analysable, else the reason it is not."""
    if ds.get("Modality") != "CT":
        return f"modality {ds.get('Modality') or 'unknown'} is not CT"
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if any(t in ("LOCALIZER", "SCOUT", "TOPOGRAM") for t in image_type):
        return "localizer/scout images"
    if image_type[:1] and image_type[0] != "ORIGINAL":
        return "derived images"
    if len(image_type) > 1 and image_type[1] not in ("PRIMARY",):
        return "secondary images"
    iop = orientation(ds)
    if iop is None or len(iop) != 6:
        return "no image orientation"
    normal = np.cross(iop[:3], iop[3:])
    if abs(normal[2]) < AXIAL_MIN_COSINE * max(float(np.linalg.norm(normal)), 1e-9):
        return "not axial"
    return ""


def select(instances: list[tuple[int, str]], min_series_slices: int) -> Selection:
    """Select from ``(instance id, spool path)`` pairs by reading each header once.

    ``headers`` keeps the datasets of the kept instances, pixel data not read."""
    out = Selection()
    by_series: dict[str, list[tuple[int, Path, Dataset]]] = defaultdict(list)
    for instance_id, path in instances:
        # one parse per file: pixel data stays on disk (deferred) until the read-ahead
        # threads decode it from this same dataset
        ds = pydicom.dcmread(path, defer_size=DEFER_BYTES)
        reason = classify_instance(ds)
        series = str(ds.get("SeriesInstanceUID", ""))
        if reason:
            out.skipped.setdefault(series, reason)
            continue
        by_series[series].append((instance_id, Path(path), ds))
    for series, members in by_series.items():
        frames = sum(int(ds.get("NumberOfFrames", 1) or 1) for _, _, ds in members)
        if frames < min_series_slices:
            out.skipped[series] = f"series of {frames} slices is shorter than {min_series_slices}"
            continue
        out.skipped.pop(series, None)
        for instance_id, path, ds in members:
            iop = orientation(ds)
            assert iop is not None
            normal = np.cross(iop[:3], iop[3:])
            normal = normal / np.linalg.norm(normal)
            out.headers[instance_id] = ds
            for frame in range(int(ds.get("NumberOfFrames", 1) or 1)):
                out.slices.append(
                    SliceRef(instance_id, path, frame, _position(ds, frame, normal), series)
                )
    out.slices.sort(key=lambda s: (s.series_uid, s.position))
    return out
