"""The ``covidct`` command line.

Each subcommand loads the settings once, then hands them to the stage it starts.  Stages are
imported lazily so that ``covidct --help`` does not pay for TensorFlow.  Errors that a user can
fix end as one line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from core.settings import Settings, SettingsError, load_settings

logger = logging.getLogger("covidct")

EXIT_USAGE = 2
EXIT_FAILURE = 1


class CommandError(Exception):
    """A command could not do what was asked; the message is shown as is."""


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if level != "DEBUG":  # their INFO lines are per PDU or per migration step
        for noisy in ("pynetdicom", "alembic", "highdicom", "celery.worker.strategy"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def _settings(args: argparse.Namespace) -> Settings:
    settings = load_settings()
    _configure_logging(settings.log_level)
    args.settings = settings  # for main's error translation (the database's URL)
    return settings


# --- subcommands -------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from covidct.serve import serve

    return serve(_settings(args), workers=args.workers)


def cmd_echo(args: argparse.Namespace) -> int:
    import time

    from core.health import dicom_echo, local_address

    settings = _settings(args)
    address = args.address or local_address(settings.dicom_host, settings.dicom_port)
    t0 = time.perf_counter()
    answer = dicom_echo(address, settings.ae_title, timeout=args.timeout)
    took = (time.perf_counter() - t0) * 1000
    if answer != "ok":
        print(f"C-ECHO to {settings.ae_title}@{address}: {answer}", file=sys.stderr)
        return 1
    print(f"C-ECHO to {settings.ae_title}@{address}: ok ({took:.0f} ms)")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from covidct.serve import stop

    return stop(_settings(args))


def _stage_settings(args: argparse.Namespace) -> Settings:
    """A stage's settings, logged once: by the stage, or by ``serve`` for its stages; a stage
    under serve ends when serve does (:mod:`core.parentwatch`)."""
    settings = _settings(args)
    if not args.under_serve:
        settings.log_effective()
    else:
        from core.parentwatch import die_with_parent

        die_with_parent(args.serve_pid)
    return settings


def cmd_listener(args: argparse.Namespace) -> int:
    from ingest.server import run_listener

    return run_listener(_stage_settings(args))


def cmd_worker(args: argparse.Namespace) -> int:
    from worker.main import run_worker

    return run_worker(
        _stage_settings(args),
        concurrency=args.concurrency,
        queues=args.queues,
        quiet=args.under_serve,
    )


def cmd_sweeper(args: argparse.Namespace) -> int:
    from ingest.sweeper import run_sweeper

    return run_sweeper(_stage_settings(args))


def cmd_web(args: argparse.Namespace) -> int:
    from web.app import run_web

    return run_web(_stage_settings(args))


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from classifier.evaluate import evaluate_folder, format_report

    settings = _settings(args)
    model = Path(args.model) if args.model else settings.model_path
    result = evaluate_folder(Path(args.data), model, threshold=args.threshold)
    print(json.dumps(result.as_json()) if args.json else format_report(result))
    return 0


def cmd_evaluate_studies(args: argparse.Namespace) -> int:
    import json
    import tempfile

    from classifier.inference import Classifier
    from worker.evaluate_studies import as_json, evaluate_study, find_studies, format_metrics

    settings = _settings(args)
    model = Path(args.model) if args.model else settings.model_path
    studies = find_studies(Path(args.root))
    clf = Classifier(model)
    lines = []
    with tempfile.TemporaryDirectory(prefix="covidct-evaluate-") as scratch:
        # nothing is stored: overlays and reports of this run go to a scratch folder
        settings = replace(settings, data_dir=Path(scratch))
        for label, folder in studies:
            line = evaluate_study(label, folder, settings, clf)
            lines.append(line)
            print(line.format(), file=sys.stderr if args.json else sys.stdout, flush=True)
    result = as_json(lines)
    if args.json:
        print(json.dumps(result))
    else:
        metrics = result["metrics"]
        assert isinstance(metrics, dict)
        print(format_metrics(metrics))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from classifier.predict import predict_files

    settings = _settings(args)
    model = Path(args.model) if args.model else settings.model_path
    failures = 0
    for line in predict_files([Path(f) for f in args.files], model):
        print(line.format())
        failures += line.error is not None
    return EXIT_FAILURE if failures else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from covidct.demo import run_demo

    if not 1 <= args.studies <= 50:
        raise CommandError("--studies must be between 1 and 50")
    return run_demo(_settings(args), studies=args.studies)


def cmd_backfill(args: argparse.Namespace) -> int:
    """Analyse a PACS's older studies: C-FIND, then C-MOVE of each one not here yet."""
    from datetime import date

    from core.values import destinations
    from ingest.backfill import BackfillError, backfill

    settings = _settings(args)
    try:
        (source,) = destinations(args.source)
        since = date.fromisoformat(args.since)
        until = date.fromisoformat(args.until) if args.until else None
    except ValueError as exc:
        raise CommandError(f"backfill: {exc} (--source AE@host:port, dates YYYY-MM-DD)") from None
    if source.is_dicomweb:
        raise CommandError("backfill: --source is a DICOM node, AE@host:port")
    tty = sys.stderr.isatty()

    def progress(done: int, total: int, line: str) -> None:
        width = 30
        bar = "#" * (width * done // max(total, 1))
        text = f"[{bar:<{width}}] {done}/{total} {line}"
        print(
            ("\r" + text[:120].ljust(120)) if tty else text,
            end="" if tty else "\n",
            file=sys.stderr,
            flush=True,
        )

    try:
        summary = backfill(settings, source, since, until, args.modality, progress)
    except BackfillError as exc:
        raise CommandError(f"backfill: {exc}") from None
    if tty:
        print(file=sys.stderr)
    print(summary.line())
    for failure in summary.failed:
        print(f"  failed: {failure}")
    return 1 if summary.failed else 0


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from core.db import current_revision, upgrade

    settings = _settings(args)
    upgrade(settings.database_url, args.revision)
    print(f"database at revision {current_revision(settings.database_url)}")
    return 0


# --- parser ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="covidct",
        description=(
            "COVID-19 CT triage: DICOM in, DICOM SR out, dashboard. Settings come from "
            "COVIDCT_* environment variables (see README). Results support research and "
            "triage; they are not a diagnosis."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(
        name: str, func: Callable[[argparse.Namespace], int], text: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, description=text)
        p.set_defaults(func=func)
        if name in ("listener", "sweeper", "worker", "web"):  # started by serve: it speaks
            p.add_argument("--under-serve", action="store_true", help=argparse.SUPPRESS)
            p.add_argument("--serve-pid", type=int, help=argparse.SUPPRESS)
        return p

    p = add("serve", cmd_serve, "run listener, worker and dashboard on this machine")
    p.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    add("stop", cmd_stop, "stop the covidct serve running on COVIDCT_DATA_DIR (or ./var)")
    p = add("echo", cmd_echo, "C-ECHO to the listener, as a PACS would (exit 1 if no answer)")
    p.add_argument("--address", help="host:port (default: COVIDCT_DICOM_HOST:COVIDCT_DICOM_PORT)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    add("listener", cmd_listener, "run the DICOM storage SCP (C-ECHO, C-STORE)")
    add("sweeper", cmd_sweeper, "run the sweep: queue complete studies, retry deliveries")
    p = add("worker", cmd_worker, "run a Celery worker that analyses studies and uploads")
    p.add_argument("--concurrency", type=int, default=1, help="worker processes (default 1)")
    p.add_argument(
        "--queues", default="studies,uploads,exports", help="queues to consume (default: all)"
    )
    add("web", cmd_web, "run the web dashboard and JSON API")
    p = add("evaluate", cmd_evaluate, "score a model on a folder with CT_COVID/ and CT_NonCOVID/")
    p.add_argument("--data", required=True, help="folder with CT_COVID/ and CT_NonCOVID/")
    p.add_argument("--model", help="model file (default: COVIDCT_MODEL_PATH)")
    p.add_argument("--threshold", type=float, help="override the model card's threshold")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p = add(
        "evaluate-studies",
        cmd_evaluate_studies,
        "run the serving path on folders of DICOM studies: ROOT/{covid,pneumonia,normal}/STUDY",
    )
    p.add_argument("root", metavar="ROOT", help="folder with covid/, pneumonia/, normal/")
    p.add_argument("--model", help="model file (default: COVIDCT_MODEL_PATH)")
    p.add_argument("--json", action="store_true", help="last line: one JSON object")
    p = add("predict", cmd_predict, "probability and label for PNG, JPEG or DICOM files")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--model", help="model file (default: COVIDCT_MODEL_PATH)")
    from covidct.accounts import add_account_commands

    add_account_commands(add, _settings)
    p = add(
        "demo",
        cmd_demo,
        "send 3 demo CT studies to the running service over C-STORE: a chest with ground "
        "glass (Present), a clear one (Absent), one slice (not analysable, with the reason)",
    )
    p.add_argument(
        "--studies", type=int, default=3, help="how many studies in all (default 3; 1 to 50)"
    )
    p = add(
        "backfill",
        cmd_backfill,
        "analyse a PACS's older studies: C-FIND for a date range, then C-MOVE of each study"
        " not here yet to this service's AE title (safe to interrupt and run again)",
    )
    p.add_argument("--source", required=True, help="the PACS, AE@host:port")
    p.add_argument("--since", required=True, help="first study date, YYYY-MM-DD")
    p.add_argument("--until", help="last study date, YYYY-MM-DD (default: no end)")
    p.add_argument("--modality", default="CT", help="studies holding this modality (default CT)")
    p = add("db", lambda a: _db_help(parser), "database maintenance")
    dbsub = p.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    up = dbsub.add_parser("upgrade", help="apply migrations", description="apply migrations")
    up.add_argument("revision", nargs="?", default="head")
    up.set_defaults(func=cmd_db_upgrade)
    return parser


def _db_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return EXIT_USAGE


FILE_MODE_MASK = 0o027  # files 0640, folders 0750: patient data is not for other accounts


def main(argv: Sequence[str] | None = None) -> int:
    os.umask(FILE_MODE_MASK)  # every file any stage writes: spool, database, SRs, uploads
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # translated here, where errors leave the program
        if _is_user_error(exc):
            print(f"covidct: error: {exc}", file=sys.stderr)
            return EXIT_USAGE if isinstance(exc, SettingsError) else EXIT_FAILURE
        store = _database_error(exc, getattr(args, "settings", None))
        if store:
            print(f"covidct: error: {store}", file=sys.stderr)
            return EXIT_FAILURE
        raise


def _database_error(exc: Exception, settings: Settings | None) -> str:
    """One line for a results store that cannot be used: its URL (password hidden) and the
    server's reason."""
    from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError

    if not isinstance(exc, DBAPIError | ArgumentError | NoSuchModuleError) or settings is None:
        return ""
    reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    url = settings.masked()["database_url"]
    return f"cannot use the results store {url}: {reason[0] if reason else type(exc).__name__}"


def _is_user_error(exc: Exception) -> bool:
    from core.users import UserError

    known: tuple[type[Exception], ...] = (SettingsError, UserError, CommandError, OSError)
    try:
        from classifier.errors import ClassifierError

        known += (ClassifierError,)
    except ImportError:  # pragma: no cover - classifier is part of the package
        pass
    return isinstance(exc, known)


if __name__ == "__main__":
    sys.exit(main())
