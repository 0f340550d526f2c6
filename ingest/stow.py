"""STOW-RS (PS3.18 10.5): instances POSTed over HTTP take the C-STORE path's checks, durable
spool and records; their study is assembled like any other (complete after the quiet time).

The body is ``multipart/related; type="application/dicom"``, read part by part from the
request stream (:func:`parts`), so memory holds one instance at a time.  Each part gets an
outcome: stored, or failed with the Failure Reason (0008,1197) PS3.18 Table 10.5.3-2 names and
a sentence in Error Comment (0000,0902).  Nothing here knows HTTP: web/dicomweb.py turns the
outcomes into the response.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from core.settings import Settings
from ingest.keep import NotKept, keep
from ingest.part10 import TRANSFER_SYNTAXES
from ingest.records import UnreadableDatasetError, read_header
from ingest.spool import InvalidUIDError

logger = logging.getLogger(__name__)

# Failure Reasons, PS3.18 Table 10.5.3-2 (PS3.4 C-STORE statuses)
OUT_OF_RESOURCES = 0xA700
MISMATCH = 0xA900  # data set does not match SOP class (or the study the URL names)
CANNOT_UNDERSTAND = 0xC000
SOP_CLASS_NOT_SUPPORTED = 0x0122
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122

CHUNK = 1024 * 1024


class BadRequest(ValueError):
    """The request as a whole is wrong (its media type, its multipart framing)."""


@dataclass(frozen=True)
class Outcome:
    sop_class_uid: str
    sop_instance_uid: str
    failure: int | None = None  # None: stored
    reason: str = ""


def boundary_of(content_type: str) -> str:
    """The boundary of a ``multipart/related; type="application/dicom"`` body; raises
    :class:`BadRequest` for any other media type (the caller answers 415)."""
    media, _, params = content_type.partition(";")
    if media.strip().lower() != "multipart/related":
        raise BadRequest(f"the body must be multipart/related, not {media.strip() or 'none'}")
    found = dict(
        (k.lower(), v.strip('"'))
        for k, v in re.findall(r';?\s*([A-Za-z-]+)=("[^"]*"|[^;]*)', ";" + params)
    )
    if found.get("type", "").lower() != "application/dicom":
        raise BadRequest('multipart/related needs type="application/dicom"')
    boundary = found.get("boundary", "")
    if not 1 <= len(boundary) <= 70:
        raise BadRequest("multipart/related without a boundary")
    return boundary


def parts(stream: BinaryIO, boundary: str, limit: int) -> Iterator[tuple[str, bytes]]:
    """(content type, bytes) of each part, read from ``stream``; at most ``limit`` bytes a part.
    Raises :class:`BadRequest` on a body that is not framed as multipart."""
    delimiter = b"\r\n--" + boundary.encode("ascii")
    buf = b"\r\n"  # the first delimiter has no line break before it
    pos = -1
    while pos < 0:  # the preamble, up to the first delimiter
        pos = buf.find(delimiter)
        if pos < 0:
            chunk = stream.read(CHUNK)
            if not chunk:
                raise BadRequest("no part in the multipart body")
            buf = buf[-len(delimiter) :] + chunk
    buf = buf[pos + len(delimiter) :]
    while True:
        while len(buf) < 2:
            chunk = stream.read(CHUNK)
            if not chunk:
                raise BadRequest("the multipart body ends without its closing delimiter")
            buf += chunk
        if buf.startswith(b"--"):
            return  # the close delimiter
        start = 0
        while True:
            end = buf.find(delimiter, start)
            if end >= 0:
                break
            if len(buf) > limit + 64 * 1024:
                raise BadRequest(f"a part is larger than {limit} bytes")
            start = max(0, len(buf) - len(delimiter))
            chunk = stream.read(CHUNK)
            if not chunk:
                raise BadRequest("the multipart body ends inside a part")
            buf += chunk
        part, buf = buf[:end], buf[end + len(delimiter) :]
        head, sep, body = part.partition(b"\r\n\r\n")
        if not sep:
            raise BadRequest("a part without headers")
        if len(body) > limit:
            raise BadRequest(f"a part is larger than {limit} bytes")
        yield _content_type(head), body


def _content_type(head: bytes) -> str:
    for line in head.decode("latin-1").split("\r\n"):
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-type":
            return value.split(";")[0].strip().lower()
    return ""


def store_part(
    settings: Settings, content_type: str, data: bytes, study_uid: str, sender: str
) -> Outcome:
    """Check one part and store it as the listener stores a C-STORE; never raises for the
    part's content (an outcome says what went wrong)."""
    if content_type not in ("application/dicom", ""):
        return Outcome("", "", CANNOT_UNDERSTAND, f"a part of type {content_type}, not DICOM")
    try:
        header = read_header(data)
    except (UnreadableDatasetError, InvalidUIDError) as exc:
        return Outcome("", "", CANNOT_UNDERSTAND, f"not a DICOM Part 10 instance: {exc}")
    cls, uid = header.sop_class_uid, header.sop_uid
    if cls not in settings.sop_classes:
        return Outcome(cls, uid, SOP_CLASS_NOT_SUPPORTED, f"SOP class {cls} is not accepted")
    if header.transfer_syntax_uid not in TRANSFER_SYNTAXES:
        why = f"transfer syntax {header.transfer_syntax_uid} is not accepted"
        return Outcome(cls, uid, TRANSFER_SYNTAX_NOT_SUPPORTED, why)
    if study_uid and header.study_uid != study_uid:
        return Outcome(cls, uid, MISMATCH, "the instance belongs to another study than the URL's")
    try:
        keep(settings, header, data, sender)
    except NotKept as exc:
        if not exc.noted:  # written, not recorded, but noted: the sweeper records it
            return Outcome(cls, uid, OUT_OF_RESOURCES, str(exc))
    return Outcome(cls, uid)


def response(outcomes: list[Outcome]) -> tuple[int, dict[str, object]]:
    """HTTP status and the DICOM JSON answer (PS3.18 10.5.3): 200 all stored, 202 some,
    409 none."""
    stored = [o for o in outcomes if o.failure is None]
    failed = [o for o in outcomes if o.failure is not None]
    body: dict[str, object] = {}
    if stored:
        body["00081199"] = {"vr": "SQ", "Value": [_reference(o) for o in stored]}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": [_reference(o) for o in failed]}
    status = 200 if not failed else 202 if stored else 409
    return status, body


def _reference(o: Outcome) -> dict[str, object]:
    item: dict[str, object] = {}
    if o.sop_class_uid:
        item["00081150"] = {"vr": "UI", "Value": [o.sop_class_uid]}
    if o.sop_instance_uid:
        item["00081155"] = {"vr": "UI", "Value": [o.sop_instance_uid]}
    if o.failure is not None:
        item["00081197"] = {"vr": "US", "Value": [o.failure]}
        item["00000902"] = {"vr": "LO", "Value": [o.reason[:64]]}
    return item
