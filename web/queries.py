"""Reading the results store for the dashboard and the API (one place, same answers)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time
from typing import Any

from sqlalchemy import case, func, or_, select
from sqlalchemy.orm import Session

from classifier.aggregate import key_slice_indices
from classifier.quantify import zone_at
from core.models import Delivery, Prediction, Report, Study, StudyState, Upload
from web.reviews import study_reviews

PAGE_SIZE = 25
STATES = [s.value for s in StudyState]
VERDICTS = ["Present", "Indeterminate", "Absent"]
SORTS = {"newest": "newest first", "positive": "positive first"}


@dataclass
class Filters:
    state: str = ""
    verdict: str = ""
    date_from: date | None = None
    date_to: date | None = None
    q: str = ""
    sort: str = "newest"
    page: int = 1

    @classmethod
    def from_args(cls, args: Any) -> Filters:
        def day(name: str) -> date | None:
            try:
                return date.fromisoformat(args.get(name, "")) if args.get(name) else None
            except ValueError:
                return None

        try:
            page = min(MAX_PAGE, max(1, int(args.get("page", 1))))
        except ValueError:
            page = 1
        return cls(
            state=args.get("state", "") if args.get("state", "") in STATES else "",
            verdict=args.get("verdict", "") if args.get("verdict", "") in VERDICTS else "",
            date_from=day("from"),
            date_to=day("to"),
            q=args.get("q", "").strip()[:64],
            sort=args.get("sort", "newest") if args.get("sort") in SORTS else "newest",
            page=page,
        )

    def as_args(self, **override: Any) -> dict[str, Any]:
        out = {
            "state": self.state,
            "verdict": self.verdict,
            "q": self.q,
            "sort": self.sort,
            "from": self.date_from.isoformat() if self.date_from else "",
            "to": self.date_to.isoformat() if self.date_to else "",
            "page": self.page,
        }
        out.update(override)
        return {k: v for k, v in out.items() if v not in ("", None)}


MAX_PAGE = 1_000_000  # ?page= is clamped to this: an offset the database can take

STATE_WORDS = {
    "receiving": "receiving",
    "queued": "queued",
    "processing": "being analysed",
    "done": "done",
    "not_analysable": "not analysable",
    "failed": "failed",
}


def state_words(state: str) -> str:
    return STATE_WORDS.get(state, state)


def dicom_date(value: str) -> str:
    """``20261206`` -> ``2026-12-06``; anything else as it is."""
    if len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return value


def utc_text(iso: str) -> str:
    """``2026-12-06T23:41:05+00:00`` -> ``2026-12-06 23:41 UTC`` (the page's script shows it
    in the browser's time zone)."""
    try:
        when = datetime.fromisoformat(iso)
    except ValueError:
        return iso
    return when.strftime("%Y-%m-%d %H:%M UTC")


def report_state(session: Session, study_id: int) -> str:
    """none | stored | pending | delivered | failed | partial | cancelled, over the latest
    report's deliveries (cancelled ones count only when every one is)."""
    report = session.scalar(
        select(Report)
        .where(Report.study_id == study_id)
        .order_by(Report.generation.desc(), Report.id.desc())
        .limit(1)
    )
    if report is None:
        return "none"
    states = set(
        session.scalars(
            select(Delivery.state).where(Delivery.report_id == report.id, Delivery.event == "")
        )
    )
    if states and states <= {"cancelled"}:
        return "cancelled"
    states.discard("cancelled")  # taken out by an admin: the others tell the state
    if not states:
        return "stored"
    if states == {"delivered"}:
        return "delivered"
    if "failed" in states:
        return "failed" if states == {"failed"} else "partial"
    return "pending"


def list_studies(
    session: Session, f: Filters, page_size: int = PAGE_SIZE
) -> tuple[list[dict], int]:
    query = select(Study)
    if f.state:
        query = query.where(Study.state == f.state)
    if f.verdict:
        query = query.where(Study.verdict == f.verdict)
    if f.date_from:
        query = query.where(Study.received_at >= datetime.combine(f.date_from, time.min))
    if f.date_to:
        query = query.where(Study.received_at <= datetime.combine(f.date_to, time.max))
    if f.q:
        like = f"%{f.q}%"
        query = query.where(or_(Study.patient_id.ilike(like), Study.accession_number.ilike(like)))
    total = int(session.scalar(select(func.count()).select_from(query.subquery())) or 0)
    if f.sort == "positive":
        rank = case((Study.verdict == "Present", 0), (Study.verdict == "Indeterminate", 1), else_=2)
        query = query.order_by(
            rank, Study.probability.desc().nulls_last(), Study.received_at.desc()
        )
    else:
        query = query.order_by(Study.received_at.desc(), Study.id.desc())
    rows = session.scalars(query.offset((f.page - 1) * page_size).limit(page_size)).all()
    return [study_dict(session, st) for st in rows], total


def study_dict(session: Session, st: Study) -> dict[str, Any]:
    return {
        "id": st.id,
        "study_instance_uid": st.study_instance_uid,
        "patient_id": st.patient_id,
        "patient_name": st.patient_name.replace("^", " ").strip(),
        "accession_number": st.accession_number,
        "study_date": st.study_date,
        "study_description": st.study_description,
        "modality": st.modality,
        "instance_count": st.instance_count,
        "received_at": st.received_at.isoformat(timespec="seconds"),
        "state": st.state,
        "state_reason": st.state_reason,
        "incomplete_reason": st.incomplete_reason,
        "slices_analysed": st.slices_analysed,
        "verdict": st.verdict,
        "probability": st.probability,
        "model_version": st.model_version,
        "report_state": report_state(session, st.id),
        "measurements": measurement_summary(st.quantification),
    }


def measurement_summary(q: dict[str, Any] | None) -> dict[str, Any] | None:
    """The lung measurements the worklist and the API lead with (None before analysis)."""
    if not q:
        return None
    total = q.get("lungs", {}).get("total", {})
    # measurements stored before the gate existed passed no gate: they count as passed
    ok = bool(q.get("lungs_ok", True))
    return {
        "lungs_ok": ok,
        "lung_check": q.get("lung_check", ""),
        "lung_volume_ml": total.get("volume_ml"),
        # the opacity figures stand only on lungs that passed the gate
        "opacity_percent": total.get("opacity_percent") if ok else None,
        "ground_glass_percent": total.get("ggo_percent") if ok else None,
        "consolidation_percent": total.get("consolidation_percent") if ok else None,
        "severity_score": q.get("severity_score") if ok else None,
        "severity_max": q.get("severity_max"),
        "pattern": q.get("pattern") if ok else None,
        "basis": q.get("basis", ""),
    }


OBJECT_NAMES = {"sr": "SR", "sc": "key images", "ko": "key object selection"}


def key_slices(slices: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The study's key slices (:func:`classifier.aggregate.key_slice_indices`), the same the
    worker sends to the PACS as key images."""
    picked = key_slice_indices([s["position"] for s in slices], [s["probability"] for s in slices])
    return [slices[i] for i in picked]


def study_detail(session: Session, uid: str) -> dict[str, Any] | None:
    st = session.scalar(select(Study).where(Study.study_instance_uid == uid))
    if st is None:
        return None
    out = study_dict(session, st)
    # the full measurements, without server paths
    out["quantification"] = (
        {k: v for k, v in st.quantification.items() if k != "overlay"}
        if st.quantification
        else None
    )
    study_pred = session.scalar(
        select(Prediction)
        .where(Prediction.study_id == st.id, Prediction.kind == "study")
        .order_by(Prediction.generation.desc(), Prediction.id.desc())
        .limit(1)
    )
    out["threshold"] = study_pred.threshold if study_pred else None
    generation = study_pred.generation if study_pred else None
    slices = []
    if study_pred is not None:
        for p in session.scalars(
            select(Prediction)
            .where(
                Prediction.study_id == st.id,
                Prediction.kind == "slice",
                Prediction.generation == generation,
                Prediction.model_version == study_pred.model_version,
            )
            .order_by(Prediction.position)
        ):
            slices.append(
                {
                    "id": p.id,
                    "position": p.position,
                    "frame": p.frame,
                    "probability": p.probability,
                    "skipped": p.skipped_reason,
                }
            )
    out["slices"] = slices
    q = st.quantification or {}
    for s in slices:
        s["zone"] = zone_at(q, s["position"]) if s["position"] is not None else ""
    out["top_slices"] = key_slices(slices)
    out["reviews"] = study_reviews(session, st.id)
    reports = []
    for r in session.scalars(
        select(Report).where(Report.study_id == st.id).order_by(Report.generation.desc())
    ):
        deliveries = [
            {
                "id": d.id,
                "destination": d.destination,
                "state": d.state,
                "attempts": d.attempts,
                "interrupted": d.interrupted,
                "last_error": d.last_error,
                "objects": (
                    [f"notification of {d.event.replace('_', ' ')}"]
                    if d.event
                    else [OBJECT_NAMES.get(k, k) for k in d.objects.split(",")]
                ),
                "delivered_at": d.delivered_at.isoformat(timespec="seconds")
                if d.delivered_at
                else None,
            }
            for d in session.scalars(select(Delivery).where(Delivery.report_id == r.id))
        ]
        reports.append(
            {
                "id": r.id,
                "sop_instance_uid": r.sop_instance_uid,
                "generation": r.generation,
                "model_version": r.model_version,
                "predecessor_uid": r.predecessor_uid,
                "key_images": sum(o.kind == "sc" for o in r.objects),
                "deliveries": deliveries,
            }
        )
    out["reports"] = reports
    return out


def upload_dict(up: Upload, threshold: float | None = None) -> dict[str, Any]:
    return {
        "threshold": threshold,
        "id": up.id,
        "filename": up.filename,
        "state": up.state,
        "reason": up.state_reason,
        "probability": up.probability,
        "label": up.label,
        "model_version": up.model_version,
        "width": up.width,
        "height": up.height,
        "size_bytes": up.size_bytes,
        "created_at": up.created_at.isoformat(timespec="seconds"),
    }


def visible_uploads(owner: int | None) -> Any:
    """The uploads a user may see: their own, or every one (``owner`` None: an admin, or a
    site that shares uploads)."""
    query = select(Upload)
    return query if owner is None else query.where(Upload.user_id == owner)


def list_uploads(
    session: Session, owner: int | None = None, limit: int = 100
) -> list[dict[str, Any]]:
    rows = session.scalars(visible_uploads(owner).order_by(Upload.id.desc()).limit(limit)).all()
    return uploads_with_thresholds(session, list(rows))


def uploads_with_thresholds(session: Session, rows: list[Upload]) -> list[dict[str, Any]]:
    """Each upload with the threshold its score was called against (None before)."""
    thresholds = dict(
        session.execute(
            select(Prediction.upload_id, Prediction.threshold).where(
                Prediction.kind == "upload", Prediction.upload_id.in_([u.id for u in rows])
            )
        ).all()
    )
    return [upload_dict(u, thresholds.get(u.id)) for u in rows]
