#!/usr/bin/env python3
"""Dashboard viewer benchmark: how soon the first slice shows, and what scrolling costs.

    .venv/bin/python bench/viewer.py [--slices 300]

Spools a synthetic study of 512x512 slices, analyses it with the shipped model (so that the
lungs' overlay exists), then through the web app (Flask's test client, logged in) measures:
the viewer's series (``viewer.json``: image numbers read from every header) cold and cached,
the first screen-size slice cold and cached, and every slice of the series once (a scroll
through it) with and without the overlay.  The reference, measured in the same run, is a bare
read and lung-window of one slice with pydicom (what any viewer must do): the ratio says what
the service adds.  Target: the first image within 1 s of opening the page (series + image).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def timed(call) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    args = parser.parse_args()

    import pydicom
    from sqlalchemy import select

    from classifier.inference import Classifier
    from classifier.preprocess import windowed_slice
    from core.db import session_scope, upgrade
    from core.models import Instance, Study
    from core.settings import load_settings
    from core.users import create_user
    from covidct.synthetic import SeriesSpec, make_study
    from covidct.testbed import spool_study
    from web.app import create_app
    from worker.pipeline import analyse_study

    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings({"COVIDCT_DATA_DIR": str(Path(tmp) / "var")})
        upgrade(settings.database_url)
        study_id = spool_study(settings, make_study([SeriesSpec(slices=args.slices)]))
        outcome = analyse_study(settings, study_id, Classifier(settings.model_path))
        assert outcome.state == "done", outcome
        with session_scope(settings.database_url) as s:
            uid = s.scalar(select(Study.study_instance_uid).where(Study.id == study_id))
            path = s.scalar(select(Instance.spool_path).where(Instance.study_id == study_id))
            create_user(s, "bench", "a bench password")
        client = create_app(settings).test_client()
        form = client.get("/login").get_data(as_text=True)
        token = re.search(r'name="csrf_token" value="([^"]+)"', form)
        assert token is not None
        client.post(
            "/login",
            data={"username": "bench", "password": "a bench password", "csrf_token": token[1]},
        )

        def get(url: str) -> bytes:
            r = client.get(url)
            assert r.status_code == 200, (url, r.status_code)
            return r.data

        bare = statistics.median(
            timed(lambda: windowed_slice(pydicom.dcmread(path), 0)) for _ in range(20)
        )
        series_cold = timed(lambda: get(f"/studies/{uid}/viewer.json"))
        series_warm = timed(lambda: get(f"/studies/{uid}/viewer.json"))
        ids = [s["id"] for s in client.get(f"/studies/{uid}/viewer.json").json["slices"]]
        middle = ids[len(ids) // 2]
        first_cold = timed(lambda: get(f"/slices/{middle}/view.png"))
        first_warm = timed(lambda: get(f"/slices/{middle}/view.png"))
        scroll = [timed(lambda i=i: get(f"/slices/{i}/view.png")) for i in ids if i != middle]
        overlay = [timed(lambda i=i: get(f"/slices/{i}/view.png?overlay=1")) for i in ids]
        cached = [timed(lambda i=i: get(f"/slices/{i}/view.png")) for i in ids]
        page = timed(lambda: get(f"/studies/{uid}"))

    ms = 1000.0
    shown = page + series_cold + first_cold
    rows = [
        ("reference: bare pydicom read + lung window", f"{bare * ms:.1f} ms"),
        ("study page (HTML)", f"{page * ms:.1f} ms"),
        (
            "viewer.json cold (every header) / cached",
            f"{series_cold * ms:.1f} / {series_warm * ms:.1f} ms",
        ),
        ("first image cold / cached", f"{first_cold * ms:.1f} / {first_warm * ms:.1f} ms"),
        ("first image after opening the page, cold", f"{shown * ms:.1f} ms (target 1000)"),
    ]
    for name, values in (
        ("scroll, cold", scroll),
        ("scroll with overlay, cold", overlay),
        ("scroll, cached", cached),
    ):
        med = statistics.median(values)
        rows.append(
            (
                name,
                f"median {med * ms:.1f} ms a slice ({med / bare:.2f}x the reference),"
                f" the series {sum(values):.1f} s",
            )
        )
    print(f"series of {len(ids)} slices, 512x512")
    for name, value in rows:
        print(f"{name:<44} {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
