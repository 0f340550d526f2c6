"""What a training step sees: class- and dataset-balanced weights, and shuffled batches in which
every image is drawn as stored or re-encoded as JPEG, so that file format carries no label."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from classifier.datasets import Split
from classifier.preprocess import rgb_batch


def jpeg_roundtrip(gray: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(gray, mode="L").save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L"), dtype=np.uint8)


def jpeg_versions(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    qualities = rng.integers(70, 96, len(images))
    return np.stack([jpeg_roundtrip(im, int(q)) for im, q in zip(images, qualities, strict=True)])


def sample_weights(splits: Sequence[Split], balance: bool) -> np.ndarray:
    if not balance:
        return np.ones(sum(len(s) for s in splits), np.float32)
    parts = []
    for s in splits:
        w = np.zeros(len(s), np.float32)
        for label in (0, 1):
            mask = s.labels == label
            if mask.any():
                w[mask] = 1.0 / (2 * len(splits) * mask.sum())
        parts.append(w)
    w = np.concatenate(parts)
    return w * (len(w) / w.sum())


def _batches_class() -> type:
    import keras

    class _Batches(keras.utils.PyDataset):
        """Shuffled batches in numpy (any Keras backend): each image is drawn as stored or as
        its JPEG re-encoding with probability 1/2, so file format carries no label."""

        def __init__(
            self,
            x: np.ndarray,
            x_jpeg: np.ndarray | None,
            y: np.ndarray,
            w: np.ndarray,
            batch_size: int,
            rng: np.random.Generator,
        ) -> None:
            super().__init__()
            self.x, self.x_jpeg, self.y, self.w = x, x_jpeg, y, w
            self.batch_size, self.rng = batch_size, rng
            self.order = rng.permutation(len(y))

        def __len__(self) -> int:
            return (len(self.y) + self.batch_size - 1) // self.batch_size

        def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            idx = self.order[i * self.batch_size : (i + 1) * self.batch_size]
            imgs = self.x[idx]
            if self.x_jpeg is not None:
                use = self.rng.random(len(idx)) < 0.5
                imgs = np.where(use[:, None, None], self.x_jpeg[idx], imgs)
            return rgb_batch(imgs), self.y[idx], self.w[idx]

        def on_epoch_end(self) -> None:
            self.order = self.rng.permutation(len(self.y))

    return _Batches


def Batches(*args: Any) -> Any:  # noqa: N802 - a factory standing in for the class
    return _batches_class()(*args)
