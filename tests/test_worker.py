"""The worker with a real Redis, a real Celery worker and a pynetdicom SCP as the PACS."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import JPEGLSLossless, RLELossless
from sqlalchemy import func, select, update

from core.db import session_scope, upgrade
from core.models import Delivery, Prediction, Report, ReportObject, Study, StudyState, Upload
from core.settings import Settings, load_settings
from covidct.synthetic import SeriesSpec, make_study
from covidct.testbed import TestPACS, launched, spool_study
from ingest.sweeper import Sweeper
from tests.conftest import REDIS_HOST, REDIS_PORT, free_port, need_tool
from tests.factories import SYNTAXES, enhanced_ct, in_syntax, to_bytes
from tests.helpers import make_tiny_model
from tests.sr_reading import read_finding
from worker.app import QUEUES, STUDY_TASK, UPLOAD_TASK, publish

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent


def wait_for(check: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def pacs() -> Iterator[TestPACS]:
    p = TestPACS()
    yield p
    p.stop()


def make_settings(tmp_path: Path, redis_db: int, destinations: str, **extra: str) -> Settings:
    model = make_tiny_model(tmp_path / "model" / "tiny.keras")
    settings = load_settings(
        {
            "COVIDCT_DATA_DIR": str(tmp_path / "var"),
            "COVIDCT_BROKER_URL": f"redis://{REDIS_HOST}:{REDIS_PORT}/{redis_db}",
            "COVIDCT_MODEL_PATH": str(model),
            "COVIDCT_DESTINATIONS": destinations,
            "COVIDCT_MIN_SERIES_SLICES": "5",
            "COVIDCT_SR_RETRY_BASE_SECONDS": "0.2",
            "COVIDCT_SR_MAX_ATTEMPTS": "20",
        }
        | extra
    )
    upgrade(settings.database_url)
    return settings


def running_worker(app):  # type: ignore[no-untyped-def]
    """A real Celery worker thread (celery's test helper) on every queue of the app."""
    from celery.contrib.testing.worker import start_worker

    return start_worker(
        app, pool="solo", perform_ping_check=False, shutdown_timeout=30, queues=list(QUEUES)
    )


@pytest.fixture
def celery_setup(tmp_path: Path, redis_db: int, pacs: TestPACS) -> Iterator[tuple]:
    from worker.tasks import create_app

    settings = make_settings(tmp_path, redis_db, pacs.destination)
    app = create_app(settings)
    with running_worker(app):
        yield settings, app, pacs


def study_row(settings: Settings, study_id: int) -> Study:
    with session_scope(settings.database_url) as s:
        study = s.get(Study, study_id)
        assert study is not None
        return study


def dciodvfy_errors(path: Path) -> list[str]:
    out = subprocess.run([need_tool("dciodvfy"), str(path)], capture_output=True, text=True)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def test_study_to_validated_sr_in_the_pacs(celery_setup: tuple) -> None:
    settings, app, pacs = celery_setup
    study = make_study(
        [SeriesSpec(slices=24), SeriesSpec(kind="localizer"), SeriesSpec(slices=8, kind="derived")],
        patient_name="<script>x</script>",
    )
    study_id = spool_study(settings, study)
    publish(app, STUDY_TASK, study_id)
    wait_for(lambda: len(pacs.reports) == 1, what="the SR at the PACS")

    def delivered() -> bool:  # the PACS answers before the worker commits its outcome
        with session_scope(settings.database_url) as s:
            return s.scalar(select(Delivery.state)) == "delivered"

    wait_for(delivered, what="the delivery recorded")
    row = study_row(settings, study_id)
    # the drawn chest's apex and base slices hold too little lung to frame
    assert row.state == StudyState.DONE and 10 <= row.slices_analysed < 24
    sr = pacs.reports[0]
    assert sr.StudyInstanceUID == study[0].StudyInstanceUID
    assert sr.SeriesDescription == "AI OUTPUT - NOT FOR DIAGNOSTIC USE"
    assert sr.VerificationFlag == "UNVERIFIED"
    probability, verdict, version = read_finding(sr)
    assert probability == pytest.approx(row.probability, abs=1e-6)
    assert verdict == row.verdict and version == "tiny-test-1"
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    # localizer and derived images out
    assert sum(len(s.ReferencedSOPSequence) for s in evidence) == row.slices_analysed
    with session_scope(settings.database_url) as s:
        report = s.scalar(select(Report))
        assert report is not None
        n_slices = s.scalar(
            select(func.count()).select_from(Prediction).where(Prediction.kind == "slice")
        )
        assert n_slices == 24
    saved = Path(report.path)
    assert saved.is_file()
    assert dciodvfy_errors(saved) == []
    assert_key_objects(settings, pacs, sr, row)


def assert_key_objects(settings: Settings, pacs: TestPACS, sr: Any, row: Study) -> None:
    """The key images and the key object selection reached the PACS in the study, each
    clean under dciodvfy and read back by highdicom; the SR names both."""
    from highdicom import Image
    from highdicom.ko import KeyObjectSelectionDocument

    from covidct.testbed import KO, SC

    images, kos = pacs.of_class(SC), pacs.of_class(KO)
    assert 1 <= len(images) <= 4 and len(kos) == 1
    sources = set()
    for im in images:
        assert im.StudyInstanceUID == sr.StudyInstanceUID
        assert im.SeriesInstanceUID not in (sr.SeriesInstanceUID, kos[0].SeriesInstanceUID)
        assert im.BurnedInAnnotation == "YES" and list(im.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert im.PatientName == sr.PatientName  # the HTML stays text, copied as it came
        sources.add(im.SourceImageSequence[0].ReferencedSOPInstanceUID)
        picture = Image.from_dataset(im).get_frame(1)
        assert picture.shape[2] == 3 and picture.shape[0] > 512 - 1  # the slice and its caption
    assert KeyObjectSelectionDocument.from_dataset(kos[0]).SeriesDescription.startswith("AI")
    # the call and why it was made, as the viewer shows them beside the key images
    described = [
        i.TextValue
        for i in kos[0].ContentSequence
        if i.ValueType == "TEXT" and i.ConceptNameCodeSequence[0].CodeValue == "113012"
    ]
    assert len(described) == 1 and described[0].startswith("AI result, not for diagnostic use.")
    assert f"COVID-19 {row.verdict}: " in described[0]
    assert row.quantification and row.quantification["basis"] in described[0]
    with session_scope(settings.database_url) as s:
        objects = s.scalars(select(ReportObject).order_by(ReportObject.id)).all()
        assert sorted(o.kind for o in objects) == ["ko"] + ["sc"] * len(images)
        paths = [Path(o.path) for o in objects]
    for path in paths:
        assert dciodvfy_errors(path) == [], path
    named = {
        item.ReferencedSOPInstanceUID
        for study in sr.PertinentOtherEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert named == {im.SOPInstanceUID for im in images} | {kos[0].SOPInstanceUID}
    # the slices flagged are the key slices behind the pictures, and the pictures
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in kos[0].CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert evidence == sources | {im.SOPInstanceUID for im in images}


def test_running_twice_sends_one_sr(celery_setup: tuple) -> None:
    settings, app, pacs = celery_setup
    study_id = spool_study(settings, make_study([SeriesSpec(slices=10)]))
    publish(app, STUDY_TASK, study_id)
    publish(app, STUDY_TASK, study_id)
    wait_for(lambda: study_row(settings, study_id).state == StudyState.DONE, what="done")
    wait_for(lambda: len(pacs.reports) >= 1, what="SR")
    # a forced re-run of the same generation and model makes the same SR, not a second one
    with session_scope(settings.database_url) as s:
        s.execute(update(Study).where(Study.id == study_id).values(state=StudyState.QUEUED))
    publish(app, STUDY_TASK, study_id)
    wait_for(lambda: study_row(settings, study_id).state == StudyState.DONE, what="re-run")
    with session_scope(settings.database_url) as s:
        assert s.scalar(select(func.count()).select_from(Report)) == 1
        assert s.scalar(select(func.count()).select_from(Delivery)) == 1
        assert (
            s.scalar(select(func.count()).select_from(Prediction).where(Prediction.kind == "study"))
            == 1
        )
    assert len(pacs.reports) == 1


def test_pacs_down_then_up_delivers_after_retries(tmp_path: Path, redis_db: int) -> None:

    from worker.tasks import create_app

    port = free_port()
    settings = make_settings(tmp_path, redis_db, f"PACS@127.0.0.1:{port}")
    app = create_app(settings)
    sweeper = Sweeper(settings, lambda task, obj: publish(app, task, obj))
    with running_worker(app):
        study_id = spool_study(settings, make_study([SeriesSpec(slices=6)]))
        publish(app, STUDY_TASK, study_id)

        def attempts() -> int:
            with session_scope(settings.database_url) as s:
                return int(s.scalar(select(Delivery.attempts)) or 0)

        def sweep_until(check: Callable[[], bool], what: str) -> None:
            def step() -> bool:
                sweeper.sweep_once()
                return check()

            wait_for(step, timeout=60, what=what)

        sweep_until(lambda: attempts() >= 2, "two failed attempts")
        with session_scope(settings.database_url) as s:
            row = s.scalar(select(Delivery))
            assert row is not None and row.state == "pending" and "refused" in row.last_error
        pacs = TestPACS(port=port)
        try:

            def delivered() -> bool:  # the PACS answers before the outcome is committed
                with session_scope(settings.database_url) as s:
                    return s.scalar(select(Delivery.state)) == "delivered"

            sweep_until(
                lambda: len(pacs.reports) == 1 and delivered(), "delivery once the PACS is up"
            )
            with session_scope(settings.database_url) as s:
                row = s.scalar(select(Delivery))
                assert row is not None and row.state == "delivered" and row.attempts >= 3
        finally:
            pacs.stop()


def test_destination_that_stays_down_ends_failed(tmp_path: Path, redis_db: int) -> None:
    from worker.delivery import deliver, resend

    settings = make_settings(
        tmp_path, redis_db, f"PACS@127.0.0.1:{free_port()}", COVIDCT_SR_MAX_ATTEMPTS="2"
    )
    from classifier.inference import Classifier
    from worker.pipeline import analyse_study

    study_id = spool_study(settings, make_study([SeriesSpec(slices=6)]))
    analyse_study(settings, study_id, Classifier(settings.model_path))
    with session_scope(settings.database_url) as s:
        delivery_id = s.scalar(select(Delivery.id))
    assert deliver(settings, delivery_id) == "pending"
    assert deliver(settings, delivery_id) == "failed"
    with session_scope(settings.database_url) as s:
        row = s.get(Delivery, delivery_id)
        assert row is not None and row.last_error and row.attempts == 2
    resend(settings, delivery_id, "admin")
    with session_scope(settings.database_url) as s:
        row = s.get(Delivery, delivery_id)
        assert row is not None and row.state == "pending" and row.attempts == 0


def test_each_destination_gets_the_objects_it_names(tmp_path: Path, redis_db: int) -> None:
    """One PACS takes everything, an archive only the SR and key objects (``?objects=sr+ko``),
    and a PACS that takes no Secondary Capture, sent everything, fails with a reason that says
    how to configure it, while the others are delivered."""
    from covidct.testbed import KO, SC, SR
    from worker.tasks import create_app

    full, archive, picky = TestPACS(), TestPACS("ARCHIVE"), TestPACS("PICKY", accepts=(SR, KO))
    try:
        settings = make_settings(
            tmp_path,
            redis_db,
            f"{full.destination},{archive.destination}?objects=sr+ko,{picky.destination}",
            COVIDCT_SR_MAX_ATTEMPTS="2",
        )
        app = create_app(settings)
        with running_worker(app):
            publish(app, STUDY_TASK, spool_study(settings, make_study([SeriesSpec(slices=10)])))

            def states() -> dict[str, str]:
                with session_scope(settings.database_url) as s:
                    return {d.destination: d.state for d in s.scalars(select(Delivery))}

            sweeper = Sweeper(settings, lambda task, obj: publish(app, task, obj))

            def settled() -> bool:  # the sweeper publishes each retry when it is due
                sweeper.sweep_once()
                return len(states()) == 3 and "pending" not in states().values()

            wait_for(settled, what="every delivery settled")
        assert states() == {
            full.destination: "delivered",
            archive.destination: "delivered",
            picky.destination: "failed",
        }
        n_images = len(full.of_class(SC))
        assert n_images >= 1 and len(full.of_class(KO)) == 1 and len(full.reports) == 1
        assert len(archive.reports) == 1 and len(archive.of_class(KO)) == 1
        assert archive.of_class(SC) == []
        with session_scope(settings.database_url) as s:
            failed = s.scalar(select(Delivery).where(Delivery.state == "failed"))
            assert failed is not None
            assert "does not accept Secondary Capture Image Storage" in failed.last_error
            assert "?objects=" in failed.last_error
            assert failed.objects == "sr,sc,ko"
        assert picky.received == []  # refused before anything was sent: no half delivery
    finally:
        for p in (full, archive, picky):
            p.stop()


def test_an_object_that_fails_dciodvfy_is_not_sent(
    tmp_path: Path, redis_db: int, pacs: TestPACS
) -> None:
    """A key image that lost a Type 1 attribute: dciodvfy finds the error before the
    association, nothing of the report is sent, and the delivery says why."""
    from classifier.inference import Classifier
    from worker.delivery import deliver
    from worker.pipeline import analyse_study

    need_tool("dciodvfy")
    settings = make_settings(tmp_path, redis_db, pacs.destination)
    study_id = spool_study(settings, make_study([SeriesSpec(slices=10)]))
    assert analyse_study(settings, study_id, Classifier(settings.model_path)).state == "done"
    with session_scope(settings.database_url) as s:
        image = s.scalar(select(ReportObject).where(ReportObject.kind == "sc"))
        delivery_id = s.scalar(select(Delivery.id))
        assert image is not None and delivery_id is not None
        path = Path(image.path)
    ds = pydicom.dcmread(path)
    del ds.ConversionType  # Type 1 in the SC Equipment module
    ds.save_as(path, enforce_file_format=True)
    assert deliver(settings, delivery_id) == "pending"
    with session_scope(settings.database_url) as s:
        row = s.get(Delivery, delivery_id)
        assert row is not None and row.attempts == 1
        assert f"{path.name} fails dciodvfy, nothing sent" in row.last_error
        assert "ConversionType" in row.last_error or "Conversion Type" in row.last_error
    assert pacs.received == []


def test_only_localizers_is_not_analysable(celery_setup: tuple) -> None:
    settings, app, pacs = celery_setup
    study_id = spool_study(
        settings, make_study([SeriesSpec(kind="localizer"), SeriesSpec(kind="localizer")])
    )
    publish(app, STUDY_TASK, study_id)
    wait_for(
        lambda: study_row(settings, study_id).state == StudyState.NOT_ANALYSABLE,
        what="not_analysable",
    )
    assert "localizer" in study_row(settings, study_id).state_reason
    assert pacs.received == []


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless])
def test_compressed_study(celery_setup: tuple, syntax: str) -> None:
    settings, app, pacs = celery_setup
    datasets = make_study([SeriesSpec(slices=6)])
    for ds in datasets:
        ds.compress(syntax)
    study_id = spool_study(settings, datasets)
    publish(app, STUDY_TASK, study_id)
    wait_for(lambda: len(pacs.reports) == 1, what="SR")
    assert study_row(settings, study_id).slices_analysed == 6


def test_enhanced_ct_multiframe(celery_setup: tuple) -> None:
    settings, app, pacs = celery_setup
    ds = enhanced_ct(frames=8)
    study_id = spool_study(settings, [ds])
    publish(app, STUDY_TASK, study_id)
    wait_for(lambda: len(pacs.reports) == 1, what="SR")
    row = study_row(settings, study_id)
    assert row.state == StudyState.DONE and row.slices_analysed == 8
    with session_scope(settings.database_url) as s:
        frames = s.scalars(select(Prediction.frame).where(Prediction.kind == "slice")).all()
    assert sorted(frames) == list(range(8))


def test_upload_task(celery_setup: tuple, tmp_path: Path) -> None:
    from PIL import Image

    settings, app, _ = celery_setup
    good, bad = tmp_path / "a.png", tmp_path / "b.png"
    Image.new("L", (64, 64), 220).save(good)
    bad.write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with session_scope(settings.database_url) as s:
        ids = []
        for p in (good, bad):
            up = Upload(
                filename=p.name,
                content_type="image/png",
                sha256="0" * 64,
                size_bytes=p.stat().st_size,
                width=64,
                height=64,
                path=str(p),
            )
            s.add(up)
            s.flush()
            ids.append(up.id)
    for i in ids:
        publish(app, UPLOAD_TASK, i)

    def states() -> list[str]:
        with session_scope(settings.database_url) as s:
            return [s.get(Upload, i).state for i in ids]  # type: ignore[union-attr]

    wait_for(lambda: states() == ["done", "failed"], what="uploads")
    with session_scope(settings.database_url) as s:
        ok, failed = s.get(Upload, ids[0]), s.get(Upload, ids[1])
        assert ok is not None and ok.probability is not None and ok.label
        assert failed is not None and "PNG or JPEG" in failed.state_reason
        from web.queries import list_uploads

        listed = {u["id"]: u for u in list_uploads(s)}
        # the threshold the score was called against, shown beside it
        assert listed[ids[0]]["threshold"] == pytest.approx(0.5, abs=0.5)
        assert listed[ids[1]]["threshold"] is None


def test_worker_killed_mid_task_is_redelivered_and_finished_once(
    tmp_path: Path, redis_db: int, pacs: TestPACS
) -> None:
    """A real `covidct worker` (prefork); its child is SIGKILLed while it analyses a study.
    The lease (default: renewed every 2 s, stale after 10 s) lets the re-delivered task take
    the study over within 15 s of the kill."""
    settings = make_settings(tmp_path, redis_db, pacs.destination, COVIDCT_BATCH_SIZE="4")
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVIDCT_")} | {
        "COVIDCT_DATA_DIR": str(settings.data_dir),
        "COVIDCT_BROKER_URL": settings.broker_url,
        "COVIDCT_MODEL_PATH": str(settings.model_path),
        "COVIDCT_DESTINATIONS": pacs.destination,
        "COVIDCT_MIN_SERIES_SLICES": "5",
        "COVIDCT_BATCH_SIZE": "4",
    }
    study_id = spool_study(settings, make_study([SeriesSpec(slices=120)]))
    with launched(
        [sys.executable, "-m", "covidct.cli", "worker"],
        grace=30,
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    ) as worker:
        from worker.tasks import create_app

        publish(create_app(settings), STUDY_TASK, study_id)
        wait_for(
            lambda: study_row(settings, study_id).state == StudyState.PROCESSING,
            timeout=120,
            what="processing",
        )
        children = subprocess.run(
            ["pgrep", "-P", str(worker.pid)], capture_output=True, text=True
        ).stdout.split()
        assert children, "the prefork child is running"
        for pid in children:
            os.kill(int(pid), signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: study_row(settings, study_id).attempts >= 2, timeout=60, what="takeover")
        takeover = time.monotonic() - killed
        print(f"\nstudy taken over {takeover:.1f} s after its worker was killed")
        assert takeover < 15, f"taken over {takeover:.1f} s after the kill"
        wait_for(
            lambda: study_row(settings, study_id).state == StudyState.DONE,
            timeout=180,
            what="finished after redelivery",
        )
        wait_for(lambda: len(pacs.reports) == 1, what="one SR")
        row = study_row(settings, study_id)
        # the drawn chest's apex and base slices are skipped; the redelivered run stores
        # each slice once
        assert row.attempts >= 2 and 60 <= row.slices_analysed < 120
        with session_scope(settings.database_url) as s:
            assert s.scalar(select(func.count()).select_from(Report)) == 1
            stored = s.scalar(
                select(func.count())
                .select_from(Prediction)
                .where(Prediction.kind == "slice", Prediction.probability.is_not(None))
            )
            assert stored == row.slices_analysed
    assert len(pacs.reports) == 1


def test_sr_for_a_deidentified_study_without_patient_name(tmp_path: Path) -> None:
    """Real de-identified studies omit PatientName; the SR still builds and validates."""
    from worker.sr import Finding, build_sr

    study = make_study([SeriesSpec(slices=3, rows=32)])
    for ds in study:
        del ds.PatientName, ds.PatientBirthDate, ds.ReferringPhysicianName
    sr = build_sr(study, [(study[0], None)], Finding(0.2, "Absent", 0.5, 0.05, "rule", "m", 3))
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert pydicom.dcmread(path).PatientName == ""
    assert dciodvfy_errors(path) == []


@pytest.mark.parametrize("syntax", sorted(SYNTAXES))
def test_read_ahead_keeps_order_and_memory_flat(syntax: str, tmp_path: Path) -> None:
    """One, two or four read threads give the same inputs bit for bit, in the same order, in
    every supported transfer syntax (frames of a multi-frame file included); the headers kept
    for the SR hold no pixel data afterwards."""
    import numpy as np

    from worker.analysis import Timings, read_ahead
    from worker.selection import select as select_slices

    if SYNTAXES[syntax][0] not in ("plain", "pydicom"):
        need_tool(SYNTAXES[syntax][1])
    study = make_study([SeriesSpec(slices=12, rows=128)], seed=4)
    instances = [(i + 1, str(in_syntax(ds, syntax, tmp_path))) for i, ds in enumerate(study)]
    multiframe = tmp_path / "enhanced.dcm"
    multiframe.write_bytes(to_bytes(enhanced_ct(6, 128)))
    instances.append((13, str(multiframe)))
    runs = []
    for threads in (1, 2, 4):
        # a study's selection reads one series: the two are selected apart and read together
        series, frames = select_slices(instances[:12], 5), select_slices(instances[12:], 5)
        slices, headers = series.slices + frames.slices, {**series.headers, **frames.headers}
        assert len(slices) == 18  # 12 slices and 6 frames
        items = list(read_ahead(slices, headers, Timings(), threads=threads))
        runs.append(items)
        assert [ref for ref, _, _ in items] == slices
        assert all("PixelData" not in ds for ds in headers.values())
        assert all(g is not None and g.dtype == np.int16 for _, _, g in items)
        assert sum(isinstance(item, np.ndarray) for _, item, _ in items) >= 12
    for (ref_a, a, grid_a), *others in zip(*runs, strict=True):
        for ref_b, b, grid_b in others:
            assert ref_a == ref_b
            assert (isinstance(a, str) and a == b) or np.array_equal(a, b)
            assert np.array_equal(grid_a, grid_b)


def test_a_slice_whose_jpeg_stream_is_cut_short_is_skipped_with_the_reason(
    tmp_path: Path,
) -> None:
    """A sender lost the end of one slice's JPEG Lossless stream: that slice is skipped and
    says why; the others are read as usual (every decoder would have filled the rows in)."""
    import numpy as np
    from pydicom.encaps import encapsulate, generate_frames

    from worker.analysis import Timings, read_ahead
    from worker.selection import select as select_slices

    need_tool("dcmcjpeg")
    study = make_study([SeriesSpec(slices=12, rows=128)], seed=6)
    paths = [in_syntax(ds, "1.2.840.10008.1.2.4.70", tmp_path) for ds in study]
    cut = pydicom.dcmread(paths[5])
    frame = next(generate_frames(cut.PixelData, number_of_frames=1))
    cut.PixelData = encapsulate([frame[: len(frame) * 2 // 3]])
    cut.save_as(paths[5], enforce_file_format=True)
    chosen = select_slices([(i + 1, str(p)) for i, p in enumerate(paths)], 5)
    items = list(read_ahead(chosen.slices, chosen.headers, Timings()))
    reasons = {str(ref.path): item for ref, item, _ in items if isinstance(item, str)}
    assert "frame 1 is cut short" in reasons.get(str(paths[5]), "")
    assert sum(isinstance(item, np.ndarray) for _, item, _ in items) >= 6
    assert all(
        isinstance(item, np.ndarray) or "cut short" not in item
        for ref, item, _ in items
        if str(ref.path) != str(paths[5])
    )


def test_embedded_broker_keeps_its_files_in_the_data_dir(tmp_path: Path) -> None:
    """kombu's filesystem transport writes its exchange table to ./control by default: a
    service started from the repository left one there.  A fresh process (kombu remembers
    declared exchanges per process) publishes from an empty working directory."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    code = (
        "from core.settings import load_settings\n"
        "from worker.app import STUDY_TASK, make_celery, publish\n"
        f"s = load_settings({{'COVIDCT_DATA_DIR': {str(tmp_path / 'var')!r}}})\n"
        "assert s.broker_is_embedded\n"
        "publish(make_celery(s), STUDY_TASK, 1)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVIDCT_")}
    env["PYTHONPATH"] = str(ROOT)
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert list(cwd.iterdir()) == []
    broker = tmp_path / "var" / "broker"
    assert (broker / "control" / "studies.exchange").is_file()
    assert len(list((broker / "queue").iterdir())) == 1


def _visible_while_written(
    channel_cls: type, monkeypatch: pytest.MonkeyPatch, folder: Path
) -> list:
    """What a consumer listing ``folder`` could pick up while ``channel_cls._put`` writes."""
    import builtins

    from kombu.transport import filesystem

    from worker import fs_transport

    seen: list[list[str]] = []

    class Spy:
        def __init__(self, f: Any) -> None:
            self.f = f

        def write(self, data: bytes) -> int:
            seen.append(sorted(p.name for p in folder.iterdir() if p.name.endswith(".studies.msg")))
            return self.f.write(data)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.f, name)

        def __enter__(self) -> Spy:
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.close()

    def spy_open(*args: Any, **kwargs: Any) -> Spy:
        return Spy(builtins.open(*args, **kwargs))

    for module in (filesystem, fs_transport):
        monkeypatch.setattr(module, "open", spy_open, raising=False)
    monkeypatch.setattr(filesystem, "lock", lambda f, flags: None)
    monkeypatch.setattr(filesystem, "unlock", lambda f: None)
    channel = object.__new__(channel_cls)
    channel.__dict__["data_folder_out"] = str(folder)  # the channel's cached property
    channel._put("studies", {"body": "x"})
    assert len(list(folder.glob("*.studies.msg"))) == 1
    return seen


def test_embedded_broker_messages_appear_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kombu's own channel creates the message file before writing it (a consumer that read
    it then got an empty file and the worker stopped); ours renames it into place whole."""
    from kombu.transport import filesystem

    from worker import fs_transport

    (tmp_path / "kombu").mkdir()
    (tmp_path / "ours").mkdir()
    assert _visible_while_written(filesystem.Channel, monkeypatch, tmp_path / "kombu") != [[]]
    assert _visible_while_written(fs_transport.Channel, monkeypatch, tmp_path / "ours") == [[]]


def test_embedded_broker_wait_ends_when_the_worker_is_asked_to_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Celery's loop for the embedded broker waits 2 s for messages before it looks at a stop
    request; the transport ends the wait as soon as one is made (Ctrl-C was 2-3 s slower)."""
    import threading

    from celery.worker import state

    from worker.app import make_celery

    settings = load_settings({"COVIDCT_DATA_DIR": str(tmp_path / "var")})
    app = make_celery(settings)
    with app.connection_for_read() as conn:
        consumer = conn.SimpleQueue("studies")
        monkeypatch.setattr(state, "should_stop", None)
        timer = threading.Timer(0.3, lambda: setattr(state, "should_stop", 0))
        timer.start()
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            conn.drain_events(timeout=30.0)
        waited = time.monotonic() - started
        consumer.close()
    assert waited < 5.0, f"the wait went on {waited:.1f} s after the stop request"
    # with no stop request, the wait lasts its timeout
    monkeypatch.setattr(state, "should_stop", None)
    with app.connection_for_read() as conn:
        consumer = conn.SimpleQueue("studies")
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            conn.drain_events(timeout=0.6)
        assert time.monotonic() - started >= 0.55
        consumer.close()
