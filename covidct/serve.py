"""``covidct serve``: listener, worker and dashboard on one machine, as three processes.

Each stage runs in its own process (the same ``covidct`` command line), so TensorFlow lives
only in the worker and a crash of one stage is visible.  All three share the data directory:
SQLite results store and the embedded filesystem queue by default, Redis and PostgreSQL as
soon as their URLs are set.  A stage that dies is restarted (after 1, 2, 4 ... 30 s) while the
others keep serving; one that keeps dying stops the service, loudly.  Ctrl-C (SIGINT) or
SIGTERM stops them in order; studies that were queued resume at the next start because the
results store, not the queue, holds them.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from core.db import upgrade
from core.health import local_address
from core.settings import Settings

logger = logging.getLogger(__name__)

# started in this order, stopped in the reverse; the sweep is a stage of its own, so that
# deliveries are retried while the listener is down or stuck
STAGES = ("listener", "sweeper", "worker", "web")


def command() -> str:
    """How to run ``covidct`` from this shell: the console script beside this Python (a
    virtual environment's bin, not on the PATH after ./scripts/run.sh), else the module."""
    script = Path(sys.executable).parent / "covidct"
    if shutil.which("covidct") == str(script):
        return "covidct"
    if script.is_file():
        relative = os.path.relpath(script)
        return str(script) if relative.startswith("..") else relative
    return f"{sys.executable} -m covidct.cli"


def banner(settings: Settings) -> str:
    return "\n".join(
        [
            "covidct is running. Research and triage support only: not a diagnosis.",
            f"  DICOM:     AE title {settings.ae_title} on "
            f"{settings.dicom_host}:{settings.dicom_port} (C-ECHO, C-STORE of CT, Enhanced CT)",
            f"  Dashboard: http://{settings.web_host}:{settings.web_port}/",
            f"  Data:      {settings.data_dir}",
            "  Results go to: "
            + (", ".join(map(str, settings.destinations)) or "the data directory only"),
            f"  First user: {command()} create-user NAME --admin   (in another terminal)",
            f"  Demo data:  {command()} demo",
            f"  Stop:       Ctrl-C, or {command()} stop   (in another terminal)",
        ]
    )


RESTART_DELAYS = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)  # seconds before the 1st, 2nd, ... restart
CRASH_LOOP = (5, 120.0)  # this many deaths of one stage within this many seconds stop serve


def _start(stage: str, env: dict[str, str], workers: int) -> subprocess.Popen:
    # its own process group: a Ctrl-C reaches serve alone, which stops the stages in order;
    # the stage watches serve's pid and ends with it however serve dies (core.parentwatch)
    args = [
        sys.executable,
        "-m",
        "covidct.cli",
        stage,
        "--under-serve",
        "--serve-pid",
        str(os.getpid()),
    ]
    if stage == "worker":
        args += ["--concurrency", str(workers)]
    return subprocess.Popen(args, env=env, start_new_session=True)


class Supervisor:
    """Restarts a stage that died, after a growing delay, while the others keep running; a
    stage that dies ``CRASH_LOOP[0]`` times within ``CRASH_LOOP[1]`` seconds stops serve."""

    def __init__(self, env: dict[str, str], workers: int) -> None:
        self.env, self.workers = env, workers
        self.procs: dict[str, subprocess.Popen] = {}
        self.deaths: dict[str, list[float]] = {stage: [] for stage in STAGES}
        self.restart_at: dict[str, float] = {}

    def start_all(self) -> None:
        for stage in STAGES:
            self.procs[stage] = _start(stage, self.env, self.workers)

    def check(self, now: float) -> str | None:
        """One look at every stage; the reason to stop serve, or None."""
        for stage, proc in self.procs.items():
            if stage in self.restart_at:
                if now >= self.restart_at[stage]:
                    del self.restart_at[stage]
                    self.procs[stage] = _start(stage, self.env, self.workers)
                    logger.warning("%s restarted (pid %d)", stage, self.procs[stage].pid)
                continue
            if proc.poll() is None:
                continue
            _kill_group(proc)  # a dead worker's pool children must not linger
            deaths = [t for t in self.deaths[stage] if now - t < CRASH_LOOP[1]] + [now]
            self.deaths[stage] = deaths
            if len(deaths) >= CRASH_LOOP[0]:
                return (
                    f"{stage} exited {len(deaths)} times within {CRASH_LOOP[1]:.0f} s "
                    f"(last status {proc.returncode}): stopping covidct"
                )
            delay = RESTART_DELAYS[min(len(deaths), len(RESTART_DELAYS)) - 1]
            logger.error(
                "%s exited with status %s; restarting it in %.0f s; the other stages go on",
                stage,
                proc.returncode,
                delay,
            )
            self.restart_at[stage] = now + delay
        return None


ECHO_SECONDS = 5.0  # how often serve sends its listener a C-ECHO (each waits up to 5 s)
ECHO_FAILURES = 3  # this many unanswered in a row and the listener is killed, then restarted


class ListenerWatch(threading.Thread):
    """A listener that stops answering C-ECHO (frozen, deadlocked) is killed, so that the
    supervisor restarts it: a stuck process keeps its port, and the kernel keeps handing it
    new associations that nobody answers.  Only silence on an open connection counts: a
    listener still starting refuses the connection, and a rejected association is an
    answer."""

    def __init__(self, supervisor: Supervisor, address: str, ae_title: str) -> None:
        super().__init__(name="listener-watch", daemon=True)
        self.supervisor, self.address, self.ae_title = supervisor, address, ae_title
        self.stop = threading.Event()

    def run(self) -> None:
        from core.health import echo_check

        watched, failures = None, 0
        while not self.stop.wait(ECHO_SECONDS):
            proc = self.supervisor.procs.get("listener")
            if proc is None or proc.poll() is not None:
                continue
            if proc.pid != watched:
                watched, failures = proc.pid, 0
            answer, connected = echo_check(self.address, self.ae_title, timeout=ECHO_SECONDS)
            if answer == "ok" or not connected:
                failures = 0
                continue
            failures += 1
            logger.warning("listener (pid %d) did not answer C-ECHO: %s", proc.pid, answer)
            if failures >= ECHO_FAILURES:
                logger.error(
                    "listener (pid %d) did not answer %d C-ECHOs in a row: killing it so that"
                    " it is restarted",
                    proc.pid,
                    failures,
                )
                _kill_group(proc)
                failures = 0


def listener_address(settings: Settings) -> str:
    """Where serve's own listener answers, for C-ECHO."""
    return local_address(settings.dicom_host, settings.dicom_port)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def accepting(settings: Settings) -> bool:
    """Whether the DICOM and web ports both accept a connection."""
    for host, port in (
        (settings.dicom_host, settings.dicom_port),
        (settings.web_host, settings.web_port),
    ):
        target = local_address(host, port).rpartition(":")[0].strip("[]")
        try:
            socket.create_connection((target, port), timeout=0.5).close()
        except OSError:
            return False
    return True


def check_ports(settings: Settings) -> None:
    """Refuse to start, naming the port, when the DICOM or web port is taken (by another
    covidct too: its listener shares its port only with its own processes)."""
    from ingest.server import claim_port, port_in_use

    claim_port(settings.dicom_port).close()
    for name, host, port, var in (
        ("DICOM", settings.dicom_host, settings.dicom_port, "COVIDCT_DICOM_PORT"),
        ("web", settings.web_host, settings.web_port, "COVIDCT_WEB_PORT"),
    ):
        probe = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            raise port_in_use(name, host, port, var) from None
        finally:
            probe.close()


def pid_file(settings: Settings) -> Path:
    """Where a running ``covidct serve`` writes its pid, for ``covidct stop``."""
    return settings.data_dir / "serve.pid"


def running_serve(settings: Settings) -> int | None:
    """The pid of the ``covidct serve`` running on this data directory, or None."""
    try:
        pid = int(pid_file(settings).read_text().strip())
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    return pid if b"serve" in args and any(b"covidct" in a for a in args) else None


def stop(settings: Settings, timeout: float = 60.0) -> int:
    """``covidct stop``: SIGTERM to the serve running on this data directory (it stops its
    stages in order), then wait for it to end."""
    pid = running_serve(settings)
    if pid is None:
        print(f"covidct is not running on {settings.data_dir}")
        return 1
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _running(pid):
        print(f"covidct (pid {pid}) did not stop within {timeout:.0f} s", file=sys.stderr)
        return 1
    print(f"covidct (pid {pid}) stopped")
    return 0


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (an exited process its parent has not reaped yet does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def serve(settings: Settings, *, workers: int = 1) -> int:
    check_ports(settings)
    upgrade(settings.database_url)
    pid_file(settings).write_text(f"{os.getpid()}\n")
    settings.log_effective()
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    env = dict(os.environ)
    env.setdefault("COVIDCT_DATA_DIR", str(settings.data_dir))
    env.setdefault("COVIDCT_SECRET_KEY", settings.secret_key)
    # /readyz asks serve's own listener for a C-ECHO
    env.setdefault("COVIDCT_LISTENER_ADDRESS", listener_address(settings))
    env["COVIDCT_LISTENER_SWEEPER"] = "false"  # the sweeper stage sweeps
    supervisor = Supervisor(env, workers)
    supervisor.start_all()
    watch = ListenerWatch(supervisor, listener_address(settings), settings.ae_title)
    watch.start()
    exit_code = 0
    announced = False  # the banner waits until both ports accept connections
    while not stop.wait(0.5 if announced else 0.1):
        reason = supervisor.check(time.monotonic())
        if reason:
            logger.critical("%s", reason)
            print(f"covidct: {reason}", file=sys.stderr, flush=True)
            exit_code = 1
            break
        if not announced and accepting(settings):
            print(banner(settings), flush=True)
            announced = True
    watch.stop.set()
    shutdown(supervisor.procs)
    pid_file(settings).unlink(missing_ok=True)
    return exit_code


def shutdown(procs: dict[str, subprocess.Popen], timeout: float = 30.0) -> None:
    """SIGTERM to each stage's main process in reverse order (web, worker, listener): the
    worker finishes its task (Celery's warm shutdown); then SIGKILL what is left."""
    for stage in reversed(STAGES):
        proc = procs.get(stage)
        if proc is not None and proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + timeout
    for stage, proc in procs.items():
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.warning("%s did not stop in time; killing it", stage)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    print("covidct stopped.", flush=True)
