"""Test helpers: tiny models with known outputs (studies and a PACS: covidct/testbed.py)."""

from __future__ import annotations

import json
from pathlib import Path

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
