#!/usr/bin/env python3
"""The DICOM port under hostile peers: the listener's memory and C-ECHO, against its idle self.

    .venv/bin/python bench/hostile_port.py [--checkout PATH] [--connections 10]

Starts `covidct listener` (the default two processes) from this checkout, or from another
one given with ``--checkout`` (to measure a version before a change in the same run), warms it
with eight C-ECHO associations and measures its resident memory (both processes): idle, then
while ``--connections`` peers hold connections whose PDU headers claim 2 GB (P-DATA-TF) and
4 GB (A-ASSOCIATE-RQ), then after 50 connections of 1-3,000 random bytes.  Each phase prints
the memory, its ratio to idle, and the time DCMTK's echoscu takes for one C-ECHO (or its
failure).  Hostile peers use their own loopback addresses (127.0.0.2 and up).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from covidct.testbed import descendants, free_port, launched, rss_mb  # noqa: E402


def echo(port: int) -> str:
    t0 = time.perf_counter()
    out = subprocess.run(
        ["/usr/bin/echoscu", "-aec", "COVIDCT", "-to", "30", "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
    )
    took = time.perf_counter() - t0
    return f"{took:.2f} s" if out.returncode == 0 else f"FAILED ({out.stderr.strip()[:80]})"


def connect(port: int, peer: int, payload: bytes) -> socket.socket | None:
    """A connection from 127.0.0.``peer`` that sends ``payload``; None if refused."""
    s = socket.socket()
    s.bind((f"127.0.0.{peer}", 0))
    try:
        s.connect(("127.0.0.1", port))
    except OSError:
        s.close()
        return None
    try:
        s.sendall(payload)
    except OSError:
        pass
    return s


def phase(name: str, peers: list[socket.socket | None], pid: int, idle: float, port: int) -> None:
    """With ``peers`` connected for 2 s: the listener's memory against idle, and a C-ECHO;
    then the peers close."""
    time.sleep(2.0)
    now = rss_mb(pid, below=True)
    refused = f"  ({peers.count(None)} connections refused)" if None in peers else ""
    print(f"{name:<30}{now:7.0f} MB  x{now / idle:5.2f}  C-ECHO {echo(port)}{refused}")
    for s in peers:
        if s is not None:
            s.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkout", type=Path, default=ROOT)
    p.add_argument("--connections", type=int, default=10)
    args = p.parse_args()
    if not Path("/usr/bin/echoscu").exists():
        print("needs DCMTK's echoscu (apt-get install dcmtk)", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="covidct-hostile-"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVIDCT_")} | {
        "COVIDCT_DATA_DIR": str(tmp / "var"),
        "COVIDCT_DICOM_PORT": str(port),
        "COVIDCT_STABLE_SECONDS": "3600",
        "COVIDCT_MIN_FREE_DISK_MB": "1",
        "PYTHONPATH": str(args.checkout),
    }
    log = tmp / "listener.log"
    try:
        with (
            log.open("w") as out,
            launched(
                [sys.executable, "-m", "covidct.cli", "listener"],
                cwd=args.checkout,
                env=env,
                stdout=out,
                stderr=out,
            ) as proc,
        ):
            deadline = time.monotonic() + 90
            while "(2 processes)" not in log.read_text() and time.monotonic() < deadline:
                time.sleep(0.2)
            for _ in range(8):
                echo(port)
            idle = rss_mb(proc.pid, below=True)
            print(f"checkout {args.checkout}")
            print(f"idle:                         {idle:7.0f} MB          C-ECHO {echo(port)}")
            peers = [
                connect(
                    port,
                    2 + i,
                    struct.pack(">BBL", 4 if i % 2 else 1, 0, 2**31 if i % 2 else 2**32 - 1),
                )
                for i in range(args.connections)
            ]
            phase(f"{args.connections} claims of 2-4 GB held:", peers, proc.pid, idle, port)
            rng = random.Random(35)
            noise = [
                connect(
                    port, 100 + i, bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 3000)))
                )
                for i in range(50)
            ]
            phase("50 random-byte connections:", noise, proc.pid, idle, port)
            alive = proc.poll() is None and len(descendants(proc.pid)) > 0
            print(f"listener still running with both processes: {alive}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
