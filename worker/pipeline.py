"""A complete study becomes a verdict and an SR: the stages, wired in one place.

    claim -> select slices -> read + preprocess (streamed; each frame also kept as a small
          HU grid) -> classify in batches -> segment and measure the lungs (3D)
          -> aggregate the CNN over slices inside the lungs -> verdict (CNN + opacity)
          -> store predictions and measurements -> build SR -> outbox rows -> finish

:func:`analyse` is the part without the results store (``covidct evaluate-studies``).

Every step is idempotent: a run that dies is re-run by the sweeper or the broker and produces
the same SR UID; a study that got new instances while it was processed stays queued for the
next generation.  Timings per stage are logged (and returned for the benchmark).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from itertools import groupby
from pathlib import Path

import numpy as np
import pydicom
from sqlalchemy import delete, insert, or_, select, update

from classifier.aggregate import STUDY_RULE, study_probability, study_verdict
from classifier.errors import UnusableInputError
from classifier.inference import Classifier
from classifier.lungs import NoLungs
from classifier.preprocess import DEFAULT_FRAMING, frame_and_grid
from classifier.quantify import Quantification
from core.db import session_scope
from core.models import (
    Delivery,
    Instance,
    Prediction,
    Report,
    Study,
    StudyState,
    utcnow,
)
from core.settings import Settings
from worker.lungs import LungResult, measure_lungs
from worker.prefetch import prefetch
from worker.selection import Selection, SliceRef
from worker.selection import select as select_slices
from worker.sr import Finding, build_sr, lung_measurements

logger = logging.getLogger(__name__)


class StudyBusy(Exception):
    """Another worker holds the study and is alive: try again later."""


@dataclass
class Timings:
    read: float = 0.0
    preprocess: float = 0.0
    inference: float = 0.0
    lungs: float = 0.0
    sr: float = 0.0
    total: float = 0.0
    slices: int = 0
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class Outcome:
    study_id: int
    state: str
    reason: str = ""
    probability: float | None = None
    verdict: str | None = None
    report_id: int | None = None
    timings: Timings = field(default_factory=Timings)


def claim(settings: Settings, study_id: int) -> int | None:
    """Take the study (queued, or processing with a dead worker); return its generation."""
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
            raise StudyBusy(f"study {study.study_instance_uid} is being processed")
        taken = s.execute(
            update(Study)
            .where(
                Study.id == study_id,
                or_(
                    Study.state == StudyState.QUEUED,
                    (Study.state == StudyState.PROCESSING)
                    & (or_(Study.heartbeat_at.is_(None), Study.heartbeat_at <= stale)),
                ),
            )
            .values(
                state=StudyState.PROCESSING,
                started_at=now,
                heartbeat_at=now,
                attempts=Study.attempts + 1,
                state_reason="",
            )
        ).rowcount
        if taken != 1:
            logger.info("study %s is %s: nothing to do", study.study_instance_uid, study.state)
            return None
        return study.generation


def heartbeat(settings: Settings, study_id: int) -> None:
    with session_scope(settings.database_url) as s:
        s.execute(update(Study).where(Study.id == study_id).values(heartbeat_at=utcnow()))


def finish(
    settings: Settings,
    study_id: int,
    generation: int,
    state: StudyState,
    reason: str = "",
    **values: object,
) -> str:
    """Set the final state unless new instances arrived meanwhile (then they win)."""
    with session_scope(settings.database_url) as s:
        done = s.execute(
            update(Study)
            .where(
                Study.id == study_id,
                Study.state == StudyState.PROCESSING,
                Study.generation == generation,
            )
            .values(
                state=state,
                state_reason=reason,
                finished_at=utcnow(),
                processed_generation=generation,
                **values,
            )
        ).rowcount
        if done != 1:
            study = s.get(Study, study_id)
            logger.info(
                "study id %d changed while processed; left %s",
                study_id,
                study.state if study else "missing",
            )
            return str(study.state) if study else "missing"
    return str(state)


Item = tuple[SliceRef, np.ndarray | str, np.ndarray | None]


@dataclass
class _Read:
    """One file read and preprocessed, per frame: (slice, model input or why it was
    skipped, the frame's HU grid for the lung segmentation or None if it was unreadable)."""

    items: list[Item]
    read: float
    preprocess: float


def _read_file(refs: list[SliceRef], header: pydicom.Dataset) -> _Read:
    """Decode and preprocess the frames the selection kept of one file, from the header
    the selection already parsed (its pixel data deferred), then drop the pixel data again
    so that the header kept for the SR stays small.  A file that vanished or cannot be read
    skips its slices."""
    t0 = time.perf_counter()
    try:
        header.PixelData  # noqa: B018 - reads the deferred value: the file I/O of this slice
    except Exception as exc:  # unreadable or vanished file in the spool: skip its slices
        return _Read(
            [(ref, f"unreadable: {exc}", None) for ref in refs], time.perf_counter() - t0, 0.0
        )
    t1 = time.perf_counter()
    items: list[Item] = []
    try:
        for ref in refs:
            try:
                done = frame_and_grid(header, ref.frame, DEFAULT_FRAMING)
                items.append((ref, done.item, done.hu_grid))
            except UnusableInputError as exc:
                items.append((ref, f"unusable: {exc}", None))
    finally:
        del header.PixelData
    return _Read(items, t1 - t0, time.perf_counter() - t1)


def read_ahead(
    slices: list[SliceRef],
    headers: dict[int, pydicom.Dataset],
    t: Timings,
    *,
    threads: int = 1,
    depth: int = 64,
    grids: dict[SliceRef, np.ndarray] | None = None,
    all_read: threading.Event | None = None,
) -> Iterator[Item]:
    """Read and preprocess, in order, on ``threads`` threads while the model runs on the
    previous batch: file I/O, NumPy, Pillow and TensorFlow release the GIL (the JPEG decoders,
    GDCM and pylibjpeg, measured do not: two threads decode no faster than one).  At most
    ``depth`` files are in flight, so memory stays flat whatever the study size.  Frames of
    one multi-frame file are read together, once.

    ``grids`` is filled with each frame's HU grid as soon as its file is read, and
    ``all_read`` set once every file is: the lungs can be segmented while the model still
    works through the last ``depth`` files."""
    groups = [list(g) for _, g in groupby(slices, key=lambda ref: ref.path)]
    pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="read-ahead")
    lock = threading.Lock()
    remaining = [len(groups)]

    def read(group: list[SliceRef]) -> _Read:
        done = _read_file(group, headers[group[0].instance_id])
        if grids is not None:
            grids.update((ref, g) for ref, _, g in done.items if g is not None)
        with lock:
            remaining[0] -= 1
            if remaining[0] == 0 and all_read is not None:
                all_read.set()
        return done

    if not groups and all_read is not None:
        all_read.set()
    try:
        pending: deque[Future[_Read]] = deque(pool.submit(read, g) for g in groups[:depth])
        following = iter(groups[depth:])
        while pending:
            done = pending.popleft().result()
            t.read += done.read
            t.preprocess += done.preprocess
            if (group := next(following, None)) is not None:
                pending.append(pool.submit(read, group))
            yield from done.items
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class Analysis:
    """What the serving path concludes from a study's files, before anything is stored.
    ``reason`` set: not analysable, and why."""

    selection: Selection
    timings: Timings
    reason: str = ""
    analysed: list[SliceRef] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)
    skipped: list[tuple[SliceRef, str]] = field(default_factory=list)
    probability: float | None = None
    top: list[int] = field(default_factory=list)
    verdict: str | None = None
    basis: str = ""
    lungs: LungResult | None = None


def analyse(
    instances: list[tuple[int, str]],
    settings: Settings,
    classifier: Classifier,
    on_batch: Callable[[], None] = lambda: None,
) -> Analysis:
    """Selection, read and preprocessing, inference, lung segmentation and quantification,
    aggregation and the verdict for ``(id, path)`` pairs: the whole serving path without the
    results store or the network (``covidct evaluate-studies`` runs exactly this)."""
    t = Timings()
    t0 = time.perf_counter()
    prefetch(path for _, path in instances)
    selection = select_slices(instances, settings.min_series_slices)
    t.read += time.perf_counter() - t0
    out = Analysis(selection, t)
    if not selection.slices:
        out.reason = selection.reason()
        return out
    batch_refs: list[SliceRef] = []
    batch: list[np.ndarray] = []

    def flush() -> None:
        t1 = time.perf_counter()
        out.probs.extend(float(p) for p in classifier.probabilities(np.stack(batch)))
        t.inference += time.perf_counter() - t1
        out.analysed.extend(batch_refs)
        batch.clear()
        batch_refs.clear()
        on_batch()

    grids: dict[SliceRef, np.ndarray] = {}
    all_read, abandoned = threading.Event(), threading.Event()
    lungs_thread = ThreadPoolExecutor(1, thread_name_prefix="lungs")

    def measure() -> tuple[LungResult, float]:
        # scipy.ndimage releases the GIL: this overlaps the model's last batches
        all_read.wait()
        if abandoned.is_set():
            raise NoLungs("the analysis stopped before every slice was read")
        t1 = time.perf_counter()
        return measure_lungs(grids, selection.headers), time.perf_counter() - t1

    lungs_future = lungs_thread.submit(measure)
    try:
        for ref, item, _ in read_ahead(
            selection.slices,
            selection.headers,
            t,
            threads=settings.read_threads,
            grids=grids,
            all_read=all_read,
        ):
            if isinstance(item, str):
                out.skipped.append((ref, item))
                continue
            batch.append(item)
            batch_refs.append(ref)
            if len(batch) == settings.batch_size:
                flush()
        if batch:
            flush()
        t.slices = len(out.analysed)
        t1 = time.perf_counter()
        try:
            out.lungs, t.lungs = lungs_future.result()
        except NoLungs as exc:
            out.reason = f"no lungs to analyse: {exc}"
        t.extra["lungs_wait"] = time.perf_counter() - t1
    finally:
        if not lungs_future.done():  # the loop failed: do not segment half a series
            abandoned.set()
            all_read.set()
        lungs_thread.shutdown(wait=True)
    if not out.analysed:
        out.reason = "no slice shows enough lung: " + (out.skipped[0][1] if out.skipped else "")
        return out
    if out.lungs is None:
        return out
    lungs = out.lungs
    # the CNN's evidence comes from slices inside the segmented lungs only: a slice framed on
    # stomach or bowel gas, or on the trachea above the apices, is not lung
    kept = [i for i, ref in enumerate(out.analysed) if lungs.lung_fraction(ref) != 0.0]
    if not kept:
        out.reason = "no analysed slice lies inside the segmented lungs"
        return out
    if len(kept) < len(out.analysed):
        outside = sorted(set(range(len(out.analysed))) - set(kept))
        out.skipped.extend((out.analysed[i], "no lung in the 3D segmentation") for i in outside)
        out.analysed = [out.analysed[i] for i in kept]
        out.probs = [out.probs[i] for i in kept]
    out.probability, out.top = study_probability(out.probs)
    out.verdict, out.basis = study_verdict(
        out.probability, classifier.threshold, settings.indeterminate_band, lungs.quantification
    )
    t.slices = len(out.analysed)
    return out


def analyse_study(settings: Settings, study_id: int, classifier: Classifier) -> Outcome:
    """Run the whole pipeline for one study; see the module docstring."""
    started = time.perf_counter()
    generation = claim(settings, study_id)
    if generation is None:
        return Outcome(study_id, "skipped")
    with session_scope(settings.database_url) as s:
        study = s.get(Study, study_id)
        assert study is not None
        study_uid = study.study_instance_uid
        rows = s.execute(
            select(Instance.id, Instance.spool_path).where(Instance.study_id == study_id)
        ).all()
    logger.info(
        "analysing study %s (generation %d, %d instances)", study_uid, generation, len(rows)
    )
    a = analyse(
        [(r[0], r[1]) for r in rows],
        settings,
        classifier,
        on_batch=lambda: heartbeat(settings, study_id),
    )
    t = a.timings
    if a.reason or a.lungs is None or a.probability is None or a.verdict is None:
        reason = a.reason or "not analysable"
        state = finish(
            settings, study_id, generation, StudyState.NOT_ANALYSABLE, reason, slices_analysed=0
        )
        logger.info("study %s not analysable: %s", study_uid, reason)
        return Outcome(study_id, state, reason, timings=t)
    lungs, analysed, probs, skipped = a.lungs, a.analysed, a.probs, a.skipped
    probability, call, top, selection = a.probability, a.verdict, a.top, a.selection
    overlay = settings.reports_dir / study_uid / f"lungs-g{generation}.npz"
    lungs.save_overlay(overlay)
    measured = {
        **lungs.quantification.as_dict(),
        "basis": a.basis,
        "series_instance_uid": lungs.series_uid,
        "overlay": str(overlay),
    }
    t1 = time.perf_counter()
    report_id = _store_results(
        settings,
        study_id,
        generation,
        classifier,
        analysed,
        probs,
        skipped,
        probability,
        call,
        top,
        selection,
        lungs.quantification,
    )
    t.sr += time.perf_counter() - t1
    state = finish(
        settings,
        study_id,
        generation,
        StudyState.DONE,
        "",
        verdict=call,
        probability=probability,
        slices_analysed=len(analysed),
        model_version=classifier.version,
        quantification=measured,
    )
    t.total = time.perf_counter() - started
    logger.info(
        "study %s: %s (p=%.3f, %d slices, %.1f s)",
        study_uid,
        call,
        probability,
        len(analysed),
        t.total,
    )
    return Outcome(study_id, state, "", probability, call, report_id, t)


def _store_results(
    settings: Settings,
    study_id: int,
    generation: int,
    classifier: Classifier,
    analysed: list[SliceRef],
    probs: list[float],
    skipped: list[tuple[SliceRef, str]],
    probability: float,
    call: str,
    top: list[int],
    selection: Selection,
    quantification: Quantification,
) -> int:
    """Predictions, the SR file, the report and its outbox rows, in one transaction."""
    version, threshold = classifier.version, classifier.threshold
    with session_scope(settings.database_url) as s:
        study = s.get(Study, study_id)
        assert study is not None
        s.execute(
            delete(Prediction).where(
                Prediction.study_id == study_id,
                Prediction.generation == generation,
                Prediction.model_version == version,
            )
        )
        rows = [(ref, p, classifier.label(p), "") for ref, p in zip(analysed, probs, strict=True)]
        rows += [(ref, None, "skipped", why[:256]) for ref, why in skipped]
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
                    "threshold": threshold,
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
                probability=probability,
                label=call,
                threshold=threshold,
                model_version=version,
                generation=generation,
            )
        )

        report = s.scalar(
            select(Report).where(
                Report.study_id == study_id,
                Report.model_version == version,
                Report.generation == generation,
            )
        )
        if report is None:
            previous = s.scalar(
                select(Report)
                .where(Report.study_id == study_id)
                .order_by(Report.generation.desc(), Report.id.desc())
                .limit(1)
            )
            predecessor = (
                pydicom.dcmread(previous.path)
                if previous and Path(previous.path).is_file()
                else None
            )
            used = {ref.instance_id for ref in analysed}
            evidence = [selection.headers[i] for i in sorted(used)]
            key = [
                (
                    selection.headers[analysed[i].instance_id],
                    analysed[i].frame + 1
                    if int(selection.headers[analysed[i].instance_id].get("NumberOfFrames", 1) or 1)
                    > 1
                    else None,
                )
                for i in top
            ]
            sr = build_sr(
                evidence,
                key,
                Finding(
                    probability=probability,
                    verdict=call,
                    threshold=threshold,
                    band=settings.indeterminate_band,
                    aggregation=STUDY_RULE,
                    model_version=version,
                    slices_analysed=len(analysed),
                ),
                lung_measurements(quantification),
                generation=generation,
                predecessor=predecessor,
            )
            path = settings.reports_dir / study.study_instance_uid / f"{sr.SOPInstanceUID}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            sr.save_as(path, enforce_file_format=True)
            report = Report(
                study_id=study_id,
                sop_instance_uid=str(sr.SOPInstanceUID),
                series_instance_uid=str(sr.SeriesInstanceUID),
                predecessor_uid=previous.sop_instance_uid if previous else None,
                model_version=version,
                generation=generation,
                path=str(path),
            )
            s.add(report)
            s.flush()
        for dest in settings.destinations:
            exists = s.scalar(
                select(Delivery.id).where(
                    Delivery.report_id == report.id, Delivery.destination == str(dest)
                )
            )
            if exists is None:
                s.add(Delivery(report_id=report.id, destination=str(dest)))
        return report.id
