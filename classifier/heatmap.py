"""Where the model looked: Grad-CAM on the last convolutional block (Selvaraju et al., ICCV
2017), served by LiteRT like the classifier.

The shipped architecture ends conv block -> 2x2 max pooling -> global average pooling -> one
sigmoid expert per dataset and a softmax gate.  For the expert ``k`` the gate chose, the
gradient of its logit with respect to the last block's activations ``A`` (12 x 12 x C) is
``w_k / 36`` at the position each pooled cell took its maximum from and 0 elsewhere, so
Grad-CAM's channel weights (the gradient averaged over the 144 positions) are ``w_k / 144``
whatever the image: the map is ``ReLU(A @ w_k)`` up to a constant, computed here without a
gradient.  Maps are scaled to [0, 1] per image (all zero when nothing speaks for COVID-19).

The export (``<model>.cam.tflite``, :func:`export_cam`) outputs, for a batch, the maps of every
expert, the gate and the probability; the probability must match the served model's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from classifier.errors import ModelError
from classifier.inference import model_stem

TOLERANCE = 1e-5  # largest |probability of the CAM export - the Keras model|


def cam_path(model_path: Path) -> Path:
    return Path(model_path).with_name(model_stem(Path(model_path)) + ".cam.tflite")


def _last_block(model: Any) -> Any:
    """The layer whose output is the last convolutional block's activations: the last layer
    with a 4-D output that is not pooling."""
    candidates = [
        layer
        for layer in model.layers
        if len(getattr(layer, "output", np.empty(0)).shape) == 4
        and "Pooling" not in type(layer).__name__
    ]
    if not candidates:
        raise ModelError("the model has no convolutional block to explain")
    return candidates[-1]


def cam_function(model: Any) -> Any:
    """A TensorFlow function: images (N, 200, 200, 3) -> (maps (N, h, w, experts), gate
    (N, experts), probability (N,)), the maps unscaled and before ReLU."""
    import keras
    import tensorflow as tf

    block = _last_block(model)
    experts, gate = model.get_layer("experts"), model.get_layer("gate")
    inner = keras.Model(model.inputs, [block.output, gate.output, model.outputs[0]])
    kernel = tf.constant(experts.get_weights()[0], dtype=tf.float32)  # (C, experts)
    shape = [None, *model.input_shape[1:]]

    @tf.function(input_signature=[tf.TensorSpec(shape, tf.float32)])
    def forward(x: Any) -> Any:
        act, g, p = inner(x, training=False)
        maps = tf.einsum("nhwc,ck->nhwk", act, kernel)
        return {"maps": maps, "gate": g, "probability": tf.reshape(p, [-1])}

    return forward


def export_cam(model_path: Path, images: np.ndarray) -> dict[str, Any]:
    """Write ``<model>.cam.tflite``; raise (and remove it) unless its probability matches the
    Keras model within :data:`TOLERANCE` on ``images``."""
    import keras
    import tensorflow as tf

    model = keras.saving.load_model(model_path, compile=False)
    forward = cam_function(model)
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [forward.get_concrete_function()], model
    )
    out = cam_path(model_path)
    out.write_bytes(bytes(converter.convert()))
    mapper = HeatMapper(out)
    worst = 0.0
    for i in range(0, len(images), 32):
        x = images[i : i + 32].astype(np.float32)
        want = np.asarray(forward(tf.convert_to_tensor(x))["probability"])
        worst = max(worst, float(np.abs(mapper.run(x)[2] - want).max()))
    if worst > TOLERANCE:
        out.unlink()
        raise ModelError(f"the CAM export differs from Keras by {worst:.2e}: removed")
    return {"file": out.name, "max_abs_difference": worst, "images": int(len(images))}


def scale(maps: np.ndarray, gate: np.ndarray) -> np.ndarray:
    """The chosen expert's map per image, ReLU, scaled to [0, 1]: (N, h, w)."""
    chosen = np.take_along_axis(maps, gate.argmax(axis=1)[:, None, None, None], axis=3)[..., 0]
    chosen = np.maximum(chosen, 0.0)
    peak = chosen.reshape(len(chosen), -1).max(axis=1)
    return np.where(peak[:, None, None] > 0, chosen / np.maximum(peak, 1e-12)[:, None, None], 0.0)


def upsample(heat: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """One map (h, w) in [0, 1] resized bilinearly to ``shape`` (rows, cols)."""
    img = Image.fromarray(heat.astype(np.float32), mode="F")
    return np.asarray(img.resize((shape[1], shape[0]), Image.Resampling.BILINEAR))


class HeatMapper:
    """The CAM export loaded in LiteRT: one per process, like the classifier."""

    def __init__(self, path: Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise ModelError(f"no heatmap model {path}")
        try:
            from ai_edge_litert.interpreter import Interpreter

            self._interpreter = Interpreter(model_path=str(path), num_threads=os.cpu_count())
        except (ImportError, ValueError, RuntimeError) as exc:
            raise ModelError(f"cannot load LiteRT model {path}: {exc}") from None
        self._input = self._interpreter.get_input_details()[0]["index"]
        # the converter names outputs after its graph, not after the function's keys: they
        # are told apart by rank (maps 4, gate 2, probability 1)
        ranks = {len(d["shape"]): d["index"] for d in self._interpreter.get_output_details()}
        if sorted(ranks) != [1, 2, 4]:
            raise ModelError(f"{path} is not a heatmap model (outputs of rank {sorted(ranks)})")
        self._outputs = {"maps": ranks[4], "gate": ranks[2], "probability": ranks[1]}
        self._shape: tuple[int, ...] = ()

    def _output(self, key: str) -> np.ndarray:
        return np.asarray(self._interpreter.get_tensor(self._outputs[key]))

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(maps (N, h, w, experts), gate (N, experts), probability (N,)) of a batch."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.shape != self._shape:
            self._interpreter.resize_tensor_input(self._input, list(batch.shape))
            self._interpreter.allocate_tensors()
            self._shape = batch.shape
        self._interpreter.set_tensor(self._input, batch)
        self._interpreter.invoke()
        return (
            self._output("maps"),
            self._output("gate"),
            self._output("probability").reshape(-1),
        )

    def heat(self, batch: np.ndarray) -> np.ndarray:
        """Scaled maps (N, h, w) in [0, 1] of the gate's expert for each image."""
        maps, gate, _ = self.run(batch)
        return scale(maps, gate)
