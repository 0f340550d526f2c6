"""The training data: ``train/`` and ``val/`` folders of labelled slices, read once through the
product's own preprocessing and cached as lossless PNG strips.

Folders are laid out like ``../shared/datasets/*``: ``train/`` and ``val/``, each with
``CT_COVID/`` (positive) and ``CT_NonCOVID/`` (negative).  Every image goes through
:func:`classifier.preprocess.to_model_input`, the path the service itself takes.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from classifier.errors import UnusableInputError
from classifier.preprocess import to_model_input

logger = logging.getLogger(__name__)

CLASSES = (("CT_NonCOVID", 0), ("CT_COVID", 1))
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


@dataclass
class Split:
    """One dataset's split, preprocessed: gray ``uint8`` (N, 200, 200), labels, file formats."""

    dataset: str
    images: np.ndarray
    labels: np.ndarray
    formats: list[str]
    names: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def load_split(root: Path, split: str, *, limit: int | None = None) -> Split:
    """Read ``root/split/CT_*`` through the product's preprocessing."""
    images, labels, formats, names = [], [], [], []
    for cls, label in CLASSES:
        folder = root / split / cls
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is missing (expected train/ and val/ with {cls}/)")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        for path in files[:limit]:
            try:
                images.append(to_model_input(path)[:, :, 0])
            except UnusableInputError as exc:
                logger.warning("skipping %s: %s", path.name, exc)
                continue
            labels.append(label)
            formats.append("jpeg" if path.suffix.lower() in (".jpg", ".jpeg") else "png")
            names.append(f"{cls}/{path.name}")
    if not images:
        raise FileNotFoundError(f"no images under {root / split}")
    return Split(root.name, np.stack(images), np.array(labels, np.int32), formats, names)


def cached_split(root: Path, split: str, cache: Path | None, *, limit: int | None = None) -> Split:
    """:func:`load_split`, through a cache of lossless PNG strips (one per split) when given."""
    if cache is None:
        return load_split(root, split, limit=limit)
    strip, meta = cache / f"{root.name}.{split}.png", cache / f"{root.name}.{split}.json"
    if strip.is_file() and meta.is_file():
        info = json.loads(meta.read_text())
        arr = np.asarray(Image.open(strip), dtype=np.uint8)
        images = arr.reshape(-1, arr.shape[1], arr.shape[1])
        return Split(
            root.name, images, np.array(info["labels"], np.int32), info["formats"], info["names"]
        )
    s = load_split(root, split, limit=limit)
    cache.mkdir(parents=True, exist_ok=True)
    Image.fromarray(s.images.reshape(-1, s.images.shape[2])).save(strip, optimize=True)
    meta.write_text(
        json.dumps({"labels": s.labels.tolist(), "formats": s.formats, "names": s.names})
    )
    return s
