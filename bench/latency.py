#!/usr/bin/env python3
"""Latency benchmark: last instance received -> SR delivered to DCMTK's storescp.

    .venv/bin/python bench/latency.py [--stable 2] [--released SECONDS] [--runs 5]

Runs ``covidct serve`` (embedded queue, SQLite) with the default sweep period (5 s), a quiet
time of ``--stable`` seconds (2) and, after the sender's release, ``--released`` (the same as
``--stable`` unless given), and sends, one after another with DCMTK's storescu (which releases
its association), ``--runs`` studies of each kind: a synthetic 40-slice axial series with a
localizer and a derived series, a synthetic 300-slice uncompressed series, and, when ../shared
holds them, the real studies (COVID-CT-MD P001 and normal001, 148 and 154 JPEG Lossless slices;
MIDRC-RICORD 419639-000082; P001 thinned to every 6th slice, 25 slices 12 mm apart, for the
short-study target), each run under fresh UIDs and sent as stored (``storescu -xs``).
Per study it prints the time from its last instance to the SR's delivery as recorded by the
service, split into the quiet time that applied, waiting to be noticed, the queue, the analysis
and the delivery; then the median per kind against the quiet time (the reference: the rest is
what the service adds).  ``COVIDCT_READ_THREADS`` is passed through.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import tempfile
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pydicom  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from covidct.synthetic import SeriesSpec, make_study, write_study  # noqa: E402
from tests.test_e2e import (  # noqa: E402
    base_env,
    send_study,
    serve,
    storescp,
    storescu,
    wait,
)

TIMES = (
    "SELECT s.last_instance_at, s.released_at, s.queued_at, s.started_at, s.finished_at,"
    " d.delivered_at FROM studies s"
    " JOIN reports r ON r.study_id = s.id JOIN deliveries d ON d.report_id = r.id"
    " WHERE s.study_instance_uid = ? AND d.state = 'delivered'"
)


def delivered(db: Path, uid: str) -> tuple[str, ...] | None:
    con = sqlite3.connect(db)
    try:
        return con.execute(TIMES, (uid,)).fetchone()
    finally:
        con.close()


def parts(row: tuple[str, ...], stable: float, released: float) -> tuple[float, str]:
    """Last instance -> SR delivered, and where the time went, from the service's own
    timestamps: the quiet time that applied, waiting to be noticed after it, the queue, the
    analysis (read, model, lungs, SR), the delivery."""
    last, rel, queued, started, finished, done = (
        datetime.fromisoformat(t) if t else None for t in row
    )
    assert last and queued and started and finished and done
    deadline = last.timestamp() + stable
    if rel is not None and rel >= last:
        deadline = min(deadline, rel.timestamp() + released)
    total = (done - last).total_seconds()
    split = (
        f"quiet {deadline - last.timestamp():.2f} | noticed {queued.timestamp() - deadline:.2f}"
        f" | queue {(started - queued).total_seconds():.2f}"
        f" | analysis {(finished - started).total_seconds():.2f}"
        f" | delivery {(done - finished).total_seconds():.2f}"
    )
    return total, split


def real_studies() -> list[tuple[str, list[Path]]]:
    """The real sample studies (JPEG Lossless), when ../shared holds them."""
    data = ROOT.parent / "shared" / "datasets"
    found = [
        (sub, sorted((data / "covid-ct-md-sample" / sub).glob("*.dcm")))
        for sub in ("covid/P001", "normal/normal001")
    ]
    ricord = data / "midrc-ricord-sample" / "covid" / "419639-000082"
    found.append(("RICORD 419639-000082", sorted(ricord.glob("*.dcm"))))
    if found[0][1]:  # no real study of about 24 slices is at hand: P001 thinned to one
        found.append(("covid/P001 every 6th slice", every_nth(found[0][1], 6)))
    return [(name, files) for name, files in found if files]


def every_nth(files: list[Path], n: int) -> list[Path]:
    """Every ``n``-th file of a series in slice order: a thick-slice study of real pixels."""

    def z(path: Path) -> float:
        return float(pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient[2])

    return sorted(files, key=z)[::n]


def fresh_copy(files: list[Path], folder: Path) -> tuple[str, list[Path]]:
    """The files under new Study, Series and SOP Instance UIDs, pixel data untouched (still
    compressed), so that each run is a new study to the service."""
    folder.mkdir(parents=True)
    new: dict[str, str] = {}
    out = []
    for n, path in enumerate(files):
        ds = pydicom.dcmread(path)
        for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            ds.data_element(kw).value = new.setdefault(str(getattr(ds, kw)), generate_uid())
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(folder / f"{n}.dcm", enforce_file_format=True)
        out.append(folder / f"{n}.dcm")
    return str(ds.StudyInstanceUID), out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--stable", type=float, default=2.0)
    parser.add_argument("--released", type=float, default=None)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    released = args.stable if args.released is None else args.released
    tmp = Path(tempfile.mkdtemp())
    results: dict[str, list[float]] = {}
    with storescp(tmp) as (pacs_port, _):
        env = base_env(
            tmp,
            COVIDCT_SWEEP_SECONDS="5",
            COVIDCT_STABLE_SECONDS=str(args.stable),
            COVIDCT_RELEASED_STABLE_SECONDS=str(released),
            COVIDCT_DESTINATIONS=f"PACS@127.0.0.1:{pacs_port}?objects=sr",
            **{k: v for k, v in os.environ.items() if k == "COVIDCT_READ_THREADS"},
        )
        db = Path(env["COVIDCT_DATA_DIR"]) / "covidct.sqlite3"

        def measure(kind: str, uid: str) -> None:
            row = wait(lambda: delivered(db, uid), 300, "the SR delivered")
            took, split = parts(row, args.stable, released)
            results.setdefault(kind, []).append(took)
            print(f"{kind}: last instance -> SR delivered {took:.2f} s ({split})", flush=True)

        real = real_studies()  # read once: each run sends fresh copies of the same files
        with serve(env, tmp / "serve.log"):
            wait(lambda: "covidct is running" in (tmp / "serve.log").read_text(), 120, "serve")
            for i in range(args.runs):
                uid, _ = send_study(env, tmp / f"s{i}")
                measure("synthetic 40 slices and 2 series", uid)
                big = make_study([SeriesSpec(slices=300)], seed=i)
                storescu(env, write_study(big, tmp / f"big{i}"))
                measure("synthetic 300 slices, uncompressed", str(big[0].StudyInstanceUID))
                for name, files in real:
                    uid, copy = fresh_copy(files, tmp / f"{name.replace('/', '-')}-{i}")
                    storescu(env, copy, "-xs")  # JPEG Lossless proposed: sent as stored
                    measure(f"{name} ({len(files)} slices, JPEG Lossless)", uid)
    print(f"\nquiet time {args.stable:g} s, {released:g} s after the sender's release")
    for kind, runs in results.items():
        med = sorted(runs)[len(runs) // 2]
        print(f"{kind}: median of {len(runs)} {med:.2f} s = quiet + {med - released:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
