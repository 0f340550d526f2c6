#!/usr/bin/env python3
"""Do the model's heatmaps mean something?  Measured on the val splits, written to the card.

    .venv/bin/python scripts/check_heatmaps.py [--model models/covidct.keras]
        [--data ../shared/datasets/sars-cov-2-ct --data ../shared/datasets/covid-ct]

Exports ``<model>.cam.tflite`` (checked against Keras) when it is missing or older than the
model, then, per dataset, on the val images the model calls COVID-19:

* **heat inside the lung**: the share of each map's heat on lung pixels, against the share of
  the picture the lung covers (a map that ignored anatomy would score about that).  Lung
  pixels: the product's own 2D rule for DICOM slices (``classifier.preprocess.Framing``: the
  largest body component above -500 HU, holes filled, and below -400 HU inside it), on the
  gray picture read back to HU through the lung window;
* **deletion test**: the hottest 10% of the picture blurred (Gaussian, sigma 6 px) lowers the
  probability by how much, against the same mask moved to 5 random places (a region of the
  same size and shape): mean drops, the paired difference with a bootstrap 95% interval, and
  how often the hot region drops more.

A map *means something* on a dataset when both hold: the hot region's drop exceeds the random
region's (the interval's lower bound above 0), and more of the heat lies on lung than the lung's
share of the picture.  The product shows Grad-CAM only if it means something on the real scans
(``sars-cov-2-ct``); otherwise its pictures show the opacity map measured in HU.  Results go to
``<model>.card.json`` under ``heatmap`` and into the card's Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import date
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

from classifier.preprocess import DEFAULT_FRAMING, rgb_batch  # noqa: E402

HOT_FRACTION = 0.10
BLUR_SIGMA = 6.0
RANDOM_PLACES = 5


def lung_proxy(gray: np.ndarray) -> np.ndarray:
    """Lung pixels of a lung-window picture by the product's DICOM rule, on HU read back."""
    f = DEFAULT_FRAMING
    hu = gray.astype(np.float32) / 255.0 * f.window_width + (f.window_center - f.window_width / 2)
    labels, count = ndimage.label(hu > f.body_hu)
    if count == 0:
        return np.zeros(gray.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    body = ndimage.binary_fill_holes(labels == int(sizes.argmax()))
    return ndimage.binary_opening(body & (hu < f.lung_hu), iterations=1)


def deletion(gray: np.ndarray, mask: np.ndarray) -> np.ndarray:
    blurred = ndimage.gaussian_filter(gray.astype(np.float32), BLUR_SIGMA)
    out = gray.astype(np.float32).copy()
    out[mask] = blurred[mask]
    return out


def bootstrap_mean(values: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    means = [float(rng.choice(values, len(values)).mean()) for _ in range(1000)]
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def measure(name: str, gray: np.ndarray, clf: Any, mapper: Any) -> dict[str, Any]:
    from classifier.heatmap import upsample

    rng = np.random.default_rng(0)
    x = rgb_batch(gray)
    p = np.concatenate([clf.probabilities(x[i : i + 32]) for i in range(0, len(x), 32)])
    positive = np.flatnonzero(p >= clf.threshold)
    inside, area, hot_drop, rand_drop = [], [], [], []
    for i in positive:
        heat = upsample(mapper.heat(x[i : i + 1])[0], gray.shape[1:])
        if heat.max() <= 0:
            continue
        lung = lung_proxy(gray[i])
        if lung.any():
            inside.append(float(heat[lung].sum() / heat.sum()))
            area.append(float(lung.mean()))
        hot = heat >= np.quantile(heat, 1 - HOT_FRACTION)
        shifted = [
            np.roll(hot, (int(rng.integers(40, 160)), int(rng.integers(40, 160))), axis=(0, 1))
            for _ in range(RANDOM_PLACES)
        ]
        batch = np.stack([deletion(gray[i], m) for m in [hot, *shifted]])
        q = clf.probabilities(np.repeat(batch[..., None], 3, axis=3))
        hot_drop.append(float(p[i] - q[0]))
        rand_drop.append(float(p[i] - q[1:].mean()))
    hot_a, rand_a = np.array(hot_drop), np.array(rand_drop)
    diff = hot_a - rand_a
    lo, hi = bootstrap_mean(diff, rng) if len(diff) else (float("nan"), float("nan"))
    return {
        "dataset": name,
        "val_images": int(len(gray)),
        "called_covid": int(len(positive)),
        "measured": int(len(diff)),
        "heat_in_lung": float(np.mean(inside)) if inside else None,
        "lung_area": float(np.mean(area)) if area else None,
        "drop_hot": float(hot_a.mean()) if len(hot_a) else None,
        "drop_random": float(rand_a.mean()) if len(rand_a) else None,
        "drop_difference": float(diff.mean()) if len(diff) else None,
        "drop_difference_ci": [lo, hi],
        "hot_drops_more": float((diff > 0).mean()) if len(diff) else None,
        "means_something": bool(
            len(diff) and lo > 0 and inside and np.mean(inside) > np.mean(area)
        ),
    }


def verdict(results: list[dict[str, Any]]) -> str:
    real = next((r for r in results if r["dataset"] == "sars-cov-2-ct"), None)
    if real is None:
        return "Not measured on real scans (sars-cov-2-ct): the product does not show the maps."
    if real["means_something"]:
        return "On real scans the maps mean something: the product may show them."
    return (
        "On real scans (sars-cov-2-ct) the maps do not show where the call comes from: the"
        " hot region's drop is not shown to exceed a random region's, or the heat is not on the"
        " lung more than chance.  The product does not show them: its key images and"
        " dashboard show the opacity map measured in Hounsfield units instead."
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "covidct.keras")
    parser.add_argument(
        "--data",
        type=Path,
        action="append",
        default=None,
        help="a dataset folder with val/ (default: sars-cov-2-ct and covid-ct in ../shared)",
    )
    args = parser.parse_args()
    shared = ROOT.parent / "shared" / "datasets"
    data = args.data or [shared / "sars-cov-2-ct", shared / "covid-ct"]

    from classifier.datasets import load_split
    from classifier.heatmap import HeatMapper, cam_path, export_cam
    from classifier.inference import Classifier, card_path

    splits = [load_split(d, "val") for d in data]
    cam = cam_path(args.model)
    if not cam.is_file() or cam.stat().st_mtime < args.model.stat().st_mtime:
        images = np.concatenate([rgb_batch(s.images) for s in splits])
        print("exported", export_cam(args.model, images))
    clf, mapper = Classifier(args.model), HeatMapper(cam)
    results = [measure(s.dataset, s.images, clf, mapper) for s in splits]
    for r in results:
        print(json.dumps(r))
    card = card_path(args.model)
    data_card = json.loads(card.read_text(encoding="utf-8"))
    data_card["heatmap"] = {
        "method": (
            "Grad-CAM of the gate's expert on the last convolutional block (12x12), as served"
            f" from {cam.name}"
        ),
        "measured_on": str(date.today()),
        "hot_fraction": HOT_FRACTION,
        "blur_sigma_px": BLUR_SIGMA,
        "random_places": RANDOM_PLACES,
        "results": results,
        "verdict": verdict(results),
    }
    card.write_text(json.dumps(data_card, indent=2) + "\n", encoding="utf-8")
    from classifier.card import write_card_markdown

    write_card_markdown(data_card, card.with_name(card.name.replace(".card.json", ".card.md")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
