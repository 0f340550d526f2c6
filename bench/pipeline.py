#!/usr/bin/env python3
"""Worker pipeline benchmark: a study from queued to SR delivered, split by stage.

    .venv/bin/python bench/pipeline.py [--slices 300] [--model models/covidct.keras]
                                       [--real-runs 1] [--no-synthetic]

For a synthetic study of 512x512 slices (and, when ../shared is present, the two real
COVID-CT-MD studies, JPEG Lossless), runs the worker's own pipeline in-process with the shipped
model and a pynetdicom SCP as the PACS, and prints: time per stage (read, preprocess,
inference, lungs: segmentation and quantification, SR, export), slices/s, peak RSS, and the
ratio of the whole to a bare forward pass of the model over the same slices measured in the
same run (target: at most 1.3).  For the real studies it prints the verdicts, and with
``--real-runs N`` the median of N runs each.  ``COVIDCT_READ_THREADS`` is passed through.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402


def run_one(settings, clf, study_id: int, label: str) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    import tensorflow as tf
    from sqlalchemy import select

    from classifier.preprocess import to_model_input
    from core.db import session_scope
    from core.models import Delivery, Instance
    from worker.delivery import deliver
    from worker.pipeline import analyse_study

    t0 = time.perf_counter()
    out = analyse_study(settings, study_id, clf)
    t1 = time.perf_counter()
    with session_scope(settings.database_url) as s:
        ids = s.scalars(select(Delivery.id)).all()
        paths = s.scalars(select(Instance.spool_path).where(Instance.study_id == study_id)).all()
    for delivery_id in ids:
        deliver(settings, delivery_id)
    export = time.perf_counter() - t1
    total = t1 - t0 + export
    t = out.timings
    # the reference: a bare forward pass over the same analysed slices, same batch size
    import pydicom

    from classifier.errors import SliceSkipped

    inputs = []
    for p in paths:
        try:
            inputs.append(to_model_input(pydicom.dcmread(p)))
        except SliceSkipped:
            continue
        except Exception:
            continue
    model = clf.model

    @tf.function(reduce_retracing=True)
    def bare(x: tf.Tensor) -> tf.Tensor:
        return model(x, training=False)

    x = np.stack(inputs[: t.slices]).astype(np.float32)
    for i in range(0, len(x), settings.batch_size):  # trace every batch shape first
        bare(tf.convert_to_tensor(x[i : i + settings.batch_size])).numpy()
    bare_runs = []
    for _ in range(3):  # the machine is noisy: the median of three passes
        b0 = time.perf_counter()
        for i in range(0, len(x), settings.batch_size):
            bare(tf.convert_to_tensor(x[i : i + settings.batch_size])).numpy()
        bare_runs.append(time.perf_counter() - b0)
    bare_s = float(np.median(bare_runs))
    lungs_wait = t.extra.get("lungs_wait", 0.0)
    other = max(0.0, total - (t.read + t.preprocess + t.inference + lungs_wait + t.sr + export))
    print(
        f"\n{label}: {out.state}, verdict {out.verdict} (p={out.probability:.3f}), "
        f"{t.slices} slices analysed"
    )
    print(
        f"  read {t.read:.2f} s | preprocess {t.preprocess:.2f} s | inference {t.inference:.2f} s"
        f" | lungs {t.lungs:.2f} s (added after inference {t.extra.get('lungs_wait', 0):.2f} s)"
        f" | SR {t.sr:.2f} s (of which key images and key objects"
        f" {t.extra.get('key images', 0):.2f} s) | export {export:.2f} s"
        f" | other {other:.2f} s | total {total:.2f} s"
        " (read+preprocess run in a thread beside inference, so stages overlap)"
    )
    print(
        f"  {t.slices / total:.1f} slices/s; bare model inference on the same slices "
        f"{bare_s:.2f} s; whole / bare = {total / bare_s:.2f}; "
        f"(read+preprocess) per slice {1000 * (t.read + t.preprocess) / max(t.slices, 1):.1f} ms"
    )
    return total, bare_s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "covidct.keras")
    parser.add_argument("--real-runs", type=int, default=1)
    parser.add_argument("--no-synthetic", action="store_true")
    args = parser.parse_args()

    from classifier.inference import Classifier
    from core.db import upgrade
    from core.settings import load_settings
    from covidct.synthetic import SeriesSpec, make_study
    from covidct.testbed import TestPACS, spool_study

    pacs = TestPACS()
    work = Path(tempfile.mkdtemp(prefix="covidct-pipeline-"))
    clf = Classifier(args.model)
    print(
        f"model {clf.version}; peak RSS after loading: "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB"
    )
    jobs: list[tuple[str, object]] = [
        (
            "warm-up (not reported: first use of TensorFlow, highdicom's code tables)",
            make_study([SeriesSpec(slices=20)], seed=99),
        ),
    ]
    jobs += [
        (
            f"synthetic study, {args.slices} slices 512x512 (run {k + 1})",
            make_study([SeriesSpec(slices=args.slices)], seed=k),
        )
        for k in range(0 if args.no_synthetic else 3)
    ]
    sample = ROOT.parent / "shared" / "datasets" / "covid-ct-md-sample"
    for k in range(args.real_runs):
        for sub in ("covid/P001", "normal/normal001"):
            if (sample / sub).is_dir():
                files = sorted((sample / sub).glob("*.dcm"))
                jobs.append((f"real study {sub} (JPEG Lossless, run {k + 1})", files))
    real: dict[str, list[float]] = {}
    totals: list[float] = []
    bares: list[float] = []
    for n, (label, items) in enumerate(jobs):
        settings = load_settings(
            {
                "COVIDCT_DATA_DIR": str(work / f"run{n}"),
                "COVIDCT_MODEL_PATH": str(args.model),
                "COVIDCT_DESTINATIONS": pacs.destination,
                "COVIDCT_LOG_LEVEL": "WARNING",
            }
            | {k: v for k, v in os.environ.items() if k == "COVIDCT_READ_THREADS"}
        )
        upgrade(settings.database_url)
        study_id = spool_study(settings, items, "BENCH")
        if label.startswith("warm-up"):
            from worker.pipeline import analyse_study

            analyse_study(settings, study_id, clf)
            continue
        total, bare_s = run_one(settings, clf, study_id, label)
        if label.startswith("synthetic"):
            totals.append(total)
            bares.append(bare_s)
        else:
            real.setdefault(label.split(" (")[0], []).append(total)
        print(
            f"  peak RSS so far: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB"
        )
    pacs.stop()
    for name, runs in real.items():
        print(f"\n{name}, median of {len(runs)} runs: whole {float(np.median(runs)):.2f} s")
    if not totals:
        return 0
    whole, bare = float(np.median(totals)), float(np.median(bares))
    print(
        f"\nsynthetic study, median of {len(totals)} runs: whole {whole:.2f} s, bare inference "
        f"{bare:.2f} s, whole / bare = {whole / bare:.2f} (target: at most 1.3)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
