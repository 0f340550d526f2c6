#!/usr/bin/env python3
"""Ingest benchmark: `covidct listener` against DCMTK's storescp, same sender, same study.

    .venv/bin/python bench/ingest.py [--rounds 3] [--slices 300]

DCMTK's storescu (TCP_NODELAY=1) sends a study of 512x512 16-bit CT slices (built here, fresh
UIDs each round) to (a) `covidct listener` (durable writes: fsync, rename, database record
before 0x0000), (b) DCMTK's storescp (TCP_NODELAY=1, plain writes) and (c) Orthanc when it is
installed (TCP_NODELAY=1, its own fsync and SQLite index), in turn, with one association and
with four parallel associations.  Each round sends one study to every target, in alternating
order, with ``sync`` before each send so that no target pays for another's write-back.  Prints
instances/s (median of the rounds), the ratios covidct / storescp (target: at least 0.5 on one
connection) and covidct / Orthanc (target: above 1), and each round's ratios (the machines'
speed drifts between rounds; within a round it is steadier).  COVIDCT_MAX_PDU,
COVIDCT_SPOOL_DIRECT_IO and COVIDCT_LISTENER_PROCESSES pass through to the listener.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import AbstractContextManager as ContextManager
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from covidct.synthetic import SeriesSpec, make_study, write_study  # noqa: E402
from covidct.testbed import free_port, launched  # noqa: E402

# the listener's tuning settings may be varied from the command line; others are the bench's
PASSED_THROUGH = ("COVIDCT_MAX_PDU", "COVIDCT_SPOOL_DIRECT_IO", "COVIDCT_LISTENER_PROCESSES")


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
    with ExitStack() as stack:
        procs = [
            stack.enter_context(
                launched(
                    ["storescu", "-aec", aec, "-aet", "BENCH", "127.0.0.1", str(port)]
                    + [str(f) for f in chunk],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
            )
            for chunk in chunks
        ]
        for p in procs:
            _, err = p.communicate()
            if p.returncode != 0:
                raise RuntimeError(err.decode()[-500:])
        return time.perf_counter() - t0


def start_orthanc(exe: str, storage: Path, dicom_port: int) -> ContextManager[subprocess.Popen]:
    """Orthanc as a store SCP with its defaults (fsync on, SQLite index), HTTP on a free
    port, local only (Orthanc 1.10 has no bind-address setting: ../shared/NOTES.md)."""
    storage.mkdir(parents=True)
    config = {
        "Name": "bench",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "HttpPort": free_port(),
        "DicomPort": dicom_port,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True,
        "Plugins": [],
    }
    (storage / "orthanc.json").write_text(json.dumps(config))
    return launched(
        [exe, str(storage / "orthanc.json")],
        env=os.environ | {"TCP_NODELAY": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


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
        | {k: v for k, v in os.environ.items() if k in PASSED_THROUGH}
    )
    servers = ExitStack()
    servers.enter_context(
        launched(
            [sys.executable, "-m", "covidct.cli", "listener"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    )
    (work / "storescp").mkdir()
    servers.enter_context(
        launched(
            ["storescp", "-od", str(work / "storescp"), str(sport)],
            env=os.environ | {"TCP_NODELAY": "1"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    )
    targets = [("covidct", cport, "COVIDCT"), ("storescp", sport, "ANY-SCP")]
    orthanc_exe = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin")
    if orthanc_exe:
        oport = free_port()
        servers.enter_context(start_orthanc(orthanc_exe, work / "orthanc", oport))
        targets.append(("orthanc", oport, "ORTHANC"))
    try:
        for _, port, _ in targets:
            wait_port(port)
        print(f"{args.slices} slices of 512x512 16-bit CT per study; {args.rounds} rounds")
        for rnd in range(args.rounds):
            for connections in (1, 4):
                folder = work / f"study-{rnd}-{connections}"
                files = write_study(
                    make_study([SeriesSpec(slices=args.slices)], seed=10 * rnd + connections),
                    folder,
                )
                # alternate the order, so that no target always follows the same one
                for target, port, aec in targets if rnd % 2 == 0 else targets[::-1]:
                    os.sync()  # no target pays for the write-back of an earlier one
                    seconds = send(port, aec, files, connections)
                    results.setdefault((target, connections), []).append(args.slices / seconds)
                shutil.rmtree(folder)
        names = [t for t, _, _ in targets]
        print(f"{'connections':>11} " + " ".join(f"{n + '/s':>11}" for n in names), end="")
        print(" covidct/storescp" + (" covidct/orthanc" if "orthanc" in names else ""))
        for connections in (1, 4):
            rates = {n: statistics.median(results[(n, connections)]) for n in names}
            line = f"{connections:>11} " + " ".join(f"{rates[n]:>11.1f}" for n in names)
            line += f" {rates['covidct'] / rates['storescp']:>16.2f}"
            if "orthanc" in rates:
                line += f" {rates['covidct'] / rates['orthanc']:>15.2f}"
            print(line)
        # this machine's speed drifts between rounds: the ratio within each round is steadier
        for connections in (1, 4):
            for ref in [n for n in names if n != "covidct"]:
                ours, theirs = results[("covidct", connections)], results[(ref, connections)]
                ratios = [c / r for c, r in zip(ours, theirs, strict=True)]
                print(
                    f"covidct/{ref}, {connections} connection{'s' if connections > 1 else ''},"
                    f" per round: "
                    + " ".join(f"{x:.2f}" for x in ratios)
                    + f" (median {statistics.median(ratios):.2f})"
                )
    finally:
        servers.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
