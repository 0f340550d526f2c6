#!/usr/bin/env python3
"""Ingest benchmark: `covidct listener` against DCMTK's storescp, same sender, same study.

    .venv/bin/python bench/ingest.py [--rounds 3] [--slices 300]

DCMTK's storescu (TCP_NODELAY=1) sends a study of 512x512 16-bit CT slices (built here, fresh
UIDs each round) to (a) `covidct listener` (durable writes: fsync, rename, database record
before 0x0000) and (b) DCMTK's storescp (TCP_NODELAY=1, plain writes), alternating, with one
association and with four parallel associations.  Prints instances/s and the ratio
covidct / storescp for each (target: at least 0.5 on one connection).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from covidct.synthetic import SeriesSpec, make_study, write_study  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


def send(port: int, aec: str, files: list[Path], connections: int) -> float:
    """Seconds for storescu to send all files over ``connections`` parallel associations."""
    env = os.environ | {"TCP_NODELAY": "1"}
    chunks = [files[i::connections] for i in range(connections)]
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            ["storescu", "-aec", aec, "-aet", "BENCH", "127.0.0.1", str(port), *map(str, chunk)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for chunk in chunks
    ]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(err.decode()[-500:])
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--slices", type=int, default=300)
    args = parser.parse_args()
    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            print(f"{tool} (DCMTK) is required: apt-get install dcmtk")
            return 2
    work = Path(tempfile.mkdtemp(prefix="covidct-bench-"))
    results: dict[tuple[str, int], list[float]] = {}
    cport, sport = free_port(), free_port()
    env = (
        {k: v for k, v in os.environ.items() if not k.startswith("COVIDCT_")}
        | {
            "COVIDCT_DATA_DIR": str(work / "covidct"),
            "COVIDCT_DICOM_PORT": str(cport),
            "COVIDCT_LOG_LEVEL": "WARNING",
            "COVIDCT_STABLE_SECONDS": "3600",
            "COVIDCT_MIN_FREE_DISK_MB": "100",
        }
        | {k: v for k, v in os.environ.items() if k == "COVIDCT_MAX_PDU"}
    )
    listener = subprocess.Popen(
        [sys.executable, "-m", "covidct.cli", "listener"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    (work / "storescp").mkdir()
    storescp = subprocess.Popen(
        ["storescp", "-od", str(work / "storescp"), str(sport)],
        env=os.environ | {"TCP_NODELAY": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(cport)
        wait_port(sport)
        print(f"{args.slices} slices of 512x512 16-bit CT per study; {args.rounds} rounds")
        for rnd in range(args.rounds):
            for connections in (1, 4):
                for target, port, aec in (
                    ("covidct", cport, "COVIDCT"),
                    ("storescp", sport, "ANY-SCP"),
                ):
                    folder = work / f"study-{rnd}-{connections}-{target}"
                    files = write_study(
                        make_study([SeriesSpec(slices=args.slices)], seed=rnd), folder
                    )
                    seconds = send(port, aec, files, connections)
                    results.setdefault((target, connections), []).append(args.slices / seconds)
                    shutil.rmtree(folder)
        print(f"{'connections':>11} {'covidct/s':>10} {'storescp/s':>11} {'ratio':>6}")
        for connections in (1, 4):
            ours = statistics.median(results[("covidct", connections)])
            ref = statistics.median(results[("storescp", connections)])
            print(f"{connections:>11} {ours:>10.1f} {ref:>11.1f} {ours / ref:>6.2f}")
    finally:
        listener.terminate()
        storescp.terminate()
        listener.wait(30)
        storescp.wait(30)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
