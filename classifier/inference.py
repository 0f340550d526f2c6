"""Batched inference: load the model and its card once, return calibrated probabilities.

The card (``<model>.card.json`` beside the model) carries the version, the operating threshold
and the temperature chosen on validation data; :class:`Classifier` applies the temperature so
every caller sees the same calibrated probability the threshold was chosen on.

Two runtimes serve the same weights.  LiteRT (``ai-edge-litert``) runs the ``<model>.tflite``
exported beside the Keras file (``classifier/export.py``; it agrees with Keras within 1e-5 on
the validation images, checked at export and recorded in the card) without importing
TensorFlow: a worker process needed 478 MB less idle and 560 MB less at peak under load
(``bench/load.py``, 2026-12-04).  Keras runs the ``.keras`` file (training,
evaluation, models without an export).  ``auto`` takes LiteRT when the export is there.
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


RUNTIMES = ("auto", "keras", "litert")


def model_stem(model_path: Path) -> str:
    return model_path.name.removesuffix(".keras").removesuffix(".tflite")


def card_path(model_path: Path) -> Path:
    return model_path.with_name(model_stem(model_path) + ".card.json")


def litert_path(model_path: Path) -> Path:
    return model_path.with_name(model_stem(model_path) + ".tflite")


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

    def __init__(
        self, model_path: Path, *, threshold: float | None = None, runtime: str = "auto"
    ) -> None:
        model_path = Path(model_path)
        if runtime not in RUNTIMES:
            raise ModelError(f"unknown model runtime {runtime!r}; one of {', '.join(RUNTIMES)}")
        if not model_path.is_file():
            raise ModelError(f"model file {model_path} does not exist")
        self.card: dict[str, Any] = load_card(model_path)
        lite = model_path if model_path.suffix == ".tflite" else litert_path(model_path)
        if runtime == "litert" or (runtime == "auto" and lite.is_file()):
            self._backend: _Backend = _LiteRT(lite)
            self.runtime = "litert"
        elif model_path.suffix == ".tflite":
            raise ModelError(f"{model_path} is a LiteRT model: it needs the litert runtime")
        else:
            self._backend = _Keras(model_path)
            self.runtime = "keras"
        self.model_path = model_path
        self._keras: _Keras | None = None
        self.version: str = str(
            self.card.get("version") or f"unversioned-{file_sha256(model_path)[:8]}"
        )
        self.threshold: float = float(
            threshold if threshold is not None else self.card.get("threshold", 0.5)
        )
        self.temperature: float = float(self.card.get("temperature", 1.0))

    @property
    def model(self) -> Any:
        """The Keras model (evaluation tools, benchmarks' bare reference); loaded on first use
        when LiteRT serves, which goes on serving."""
        if isinstance(self._backend, _Keras):
            return self._backend.model
        if self._keras is None:
            self._keras = _Keras(self.model_path.with_suffix(".keras"))
        return self._keras.model

    def raw(self, batch: np.ndarray) -> np.ndarray:
        """Uncalibrated model outputs for a (N, 200, 200, 3) batch."""
        return self._backend.raw(np.asarray(batch, dtype=np.float32))

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


class _Backend:
    def raw(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class _Keras(_Backend):
    def __init__(self, path: Path) -> None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import keras
        import tensorflow as tf

        try:
            self.model = keras.saving.load_model(path, compile=False)
        except Exception as exc:
            raise ModelError(f"cannot load model {path}: {exc}") from None
        model = self.model

        @tf.function(reduce_retracing=True)
        def forward(x: Any) -> Any:
            return model(x, training=False)

        self._forward, self._tf = forward, tf

    def raw(self, batch: np.ndarray) -> np.ndarray:
        x = self._tf.convert_to_tensor(batch)
        return np.asarray(self._forward(x)).reshape(-1).astype(np.float64)


class _LiteRT(_Backend):
    """One interpreter, resized when the batch size changes (the last batch of a study)."""

    def __init__(self, path: Path) -> None:
        try:
            from ai_edge_litert.interpreter import Interpreter

            self._interpreter = Interpreter(model_path=str(path), num_threads=os.cpu_count())
        except (ImportError, ValueError, RuntimeError) as exc:
            raise ModelError(f"cannot load LiteRT model {path}: {exc}") from None
        self._input = self._interpreter.get_input_details()[0]["index"]
        self._output = self._interpreter.get_output_details()[0]["index"]
        self._shape: tuple[int, ...] = ()

    def raw(self, batch: np.ndarray) -> np.ndarray:
        if batch.shape != self._shape:
            self._interpreter.resize_tensor_input(self._input, list(batch.shape))
            self._interpreter.allocate_tensors()
            self._shape = batch.shape
        self._interpreter.set_tensor(self._input, np.ascontiguousarray(batch))
        self._interpreter.invoke()
        return self._interpreter.get_tensor(self._output).reshape(-1).astype(np.float64)


def load_card(model_path: Path) -> dict[str, Any]:
    path = card_path(Path(model_path))
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read model card {path}: {exc}") from None
