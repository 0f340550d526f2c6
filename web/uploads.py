"""Manual uploads: checked by content, size and pixel count, stored, queued for the worker.

A rejected file leaves nothing behind (no file, no row).  Accepted files are kept under
``<data>/uploads/<sha256>.<png|jpg>``, beside the picture as the model sees it
(``<sha256>.model.png``, made once at upload: a page view never decodes the image again);
identical content is stored once.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from classifier.errors import UnusableInputError
from classifier.preprocess import open_image, to_model_input
from core import audit
from core.db import session_scope
from core.models import Upload
from core.settings import Settings

logger = logging.getLogger(__name__)
MIME = {"PNG": "image/png", "JPEG": "image/jpeg"}


class UploadRejected(ValueError):
    """The file is not an acceptable image; the message says why (shown to the user)."""


@dataclass
class Accepted:
    id: int
    filename: str


def write_whole(path: Path, data: bytes) -> None:
    """Write ``path`` so that it is whole or absent: two requests may make it at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def thumbnail_path(upload: Path) -> Path:
    """Where an upload's picture as the model sees it is kept (made once, at upload)."""
    return upload.with_name(upload.stem + ".model.png")


def model_input_png(img: Image.Image) -> bytes:
    """The 200x200 model input as PNG bytes: decoded once, here, not at every page view."""
    buf = io.BytesIO()
    Image.fromarray(to_model_input(img)).save(buf, format="PNG")
    return buf.getvalue()


def accept_upload(
    settings: Settings,
    filename: str,
    data: bytes,
    user_id: int | None,
    actor: str,
    remote: str = "",
) -> Accepted:
    name = os.path.basename(filename or "upload")[:255] or "upload"
    if not data:
        raise UploadRejected(f"{name}: the file is empty")
    if len(data) > settings.max_upload_bytes:
        raise UploadRejected(
            f"{name}: {len(data)} bytes exceeds the limit of {settings.max_upload_bytes} bytes"
        )
    try:
        img = open_image(data, max_pixels=settings.max_upload_pixels)
    except UnusableInputError as exc:
        raise UploadRejected(f"{name}: {exc}") from None
    try:
        thumbnail = model_input_png(img)
    except UnusableInputError as exc:
        raise UploadRejected(f"{name}: {exc}") from None
    digest = hashlib.sha256(data).hexdigest()
    suffix = ".png" if img.format == "PNG" else ".jpg"
    path = settings.uploads_dir / f"{digest}{suffix}"
    settings.uploads_dir.mkdir(parents=True, exist_ok=True)
    for target, content in ((path, data), (thumbnail_path(path), thumbnail)):
        if not target.exists():
            write_whole(target, content)
    with session_scope(settings.database_url) as s:
        up = Upload(
            filename=name,
            content_type=MIME[str(img.format)],
            sha256=digest,
            size_bytes=len(data),
            width=img.width,
            height=img.height,
            path=str(path),
            user_id=user_id,
        )
        s.add(up)
        s.flush()
        audit.record(s, actor, "upload", str(up.id), remote=remote, sha256=digest[:16])
        upload_id = up.id
    return Accepted(upload_id, name)


def queue_upload(settings: Settings, upload_id: int) -> bool:
    """Ring the worker's doorbell; False if the broker is down (the sweeper retries)."""
    from worker.app import UPLOAD_TASK, ring

    return ring(settings, UPLOAD_TASK, upload_id)
