"""Pictures of patient data, behind login: slices as the model saw them, in the lung window,
with the segmentation over them, and the viewer's screen-size slices with what the viewer
needs to know about each (image number, position, probability, orientation).

Rendered from the spool on demand; the viewer's images are kept under
``<data>/cache/views`` (written once, deleted with the study's spool or whenever the disk
needs it: they are rebuilt when asked for).  Every answer is ``no-store``.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from flask import Blueprint, abort, jsonify, request, send_file
from flask_login import current_user, login_required
from PIL import Image
from sqlalchemy import select

from classifier.errors import UnusableInputError
from classifier.preprocess import open_image, to_model_input, windowed_slice
from classifier.render import draw_overlay, pixel_spacing, square_pixels
from core.db import session_scope
from core.models import Instance, Prediction, Study, Upload
from web.queries import key_slices, study_detail, visible_uploads
from web.session import settings
from web.uploads import model_input_png, thumbnail_path, write_whole

bp = Blueprint("images", __name__)

VIEW_SIZES = (256, 512, 768, 1024)  # the viewer asks for the smallest that fills its box


@dataclass(frozen=True)
class SliceSource:
    """Where a scored slice's pixels are, and its study's segmentation: one read of the
    results store per picture."""

    path: Path
    frame: int
    position: float | None
    quantification: dict[str, Any] | None

    @property
    def overlay(self) -> str:
        """The segmentation's file ("" when none was stored)."""
        return str((self.quantification or {}).get("overlay", "") or "")


def _slice(prediction_id: int) -> SliceSource:
    with session_scope(settings().database_url) as s:
        pred = s.get(Prediction, prediction_id)
        inst = s.get(Instance, pred.instance_id) if pred and pred.instance_id else None
        if pred is None or inst is None:
            abort(404, "No such slice.")
        study = s.get(Study, pred.study_id) if pred.study_id is not None else None
        return SliceSource(
            Path(inst.spool_path),
            pred.frame,
            pred.position,
            study.quantification if study is not None else None,
        )


def _read(path: Path) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(path)
    except OSError:
        abort(410, "The slice is no longer in the spool.")
    raise AssertionError("unreachable")


def _overlay_code(src: SliceSource, ds: pydicom.Dataset) -> np.ndarray | None:
    """The segmentation's code bits of this slice, or None when its series was not
    segmented (or the overlay file is gone)."""
    q = src.quantification
    if q is None or not src.overlay or src.position is None:
        return None
    if str(ds.get("SeriesInstanceUID", "")) != q.get("series_instance_uid"):
        return None
    try:
        with np.load(src.overlay) as saved:
            code, positions = saved["code"], saved["positions"]
    except (OSError, KeyError, ValueError):
        return None
    z = int(np.argmin(np.abs(positions - src.position)))
    if abs(float(positions[z]) - src.position) > 0.01:
        return None
    return np.asarray(code[z])


def _png(arr: np.ndarray) -> Any:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return _png_bytes(buf.getvalue())


def _png_bytes(data: bytes) -> Any:
    response = send_file(io.BytesIO(data), mimetype="image/png")
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.route("/slices/<int(max=2147483647):prediction_id>/model.png")
@login_required
def slice_model_png(prediction_id: int) -> Any:
    src = _slice(prediction_id)
    try:
        return _png(to_model_input(_read(src.path), frame=src.frame))
    except UnusableInputError as exc:
        abort(422, str(exc))


@bp.route("/slices/<int(max=2147483647):prediction_id>/original.png")
@login_required
def slice_original_png(prediction_id: int) -> Any:
    src = _slice(prediction_id)
    ds = _read(src.path)
    return _png(square_pixels(windowed_slice(ds, src.frame), pixel_spacing(ds), 400))


@bp.route("/slices/<int(max=2147483647):prediction_id>/overlay.png")
@login_required
def slice_overlay_png(prediction_id: int) -> Any:
    """The slice in the lung window with the lungs' contour and the opacity map over it."""
    src = _slice(prediction_id)
    ds = _read(src.path)
    code = _overlay_code(src, ds)
    if code is None:
        abort(404, "No overlay for this slice.")
    gray = square_pixels(windowed_slice(ds, src.frame), pixel_spacing(ds), 400)
    return _png(draw_overlay(gray, code))


@bp.route("/slices/<int(max=2147483647):prediction_id>/view.png")
@login_required
def slice_view_png(prediction_id: int) -> Any:
    """The viewer's image: square pixels, ``size`` (one of :data:`VIEW_SIZES`) on its longer
    side, the segmentation drawn over it with ``overlay=1``; rendered once, then served from
    the cache."""
    size = request.args.get("size", "512")
    if not size.isdigit() or int(size) not in VIEW_SIZES:
        abort(400, f"size must be one of {', '.join(map(str, VIEW_SIZES))}")
    overlay = request.args.get("overlay", "0") == "1"
    src = _slice(prediction_id)
    # keyed by what the picture shows (the file, the frame, the segmentation's generation),
    # not by the prediction's id, which a re-run replaces
    key = f"{src.path}|{src.frame}|{src.overlay if overlay else ''}|{size}"
    name = hashlib.sha256(key.encode()).hexdigest()[:32]
    cached = settings().data_dir / "cache" / "views" / f"{name}.png"
    if cached.is_file():
        return _png_bytes(cached.read_bytes())
    ds = _read(src.path)
    gray = square_pixels(windowed_slice(ds, src.frame), pixel_spacing(ds), int(size))
    if overlay:
        code = _overlay_code(src, ds)
        if code is None:
            abort(404, "No overlay for this slice.")
        arr = draw_overlay(gray, code, int(size))
    else:
        arr = gray
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    write_whole(cached, buf.getvalue())
    return _png_bytes(buf.getvalue())


UNKNOWN = {"image_number": None, "right_on_left": True, "head_at_high": True}


def _image_facts(path: str) -> dict[str, Any]:
    """What the viewer shows of one instance: its image number (to find it in the PACS),
    which side of the picture is the patient's right, and whether a higher slice position
    lies towards the head."""
    try:
        ds = pydicom.dcmread(
            path,
            stop_before_pixels=True,
            specific_tags=["InstanceNumber", "ImageOrientationPatient"],
        )
    except (OSError, pydicom.errors.InvalidDicomError):
        return dict(UNKNOWN)
    number = ds.get("InstanceNumber")
    iop = [float(v) for v in ds.get("ImageOrientationPatient") or []]
    facts = dict(UNKNOWN)
    facts["image_number"] = int(number) if number not in (None, "") else None
    if len(iop) == 6:
        # the row direction's x > 0: columns run towards the patient's left, so the picture's
        # left edge is the patient's right (the radiological convention)
        facts["right_on_left"] = iop[0] >= 0
        # the slice normal (row x column) along +z points to the head
        facts["head_at_high"] = iop[0] * iop[4] - iop[1] * iop[3] >= 0
    return facts


@bp.route("/studies/<uid>/viewer.json")
@login_required
def viewer_data(uid: str) -> Any:
    """The analysed series, slice by slice from foot to head: what the viewer scrolls."""
    with session_scope(settings().database_url) as s:
        detail = study_detail(s, uid)
        if detail is None:
            abort(404, "No such study.")
        ids = [sl["id"] for sl in detail["slices"]]
        paths = dict(
            s.execute(
                select(Prediction.id, Instance.spool_path)
                .join(Instance, Instance.id == Prediction.instance_id)
                .where(Prediction.id.in_(ids))
            ).all()
        )
    digest = hashlib.sha256("|".join(sorted(paths.values())).encode()).hexdigest()[:32]
    cache = settings().data_dir / "cache" / "views" / f"{digest}.json"
    if cache.is_file():
        facts = json.loads(cache.read_text())
    else:
        facts = {str(i): _image_facts(paths[i]) for i in ids if i in paths}
        write_whole(cache, json.dumps(facts).encode())
    slices = [
        {
            "id": sl["id"],
            "position": sl["position"],
            "probability": sl["probability"],
            "skipped": sl["skipped"],
            "zone": sl["zone"],
            **facts.get(str(sl["id"]), UNKNOWN),
        }
        for sl in detail["slices"]
    ]
    response = jsonify(
        slices=slices,
        key=[sl["id"] for sl in key_slices(detail["slices"])],
        threshold=detail["threshold"],
        overlay=bool(detail["quantification"]),
        sizes=list(VIEW_SIZES),
    )
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.route("/uploads/<int(max=2147483647):upload_id>/model.png")
@login_required
def upload_model_png(upload_id: int) -> Any:
    """The stored picture of what the model saw; made from the upload only for uploads
    stored before such pictures were kept, and then kept."""
    with session_scope(settings().database_url) as s:
        owner = current_user.upload_owner(settings().shared_uploads)
        up = s.scalar(visible_uploads(owner).where(Upload.id == upload_id))
        if up is None:
            abort(404, "No such upload.")
        path, filename = Path(up.path), up.filename
    stored = thumbnail_path(path)
    if stored.is_file():
        return _png_bytes(stored.read_bytes())
    try:
        data = model_input_png(
            open_image(path.read_bytes(), max_pixels=settings().max_upload_pixels)
        )
    except (OSError, UnusableInputError) as exc:
        abort(422, f"{filename}: {exc}")
    write_whole(stored, data)
    return _png_bytes(data)
