from __future__ import annotations

import io

import pydicom
import pytest

from covidct.synthetic import SeriesSpec, make_study
from ingest.part10 import file_meta

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("ae", ["", "PACS", "ODD_AE"])
def test_hand_built_meta_reads_back(ae: str) -> None:
    (ds,) = make_study([SeriesSpec(slices=1, rows=16)])[:1]
    body = io.BytesIO()
    ds.save_as(body, enforce_file_format=False, implicit_vr=False, little_endian=True)
    raw = file_meta(ds.SOPClassUID, ds.SOPInstanceUID, "1.2.840.10008.1.2.1", ae)
    got = pydicom.dcmread(io.BytesIO(raw + body.getvalue()))
    meta = got.file_meta
    assert meta.MediaStorageSOPClassUID == ds.SOPClassUID
    assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert meta.FileMetaInformationVersion == b"\x00\x01"
    assert meta.get("SourceApplicationEntityTitle", "") == ae
    assert got.StudyInstanceUID == ds.StudyInstanceUID
    assert got.pixel_array.shape == (16, 16)
    # group length matches what pydicom computes
    assert meta.FileMetaInformationGroupLength == len(raw) - 132 - 12
