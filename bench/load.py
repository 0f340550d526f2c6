#!/usr/bin/env python3
"""Load and memory: six senders push a 148-slice chest CT each at once into ``covidct serve``.

    .venv/bin/python bench/load.py [--senders 6] [--slices 148] [--runtimes litert,keras]

Everything on loopback: DCMTK's storescu as the six modalities, DCMTK's storescp as the PACS.
For each model runtime it starts a fresh embedded service, sends the studies concurrently,
waits for every SR at the PACS and prints: wall time from the first send to the last SR,
whether every instance was stored exactly once (rows, spool files) and every study answered by
one SR, and the peak RSS of the worker (its main process plus pool children, sampled every
0.2 s) and of the listener.  The ratio line compares the worker's peak with LiteRT to that with
Keras, both measured in the same run (target: under 500 MB per worker process).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pydicom  # noqa: E402
from pydicom.uid import Comprehensive3DSRStorage  # noqa: E402

from covidct.testbed import child_pids, free_port, launched, rss_mb, stage_pids  # noqa: E402


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def delivered(data: Path) -> int:
    """Deliveries done: one per study (its SR, key images and key objects in one)."""
    db = sqlite3.connect(data / "covidct.sqlite3")
    try:
        return int(
            db.execute("SELECT count(*) FROM deliveries WHERE state = 'delivered'").fetchone()[0]
        )
    except sqlite3.OperationalError:  # not created yet
        return 0
    finally:
        db.close()


def wait(check, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}")


class Sampler(threading.Thread):
    """Peak RSS of a process and its children: the worker's main process and pool."""

    def __init__(self, serve_pid: int) -> None:
        super().__init__(daemon=True)
        self.serve_pid, self.stop = serve_pid, threading.Event()
        self.peak: dict[str, float] = {"worker": 0.0, "worker process": 0.0, "listener": 0.0}

    def run(self) -> None:
        while not self.stop.wait(0.2):
            stages = stage_pids(self.serve_pid)
            if "worker" in stages:
                pids = [stages["worker"], *child_pids(stages["worker"])]
                sizes = [rss_mb(p) for p in pids]
                self.peak["worker"] = max(self.peak["worker"], sum(sizes))
                self.peak["worker process"] = max(self.peak["worker process"], max(sizes))
            if "listener" in stages:
                pids = [stages["listener"], *child_pids(stages["listener"])]
                self.peak["listener"] = max(self.peak["listener"], sum(map(rss_mb, pids)))


def run(runtime: str, studies: list[list[Path]], work: Path, storescu: str, storescp: str) -> dict:
    data = work / f"var-{runtime}"
    pacs_dir = work / f"pacs-{runtime}"
    pacs_dir.mkdir()
    pacs_port, dicom_port, web_port = free_port(), free_port(), free_port()
    stack = ExitStack()
    stack.enter_context(
        launched(
            [storescp, "-aet", "PACS", "-od", str(pacs_dir), str(pacs_port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVIDCT_")} | {
        "COVIDCT_DATA_DIR": str(data),
        "COVIDCT_DICOM_PORT": str(dicom_port),
        "COVIDCT_WEB_PORT": str(web_port),
        "COVIDCT_DESTINATIONS": f"PACS@127.0.0.1:{pacs_port}",
        "COVIDCT_STABLE_SECONDS": "2",
        "COVIDCT_SWEEP_SECONDS": "0.5",
        "COVIDCT_MODEL_RUNTIME": runtime,
        "COVIDCT_LOG_LEVEL": "WARNING",
    }
    log = stack.enter_context((work / f"serve-{runtime}.log").open("w"))
    serve = stack.enter_context(
        launched(
            [sys.executable, "-m", "covidct.cli", "serve"],
            grace=60,
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    )
    sampler = Sampler(serve.pid)
    with stack:
        wait(lambda: port_open(dicom_port) and port_open(pacs_port), 120, "serve and the PACS")
        sampler.start()
        time.sleep(15)  # the worker loads its model
        idle = dict(sampler.peak)
        t0 = time.monotonic()
        senders = [
            stack.enter_context(
                launched(
                    [storescu, "-aec", "COVIDCT", "-aet", f"CT{i}", "127.0.0.1", str(dicom_port)]
                    + [str(p) for p in files],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
            )
            for i, files in enumerate(studies)
        ]
        failed = [p.stderr.read().decode()[-300:] for p in senders if p.wait() != 0]
        sent = time.monotonic() - t0
        wait(lambda: delivered(data) >= len(studies), 600, "every SR")
        done = time.monotonic() - t0
        time.sleep(1)
        db = sqlite3.connect(data / "covidct.sqlite3")
        rows = db.execute("SELECT count(*), count(DISTINCT sop_instance_uid) FROM instances")
        instances, distinct = rows.fetchone()
        states = dict(db.execute("SELECT state, count(*) FROM studies GROUP BY state").fetchall())
        spooled = sum(1 for _ in (data / "spool").rglob("*.dcm"))
        srs = sum(
            pydicom.dcmread(f, stop_before_pixels=True).SOPClassUID == Comprehensive3DSRStorage
            for f in pacs_dir.iterdir()
        )
        db.close()
        sampler.stop.set()
    sampler.stop.set()
    return {
        "runtime": runtime,
        "sent_s": sent,
        "all_srs_s": done,
        "instances": instances,
        "distinct": distinct,
        "spooled": spooled,
        "srs": srs,
        "states": states,
        "sender_failures": failed,
        "idle": idle,
        "peak": dict(sampler.peak),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--senders", type=int, default=6)
    p.add_argument("--slices", type=int, default=148)
    p.add_argument("--runtimes", default="litert,keras")
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs, data)")
    args = p.parse_args()
    storescu, storescp = shutil.which("storescu"), shutil.which("storescp")
    if not storescu or not storescp:
        raise SystemExit("DCMTK's storescu and storescp are needed (apt-get install dcmtk)")
    # pynetdicom puts its own storescu/storescp in the venv: use DCMTK's
    storescu = "/usr/bin/storescu" if Path("/usr/bin/storescu").exists() else storescu
    storescp = "/usr/bin/storescp" if Path("/usr/bin/storescp").exists() else storescp
    from covidct.synthetic import SeriesSpec, make_study, write_study

    work = Path(tempfile.mkdtemp(prefix="covidct-load-"))
    studies = [
        write_study(
            make_study([SeriesSpec(slices=args.slices, ground_glass=i % 2 == 0)], seed=i),
            work / f"study{i}",
        )
        for i in range(args.senders)
    ]
    total = args.senders * args.slices
    print(f"{args.senders} senders x {args.slices} slices = {total} instances, loopback")
    results = {}
    for runtime in args.runtimes.split(","):
        r = run(runtime, studies, work, storescu, storescp)
        results[runtime] = r
        ok = r["instances"] == r["distinct"] == r["spooled"] == total and r["srs"] == args.senders
        print(
            f"\n{runtime}: sent in {r['sent_s']:.1f} s, every SR at the PACS after "
            f"{r['all_srs_s']:.1f} s; instances stored {r['instances']} (distinct "
            f"{r['distinct']}, spool files {r['spooled']}), SRs {r['srs']}, study states "
            f"{r['states']}, sender failures {len(r['sender_failures'])}: "
            f"{'every instance once, every SR delivered' if ok else 'MISMATCH'}"
        )
        print(
            f"  peak RSS: worker process {r['peak']['worker process']:.0f} MB (idle, model "
            f"loaded: {r['idle']['worker process']:.0f} MB), worker with its pool "
            f"{r['peak']['worker']:.0f} MB, listener {r['peak']['listener']:.0f} MB"
        )
    if "litert" in results and "keras" in results:
        lite, ker = results["litert"]["peak"], results["keras"]["peak"]
        print(
            f"\nworker process peak RSS, LiteRT / Keras: {lite['worker process']:.0f} / "
            f"{ker['worker process']:.0f} MB = {lite['worker process'] / ker['worker process']:.2f}"
            f" (target: LiteRT under 500 MB)"
        )
    if args.keep:
        print(f"work folder kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
