"""train.py, `covidct evaluate` and `covidct predict` end to end on tiny generated data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from classifier import metrics as M
from classifier.preprocess import to_model_input
from covidct.synthetic import SeriesSpec, make_study, write_study
from tests.helpers import make_tiny_model, tiny_model_output

ROOT = Path(__file__).resolve().parent.parent


def make_image_folder(root: Path, per_class: int = 6, seed: int = 0) -> Path:
    """train/ and val/ with CT_COVID (bright) and CT_NonCOVID (dark) PNG and JPEG images."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for cls, level in (("CT_COVID", 170), ("CT_NonCOVID", 70)):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                arr = np.clip(rng.normal(level, 30, (120, 150)), 0, 255).astype(np.uint8)
                fmt = "PNG" if i % 2 else "JPEG"
                Image.fromarray(arr).save(folder / f"{i}.{fmt.lower()}", format=fmt)
    return root


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("COVIDCT_")} | (env or {})
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        env=full,
        timeout=600,
        check=False,
        cwd=ROOT,
    )


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["paper", "covidct"])
def test_train_one_epoch_each_recipe(tmp_path: Path, recipe: str) -> None:
    data = make_image_folder(tmp_path / "toy")
    out = tmp_path / "out"
    res = run_cli(
        "scripts/train.py",
        "--data",
        str(data),
        "--recipe",
        recipe,
        "--epochs",
        "1",
        "--out",
        str(out),
        "--bootstrap",
        "20",
        "--quiet",
    )
    assert res.returncode == 0, res.stderr[-2000:]
    stem = "paper" if recipe == "paper" else "covidct"
    card = json.loads((out / f"{stem}.card.json").read_text())
    assert card["recipe"] == recipe and len(card["history"]) == 1
    assert set(card["validation"]["toy"]["metrics"]) >= {
        "accuracy",
        "auc",
        "sensitivity",
        "specificity",
        "f1",
        "ci95",
    }
    assert 0.0 <= card["threshold"] <= 1.0
    for plot in ("accuracy", "loss", "roc", "confusion", "reliability"):
        assert (out / f"{stem}.{plot}.png").stat().st_size > 1000
    assert (out / f"{stem}.card.md").read_text().startswith("# Model card")
    # the LiteRT export the worker serves, checked against Keras on the val images: made
    # when they agree within 1e-5, else left out with the reason (the worker serves Keras)
    lite, md = card["litert"], (out / f"{stem}.card.md").read_text()
    if "file" in lite:
        assert lite["max_abs_difference"] <= 1e-5 and lite["images"] > 0
        assert (out / f"{stem}.tflite").stat().st_size > 1000 and "Served by LiteRT" in md
    else:
        assert "differs from Keras" in lite["reason"] and not (out / f"{stem}.tflite").exists()
        assert "Served by Keras" in md
    # saved without optimizer state: only the model's own weights
    import zipfile

    with zipfile.ZipFile(out / f"{stem}.keras") as z:
        import h5py

        with z.open("model.weights.h5") as fh, h5py.File(fh) as h5:
            assert sorted(h5.keys()) == ["layers", "vars"]  # no "optimizer" group


@pytest.mark.slow
def test_train_two_datasets_refits_the_gate(tmp_path: Path) -> None:
    """Two folders: one expert each, and the gate refitted after training, in the card."""
    first = make_image_folder(tmp_path / "first", seed=1)
    second = make_image_folder(tmp_path / "second", seed=2)
    out = tmp_path / "out"
    res = run_cli(
        "scripts/train.py",
        *("--data", str(first), "--data", str(second)),
        *("--epochs", "1", "--out", str(out), "--bootstrap", "20", "--quiet"),
    )
    assert res.returncode == 0, res.stderr[-2000:]
    card = json.loads((out / "covidct.card.json").read_text())
    gate = card["gate_refit"]
    assert gate["temperature"] in (1.0, 0.5, 0.25)
    assert set(gate["val_before"]) == {"first", "second"}
    assert set(card["seeds"][0]["val_auc_joint_gate"]) == {"first", "second"}
    chosen = gate["val_tried"][str(gate["temperature"])]
    for name, auc in card["seeds"][0]["val_auc"].items():  # the shipped numbers are the refit's
        assert auc == pytest.approx(chosen[name]["auc"], abs=0.05)
    assert "## Gate refit" in (out / "covidct.card.md").read_text()


@pytest.mark.slow
def test_evaluate_matches_known_outputs(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "toy", per_class=8) / "val"
    model = make_tiny_model(tmp_path / "tiny.keras")
    res = run_cli(
        "-m", "covidct.cli", "evaluate", "--data", str(data), "--model", str(model), "--json"
    )
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout)
    files = sorted((data / "CT_COVID").iterdir()) + sorted((data / "CT_NonCOVID").iterdir())
    y = np.array([1] * 8 + [0] * 8)
    p = tiny_model_output(np.stack([to_model_input(f) for f in files]))
    expected = M.evaluate(y, p, 0.5, bootstrap=0)
    for key in ("accuracy", "auc", "sensitivity", "specificity", "f1"):
        assert got[key] == pytest.approx(getattr(expected, key), abs=1e-6)
    assert got["n"] == 16 and got["threshold"] == 0.5 and got["model_version"] == "tiny-test-1"


@pytest.mark.slow
def test_predict_dicom_and_png(tmp_path: Path) -> None:
    model = make_tiny_model(tmp_path / "tiny.keras")
    (dcm,) = write_study(make_study([SeriesSpec(slices=1)]), tmp_path / "dcm")[:1]
    png = tmp_path / "slice.png"
    Image.new("L", (300, 300), 200).save(png)
    bad = tmp_path / "fake.png"
    bad.write_text("not an image")
    res = run_cli(
        "-m", "covidct.cli", "predict", str(dcm), str(png), str(bad), "--model", str(model)
    )
    assert res.returncode == 1  # one file failed
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 3
    name, prob, label = lines[1].split("\t")
    expected = float(tiny_model_output(to_model_input(png)[None])[0])
    assert name == str(png) and float(prob) == pytest.approx(expected, abs=1e-3)
    assert label == ("COVID-19" if expected >= 0.5 else "non-COVID")
    assert lines[0].startswith(str(dcm)) and "\t" in lines[0]
    assert "error: not a PNG or JPEG" in lines[2]
