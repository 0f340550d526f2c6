"""Radiologists' reads and the service measured against them.

A review is one user's call on one study (``covid``, ``pneumonia``, ``normal`` or
``indeterminate``), whether they agree with the AI, and a comment; it keeps the AI's answer
they saw.  Performance takes, per study, the reviewers' majority call as the reference
(``covid`` is positive, ``pneumonia`` and ``normal`` negative; a tie or only
``indeterminate`` reads leave the study out) and the AI's verdict of the latest review
(Present positive, Absent negative; Indeterminate counted apart, in neither figure).
Sensitivity and specificity carry 95% Wilson intervals.
"""

from __future__ import annotations

import csv
import io
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from classifier.metrics import reliability, wilson
from core import audit
from core.models import Review, Study, User, utcnow

CALLS = ("covid", "pneumonia", "normal", "indeterminate")
POSITIVE, NEGATIVE = {"covid"}, {"pneumonia", "normal"}
MAX_COMMENT = 2000
BOOLEAN_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


class ReviewRejected(ValueError):
    """The review cannot be stored as sent; the message says why (an HTTP 400)."""


@dataclass(frozen=True)
class ReviewInput:
    call: str
    agree: bool
    comment: str

    @classmethod
    def parse(cls, data: Any) -> ReviewInput:
        """From a JSON object or a form: ``call``, ``agree`` (true/false), ``comment``."""
        if not hasattr(data, "get"):
            raise ReviewRejected("send an object with call, agree and comment")
        call = str(data.get("call", "")).strip().lower()
        if call not in CALLS:
            raise ReviewRejected(f"call must be one of {', '.join(CALLS)}")
        agree = data.get("agree")
        if isinstance(agree, str):  # from a form
            agree = BOOLEAN_WORDS.get(agree.strip().lower())
        if not isinstance(agree, bool):
            raise ReviewRejected("agree must be true or false")
        comment = str(data.get("comment", "") or "")
        if len(comment) > MAX_COMMENT:
            raise ReviewRejected(f"comment is limited to {MAX_COMMENT} characters")
        return cls(call, agree, comment)


def save_review(
    session: Session, study: Study, user_id: int, actor: str, given: ReviewInput, remote: str
) -> tuple[Review, bool]:
    """Create or update this user's review of the study; (review, created).  Audited."""
    review = session.scalar(
        select(Review).where(Review.study_id == study.id, Review.user_id == user_id)
    )
    created = review is None
    if review is None:
        review = Review(study_id=study.id, user_id=user_id, created_at=utcnow())
        session.add(review)
    review.call, review.agree, review.comment = given.call, given.agree, given.comment
    review.ai_verdict, review.ai_probability = study.verdict, study.probability
    review.model_version = study.model_version
    review.updated_at = utcnow()
    session.flush()
    audit.record(
        session,
        actor,
        "review.create" if created else "review.update",
        study.study_instance_uid,
        remote=remote,
        call=given.call,
        agree=given.agree,
    )
    return review, created


def review_dict(review: Review, username: str) -> dict[str, Any]:
    return {
        "id": review.id,
        "user": username,
        "call": review.call,
        "agree": review.agree,
        "comment": review.comment,
        "ai_verdict": review.ai_verdict,
        "ai_probability": review.ai_probability,
        "model_version": review.model_version,
        "created_at": review.created_at.isoformat(timespec="seconds"),
        "updated_at": review.updated_at.isoformat(timespec="seconds"),
    }


def study_reviews(session: Session, study_id: int) -> list[dict[str, Any]]:
    rows = session.execute(
        select(Review, User.username)
        .join(User, User.id == Review.user_id)
        .where(Review.study_id == study_id)
        .order_by(Review.updated_at)
    ).all()
    return [review_dict(r, name) for r, name in rows]


def _rows(session: Session) -> list[tuple[Review, str, str]]:
    return [
        (r, name, uid)
        for r, name, uid in session.execute(
            select(Review, User.username, Study.study_instance_uid)
            .join(User, User.id == Review.user_id)
            .join(Study, Study.id == Review.study_id)
            .order_by(Review.study_id, Review.updated_at)
        ).all()
    ]


def reference_call(calls: list[str]) -> str | None:
    """The reviewers' majority: "positive", "negative", or None (a tie, or no decided read)."""
    votes = Counter(
        "positive" if c in POSITIVE else "negative" for c in calls if c in POSITIVE | NEGATIVE
    )
    if not votes or votes["positive"] == votes["negative"]:
        return None
    return votes.most_common(1)[0][0]


def proportion(k: int, n: int) -> dict[str, Any]:
    """k of n, with its 95% Wilson interval (None without cases)."""
    interval = wilson(k, n)
    return {
        "value": k / n if n else None,
        "ci95": list(interval) if interval else None,
        "k": k,
        "n": n,
    }


def _figures(cases: list[tuple[str, str, float | None]]) -> dict[str, Any]:
    """cases: (reference, AI verdict, AI probability) per study."""
    table: dict[str, Counter[str]] = {"positive": Counter(), "negative": Counter()}
    for ref, verdict, _ in cases:
        table[ref][verdict or "none"] += 1
    tp, fn = table["positive"]["Present"], table["positive"]["Absent"]
    tn, fp = table["negative"]["Absent"], table["negative"]["Present"]

    scored = [(1.0 if ref == "positive" else 0.0, p) for ref, _, p in cases if p is not None]
    return {
        "studies": len(cases),
        "sensitivity": proportion(tp, tp + fn),
        "specificity": proportion(tn, tn + fp),
        "indeterminate": sum(table[r]["Indeterminate"] for r in table),
        "confusion": {ref: dict(counts) for ref, counts in table.items()},
        "reliability": [
            {"predicted": p, "observed": o, "count": n}
            for p, o, n in reliability([y for y, _ in scored], [p for _, p in scored], bins=5)
        ]
        if scored
        else [],
    }


def performance(session: Session) -> dict[str, Any]:
    """Agreement, and the AI's sensitivity and specificity against the reviewers' reference,
    overall, per model version and per month of the latest review."""
    rows = _rows(session)
    by_study: dict[str, list[tuple[Review, str]]] = defaultdict(list)
    for review, name, uid in rows:
        by_study[uid].append((review, name))
    cases: list[tuple[str, str, float | None, str, str]] = []
    excluded = 0
    for reviews in by_study.values():
        ref = reference_call([r.call for r, _ in reviews])
        if ref is None:
            excluded += 1
            continue
        latest = max((r for r, _ in reviews), key=lambda r: r.updated_at)
        cases.append(
            (
                ref,
                latest.ai_verdict or "none",
                latest.ai_probability,
                latest.model_version or "unknown",
                latest.updated_at.strftime("%Y-%m"),
            )
        )
    agree = sum(r.agree for r, _, _ in rows)
    out: dict[str, Any] = {
        "reviews": len(rows),
        "reviewed_studies": len(by_study),
        "without_reference": excluded,
        "agreement": proportion(agree, len(rows)),
        "overall": _figures([c[:3] for c in cases]),
        "per_model": {},
        "per_month": {},
    }
    for key, index in (("per_model", 3), ("per_month", 4)):
        groups: dict[str, list[tuple[str, str, float | None]]] = defaultdict(list)
        for c in cases:
            groups[c[index]].append(c[:3])
        out[key] = {k: _figures(v) for k, v in sorted(groups.items())}
    return out


CSV_FIELDS = (
    "study_instance_uid",
    "user",
    "call",
    "agree",
    "comment",
    "ai_verdict",
    "ai_probability",
    "model_version",
    "created_at",
    "updated_at",
)


def reviews_csv(session: Session) -> str:
    """Every review, one row each (no patient names: the study is named by its UID)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for review, name, uid in _rows(session):
        row = review_dict(review, name)
        row["comment"] = _csv_safe(row["comment"])
        writer.writerow({"study_instance_uid": uid, **{k: row[k] for k in CSV_FIELDS[1:]}})
    return buf.getvalue()


def _csv_safe(text: str) -> str:
    """A comment that a spreadsheet would run as a formula starts with a quote instead."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text
