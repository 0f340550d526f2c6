"""HL7 v2 out: an ORU^R01 per finished study to each ``COVIDCT_HL7_DESTINATIONS``, over MLLP,
through the outbox (the same rows, retries and failed state as reports).

The message is built with the ``hl7`` library's containers (every value escaped by it, never
pasted into a string) when the study is done, so a retry sends the same message and control
ID; the attempt succeeds when the ACK's MSA-1 is AA or CA, and fails with the ACK's code and
text otherwise.  Segments (HL7 2.5.1): MSH; PID (PID-3 patient ID, PID-5 name as received);
OBR (OBR-3 the accession number as filler order number, OBR-4 a local code for the AI
analysis, OBR-7 the study date, OBR-25 P: preliminary, the result is unverified AI output);
ZDS (the Study Instance UID, as IHE Radiology sends it); OBX, all with status P: the call
(CWE), the probability (NM, UCUM 1), the lungs' volume (mL), opacity (%) and severity score
when the lungs passed their checks, and the notice (TX) that it is not a diagnosis.
"""

from __future__ import annotations

import socket
import uuid
from typing import Any

import hl7

from core.models import Study, utcnow
from core.settings import Settings
from worker.errors import DeliveryError

SCHEME = "mllp://"  # how an outbox row names an HL7 destination
START, END = b"\x0b", b"\x1c\r"
MAX_ACK = 1024 * 1024
NOTICE = "AI output for research and triage support; not a diagnosis."
SERVICE = ("COVIDCT", "AI COVID-19 CT triage", "L")


def destination(address: str) -> str:
    return SCHEME + address


def address(destination: str) -> str | None:
    """The host:port an outbox row names, or None when it is not an HL7 destination."""
    return destination.removeprefix(SCHEME) if destination.startswith(SCHEME) else None


def oru_r01(settings: Settings, study: Study) -> str:
    """The ORU^R01 of a finished study (carriage returns between segments)."""
    m = hl7.Message("\r", [])

    def field(*components: object) -> Any:
        return m.create_field(
            [m.create_repetition([m.escape("" if c is None else str(c)) for c in components])]
        )

    def segment(name: str, *fields: object) -> None:
        items = [m.create_field([name])]
        items += [field(*f) if isinstance(f, tuple) else field(f) for f in fields]
        m.append(m.create_segment(items))

    now = utcnow().strftime("%Y%m%d%H%M%S")
    m.append(
        m.create_segment(
            [
                m.create_field(["MSH"]),
                m.create_field(["|"]),
                m.create_field(["^~\\&"]),
                field("COVIDCT"),
                field(settings.ae_title),
                field(""),
                field(""),
                field(now),
                field(""),
                field("ORU", "R01", "ORU_R01"),
                field(uuid.uuid4().hex[:20]),
                field("P"),
                field("2.5.1"),
            ]
        )
    )
    family, _, given = (study.patient_name or "").partition("^")
    segment("PID", "1", "", (study.patient_id, "", "", "", "MR"), "", (family, given.split("^")[0]))
    segment(
        "OBR",
        "1",
        "",
        study.accession_number,
        SERVICE,
        "",
        "",
        study.study_date,
        *([""] * 17),
        "P",
    )
    segment("ZDS", (study.study_instance_uid, "COVIDCT", "Application", "DICOM"))
    one = ("1", "", "UCUM")
    rows: list[tuple[str, tuple[str, str, str], object, tuple[str, str, str] | str]] = [
        ("CWE", ("COVID19", "COVID-19 AI call", "L"), (study.verdict, study.verdict, "L"), ""),
        ("NM", ("COVIDP", "COVID-19 probability", "L"), _number(study.probability), one),
    ]
    q = study.quantification or {}
    total = (q.get("lungs") or {}).get("total") or {}
    if q.get("lungs_ok", True) and total:
        rows += [
            (
                "NM",
                ("LUNGVOL", "Lung volume", "L"),
                _number(total.get("volume_ml")),
                ("mL", "", "UCUM"),
            ),
            (
                "NM",
                ("OPACITY", "Opacity, percent of lung volume", "L"),
                _number(total.get("opacity_percent")),
                ("%", "", "UCUM"),
            ),
            (
                "NM",
                ("SEVERITY", "Severity score (Pan et al.), 0-30", "L"),
                q.get("severity_score"),
                ("{score}", "", "UCUM"),
            ),
        ]
    rows.append(("TX", ("NOTICE", "Notice", "L"), NOTICE, ""))
    for i, (kind, code, value, unit) in enumerate(rows, start=1):
        segment("OBX", str(i), kind, code, "", value, unit, "", "", "", "", "P")
    return str(m) + "\r"


def _number(value: object) -> str:
    return "" if value is None else f"{float(value):.4g}"  # type: ignore[arg-type]


def send(settings: Settings, address: str, message: str) -> None:
    """One MLLP exchange; raise :class:`DeliveryError` unless the ACK accepts it."""
    host, _, port = address.rpartition(":")
    dest = destination(address)
    try:
        with socket.create_connection((host, int(port)), timeout=settings.acse_timeout) as sock:
            sock.settimeout(settings.network_timeout)
            sock.sendall(START + message.encode("utf-8") + END)
            answer = b""
            while END not in answer:
                piece = sock.recv(65536)
                if not piece:
                    raise DeliveryError(f"{dest} closed the connection without an ACK")
                answer += piece
                if len(answer) > MAX_ACK:
                    raise DeliveryError(f"{dest} sent more than {MAX_ACK} bytes")
    except OSError as exc:
        raise DeliveryError(f"{dest}: {exc.__class__.__name__}: {exc}"[:300]) from None
    text = answer[answer.find(START) + 1 : answer.find(END)].decode("utf-8", "replace")
    try:
        msa = hl7.parse(text).segment("MSA")
    except (KeyError, hl7.ParseException, IndexError):
        raise DeliveryError(f"{dest} answered without an MSA segment") from None
    code = str(msa[1])
    if code not in ("AA", "CA"):
        why = str(msa[3]) if len(msa) > 3 else ""
        raise DeliveryError(f"{dest} answered {code}{': ' + why if why else ''}")
