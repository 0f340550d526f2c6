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

from tests.test_e2e import base_env, send_study, serve, storescp, wait  # noqa: E402

DELIVERED = (
    "SELECT s.last_instance_at, d.delivered_at FROM studies s"
    " JOIN reports r ON r.study_id = s.id JOIN deliveries d ON d.report_id = r.id"
    " WHERE s.study_instance_uid = ? AND d.state = 'delivered'"
)


def delivered(db: Path, uid: str) -> tuple[str, str] | None:
    con = sqlite3.connect(db)
    try:
        return con.execute(DELIVERED, (uid,)).fetchone()
    finally:
        con.close()


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
                took = (
                    datetime.fromisoformat(row[1]) - datetime.fromisoformat(row[0])
                ).total_seconds()
                out.append(took)
                print(f"study {i}: last instance -> SR delivered {took:.2f} s", flush=True)
    print(
        f"median {sorted(out)[len(out) // 2]:.2f} s; quiet time {args.stable:g} s,"
        f" {released:g} s after the sender's release"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
