"""PNG plots for the model card: curves per epoch, ROC, confusion matrix, reliability."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from classifier import metrics as M  # noqa: E402


def write_all(card: dict[str, Any], summary: dict[str, Any], out: Path, stem: str) -> list[Path]:
    paths = []
    hist = card["history"]
    epochs = [r["epoch"] for r in hist]
    for key, title in (("accuracy", "Accuracy"), ("loss", "Loss")):
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(epochs, [r[key] for r in hist], "o-", label=f"train {key}")
        ax.plot(epochs, [r[f"val_{key}"] for r in hist], "s-", label=f"val {key} (mean)")
        ax.set_xlabel("epoch")
        ax.set_title(f"{title} per epoch ({card['recipe']})")
        ax.legend()
        ax.grid(alpha=0.3)
        paths.append(_save(fig, out / f"{stem}.{key}.png"))

    fig, ax = plt.subplots(figsize=(5, 5))
    for name, p in summary["_cal"].items():
        y = summary["_labels"][name]
        fpr, tpr, _ = M.roc_curve(y, p)
        ax.plot(fpr, tpr, label=f"{name} (AUC {M.auc(y, p):.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title("ROC on val")
    ax.legend(loc="lower right")
    paths.append(_save(fig, out / f"{stem}.roc.png"))

    names = list(summary["_cal"])
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        c = M.confusion(summary["_labels"][name], summary["_cal"][name], card["threshold"])
        grid = np.array([[c["tn"], c["fp"]], [c["fn"], c["tp"]]])
        ax.imshow(grid, cmap="Blues")
        for (i, j), v in np.ndenumerate(grid):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=14)
        ax.set_xticks([0, 1], ["non-COVID", "COVID-19"])
        ax.set_yticks([0, 1], ["non-COVID", "COVID-19"])
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(name)
    paths.append(_save(fig, out / f"{stem}.confusion.png"))

    fig, ax = plt.subplots(figsize=(5, 5))
    y = np.concatenate(list(summary["_labels"].values()))
    for label, key in (("before", "_raw"), ("after temperature", "_cal")):
        p = np.concatenate(list(summary[key].values()))
        rel = M.reliability(y, p)
        ax.plot([r[0] for r in rel], [r[1] for r in rel], "o-", label=label)
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set_xlabel("predicted probability")
    ax.set_ylabel("observed frequency")
    ax.set_title("Reliability on val (pooled)")
    ax.legend()
    paths.append(_save(fig, out / f"{stem}.reliability.png"))
    return paths


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
