"""The model card: the training environment, and the card as JSON and Markdown (with the
hand-kept ``<name>.notes.md`` beside it included)."""

from __future__ import annotations

import json
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np


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


def _heatmap_lines(card: dict[str, Any]) -> list[str]:
    """Whether the heatmaps mean something (``scripts/check_heatmaps.py``)."""
    h = card.get("heatmap")
    if not h:
        return []
    out = [
        "",
        "## Heatmaps",
        "",
        f"{h['method']}; measured {h['measured_on']} on the val images the model calls"
        f" COVID-19.  Deletion test: the hottest {h['hot_fraction']:.0%} of the picture"
        f" blurred (sigma {h['blur_sigma_px']:g} px) against the same region moved to"
        f" {h['random_places']} random places.",
        "",
        "| dataset | measured | heat inside the lung | lung share of the picture | drop, hot |"
        " drop, random | difference (95% CI) | hot drops more |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in h["results"]:
        lo, hi = r["drop_difference_ci"]
        out.append(
            f"| {r['dataset']} | {r['measured']} of {r['called_covid']} | "
            f"{r['heat_in_lung']:.0%} | {r['lung_area']:.0%} | {r['drop_hot']:.3f} | "
            f"{r['drop_random']:.3f} | {r['drop_difference']:.3f} ({lo:.3f} to {hi:.3f}) | "
            f"{r['hot_drops_more']:.0%} |"
        )
    if h.get("verdict"):
        out += ["", h["verdict"]]
    return out


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
    lines += _heatmap_lines(card)
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
