"""EfficientNet-Lite0 in Keras: PyTorch layouts land in the right places (checked against numpy
convolutions), missing weights and a disagreeing reference are refused, and the pretrained
recipe trains from a converted file.  The real ImageNet file is not needed: the conversion
script's own check compares it with PyTorch."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest
from keras import layers

from classifier import efficientnet_lite as lite
from tests.test_classifier_cli import make_image_folder, run_cli


def fake_state_dict(model: keras.Model, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights in PyTorch's names and layouts for every trunk layer of ``model``."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for layer in model.layers:
        n = layer.name
        if isinstance(layer, layers.DepthwiseConv2D):
            k, _, c, _ = layer.kernel.shape
            out[n + ".weight"] = rng.normal(0, 0.3, (c, 1, k, k)).astype(np.float32)
        elif isinstance(layer, layers.Conv2D) and n.startswith("_"):
            k, _, i, o = layer.kernel.shape
            out[n + ".weight"] = rng.normal(0, 0.3, (o, i, k, k)).astype(np.float32)
        elif isinstance(layer, layers.BatchNormalization) and n.startswith("_"):
            c = layer.gamma.shape[0]
            out[n + ".weight"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
            out[n + ".bias"] = rng.normal(0, 0.1, c).astype(np.float32)
            out[n + ".running_mean"] = rng.normal(0, 0.1, c).astype(np.float32)
            out[n + ".running_var"] = rng.uniform(0.5, 2.0, c).astype(np.float32)
    return out


def same_pad(x: np.ndarray, k: int, s: int) -> np.ndarray:
    """TensorFlow's "same" padding (the extra pixel at the bottom/right), NHWC."""
    h = x.shape[1]
    total = max((-(-h // s) - 1) * s + k - h, 0)
    a, b = total // 2, total - total // 2
    return np.pad(x, ((0, 0), (a, b), (a, b), (0, 0)))


def conv_torch_layout(x: np.ndarray, w: np.ndarray, s: int) -> np.ndarray:
    """Cross-correlation with a PyTorch (out, in, k, k) kernel, "same" padding."""
    o, _, k, _ = w.shape
    xp = same_pad(x, k, s)
    n = -(-x.shape[1] // s)
    y = np.zeros((x.shape[0], n, n, o), np.float64)
    for i in range(n):
        for j in range(n):
            patch = xp[:, i * s : i * s + k, j * s : j * s + k, :]  # (N,k,k,in)
            y[:, i, j, :] = np.einsum("nabc,ocab->no", patch, w)
    return y


def bn_relu6(x: np.ndarray, sd: dict[str, np.ndarray], name: str) -> np.ndarray:
    g, b, m, v = (sd[f"{name}.{k}"] for k in ("weight", "bias", "running_mean", "running_var"))
    return np.clip(g * (x - m) / np.sqrt(v + lite.BN_EPSILON) + b, 0, 6)


def test_torch_layouts_load_into_the_right_axes() -> None:
    model = lite.feature_model(32)
    sd = fake_state_dict(model)
    assert lite.load_torch_weights(model, sd) == sum(
        1 for lyr in model.layers if lyr.name.startswith("_")
    )
    x = np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    # stem conv -> BN -> ReLU6, then block 0's depthwise 3x3 -> BN -> ReLU6
    stem = bn_relu6(conv_torch_layout(x, sd["_conv_stem.weight"], 2), sd, "_bn0")
    dw = sd["_blocks.0._depthwise_conv.weight"]  # (C, 1, 3, 3)
    xp = same_pad(stem, 3, 1)
    depth = np.zeros_like(stem)
    for i in range(stem.shape[1]):
        for j in range(stem.shape[2]):
            depth[:, i, j, :] = np.einsum("nabc,cab->nc", xp[:, i : i + 3, j : j + 3, :], dw[:, 0])
    depth = bn_relu6(depth, sd, "_blocks.0._bn1")
    probe = keras.Model(
        model.inputs,
        [model.get_layer("_bn0").output, model.get_layer("_blocks.0._bn1").output],
    )
    got_bn0, got_bn1 = probe.predict(x, verbose=0)
    np.testing.assert_allclose(np.clip(got_bn0, 0, 6), stem, atol=1e-4)
    np.testing.assert_allclose(np.clip(got_bn1, 0, 6), depth, atol=1e-4)


def test_missing_weights_and_disagreeing_reference_are_refused() -> None:
    model = lite.feature_model(32)
    sd = fake_state_dict(model)
    del sd["_blocks.3._project_conv.weight"]
    with pytest.raises(ValueError, match="_blocks.3._project_conv"):
        lite.load_torch_weights(model, sd)
    sd = fake_state_dict(model)
    x = np.zeros((1, 32, 32, 3), np.float32)
    sd["reference.input"] = x
    sd["reference.features"] = np.full((1, lite.FEATURES), 7.0, np.float32)
    with pytest.raises(ValueError, match="disagree"):
        lite.check_reference(sd)


def write_backbone(path: Path) -> Path:
    """A converted-weights file as the conversion script writes it, with random weights and
    a reference pair computed here (the plumbing is under test, not ImageNet)."""
    model = lite.feature_model(32)
    sd = fake_state_dict(model)
    lite.load_torch_weights(model, sd)
    x = np.random.default_rng(2).uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
    sd["reference.input"] = x
    sd["reference.features"] = model.predict(x, verbose=0)
    np.savez(path, **sd)
    return path


@pytest.mark.slow
def test_pretrained_recipe_trains_one_epoch(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "toy", per_class=4)
    backbone = write_backbone(tmp_path / "lite0.npz")
    out = tmp_path / "out"
    res = run_cli(
        "scripts/train.py",
        *("--data", str(data), "--recipe", "lite0", "--epochs", "1", "--out", str(out)),
        *("--backbone", str(backbone), "--bootstrap", "20", "--quiet", "--name", "lite"),
    )
    assert res.returncode == 0, res.stderr[-2000:]
    card = json.loads((out / "lite.card.json").read_text())
    assert card["architecture"] == "lite0" and len(card["history"]) == 1
    reloaded = keras.saving.load_model(out / "lite.keras", compile=False)
    assert reloaded.get_layer("_conv_head").kernel.shape == (1, 1, 320, lite.FEATURES)
    missing = run_cli(
        "scripts/train.py",
        *("--data", str(data), "--recipe", "lite0", "--epochs", "1", "--out", str(out)),
        *("--backbone", str(tmp_path / "absent.npz"), "--quiet"),
    )
    assert missing.returncode != 0 and "convert_efficientnet_lite" in missing.stderr
