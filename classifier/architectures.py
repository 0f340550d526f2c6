"""The two architectures: the paper's CNN, and ours.

Both take the product's input, (200, 200, 3) ``uint8``-valued floats, rescale by 1/255 inside
the model (the paper's ``rescale=1/255``) and end in one sigmoid unit: P(COVID-19).

``paper``: the paper's text allows two readings.  We ship the one that reproduces its training
curve (0.97 training accuracy at epoch 8-9): two Conv(3x3, ReLU) + MaxPool(2) blocks with 32 and
64 filters, Flatten, five Dense(64, ReLU), sigmoid output; 9.5M parameters, most of them in the
first Dense layer, which is why it memorises 430 images.  The other reading (five conv blocks,
three Dense layers) mostly predicts the majority class.

``covidct``: a mixture of experts for 2 CPU cores.  The datasets pull against each other
(COVID-CT is figures from papers, the other real scanner crops; a linear probe tells them apart
at AUC 0.98, ../shared/NOTES.md): one network trained on both learns a compromise that fits
neither, and a shared trunk with one head per dataset still scored only 0.69 on COVID-CT.  So
each dataset gets its own expert, a small VGG-style CNN trained on that dataset alone (resized
to 144x144 inside the model, a stride-2 stem, four blocks of two 3x3 conv + BatchNorm (momentum
0.9: an epoch is only tens of steps) + ReLU with max pooling, global average pooling, dropout,
sigmoid), and a gate (softmax on the experts' concatenated pooled features) learns which kind of
image it sees.  The output is the
gate-weighted mix of the expert probabilities.  A DICOM slice, framed like the real-scan
training crops, is routed to the real-scan expert.  Augmentation layers (flip, rotation, zoom,
contrast, translation) are part of each network and only active in training.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
from keras import layers

INPUT_SHAPE = (200, 200, 3)
ARCHITECTURES = ("paper", "covidct")


def build(name: str, *, seed: int = 0, domains: int = 1) -> keras.Model:
    """The serving model: image in, P(COVID-19) out."""
    if name == "paper":
        return build_paper()
    if name == "covidct":
        return build_covidct(seed=seed, domains=domains).serving
    raise ValueError(f"unknown architecture {name!r}; choose from {', '.join(ARCHITECTURES)}")


def build_paper() -> keras.Model:
    inputs = keras.Input(INPUT_SHAPE, name="image")
    x = layers.Rescaling(1.0 / 255)(inputs)
    for filters in (32, 64):
        x = layers.Conv2D(filters, 3, activation="relu")(x)
        x = layers.MaxPooling2D(2)(x)
    x = layers.Flatten()(x)
    for _ in range(5):
        x = layers.Dense(64, activation="relu")(x)
    outputs = layers.Dense(1, activation="sigmoid", name="p_covid")(x)
    return keras.Model(inputs, outputs, name="paper")


def _conv_bn(x: keras.KerasTensor, filters: int, stride: int = 1) -> keras.KerasTensor:
    x = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization(momentum=0.9)(x)
    return layers.Activation("relu")(x)


def _augment(x: keras.KerasTensor, seed: int) -> keras.KerasTensor:
    x = layers.RandomFlip("horizontal", seed=seed)(x)
    x = layers.RandomRotation(0.05, fill_mode="constant", seed=seed + 1)(x)
    x = layers.RandomZoom((-0.15, 0.1), fill_mode="constant", seed=seed + 2)(x)
    x = layers.RandomTranslation(0.06, 0.06, fill_mode="constant", seed=seed + 3)(x)
    return layers.RandomContrast(0.25, seed=seed + 4)(x)


def build_trunk(*, seed: int = 0, width: int = 32, name: str = "trunk") -> keras.Model:
    """One expert's feature extractor: image in, pooled features (``width * 8``) out."""
    inputs = keras.Input(INPUT_SHAPE, name="image")
    x = _augment(layers.Rescaling(1.0 / 255)(inputs), seed)
    x = layers.Resizing(144, 144)(x)  # halves the cost on 2 CPU cores; 200x200 stays the API
    x = _conv_bn(x, width, stride=2)  # 72x72
    for mult in (1, 2, 4, 8):
        x = _conv_bn(x, width * mult)
        x = _conv_bn(x, width * mult)
        x = layers.MaxPooling2D(2)(x)  # 36, 18, 9, 4
    return keras.Model(inputs, layers.GlobalAveragePooling2D()(x), name=name)


@dataclass
class Experts:
    """The parts of ``covidct``.  ``serving`` shares its weights with the other models:
    ``experts[i]`` (image -> P(COVID-19), trained on dataset i), ``trunks[i]`` (image ->
    features) and ``gate`` (concatenated trunk features -> softmax over datasets)."""

    serving: keras.Model
    experts: list[keras.Model]
    trunks: list[keras.Model]
    gate: keras.Model


def build_covidct(*, seed: int = 0, width: int = 32, domains: int = 1) -> Experts:
    """One expert per dataset and a gate on the experts' own features: recognising which
    kind of image it sees is easy for features that were trained on both kinds."""
    inputs = keras.Input(INPUT_SHAPE, name="image")
    trunks, heads, experts = [], [], []
    for i in range(domains):
        trunk = build_trunk(seed=seed + 10 * i, width=width, name=f"trunk_{i}")
        drop = layers.Dropout(0.4, seed=seed + 10 * i + 5, name=f"dropout_{i}")
        dense = layers.Dense(1, activation="sigmoid", name=f"expert_{i}")
        trunks.append(trunk)
        heads.append((drop, dense))
        experts.append(keras.Model(inputs, dense(drop(trunk(inputs))), name=f"covidct_expert_{i}"))
    gate_dense = layers.Dense(domains, activation="softmax", name="gate")
    feature_size = width * 8 * domains
    gate_in = keras.Input((feature_size,), name="features")
    gate = keras.Model(gate_in, gate_dense(gate_in), name="covidct_gate")
    features = [t(inputs) for t in trunks]
    probs = [dense(drop(f)) for f, (drop, dense) in zip(features, heads, strict=True)]
    if domains > 1:
        stacked = layers.Concatenate(name="experts")(probs)
        weights = gate_dense(layers.Concatenate(name="expert_features")(features))
    else:
        stacked, weights = probs[0], gate_dense(features[0])
    mixed = layers.Dot(axes=1, name="p_covid")([stacked, weights])
    return Experts(keras.Model(inputs, mixed, name="covidct"), experts, trunks, gate)
