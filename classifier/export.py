"""Export a Keras model to LiteRT (``<model>.tflite``) and prove the two agree.

The worker serves the export (``classifier.inference``: no TensorFlow in the worker process);
the export is only written when its outputs match Keras within ``TOLERANCE`` on the given
images, and the card records the largest difference, the image count and both files' SHA-256,
so a test can tell that the committed export belongs to the committed model.

    python -m classifier.export models/covidct.keras --data DATASET [--data DATASET ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from classifier.errors import ModelError
from classifier.inference import Classifier, card_path, file_sha256, litert_path

TOLERANCE = 1e-5  # largest |LiteRT - Keras| on a model output (probability before temperature)


def convert(model_path: Path) -> bytes:
    import keras
    import tensorflow as tf

    model = keras.saving.load_model(model_path, compile=False)
    shape = [None, *model.input_shape[1:]]

    # a concrete function, not from_keras_model: that path needs Keras registered with
    # TensorFlow, which it is not in every process that imported both
    @tf.function(input_signature=[tf.TensorSpec(shape, tf.float32)])
    def forward(x: Any) -> Any:
        return model(x, training=False)

    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [forward.get_concrete_function()], model
    )
    return bytes(converter.convert())


def max_difference(model_path: Path, images: np.ndarray, batch: int = 32) -> float:
    """Largest |LiteRT - Keras| over ``images`` (N, 200, 200, 3), in batches."""
    keras_model = Classifier(model_path, runtime="keras")
    lite = Classifier(model_path, runtime="litert")
    worst = 0.0
    for i in range(0, len(images), batch):
        x = images[i : i + batch]
        worst = max(worst, float(np.abs(lite.raw(x) - keras_model.raw(x)).max()))
    return worst


def export(model_path: Path, images: np.ndarray, source: str) -> dict[str, Any]:
    """Write ``<model>.tflite`` and record the check in the card; raise if they disagree."""
    out = litert_path(model_path)
    tmp = out.with_suffix(".tflite.tmp")
    tmp.write_bytes(convert(model_path))
    tmp.replace(out)
    worst = max_difference(model_path, images)
    if worst > TOLERANCE:
        out.unlink()
        raise ModelError(f"LiteRT differs from Keras by {worst:.2e} (> {TOLERANCE:.0e}): removed")
    record = {
        "file": out.name,
        "sha256": file_sha256(out),
        "keras_sha256": file_sha256(model_path),
        "max_abs_difference": worst,
        "tolerance": TOLERANCE,
        "images": int(len(images)),
        "checked_on": source,
    }
    card = card_path(model_path)
    if card.is_file():
        data = json.loads(card.read_text(encoding="utf-8"))
        data["litert"] = record
        card.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return record


def main(argv: list[str] | None = None) -> int:
    from classifier.datasets import load_split

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path)
    p.add_argument(
        "--data", type=Path, action="append", required=True, help="dataset with val/ (repeatable)"
    )
    args = p.parse_args(argv)
    splits = [load_split(d, "val") for d in args.data]
    images = np.concatenate([np.repeat(s.images[..., None], 3, axis=-1) for s in splits])
    source = " + ".join(f"{s.dataset} val" for s in splits)
    record = export(args.model, images.astype(np.float32), source)
    print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
