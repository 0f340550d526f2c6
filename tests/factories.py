"""Builders of DICOM test data: Enhanced CT, every transfer syntax, broken files."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from covidct.synthetic import ROOT, STUDY_KEYWORDS, SeriesSpec, make_study

ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"


def enhanced_ct(frames: int = 12, rows: int = 512) -> Dataset:
    """An Enhanced CT multi-frame image built from a synthetic axial series."""
    slices = make_study([SeriesSpec(slices=frames, rows=rows)])
    first = slices[0]
    ds = Dataset()
    for kw in (
        *STUDY_KEYWORDS,
        "Modality",
        "Manufacturer",
        "FrameOfReferenceUID",
        "ContentDate",
        "ContentTime",
        "Rows",
        "Columns",
        "SamplesPerPixel",
        "PhotometricInterpretation",
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
    ):
        setattr(ds, kw, getattr(first, kw))
    ds.SOPClassUID = ENHANCED_CT
    ds.SOPInstanceUID = generate_uid(prefix=ROOT)
    ds.SeriesInstanceUID = generate_uid(prefix=ROOT)
    ds.SeriesNumber = 7
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.NumberOfFrames = frames
    shared = Dataset()
    pm = Dataset()
    pm.PixelSpacing = first.PixelSpacing
    pm.SliceThickness = first.SliceThickness
    shared.PixelMeasuresSequence = Sequence([pm])
    po = Dataset()
    po.ImageOrientationPatient = first.ImageOrientationPatient
    shared.PlaneOrientationSequence = Sequence([po])
    pvt = Dataset()
    pvt.RescaleIntercept, pvt.RescaleSlope, pvt.RescaleType = -1024, 1, "HU"
    shared.PixelValueTransformationSequence = Sequence([pvt])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per = []
    for sl in slices:
        item = Dataset()
        pp = Dataset()
        pp.ImagePositionPatient = sl.ImagePositionPatient
        item.PlanePositionSequence = Sequence([pp])
        per.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per)
    ds.PixelData = b"".join(sl.PixelData for sl in slices)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ENHANCED_CT
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def to_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# transfer syntax -> how to make it: ("pydicom", uid) or ("dcmtk", program, flag)
SYNTAXES: dict[str, tuple[str, ...]] = {
    "1.2.840.10008.1.2": ("dcmtk", "dcmconv", "+ti"),
    "1.2.840.10008.1.2.1": ("plain",),
    "1.2.840.10008.1.2.1.99": ("dcmtk", "dcmconv", "+td"),
    "1.2.840.10008.1.2.4.50": ("dcmtk8", "dcmcjpeg", "+eb"),
    "1.2.840.10008.1.2.4.51": ("dcmtk", "dcmcjpeg", "+ee"),
    "1.2.840.10008.1.2.4.57": ("dcmtk", "dcmcjpeg", "+el"),
    "1.2.840.10008.1.2.4.70": ("dcmtk", "dcmcjpeg", "+e1"),
    "1.2.840.10008.1.2.4.80": ("pydicom", JPEGLSLossless),
    "1.2.840.10008.1.2.4.90": ("pydicom", JPEG2000Lossless),
    "1.2.840.10008.1.2.5": ("pydicom", RLELossless),
}
LOSSY = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"}


def eight_bit(ds: Dataset) -> Dataset:
    """The same slice stored in 8 bits (slope 8): JPEG baseline only takes 8-bit data."""
    arr = ds.pixel_array.astype(np.int32)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.RescaleSlope, ds.RescaleIntercept = 8, -1024
    ds.PixelData = np.clip(arr // 8, 0, 255).astype(np.uint8).tobytes()
    return ds


def in_syntax(ds: Dataset, syntax: str, workdir: Path) -> Path:
    """Write ``ds`` to a file in ``syntax``; DCMTK makes the JPEG family and deflate."""
    how = SYNTAXES[syntax]
    workdir.mkdir(parents=True, exist_ok=True)
    src = workdir / f"{ds.SOPInstanceUID}.plain.dcm"
    dst = workdir / f"{ds.SOPInstanceUID}.dcm"
    if how[0] == "dcmtk8":
        ds = eight_bit(ds)
    if how[0] == "pydicom":
        ds.compress(how[1])
        ds.save_as(dst, enforce_file_format=True)
        return dst
    ds.save_as(src if how[0] != "plain" else dst, enforce_file_format=True)
    if how[0] == "plain":
        return dst
    program = shutil.which(how[1])
    if program is None:
        raise FileNotFoundError(how[1])
    subprocess.run([program, how[2], str(src), str(dst)], check=True, capture_output=True)
    src.unlink()
    assert str(pydicom.dcmread(dst, stop_before_pixels=True).file_meta.TransferSyntaxUID) == syntax
    return dst
