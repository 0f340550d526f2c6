"""Batched inference: load the model and its card once, return calibrated probabilities.

The card (``<model>.card.json`` beside the model) carries the version, the operating threshold
and the temperature chosen on validation data; :class:`Classifier` applies the temperature so
every caller sees the same calibrated probability the threshold was chosen on.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from classifier.errors import ModelError
from classifier.metrics import apply_temperature

POSITIVE = "COVID-19"
NEGATIVE = "non-COVID"


def card_path(model_path: Path) -> Path:
    return model_path.with_name(model_path.name.removesuffix(".keras") + ".card.json")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Prediction:
    probability: float
    label: str


class Classifier:
    """A loaded model.  Build one per process, after any fork (TensorFlow hangs across fork)."""

    def __init__(self, model_path: Path, *, threshold: float | None = None) -> None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import keras
        import tensorflow as tf

        model_path = Path(model_path)
        if not model_path.is_file():
            raise ModelError(f"model file {model_path} does not exist")
        self.card: dict[str, Any] = load_card(model_path)
        try:
            self.model = keras.saving.load_model(model_path, compile=False)
        except Exception as exc:
            raise ModelError(f"cannot load model {model_path}: {exc}") from None
        self.model_path = model_path
        self.version: str = str(
            self.card.get("version") or f"unversioned-{file_sha256(model_path)[:8]}"
        )
        self.threshold: float = float(
            threshold if threshold is not None else self.card.get("threshold", 0.5)
        )
        self.temperature: float = float(self.card.get("temperature", 1.0))
        model = self.model

        @tf.function(reduce_retracing=True)
        def forward(x: Any) -> Any:
            return model(x, training=False)

        self._forward = forward
        self._tf = tf

    def raw(self, batch: np.ndarray) -> np.ndarray:
        """Uncalibrated model outputs for a (N, 200, 200, 3) batch."""
        x = self._tf.convert_to_tensor(np.asarray(batch, dtype=np.float32))
        return np.asarray(self._forward(x)).reshape(-1).astype(np.float64)

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """Calibrated P(COVID-19) for a batch of model inputs."""
        if len(batch) == 0:
            return np.zeros(0)
        return apply_temperature(self.raw(batch), self.temperature)

    def label(self, probability: float) -> str:
        return POSITIVE if probability >= self.threshold else NEGATIVE

    def predict(self, batch: np.ndarray) -> list[Prediction]:
        return [Prediction(float(p), self.label(float(p))) for p in self.probabilities(batch)]

    def stream(self, inputs: Iterable[np.ndarray], batch_size: int = 32) -> Iterator[float]:
        """Probabilities for a stream of inputs, batched, so memory stays flat."""
        buf: list[np.ndarray] = []
        for item in inputs:
            buf.append(item)
            if len(buf) == batch_size:
                yield from self.probabilities(np.stack(buf))
                buf.clear()
        if buf:
            yield from self.probabilities(np.stack(buf))


def load_card(model_path: Path) -> dict[str, Any]:
    path = card_path(Path(model_path))
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read model card {path}: {exc}") from None
