"""HL7 v2 out (worker/hl7out.py): an ORU^R01 per finished study over MLLP to a real TCP
receiver that answers with python-hl7's own ACKs, through the outbox."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import hl7
import pytest
from sqlalchemy import select

from classifier.inference import Classifier
from core.db import session_scope, upgrade
from core.models import Delivery, Study
from core.settings import Settings, load_settings
from covidct.synthetic import SeriesSpec, make_study
from covidct.testbed import spool_study
from worker.delivery import deliver
from worker.pipeline import analyse_study

pytestmark = pytest.mark.integration


class MllpReceiver:
    """A RIS stand-in: keeps each message and answers the next ACK code of ``codes`` (then
    AA), an AE with a reason in MSA-3."""

    def __init__(self, codes: list[str] | None = None) -> None:
        self.messages: list[hl7.Message] = []
        self.codes = list(codes or [])
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\x1c\r" not in data:
                    piece = conn.recv(65536)
                    if not piece:
                        break
                    data += piece
                text = data[data.find(b"\x0b") + 1 : data.find(b"\x1c\r")].decode()
                message = hl7.parse(text)
                self.messages.append(message)
                code = self.codes.pop(0) if self.codes else "AA"
                ack = message.create_ack(code)
                if code != "AA":
                    ack.segment("MSA").append(ack.create_field(["unknown patient"]))  # MSA-3
                conn.sendall(b"\x0b" + str(ack).encode() + b"\x1c\r")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.sock.close()


@pytest.fixture
def ris() -> Iterator[MllpReceiver]:
    r = MllpReceiver(codes=["AE"])
    yield r
    r.stop()


def make_settings(tmp_path: Path, address: str) -> Settings:
    settings = load_settings(
        {
            "COVIDCT_DATA_DIR": str(tmp_path / "var"),
            "COVIDCT_HL7_DESTINATIONS": address,
            "COVIDCT_MIN_SERIES_SLICES": "5",
        }
    )
    upgrade(settings.database_url)
    return settings


def test_a_finished_study_goes_to_the_ris_as_oru_r01(tmp_path: Path, ris: MllpReceiver) -> None:
    settings = make_settings(tmp_path, ris.address)
    study = make_study(
        [SeriesSpec(slices=16, ground_glass=True)],
        patient_name="O'Brien|Smith^Ann&Mary",  # HL7's separators in a name: escaped
    )
    study_id = spool_study(settings, study)
    assert analyse_study(settings, study_id, Classifier(settings.model_path)).state == "done"
    with session_scope(settings.database_url) as s:
        (row,) = s.scalars(select(Delivery).where(Delivery.event != "")).all()
        delivery_id, destination = row.id, row.destination
        st = s.get(Study, study_id)
        assert st is not None
        verdict, probability, accession = st.verdict, st.probability, st.accession_number
    assert destination == f"mllp://{ris.address}"

    assert deliver(settings, delivery_id) == "pending"  # the RIS answered AE
    with session_scope(settings.database_url) as s:
        row = s.get(Delivery, delivery_id)
        assert row is not None and f"mllp://{ris.address} answered AE: unknown patient" in (
            row.last_error
        )
    assert deliver(settings, delivery_id) == "delivered"

    first, second = ris.messages
    assert str(first) == str(second)  # the same message, control ID included, on the retry
    msg = second
    assert str(msg.segment("MSH")[9]) == "ORU^R01^ORU_R01"
    pid = msg.segment("PID")
    assert msg.unescape(str(pid[5][0][0])) == "O'Brien|Smith"
    assert msg.unescape(str(pid[5][0][1])) == "Ann&Mary"
    assert str(msg.segment("OBR")[3]) == accession
    assert str(msg.segment("ZDS")[1][0][0]) == str(study[0].StudyInstanceUID)
    obx = {str(seg[3][0][0]): seg for seg in msg.segments("OBX")}
    assert str(obx["COVID19"][5][0][0]) == verdict
    assert float(str(obx["COVIDP"][5])) == pytest.approx(probability, abs=1e-3)
    assert float(str(obx["LUNGVOL"][5])) > 0
    assert "not a diagnosis" in str(obx["NOTICE"][5])
    assert all(str(seg[11]) == "P" for seg in msg.segments("OBX"))  # preliminary: unverified
