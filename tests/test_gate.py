"""The gate refit: the logistic regression itself, and its weights folded into a Keras gate."""

from __future__ import annotations

import numpy as np
import pytest

from classifier.gate import SHARPENING, fit_softmax, refit_gate
from classifier.preprocess import rgb_batch

pytestmark = pytest.mark.unit


def test_fit_softmax_balanced_on_raw_features() -> None:
    """Three imbalanced classes, features on very different scales: every class is found,
    and the returned kernel applies to the raw (unstandardised) features."""
    rng = np.random.default_rng(0)
    sizes = (600, 60, 200)
    centres = np.array([[0.0, 0.0, 0.0], [3.0, 0.0, 1.0], [0.0, 3.0, -1.0]])
    scale = np.array([1.0, 1000.0, 0.01])
    x = np.concatenate([rng.normal(c, 1.0, (n, 3)) for c, n in zip(centres, sizes, strict=True)])
    x *= scale
    y = np.concatenate([np.full(n, i) for i, n in enumerate(sizes)])
    fit = fit_softmax(x, y, 3)
    predicted = fit.logits(x).argmax(axis=1)
    for k in range(3):
        assert np.mean(predicted[y == k] == k) > 0.85, k
    p = fit.probabilities(x)
    assert np.allclose(p.sum(axis=1), 1.0)
    z = 2.0 * fit.logits(x)  # T = 0.5: logits doubled
    expected = np.exp(z - z.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    assert np.allclose(fit.probabilities(x, 0.5), expected)
    assert not np.allclose(expected, p)


def _toy_gated_model():  # type: ignore[no-untyped-def]
    """A gated model whose features are the image's mean and mean square (6 numbers)."""
    import keras

    from classifier.architectures import INPUT_SHAPE, _gated

    inputs = keras.Input(INPUT_SHAPE)
    x = keras.layers.Rescaling(1.0 / 255)(inputs)
    mean = keras.layers.GlobalAveragePooling2D()(x)
    square = keras.layers.GlobalAveragePooling2D()(keras.layers.Multiply()([x, x]))
    features = keras.layers.Concatenate()([mean, square])
    serving, _ = _gated(inputs, features, name="toy", seed=0, domains=2, dropout=0.1)
    return serving


def _images(rng: np.random.Generator, level: float, n: int) -> np.ndarray:
    return np.clip(rng.normal(level, 25, (n, 200, 200)), 0, 255).astype(np.uint8)


def test_refit_gate_routes_each_dataset_to_its_expert() -> None:
    import keras

    rng = np.random.default_rng(1)
    model = _toy_gated_model()
    gate = model.get_layer("gate")
    kernel, bias = gate.get_weights()
    kernel[:] = 0.0
    kernel[:3, 0], kernel[:3, 1] = 5.0, -5.0  # bright images to expert 0: the wrong way
    gate.set_weights([kernel, bias])
    experts = model.get_layer("experts")
    ek, eb = experts.get_weights()
    experts.set_weights([np.zeros_like(ek), np.zeros_like(eb)])

    train = [_images(rng, 60, 40), _images(rng, 180, 12)]
    val = [_images(rng, 70, 10), _images(rng, 170, 10)]
    labels = [np.array([0, 1] * 5), np.array([1, 0] * 5)]
    report = refit_gate(model, ["dark", "bright"], train, val, labels)

    assert report["val_before"]["bright"]["routed_own"] == 0.0
    assert report["temperature"] in SHARPENING
    for name in ("dark", "bright"):
        assert report["val_tried"]["1.0"][name]["routed_own"] == 1.0
    # the fit lives in the Keras layer itself: the serving graph routes by it
    weights = keras.Model(model.inputs, gate.output).predict(
        rgb_batch(np.concatenate(val)), verbose=0
    )
    assert list(weights.argmax(axis=1)) == [0] * 10 + [1] * 10
