"""The few header fields the listener needs, read straight from the received bytes.

pydicom builds a full ``Dataset`` to answer "which study, series and instance is this": about
1 ms of CPU per instance, a sixth of what the listener spends per C-STORE.  For the transfer
syntaxes that encode the dataset in little endian (all but deflate and big endian) this module
walks the top-level elements up to SeriesInstanceUID (0020,000E) with ``struct``, skipping
sequences of either length: 48 µs against 745 µs for pydicom (medians, a synthetic CT slice).
Anything it does not fully understand (another syntax, a character set other than
ASCII/Latin-1/UTF-8, a truncated element, a UID missing) returns None and the caller uses
pydicom.
"""

from __future__ import annotations

from struct import error as StructError
from struct import unpack_from

IMPLICIT_VR_LE = "1.2.840.10008.1.2"
NOT_SCANNED = {"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2"}  # deflated, big endian

SPECIFIC_CHARACTER_SET = 0x00080005
FIELDS = {
    0x00080016: "sop_class_uid",
    0x00080018: "sop_uid",
    0x00080020: "study_date",
    0x00080050: "accession_number",
    0x00080060: "modality",
    0x00081030: "study_description",
    0x00100010: "patient_name",
    0x00100020: "patient_id",
    0x0020000D: "study_uid",
    0x0020000E: "series_uid",
}
REQUIRED = ("sop_class_uid", "sop_uid", "study_uid", "series_uid")
LAST = 0x0020000E
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
UNDEFINED = 0xFFFFFFFF
LONG_VRS = {
    b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"
}  # fmt: skip
CHARSETS = {"": "ascii", "ISO_IR 6": "ascii", "ISO_IR 100": "latin-1", "ISO_IR 192": "utf-8"}


class _Unusual(Exception):
    """Bytes this scanner does not handle: let pydicom read them."""


def scan(dataset: bytes | memoryview, transfer_syntax: str) -> dict[str, str] | None:
    """The fields of :data:`FIELDS` as text, or None when pydicom must read the dataset."""
    if transfer_syntax in NOT_SCANNED:
        return None
    raw: dict[int, bytes] = {}
    try:
        _walk(memoryview(dataset), 0, transfer_syntax != IMPLICIT_VR_LE, 0, raw)
        charset = raw.get(SPECIFIC_CHARACTER_SET, b"").decode("ascii").strip("\0 ")
        encoding = CHARSETS[charset]  # a KeyError (code extensions, other sets): pydicom
        out = {
            name: raw[tag].decode(encoding).replace("\0", "").strip()
            for tag, name in FIELDS.items()
            if tag in raw
        }
    except (_Unusual, KeyError, UnicodeDecodeError, IndexError, ValueError, StructError):
        return None
    if not all(out.get(name) for name in REQUIRED):
        return None
    return out


def _walk(buf: memoryview, pos: int, explicit: bool, stop: int, out: dict[int, bytes]) -> int:
    """Elements from ``pos`` until the ``stop`` delimiter (0: the top level, until LAST)."""
    n = len(buf)
    while pos + 8 <= n:
        group, element = unpack_from("<HH", buf, pos)
        tag = group << 16 | element
        if group == 0xFFFE:  # items and delimiters: no VR in either encoding
            length = unpack_from("<I", buf, pos + 4)[0]
            pos += 8
            if tag == stop:
                return pos
            if tag != ITEM or stop != SEQUENCE_END:
                raise _Unusual(f"unexpected delimiter {tag:08X}")
            pos = _walk(buf, pos, explicit, ITEM_END, {}) if length == UNDEFINED else pos + length
            continue
        if stop == 0 and tag > LAST:
            return pos
        nested_explicit = explicit
        if explicit:
            vr = bytes(buf[pos + 4 : pos + 6])
            nested_explicit = vr != b"UN"  # UN of undefined length holds implicit VR items
            if vr in LONG_VRS:
                length = unpack_from("<I", buf, pos + 8)[0]
                pos += 12
            elif vr.isalpha() and vr.isupper():
                length = unpack_from("<H", buf, pos + 6)[0]
                pos += 8
            else:
                raise _Unusual("not an explicit VR")
        else:
            length = unpack_from("<I", buf, pos + 4)[0]
            pos += 8
        if length == UNDEFINED:
            pos = _walk(buf, pos, nested_explicit, SEQUENCE_END, {})
            continue
        if pos + length > n:
            raise _Unusual("element runs past the end")
        if stop == 0 and (tag in FIELDS or tag == SPECIFIC_CHARACTER_SET):
            out[tag] = bytes(buf[pos : pos + length])
        pos += length
    if stop:
        raise _Unusual("sequence runs past the end")
    return pos
