#!/usr/bin/env python3
"""Inference benchmark: the shipped model, our API against a bare forward pass, DICOM framing.

    .venv/bin/python bench/inference.py [--model models/covidct.keras] [--rounds 5]

Prints images/s at batch 1 and 32 for ``Classifier.probabilities`` (preprocessed arrays in,
calibrated probabilities out) and for a bare ``tf.function`` forward pass measured in the same
run, their ratio (target: at most 1.2), and the cost per slice of framing a DICOM slice
(decode, HU, window, lung crop, resize) for a synthetic uncompressed 512x512 slice and, when
../shared is present, for a real JPEG Lossless slice.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402


def timed(fn, rounds: int) -> float:  # type: ignore[no-untyped-def]
    fn()  # warm-up (tracing, allocation)
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "covidct.keras")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    import pydicom
    import tensorflow as tf

    from classifier.inference import Classifier
    from classifier.preprocess import to_model_input
    from covidct.synthetic import SeriesSpec, make_study

    clf = Classifier(args.model)  # what the worker serves (LiteRT when exported)
    clf_keras = Classifier(args.model, runtime="keras")
    model = clf.model

    @tf.function(reduce_retracing=True)
    def bare(x: tf.Tensor) -> tf.Tensor:
        return model(x, training=False)

    rng = np.random.default_rng(0)
    print(f"model {clf.version} ({model.count_params():,} parameters), TensorFlow {tf.__version__}")
    print("bare: a Keras forward pass (tf.function); API: Classifier.probabilities per runtime")
    print(f"{'batch':>5} {'runtime':>8} {'bare img/s':>11} {'API img/s':>10} {'API/bare time':>14}")
    for batch in (1, 32):
        x = rng.integers(0, 256, (batch, 200, 200, 3)).astype(np.uint8)
        xt = tf.convert_to_tensor(x.astype(np.float32))
        n = 64 if batch == 1 else 8
        t_bare = timed(lambda xt=xt, n=n: [bare(xt).numpy() for _ in range(n)], args.rounds) / n
        for c in (clf_keras, clf):
            t_api = timed(lambda x=x, n=n, c=c: [c.probabilities(x) for _ in range(n)], args.rounds)
            t_api /= n
            print(
                f"{batch:>5} {c.runtime:>8} {batch / t_bare:>11.1f} {batch / t_api:>10.1f} "
                f"{t_api / t_bare:>14.3f}"
            )

    series = make_study([SeriesSpec(slices=40)])
    ds = series[len(series) // 2]  # mid-chest: enough lung to be framed, not skipped
    data = ds.PixelData

    def frame_synthetic() -> None:
        ds.PixelData = bytes(data)  # a new object: pydicom decodes again, no cache
        to_model_input(ds)

    t = timed(frame_synthetic, args.rounds * 4)
    print(f"DICOM framing, synthetic 512x512 uncompressed: {t * 1000:.2f} ms per slice")
    real = ROOT.parent / "shared" / "datasets" / "covid-ct-md-sample" / "covid" / "P001"
    if real.is_dir():
        headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in real.glob("*.dcm")]
        headers.sort(key=lambda h: float(h.ImagePositionPatient[2]))  # file names do not sort
        mid = pydicom.dcmread(headers[len(headers) // 2].filename)  # mid-chest
        raw = mid.PixelData

        def frame_real() -> None:
            mid.PixelData = bytes(raw)
            to_model_input(mid)

        t = timed(frame_real, args.rounds * 4)
        print(f"DICOM framing, real 512x512 JPEG Lossless (decode included): {t * 1000:.2f} ms")
    else:
        print("../shared not present: real-slice framing skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
