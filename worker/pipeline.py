"""A complete study becomes a verdict and an SR: the stages, wired in one place.

    claim -> analyse (worker/analysis.py: select, read, classify, segment and measure the
          lungs, verdict) -> store predictions and measurements -> key images and key object
          selection (worker/evidence.py) -> SR -> outbox rows -> finish

Every step is idempotent: a run that dies is re-run by the sweeper or the broker and produces
the same SR UID; a study that got new instances while it was processed stays queued for the
next generation.  Timings per stage are logged (and returned for the benchmark).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pydicom
from sqlalchemy import delete, insert, select
from sqlalchemy.orm import Session

from classifier.aggregate import STUDY_RULE, key_slice_indices
from classifier.inference import Classifier
from classifier.quantify import zone_at
from core import lifecycle
from core.db import session_scope
from core.models import (
    Instance,
    Prediction,
    Report,
    ReportObject,
    Study,
    StudyState,
    utcnow,
)
from core.settings import Settings
from worker import notify
from worker.analysis import Analysis, Timings, analyse
from worker.delivery import enqueue
from worker.evidence import Caption, KeySlice, build_key_images, build_kos, kos_description
from worker.lease import Claim, Lease, renew_study
from worker.selection import series_parameters
from worker.sr import (
    MANUFACTURER,
    Finding,
    build_sr,
    deterministic_uid,
    device_identity,
    lung_measurements,
)

logger = logging.getLogger(__name__)


class StudyBusy(Exception):
    """Another worker holds the study and is alive: try again in ``retry_in`` seconds, when
    its lease would have lapsed."""

    def __init__(self, message: str, retry_in: float) -> None:
        super().__init__(message)
        self.retry_in = retry_in


@dataclass
class Outcome:
    study_id: int
    state: str
    reason: str = ""
    probability: float | None = None
    verdict: str | None = None
    report_id: int | None = None
    timings: Timings = field(default_factory=Timings)


def claim(settings: Settings, study_id: int) -> Claim | None:
    """Take the study (queued, or processing with a dead worker: no lease renewed for
    ``task_stale_seconds``); None when there is nothing to do."""
    now = utcnow()
    stale = now - timedelta(seconds=settings.task_stale_seconds)
    with session_scope(settings.database_url) as s:
        study = s.get(Study, study_id)
        if study is None:
            logger.warning("study id %d does not exist", study_id)
            return None
        if (
            study.state == StudyState.PROCESSING
            and study.heartbeat_at
            and study.heartbeat_at > stale
        ):
            lapse = (study.heartbeat_at - stale).total_seconds()
            raise StudyBusy(
                f"study {study.study_instance_uid} is being processed", max(0.5, lapse + 0.5)
            )
        taken = lifecycle.claim_study(s, study_id, now, stale)
        if not taken:
            logger.info("study %s is %s: nothing to do", study.study_instance_uid, study.state)
            return None
        s.refresh(study)
        return Claim(study_id, study.generation, study.attempts)


def finish(
    settings: Settings,
    taken: Claim,
    state: StudyState,
    reason: str = "",
    **values: object,
) -> str:
    """Set the final state unless new instances arrived meanwhile (then they win) or
    another worker took the study over."""
    study_id, generation = taken.study_id, taken.generation
    with session_scope(settings.database_url) as s:
        done = lifecycle.finish_study(
            s, study_id, generation, taken.attempt, state, reason, **values
        )
        if done:
            notify.enqueue(s, settings, study_id, str(state))
        else:
            study = s.get(Study, study_id)
            logger.info(
                "study id %d changed while processed; left %s",
                study_id,
                study.state if study else "missing",
            )
            return str(study.state) if study else "missing"
    return str(state)


def analyse_study(settings: Settings, study_id: int, classifier: Classifier) -> Outcome:
    """Run the whole pipeline for one study; see the module docstring."""
    started = time.perf_counter()
    taken = claim(settings, study_id)
    if taken is None:
        return Outcome(study_id, "skipped")
    with Lease(settings, f"study id {study_id}", lambda: renew_study(settings, taken)) as lease:
        outcome = _analyse_claimed(settings, taken, classifier, lease)
    outcome.timings.total = time.perf_counter() - started
    return outcome


def _analyse_claimed(
    settings: Settings, taken: Claim, classifier: Classifier, lease: Lease
) -> Outcome:
    study_id, generation = taken.study_id, taken.generation
    with session_scope(settings.database_url) as s:
        study = s.get(Study, study_id)
        assert study is not None
        study_uid, incomplete = study.study_instance_uid, study.incomplete_reason
        rows = s.execute(
            select(Instance.id, Instance.spool_path).where(Instance.study_id == study_id)
        ).all()
    logger.info(
        "analysing study %s (generation %d, %d instances)", study_uid, generation, len(rows)
    )
    a = analyse([(r[0], r[1]) for r in rows], settings, classifier)
    t = a.timings
    if lease.lost.is_set():
        logger.warning("study %s was taken over by another worker: storing nothing", study_uid)
        return Outcome(study_id, "skipped", "taken over", timings=t)
    if a.reason or a.lungs is None or a.probability is None or a.verdict is None:
        reason = a.reason or "not analysable"
        state = finish(settings, taken, StudyState.NOT_ANALYSABLE, reason, slices_analysed=0)
        logger.info("study %s not analysable: %s", study_uid, reason)
        return Outcome(study_id, state, reason, timings=t)
    lungs, analysed, probability, call = a.lungs, a.analysed, a.probability, a.verdict
    overlay = settings.reports_dir / study_uid / f"lungs-g{generation}.npz"
    lungs.save_overlay(overlay)
    measured = {
        **lungs.quantification.as_dict(),
        "basis": a.basis,
        "series_instance_uid": lungs.series_uid,
        "series": a.selection.chosen.as_dict() if a.selection.chosen else None,
        "passed_over": dict(a.selection.skipped),
        "overlay": str(overlay),
    }
    t1 = time.perf_counter()
    report_id = _store_results(settings, taken, classifier, a, incomplete)
    t.sr += time.perf_counter() - t1
    state = finish(
        settings,
        taken,
        StudyState.DONE,
        "",
        verdict=call,
        probability=probability,
        slices_analysed=len(analysed),
        model_version=classifier.version,
        quantification=measured,
    )
    logger.info("study %s: %s (p=%.3f, %d slices)", study_uid, call, probability, len(analysed))
    return Outcome(study_id, state, "", probability, call, report_id, t)


def _store_results(
    settings: Settings, taken: Claim, classifier: Classifier, a: Analysis, incomplete: str
) -> int:
    """Predictions, the SR file, the report and its outbox rows, in one transaction."""
    with session_scope(settings.database_url) as s:
        _store_predictions(s, taken, classifier, a)
        report_id = _store_report(s, settings, taken, classifier, a, incomplete)
        enqueue(s, report_id, settings.destinations)
        return report_id


def _store_predictions(s: Session, taken: Claim, classifier: Classifier, a: Analysis) -> None:
    """One row per slice (analysed or skipped, with why) and one for the study; a re-run of
    the same generation and model replaces them."""
    assert a.probability is not None and a.verdict is not None
    study_id, generation, version = taken.study_id, taken.generation, classifier.version
    s.execute(
        delete(Prediction).where(
            Prediction.study_id == study_id,
            Prediction.generation == generation,
            Prediction.model_version == version,
        )
    )
    rows = [(ref, p, classifier.label(p), "") for ref, p in zip(a.analysed, a.probs, strict=True)]
    rows += [(ref, None, "skipped", why[:256]) for ref, why in a.skipped]
    s.execute(  # one executemany: a 300-slice study is 300 rows
        insert(Prediction),
        [
            {
                "kind": "slice",
                "study_id": study_id,
                "instance_id": ref.instance_id,
                "frame": ref.frame,
                "position": ref.position,
                "probability": p,
                "label": label,
                "threshold": classifier.threshold,
                "model_version": version,
                "generation": generation,
                "skipped_reason": why,
            }
            for ref, p, label, why in rows
        ],
    )
    s.add(
        Prediction(
            kind="study",
            study_id=study_id,
            probability=a.probability,
            label=a.verdict,
            threshold=classifier.threshold,
            model_version=version,
            generation=generation,
        )
    )


def _store_report(
    s: Session,
    settings: Settings,
    taken: Claim,
    classifier: Classifier,
    a: Analysis,
    incomplete: str,
) -> int:
    """The SR of this generation and model, written once: a re-run finds it and reuses it
    (the same SOP Instance UID goes to the PACS)."""
    assert a.lungs is not None and a.probability is not None and a.verdict is not None
    study_id, generation, version = taken.study_id, taken.generation, classifier.version
    report = s.scalar(
        select(Report).where(
            Report.study_id == study_id,
            Report.model_version == version,
            Report.generation == generation,
        )
    )
    if report is not None:
        return report.id
    study = s.get(Study, study_id)
    assert study is not None
    previous = s.scalar(
        select(Report)
        .where(Report.study_id == study_id)
        .order_by(Report.generation.desc(), Report.id.desc())
        .limit(1)
    )
    predecessor = (
        pydicom.dcmread(previous.path) if previous and Path(previous.path).is_file() else None
    )
    headers, analysed = a.selection.headers, a.analysed
    evidence = [headers[i] for i in sorted({ref.instance_id for ref in analysed})]

    def frame_number(i: int) -> int | None:
        ref = analysed[i]
        frames = int(headers[ref.instance_id].get("NumberOfFrames", 1) or 1)
        return ref.frame + 1 if frames > 1 else None

    key = [(headers[analysed[i].instance_id], frame_number(i)) for i in a.top]
    finding = Finding(
        probability=a.probability,
        verdict=a.verdict,
        threshold=classifier.threshold,
        band=settings.indeterminate_band,
        aggregation=STUDY_RULE,
        model_version=version,
        slices_analysed=len(analysed),
        incomplete=incomplete,
        lungs_ok=a.lungs.quantification.lungs_ok,
        series=series_parameters(a.selection.chosen),
    )
    t0 = time.perf_counter()
    images, kos = key_objects(a, finding, study.study_instance_uid, generation)
    a.timings.extra["key images"] = time.perf_counter() - t0
    sr = build_sr(
        evidence,
        key,
        finding,
        lung_measurements(a.lungs.quantification),
        generation=generation,
        predecessor=predecessor,
        companions=[*images, kos],
    )
    folder = settings.reports_dir / study.study_instance_uid
    report = Report(
        study_id=study_id,
        sop_instance_uid=str(sr.SOPInstanceUID),
        series_instance_uid=str(sr.SeriesInstanceUID),
        predecessor_uid=previous.sop_instance_uid if previous else None,
        model_version=version,
        generation=generation,
        path=str(_save(sr, folder)),
    )
    s.add(report)
    s.flush()
    for kind, ds in [("sc", im) for im in images] + [("ko", kos)]:
        s.add(
            ReportObject(
                report_id=report.id,
                kind=kind,
                sop_class_uid=str(ds.SOPClassUID),
                sop_instance_uid=str(ds.SOPInstanceUID),
                path=str(_save(ds, folder)),
            )
        )
    return report.id


def _save(ds: pydicom.Dataset, folder: Path) -> Path:
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def key_objects(
    a: Analysis, finding: Finding, study_uid: str, generation: int
) -> tuple[list[pydicom.Dataset], pydicom.Dataset]:
    """The key images of the study's key slices and the key object selection flagging
    them (:mod:`worker.evidence`)."""
    assert a.lungs is not None and a.probability is not None and a.verdict is not None
    q = a.lungs.quantification
    stored = q.as_dict()
    picked = key_slice_indices([r.position for r in a.analysed], list(a.probs))
    keys = [
        KeySlice(
            ref=a.analysed[i],
            header=a.selection.headers[a.analysed[i].instance_id],
            probability=a.probs[i],
            zone=zone_at(stored, a.analysed[i].position),
            code=a.lungs.code_at(a.analysed[i]),
        )
        for i in picked
    ]
    version = finding.model_version

    def uid_of(*kind: str) -> str:
        return deterministic_uid(*kind, study_uid, version, str(generation))

    images = build_key_images(
        keys,
        Caption(a.verdict, a.probability, version, q.lungs_ok),
        uid_of,
        MANUFACTURER,
    )
    kos = build_kos(
        keys,
        images,
        uid_of,
        device_identity(version),
        MANUFACTURER,
        kos_description(a.verdict, a.basis),
    )
    return list(images), kos
