"""Grad-CAM as served (classifier/heatmap.py): the LiteRT export's maps are Grad-CAM's, computed
with a real gradient, on a small untrained model of the shipped architecture."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from classifier.heatmap import HeatMapper, cam_path, export_cam, scale, upsample


@pytest.fixture(scope="module")
def gated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    from classifier.architectures import build_covidct

    serving, _ = build_covidct(seed=3, width=4, domains=2)
    path = tmp_path_factory.mktemp("model") / "small.keras"
    serving.save(path)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 200, 200, 3)).astype(np.float32)
    images[:, 60:140, 40:90] *= 0.3  # something darker to look at
    return path, images


def grad_cam(path: Path, images: np.ndarray) -> np.ndarray:
    """Grad-CAM by the book: gradient of the gate's expert's logit with respect to the last
    block's activations, averaged per channel, weighting the activations, ReLU, scaled."""
    import keras
    import tensorflow as tf

    from classifier.heatmap import _last_block

    model = keras.saving.load_model(path, compile=False)
    block = _last_block(model)
    inner = keras.Model(model.inputs, [block.output, model.get_layer("gate").output])
    names = [layer.name for layer in model.layers]
    after = model.layers[names.index(block.name) + 1 : names.index("experts")]
    kernel, bias = model.get_layer("experts").get_weights()
    x = tf.convert_to_tensor(images)
    act, gate = inner(x, training=False)
    chosen = np.argmax(np.asarray(gate), axis=1)
    with tf.GradientTape() as tape:
        tape.watch(act)
        h = act
        for layer in after:  # max pooling, global average pooling, dropout
            h = layer(h, training=False)
        logits = tf.matmul(h, kernel) + bias
        score = tf.reduce_sum(tf.gather(logits, chosen, axis=1, batch_dims=1))
    grads = np.asarray(tape.gradient(score, act))
    alpha = grads.mean(axis=(1, 2))  # (N, C)
    cam = np.maximum(np.einsum("nhwc,nc->nhw", np.asarray(act), alpha), 0.0)
    peak = cam.reshape(len(cam), -1).max(axis=1)
    return cam / np.where(peak > 0, peak, 1.0)[:, None, None]


def test_the_served_map_is_grad_cam(gated: tuple[Path, np.ndarray]) -> None:
    path, images = gated
    record = export_cam(path, images)
    assert record["max_abs_difference"] <= 1e-5 and cam_path(path).is_file()
    heat = HeatMapper(cam_path(path)).heat(images)
    assert heat.shape == (3, 12, 12) and heat.dtype.kind == "f"
    assert heat.min() >= 0.0 and heat.max() <= 1.0
    assert np.allclose(heat, grad_cam(path, images), atol=1e-4)


def test_scale_picks_the_gates_expert_and_keeps_zero_maps_zero() -> None:
    maps = np.zeros((2, 2, 2, 2), dtype=np.float32)
    maps[0, 0, 0, 1], maps[0, 1, 1, 0] = 4.0, 9.0  # expert 1 chosen: its 4 is the peak
    maps[1] = -1.0  # nothing speaks for COVID-19
    gate = np.array([[0.2, 0.8], [0.9, 0.1]], dtype=np.float32)
    out = scale(maps, gate)
    assert out[0, 0, 0] == 1.0 and out[0, 1, 1] == 0.0
    assert not out[1].any()
    assert upsample(out[0], (20, 20)).shape == (20, 20)
