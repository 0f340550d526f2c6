"""The listener's header scanner against pydicom: same fields for every kind of input."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from covidct.synthetic import SeriesSpec, make_study
from ingest.header import scan
from ingest.records import UnreadableDatasetError, read_header
from ingest.spool import InvalidUIDError
from tests.conftest import need_tool
from tests.factories import SYNTAXES, in_syntax, to_bytes

pytestmark = pytest.mark.unit


def split(data: bytes) -> tuple[int, str]:
    """Offset of the dataset after the file meta, and the transfer syntax."""
    meta_end = 144 + int.from_bytes(data[140:144], "little")
    syntax = str(pydicom.dcmread(pydicom.filebase.DicomBytesIO(data)).file_meta.TransferSyntaxUID)
    return meta_end, syntax


def both(data: bytes) -> tuple[object, object]:
    offset, syntax = split(data)
    return read_header(data), read_header(data, dataset_offset=offset, transfer_syntax=syntax)


def axial() -> Dataset:
    return make_study([SeriesSpec(slices=1)], seed=7)[0]


@pytest.mark.parametrize("syntax", sorted(SYNTAXES))
def test_every_transfer_syntax(syntax: str, tmp_path: Path) -> None:
    if SYNTAXES[syntax][0].startswith("dcmtk"):
        need_tool(SYNTAXES[syntax][1])
    data = in_syntax(axial(), syntax, tmp_path).read_bytes()
    slow, fast = both(data)
    assert fast == slow
    offset, _ = split(data)
    scanned = scan(data[offset:], syntax)
    if syntax in ("1.2.840.10008.1.2.1.99",):
        assert scanned is None  # deflated: pydicom reads it
    else:
        assert scanned is not None and scanned["study_uid"] == slow.study_uid


@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",
        "MR_small.dcm",
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_RLE.dcm",
        "JPEG2000.dcm",
        "UN_sequence.dcm",
        "nested_priv_SQ.dcm",
        "image_dfl.dcm",
        "rtdose.dcm",
        "test-SR.dcm",
        "empty_charset_LEI.dcm",
    ],
)
def test_pydicom_example_files(name: str) -> None:
    """Same header, or the same refusal (some of these files have no UIDs)."""
    data = Path(get_testdata_file(name)).read_bytes()
    offset, syntax = split(data)
    outcomes = []
    for kwargs in ({}, {"dataset_offset": offset, "transfer_syntax": syntax}):
        try:
            outcomes.append(read_header(data, **kwargs))
        except (InvalidUIDError, UnreadableDatasetError) as exc:
            outcomes.append((type(exc), str(exc)))
    assert outcomes[0] == outcomes[1]


def test_sequences_of_undefined_length_and_character_sets() -> None:
    ds = axial()
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    item.ReferencedSOPInstanceUID = "1.2.3.4"
    inner = Dataset()
    inner.CodeValue, inner.CodingSchemeDesignator, inner.CodeMeaning = "1", "99X", "x"
    item.PurposeOfReferenceCodeSequence = Sequence([inner])
    ds.ReferencedImageSequence = Sequence([item, item])  # (0008,1140): before the UIDs
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Müller^Jürgen"
    ds.StudyDescription = "Thorax nativ <b>"
    slow, fast = both(to_bytes(ds))
    assert fast == slow and fast.patient_name == "Müller^Jürgen"
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Ωμέγα^Ἀλφα"
    slow, fast = both(to_bytes(ds))
    assert fast == slow and fast.patient_name == "Ωμέγα^Ἀλφα"


def test_unusual_inputs_fall_back_to_pydicom() -> None:
    ds = axial()
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]  # code extensions: not scanned
    data = to_bytes(ds)
    offset, syntax = split(data)
    assert scan(data[offset:], syntax) is None
    assert both(data)[0] == both(data)[1]
    good = to_bytes(axial())
    offset, syntax = split(good)
    assert scan(good[offset : offset + 200], syntax) is None  # truncated inside an element
    assert scan(b"garbage" * 30, syntax) is None
    # a long-VR element header cut after 10 of its 12 bytes
    assert scan(b"\x08\x00\x05\x00OB\x00\x00\x10\x00", syntax) is None


def test_scanner_never_raises_on_damaged_bytes() -> None:
    """Truncated or corrupted datasets: the scanner answers or hands over, never raises."""
    import numpy as np

    data = to_bytes(axial())
    offset, syntax = split(data)
    body = bytearray(data[offset : offset + 4000])
    rng = np.random.default_rng(0)
    for _ in range(400):
        damaged = bytearray(body)
        for i in rng.integers(0, len(damaged), size=int(rng.integers(1, 6))):
            damaged[i] = int(rng.integers(0, 256))
        cut = int(rng.integers(0, len(damaged)))
        for candidate in (bytes(damaged), bytes(damaged[:cut])):
            for explicit in (syntax, "1.2.840.10008.1.2"):
                result = scan(candidate, explicit)
                assert result is None or isinstance(result.get("study_uid"), str)
