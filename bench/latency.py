#!/usr/bin/env python3
"""Latency benchmark: last instance received -> SR delivered to DCMTK's storescp.

    .venv/bin/python bench/latency.py [--stable 2] [--released SECONDS]

Runs ``covidct serve`` (embedded queue, SQLite) with the default sweep period (5 s), a quiet
time of ``--stable`` seconds (2) and, after the sender's release, ``--released`` (the same as
``--stable`` unless given), sends four synthetic studies one after another with DCMTK's
storescu (a 40-slice axial series, a localizer and a derived series; storescu releases its
association), and prints, per study, the time from its last instance to the SR's delivery as
recorded by the service, and the median.  The reference is the quiet time that applies: the
rest is what the service adds.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

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
    """The COVID-CT-MD sample studies (JPEG Lossless), when ../shared holds them."""
    sample = ROOT.parent / "shared" / "datasets" / "covid-ct-md-sample"
    return [
        (sub, sorted((sample / sub).glob("*.dcm")))
        for sub in ("covid/P001", "normal/normal001")
        if (sample / sub).is_dir()
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--stable", type=float, default=2.0)
    parser.add_argument("--released", type=float, default=None)
    args = parser.parse_args()
    released = args.stable if args.released is None else args.released
    tmp = Path(tempfile.mkdtemp())
    with storescp(tmp) as (pacs_port, _):
        env = base_env(
            tmp,
            COVIDCT_SWEEP_SECONDS="5",
            COVIDCT_STABLE_SECONDS=str(args.stable),
            COVIDCT_RELEASED_STABLE_SECONDS=str(released),
            COVIDCT_DESTINATIONS=f"PACS@127.0.0.1:{pacs_port}?objects=sr",
        )
        db = Path(env["COVIDCT_DATA_DIR"]) / "covidct.sqlite3"
        with serve(env, tmp / "serve.log"):
            wait(lambda: "covidct is running" in (tmp / "serve.log").read_text(), 120, "serve")
            out = []
            for i in range(4):
                uid, _ = send_study(env, tmp / f"s{i}")
                row = wait(lambda uid=uid: delivered(db, uid), 120, "the SR delivered")
                took, split = parts(row, args.stable, released)
                out.append(took)
                print(
                    f"study {i}: last instance -> SR delivered {took:.2f} s ({split})", flush=True
                )
            for name, files in real_studies():
                import pydicom

                uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
                storescu(env, files, "-xs")  # JPEG Lossless proposed: sent as stored
                row = wait(lambda uid=uid: delivered(db, uid), 300, "the SR delivered")
                took, split = parts(row, args.stable, released)
                print(f"{name} ({len(files)} slices, JPEG Lossless): {took:.2f} s ({split})")
    print(
        f"median {sorted(out)[len(out) // 2]:.2f} s; quiet time {args.stable:g} s,"
        f" {released:g} s after the sender's release"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
