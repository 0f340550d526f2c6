"""Test helpers: tiny models with known outputs, studies in a spool, a PACS that receives."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np


def make_tiny_model(
    path: Path,
    *,
    weight: float = 8.0,
    bias: float = -4.0,
    threshold: float = 0.5,
    version: str = "tiny-test-1",
) -> Path:
    """A model whose output is sigmoid(weight * mean(pixels)/255 + bias): known exactly."""
    import keras

    inputs = keras.Input((200, 200, 3))
    x = keras.layers.Rescaling(1.0 / 255)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(1, activation="sigmoid", name="p_covid")(x)
    model = keras.Model(inputs, x)
    dense = model.get_layer("p_covid")
    dense.set_weights([np.full((3, 1), weight / 3.0, np.float32), np.array([bias], np.float32)])
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    card = {"version": version, "threshold": threshold, "temperature": 1.0}
    path.with_name(path.name.removesuffix(".keras") + ".card.json").write_text(json.dumps(card))
    return path


def tiny_model_output(inputs: np.ndarray, weight: float = 8.0, bias: float = -4.0) -> np.ndarray:
    mean = inputs.reshape(len(inputs), -1).astype(np.float64).mean(axis=1) / 255.0
    return 1.0 / (1.0 + np.exp(-(weight * mean + bias)))


class TestPACS:
    """A pynetdicom storage SCP on a free port that keeps what it receives in memory."""

    def __init__(
        self,
        ae_title: str = "PACS",
        port: int = 0,
        status: int = 0x0000,
        gate: threading.Event | None = None,
    ) -> None:
        """``gate``: a PACS that hangs: each C-STORE is kept (and counted) at once but
        answered only when the event is set."""
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import Verification

        self.received: list[Any] = []
        self.status = status
        self.gate = gate
        self.lock = threading.Lock()
        self.ae = AE(ae_title=ae_title)
        self.ae.add_supported_context(Verification)
        self.ae.add_supported_context("1.2.840.10008.5.1.4.1.1.88.34")  # Comprehensive 3D SR
        self.ae_title = ae_title
        self.server = self.ae.start_server(
            ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )
        self.port = int(self.server.server_address[1])

    def _store(self, event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self.lock:
            self.received.append(ds)
        if self.gate is not None:
            self.gate.wait(120)
        return self.status

    @property
    def destination(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.shutdown()


def spool_study(settings: Any, items: list[Any], calling_ae: str = "TEST") -> int:
    """Put a study (datasets or Part 10 files) in the spool as the listener would and mark
    it queued; return its id."""
    import io

    from sqlalchemy import select

    from core.db import session_scope
    from core.models import Study, StudyState
    from ingest.records import read_header, record_instance
    from ingest.spool import instance_path, write_durable

    uid = None
    for item in items:
        if isinstance(item, Path):
            data = item.read_bytes()
        else:
            buf = io.BytesIO()
            item.save_as(buf, enforce_file_format=True)
            data = buf.getvalue()
        h = read_header(data)
        uid = h.study_uid
        path = instance_path(settings.spool_dir, h.study_uid, h.series_uid, h.sop_uid)
        write_durable(path, data)
        record_instance(settings.database_url, h, path, len(data), calling_ae)
    with session_scope(settings.database_url) as s:
        study = s.scalar(select(Study).where(Study.study_instance_uid == uid))
        assert study is not None
        study.state = StudyState.QUEUED
        return study.id
