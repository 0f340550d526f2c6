"""A DICOM Part 10 file header (preamble and file meta), encoded by hand.

pydicom's general encoder took about 4 ms per instance for these eight elements (yappi CPU
profile of the SCP, so an upper bound); the SCP writes a hundred or more instances a second,
so it builds the bytes directly (PS3.10 7.1, explicit VR little endian).
``tests/test_part10.py`` checks the result against pydicom.
"""

from __future__ import annotations

import struct

from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

# the transfer syntaxes the listener and STOW-RS accept (docs/conformance.md, section 3)
TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (8-bit)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (12-bit)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
]

IMPLEMENTATION_VERSION = "COVIDCT_01"
_PREAMBLE = b"\x00" * 128 + b"DICM"


def _pad(value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def _short(element: int, vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH", 0x0002, element) + vr + struct.pack("<H", len(value)) + value


def file_meta(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, source_ae: str = ""
) -> bytes:
    """Preamble, 'DICM' and the File Meta Information group, ready to prefix a dataset."""
    body = b"".join(
        [
            struct.pack("<HH", 0x0002, 0x0001) + b"OB\x00\x00" + struct.pack("<I", 2) + b"\x00\x01",
            _short(0x0002, b"UI", _pad(sop_class_uid, b"\x00")),
            _short(0x0003, b"UI", _pad(sop_instance_uid, b"\x00")),
            _short(0x0010, b"UI", _pad(transfer_syntax_uid, b"\x00")),
            _short(0x0012, b"UI", _pad(str(PYDICOM_IMPLEMENTATION_UID), b"\x00")),
            _short(0x0013, b"SH", _pad(IMPLEMENTATION_VERSION, b" ")),
        ]
        + ([_short(0x0016, b"AE", _pad(source_ae.strip()[:16], b" "))] if source_ae.strip() else [])
    )
    length = struct.pack("<HH", 0x0002, 0x0000) + b"UL" + struct.pack("<HI", 4, len(body))
    return _PREAMBLE + length + body
