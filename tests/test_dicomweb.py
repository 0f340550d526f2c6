"""STOW-RS into a real `covidct web` (waitress) from a real client (dicomweb-client): the
instances land in the spool and the results store as C-STORE's do, and the sweeper queues
their study; refusals come back per instance with a reason."""

from __future__ import annotations

import copy
import io
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from sqlalchemy import func, select

from core.db import session_scope, upgrade
from core.models import AuditEvent, Instance, Study, StudyState
from core.settings import Settings, load_settings
from covidct.synthetic import SeriesSpec, make_study
from covidct.testbed import free_port, launched
from tests.conftest import port_open

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, str, Path]]:
    """A `covidct web` on a free port: (its DICOMweb base URL, a bearer token, the data dir)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVIDCT_")} | {
        "COVIDCT_DATA_DIR": str(tmp_path / "var"),
        "COVIDCT_WEB_PORT": str(port),
    }
    cli = [sys.executable, "-m", "covidct.cli"]
    subprocess.run(
        [*cli, "create-user", "pacsadmin", "--password-stdin"],
        input="a long enough password\n",
        text=True,
        env=env,
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    token = subprocess.run(
        [*cli, "create-token", "pacsadmin"],
        env=env,
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    log = (tmp_path / "web.log").open("w")
    with launched([*cli, "web"], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT) as p:
        deadline = time.monotonic() + 60
        while not port_open("127.0.0.1", port):
            assert p.poll() is None, (tmp_path / "web.log").read_text()
            assert time.monotonic() < deadline, "covidct web did not open its port"
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/dicom-web", token.split()[-1], tmp_path / "var"


def client(url: str, token: str):  # type: ignore[no-untyped-def]
    from dicomweb_client.api import DICOMwebClient

    return DICOMwebClient(url=url, headers={"Authorization": f"Bearer {token}"})


def uids(response: Dataset, keyword: str) -> list[str]:
    return [str(item.ReferencedSOPInstanceUID) for item in response.get(keyword, [])]


def as_files(datasets: list[Dataset]) -> list[Dataset]:
    """The datasets as a client reads them from disk: Part 10, with their file meta."""
    return [pydicom.dcmread(io.BytesIO(dicom_bytes(ds))) for ds in datasets]


def test_a_study_posted_is_stored_and_queued(server: tuple[str, str, Path]) -> None:
    url, token, data = server
    study = as_files(make_study([SeriesSpec(slices=12), SeriesSpec(kind="localizer")]))
    answer = client(url, token).store_instances(study)
    assert sorted(uids(answer, "ReferencedSOPSequence")) == sorted(
        str(ds.SOPInstanceUID) for ds in study
    )
    assert "FailedSOPSequence" not in answer
    settings = load_settings({"COVIDCT_DATA_DIR": str(data), "COVIDCT_STABLE_SECONDS": "0.5"})
    upgrade(settings.database_url)
    with session_scope(settings.database_url) as s:
        paths = s.scalars(select(Instance.spool_path)).all()
        assert len(paths) == len(study)
        st = s.scalar(select(Study))
        assert st is not None and st.study_instance_uid == study[0].StudyInstanceUID
        event = s.scalar(select(AuditEvent).where(AuditEvent.action == "stow.store"))
        assert event is not None and event.actor == "pacsadmin"
    for path in paths:  # byte for byte what was sent, in the spool
        assert pydicom.dcmread(path).SOPInstanceUID in {ds.SOPInstanceUID for ds in study}
    from ingest.sweeper import Sweeper

    time.sleep(0.6)
    queued: list[int] = []
    Sweeper(settings, lambda task, obj: queued.append(obj)).sweep_once()
    with session_scope(settings.database_url) as s:
        assert s.scalar(select(Study.state)) == StudyState.QUEUED
    assert len(queued) == 1


def test_each_refused_instance_says_why(server: tuple[str, str, Path]) -> None:
    """A Secondary Capture (SOP class not accepted) and a CT of another study than the URL's
    fail with their reasons; the good CT of the same request is stored (202)."""
    url, token, _ = server
    study = as_files(make_study([SeriesSpec(slices=2)]))
    other = as_files(make_study([SeriesSpec(slices=1)]))[0]
    sc = copy.deepcopy(study[0])
    sc.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    sc.SOPInstanceUID = pydicom.uid.generate_uid()
    sc.file_meta.MediaStorageSOPClassUID = sc.SOPClassUID
    sc.file_meta.MediaStorageSOPInstanceUID = sc.SOPInstanceUID
    answer = client(url, token).store_instances(
        [study[0], sc, other], study_instance_uid=str(study[0].StudyInstanceUID)
    )
    assert uids(answer, "ReferencedSOPSequence") == [str(study[0].SOPInstanceUID)]
    failed = {str(i.ReferencedSOPInstanceUID): i for i in answer.FailedSOPSequence}
    assert failed[str(sc.SOPInstanceUID)].FailureReason == 0x0122
    assert failed[str(other.SOPInstanceUID)].FailureReason == 0xA900


def post(url: str, body: bytes, content_type: str, token: str | None) -> tuple[int, bytes]:
    headers = {"Content-Type": content_type}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url + "/studies", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def multipart(*parts: tuple[str, bytes]) -> tuple[bytes, str]:
    boundary = "covidct-test-boundary"
    body = b"".join(
        b"--" + boundary.encode() + b"\r\nContent-Type: " + t.encode() + b"\r\n\r\n" + d + b"\r\n"
        for t, d in parts
    )
    body += b"--" + boundary.encode() + b"--\r\n"
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def dicom_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_without_a_valid_token_nothing_is_stored(server: tuple[str, str, Path]) -> None:
    url, token, data = server
    instance = dicom_bytes(make_study([SeriesSpec(slices=1)])[0])
    body, ctype = multipart(("application/dicom", instance))
    for bad in (None, "not-a-token"):
        status, _ = post(url, body, ctype, bad)
        assert status == 401
    settings = load_settings({"COVIDCT_DATA_DIR": str(data)})
    with session_scope(settings.database_url) as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == 0


def test_a_part_that_is_not_dicom_fails_alone(server: tuple[str, str, Path]) -> None:
    url, token, _ = server
    good = make_study([SeriesSpec(slices=1)])[0]
    body, ctype = multipart(
        ("application/dicom", b"\x89PNG\r\n\x1a\n not a DICOM file"),
        ("text/html", b"<script>alert(1)</script>"),
        ("application/dicom", dicom_bytes(good)),
    )
    status, raw = post(url, body, ctype, token)
    import json

    answer = json.loads(raw)
    assert status == 202
    reasons = [i["00081197"]["Value"][0] for i in answer["00081198"]["Value"]]
    assert reasons == [0xC000, 0xC000]
    assert answer["00081199"]["Value"][0]["00081155"]["Value"] == [str(good.SOPInstanceUID)]
    status, _ = post(url, body, "application/dicom", token)
    assert status == 415  # not multipart/related
    status, _ = post(url, b"--x\r\nno end", ctype, token)
    assert status == 400


@pytest.mark.parametrize("chunk", [1, 7, 64, 1024 * 1024])
def test_parts_are_found_whatever_the_read_size(
    chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reader finds every part when delimiters straddle the reads (one byte at a time
    included), with a preamble and transport padding."""
    from ingest import stow

    monkeypatch.setattr(stow, "CHUNK", chunk)
    a, b = b"first\r\n--not the boundary", b"\r\n" * 3 + b"second"
    body, ctype = multipart(("application/dicom", a), ("application/dicom", b))
    got = list(stow.parts(io.BytesIO(b"preamble\r\n" + body), stow.boundary_of(ctype), 1000))
    assert got == [("application/dicom", a), ("application/dicom", b)]
    with pytest.raises(stow.BadRequest, match="larger than"):
        list(stow.parts(io.BytesIO(body), stow.boundary_of(ctype), 4))


def test_a_dicomweb_destination_gets_every_object_by_stow_rs(tmp_path: Path) -> None:
    """Orthanc with its DICOMweb plugin and basic authentication as the destination: the SR,
    the key images and the key object selection arrive in the CT's study by STOW-RS; the
    delivery row names the URL without the password; a wrong password fails with the HTTP
    status and stores nothing."""
    from classifier.inference import Classifier
    from core.models import Delivery
    from covidct.testbed import spool_study
    from tests.test_e2e import orthanc, orthanc_call
    from worker.delivery import deliver
    from worker.pipeline import analyse_study

    auth = ("covidct", "pacs password")
    with orthanc(tmp_path, free_port(), dicomweb=True, users=dict([auth])) as (http, _):
        base = f"127.0.0.1:{http}/dicom-web"

        def analysed(name: str, credentials: str) -> tuple[Settings, int, str]:
            settings = load_settings(
                {
                    "COVIDCT_DATA_DIR": str(tmp_path / name),
                    "COVIDCT_DESTINATIONS": f"http://{credentials}@{base}/",
                }
            )
            upgrade(settings.database_url)
            study = make_study([SeriesSpec(slices=20)])
            study_id = spool_study(settings, study)
            outcome = analyse_study(settings, study_id, Classifier(settings.model_path))
            assert outcome.state == "done"
            with session_scope(settings.database_url) as s:
                (row,) = s.scalars(select(Delivery)).all()
                assert row.destination == f"http://{base}"  # no credentials kept or shown
                return settings, row.id, str(study[0].StudyInstanceUID)

        settings, delivery_id, _ = analysed("wrong", "covidct:not%20it")
        assert deliver(settings, delivery_id) == "pending"
        with session_scope(settings.database_url) as s:
            row = s.get(Delivery, delivery_id)
            assert row is not None and "answered HTTP 401" in row.last_error
        assert orthanc_call(http, "/studies", auth=auth) == []

        settings, delivery_id, study_uid = analysed("right", "covidct:pacs%20password")
        assert deliver(settings, delivery_id) == "delivered"
        (orthanc_study,) = orthanc_call(http, "/studies", auth=auth)  # type: ignore[misc]
        info: Any = orthanc_call(http, f"/studies/{orthanc_study}", auth=auth)
        assert info["MainDicomTags"]["StudyInstanceUID"] == study_uid
        series: Any = orthanc_call(http, f"/studies/{orthanc_study}/series", auth=auth)
        assert sorted(x["MainDicomTags"]["Modality"] for x in series) == ["KO", "OT", "SR"]
