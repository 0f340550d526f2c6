#!/usr/bin/env python3
"""Train a covidct model and write it with its model card and plots.

    python scripts/train.py --data ../shared/datasets/sars-cov-2-ct \
        --data ../shared/datasets/covid-ct --seeds 0 1 2 --out models
    python scripts/train.py --recipe paper --data ../shared/datasets/covid-ct --out var/paper

Writes ``<out>/<name>.keras`` (no optimizer state), ``<name>.card.json``, ``<name>.card.md`` and
``<name>.{accuracy,loss,roc,confusion,reliability}.png``.  Everything is chosen on val.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from classifier import aggregate  # noqa: E402
from classifier import card as C  # noqa: E402
from classifier import training as T  # noqa: E402
from classifier.datasets import cached_split  # noqa: E402
from classifier.inference import file_sha256  # noqa: E402
from classifier.preprocess import DEFAULT_FRAMING  # noqa: E402
from classifier.validation import summarise  # noqa: E402

LICENSES = {
    "covid-ct": "COVID-CT (Yang et al. 2020, arXiv:2003.13865): figures from publications, "
    "research use; official patient-level split.",
    "sars-cov-2-ct": "SARS-CoV-2 CT-scan dataset (Soares et al. 2020): CC BY-NC-SA 4.0. "
    "A model trained on it inherits those terms: non-commercial, share-alike.",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--data",
        action="append",
        required=True,
        type=Path,
        help="dataset folder with train/ and val/ (repeatable)",
    )
    p.add_argument("--recipe", choices=sorted(T.RECIPES), default="covidct")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--epochs", type=int, help="override the recipe's epochs")
    p.add_argument("--out", type=Path, default=Path("models"))
    p.add_argument("--name", default=None, help="file stem (default: covidct or paper)")
    p.add_argument(
        "--dicom-study",
        action="append",
        type=Path,
        default=[],
        help="a folder of one real DICOM series to report a study probability for",
    )
    p.add_argument("--limit", type=int, help="at most this many images per class (tests)")
    p.add_argument(
        "--cache",
        type=Path,
        help="folder for preprocessed splits (PNG strips): "
        "read if present, else written; lets training run where the data is not",
    )
    p.add_argument(
        "--backbone",
        type=Path,
        default=Path(".data/efficientnet-lite0.npz"),
        help="converted ImageNet weights for a pretrained recipe "
        "(scripts/convert_efficientnet_lite.py)",
    )
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--quiet", action="store_true")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="do not train: add the --dicom-study results to the existing model card",
    )
    return p.parse_args(argv)


def dicom_study_report(model, temperature: float, threshold: float, folder: Path) -> dict:
    """Study probability of one real series by the product's own aggregation rule."""
    import pydicom

    from classifier.errors import SliceSkipped
    from classifier.metrics import apply_temperature
    from classifier.preprocess import to_model_input

    files = sorted(folder.glob("*.dcm")) or sorted(p for p in folder.iterdir() if p.is_file())
    inputs, skipped = [], 0
    for f in files:
        try:
            inputs.append(to_model_input(pydicom.dcmread(f)))
        except SliceSkipped:
            skipped += 1
    raw = model.predict(np.stack(inputs).astype(np.float32), batch_size=64, verbose=0)
    p = apply_temperature(raw.reshape(-1), temperature)
    prob, _ = aggregate.study_probability(p)
    return {
        "name": f"{folder.parent.name}/{folder.name}",
        "truth": folder.parent.name,
        "probability": prob,
        "label": "COVID-19" if prob >= threshold else "non-COVID",
        "analysed": len(inputs),
        "skipped": skipped,
        "slice_median": float(np.median(p)),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
    )
    recipe = T.RECIPES[args.recipe]
    name = args.name or ("paper" if args.recipe == "paper" else "covidct")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        return report_only(args.out / f"{name}.keras", args.dicom_study)
    train_splits = [cached_split(d, "train", args.cache, limit=args.limit) for d in args.data]
    val_splits = [cached_split(d, "val", args.cache, limit=args.limit) for d in args.data]
    for s in train_splits + val_splits:
        print(f"{s.dataset}: {len(s)} images ({int(s.labels.sum())} COVID)")

    runs = []
    for seed in args.seeds:
        print(f"== seed {seed}")
        model, history = T.train(
            recipe,
            train_splits,
            val_splits,
            seed=seed,
            epochs=args.epochs,
            verbose=0 if args.quiet else 1,
            backbone=args.backbone,
        )
        summary = summarise(
            model, val_splits, bootstrap=args.bootstrap, calibrate=args.recipe != "paper"
        )
        aucs = {k: v["metrics"]["auc"] for k, v in summary["datasets"].items()}
        print(f"seed {seed}: val AUC {aucs}, best epoch {history.best_epoch}", flush=True)
        (args.out / "seeds").mkdir(exist_ok=True)
        _save_without_optimizer(
            model,
            recipe.architecture,
            len(train_splits),
            args.out / "seeds" / f"{name}-seed{seed}.keras",
        )
        runs.append((seed, model, history, summary, aucs))
        if history.gate:
            print(
                f"seed {seed}: val AUC with the jointly trained gate {history.joint_gate_auc}",
                flush=True,
            )

    seed, model, history, summary, _ = max(runs, key=lambda r: float(np.mean(list(r[4].values()))))
    model_path = args.out / f"{name}.keras"
    _save_without_optimizer(model, recipe.architecture, len(train_splits), model_path)
    sha = file_sha256(model_path)
    env = C.environment()
    version = f"{name}-{recipe.name}-{env['trained_at'][:10].replace('-', '')}-{sha[:8]}"
    card = {
        "version": version,
        "sha256": sha,
        "architecture": recipe.architecture,
        "parameters": int(model.count_params()),
        "recipe": recipe.name,
        "recipe_description": recipe.description,
        "domains": [s.dataset for s in train_splits],
        "input": "200x200 RGB (gray replicated), values 0-255; DICOM: HU, lung window "
        "C-600/W1500, cropped to the lungs",
        "positive_class": "COVID-19",
        "threshold": summary["threshold"],
        "temperature": summary["temperature"],
        "aggregation": aggregate.RULE,
        "seed": seed,
        "seeds": [
            {
                "seed": s,
                "val_auc": a,
                "best_epoch": h.best_epoch,
                "val_auc_joint_gate": h.joint_gate_auc,
            }
            for s, _, h, _, a in runs
        ],
        "seed_summary": {
            k: {
                "mean": float(np.mean(v)),
                "min": float(np.min(v)),
                "max": float(np.max(v)),
                "std": float(np.std(v)),
            }
            for k, v in {k: [r[4][k] for r in runs] for k in runs[0][4]}.items()
        },
        "best_epoch": history.best_epoch,
        "gate_refit": history.gate,
        "training_seconds": history.seconds,
        "history": history.epochs,
        "validation": summary["datasets"],
        "validation_pooled": summary["pooled"],
        "data": [
            {
                "name": s.dataset,
                "train": len(s),
                "val": len(v),
                "license": LICENSES.get(s.dataset, "see the dataset's README"),
            }
            for s, v in zip(train_splits, val_splits, strict=True)
        ],
        "license": "CC BY-NC-SA 4.0 (inherited from sars-cov-2-ct)"
        if any(s.dataset == "sars-cov-2-ct" for s in train_splits)
        else "see data",
        "intended_use": "Research and triage support on axial chest CT. Not a diagnosis.",
        "limits": [
            "Validated on val splits only; the test splits are scored independently.",
            "Trained on 2D slices; a study verdict aggregates slices by the rule above.",
            "Not validated for children, contrast phases, or non-chest CT.",
            "COVID-CT images are figures from papers; their look differs from real scans.",
            "The two datasets ask different questions: in eight val images per class, most "
            "COVID-CT non-COVID images show other lung disease while most real-scan non-COVID "
            "slices look clear, so COVID-19 against other pneumonia is the weaker distinction "
            "and a pneumonia study may be called COVID-19.",
            "The gate routes each image to the expert of the training dataset it looks like (a "
            "linear classifier refitted after training); an image like neither dataset is "
            "routed by guess, and a misrouted image gets the other expert's answer.",
            f"DICOM slices with under {DEFAULT_FRAMING.min_lung_fraction:.0%} lung (lung bases "
            "and apices) are not analysed; the floor was chosen on the only two real DICOM "
            "studies available (README), so it is not validated.",
        ],
        "environment": env,
    }
    card["dicom_studies"] = [
        dicom_study_report(model, summary["temperature"], summary["threshold"], d)
        for d in args.dicom_study
    ]
    C.write_json(card, args.out / f"{name}.card.json")
    from classifier.errors import ModelError
    from classifier.export import export

    val_images = np.concatenate([np.repeat(v.images[..., None], 3, axis=-1) for v in val_splits])
    checked_on = " + ".join(f"{v.dataset} val" for v in val_splits)
    try:
        card["litert"] = export(model_path, val_images.astype(np.float32), checked_on)
    except ModelError as exc:  # no export: the worker serves this model with Keras
        print(f"no LiteRT export: {exc}", file=sys.stderr)
        card["litert"] = {"exported": False, "reason": str(exc)}
        C.write_json(card, args.out / f"{name}.card.json")
    C.write_card_markdown(card, args.out / f"{name}.card.md")
    from classifier.plots import write_all

    write_all(card, summary, args.out, name)
    print(f"wrote {model_path} ({model_path.stat().st_size / 1e6:.1f} MB), version {version}")
    for s in card["dicom_studies"]:
        print(f"  {s['name']}: {s['probability']:.3f} -> {s['label']}")
    return 0


def report_only(model_path: Path, studies: list[Path]) -> int:
    """Score the real DICOM studies with a trained model and record them in its card."""
    import json

    import keras

    from classifier.inference import card_path

    card = json.loads(card_path(model_path).read_text())
    model = keras.saving.load_model(model_path, compile=False)
    card["dicom_studies"] = [
        dicom_study_report(model, card["temperature"], card["threshold"], d) for d in studies
    ]
    C.write_json(card, card_path(model_path))
    C.write_card_markdown(card, model_path.with_name(model_path.stem + ".card.md"))
    for s in card["dicom_studies"]:
        print(f"  {s['name']}: {s['probability']:.3f} -> {s['label']}")
    return 0


def _save_without_optimizer(model, architecture: str, domains: int, path: Path) -> None:
    """Keras 3 has no include_optimizer: copy the weights into a fresh, uncompiled model."""
    from classifier.architectures import build

    fresh = build(architecture, domains=domains)
    fresh.set_weights(model.get_weights())
    fresh.save(path)


if __name__ == "__main__":
    sys.exit(main())
