"""Settings: the one place where covidct reads its environment.

Every entry point calls :func:`load_settings` once and hands the resulting frozen
:class:`Settings` to the parts it starts.  Values come from, in increasing priority, the
defaults below, an optional TOML file named by ``COVIDCT_CONFIG`` (keys are the variable names
without the ``COVIDCT_`` prefix, in lower case), and ``COVIDCT_*`` environment variables.  A bad
value raises :class:`SettingsError` naming the variable, so start-up stops with one clear line.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from core import values as v
from core.values import Destination

logger = logging.getLogger(__name__)

PREFIX = "COVIDCT_"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
SHIPPED_MODEL = Path(__file__).resolve().parent.parent / "models" / "covidct.keras"


class SettingsError(ValueError):
    """A setting has a value covidct cannot use; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    """The validated, effective configuration of one covidct process."""

    data_dir: Path
    database_url: str
    broker_url: str
    ae_title: str = "COVIDCT"
    dicom_host: str = "127.0.0.1"
    dicom_port: int = 11112
    allowed_aes: tuple[str, ...] = ("*",)
    allowed_hosts: tuple[str, ...] = ()
    destinations: tuple[Destination, ...] = ()
    stable_seconds: float = 10.0
    released_stable_seconds: float = 2.0  # the quiet time once the sender released (ingest)
    web_host: str = "127.0.0.1"
    web_port: int = 8000
    secret_key: str = field(default="", repr=False)
    model_path: Path = SHIPPED_MODEL
    model_runtime: str = "auto"
    sop_classes: tuple[str, ...] = (CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE)
    max_associations: int = 10
    listener_processes: int = 2
    acse_timeout: float = 30.0
    dimse_timeout: float = 30.0
    network_timeout: float = 60.0
    max_pdu: int = 131072
    association_request_seconds: float = 10.0
    listener_sweeper: bool = True  # the listener runs the sweeper (off: `covidct sweeper` does)
    listener_address: str = ""  # host:port that /readyz sends a C-ECHO to ("" = no check)
    max_peer_connections: int = 8
    min_free_disk_mb: int = 1024
    spool_direct_io: bool = True
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    sweep_seconds: float = 5.0
    heartbeat_seconds: float = 2.0
    task_stale_seconds: float = 10.0
    requeue_seconds: float = 900.0
    redeliver_seconds: float = 30.0
    incomplete_grace_seconds: float = 300.0
    indeterminate_band: float = 0.05
    min_series_slices: int = 10
    batch_size: int = 16
    read_threads: int = 1
    sr_max_attempts: int = 6
    sr_retry_base_seconds: float = 10.0
    # dciodvfy checks each object before it leaves: "auto" when it is on PATH, "off", or a path
    dciodvfy: str = "auto"
    # sent as "Authorization: Bearer" to DICOMweb destinations without user:password in the URL
    dicomweb_token: str = field(default="", repr=False)
    webhook_urls: tuple[str, ...] = ()  # a signed JSON POST per finished, not-analysable, failed
    webhook_secret: str = field(default="", repr=False)
    public_url: str = ""  # the dashboard as users reach it (links in notifications)
    hl7_destinations: tuple[str, ...] = ()  # host:port of MLLP receivers of an ORU^R01 a study
    backfill_source: str = ""  # AE@host:port the operations page backfills from ("" = none)
    max_upload_bytes: int = 20 * 1024 * 1024
    stow_max_bytes: int = 200 * 1024**2  # one STOW-RS request (and so one instance in it)
    max_upload_pixels: int = 40_000_000
    web_secure_cookies: bool = False
    login_max_failures: int = 5
    shared_uploads: bool = False
    token_days: float = 90.0
    login_window_seconds: float = 900.0
    log_level: str = "INFO"

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def pending_dir(self) -> Path:
        """Notes the listener could not write to the store (ingest.completeness)."""
        return self.data_dir / "pending"

    @property
    def reports_dir(self) -> Path:
        return self.data_dir / "reports"

    @property
    def uploads_dir(self) -> Path:
        return self.data_dir / "uploads"

    @property
    def broker_is_embedded(self) -> bool:
        return self.broker_url.startswith("filesystem://")

    @property
    def broker_dir(self) -> Path:
        return self.data_dir / "broker"

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert is not None

    def masked(self) -> dict[str, Any]:
        """The settings as a dict fit for a log line: secrets and passwords masked."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("secret_key", "dicomweb_token", "webhook_secret"):
                value = "***" if value else ""
            elif f.name in ("database_url", "broker_url", "public_url"):
                value = v.mask_url(str(value))
            elif isinstance(value, tuple):
                value = ",".join(v.mask_url(str(x)) for x in value)
            elif isinstance(value, Path):
                value = str(value)
            out[f.name] = value
        return out

    def log_effective(self, log: logging.Logger | None = None) -> None:
        """Log the effective settings once, at start-up."""
        (log or logger).info(
            "effective settings: %s", " ".join(f"{k}={v}" for k, v in self.masked().items())
        )


PARSERS: dict[str, Callable[[str], Any]] = {
    "ae_title": v.ae_title,
    "dicom_host": v.host,
    "dicom_port": v.int_range(1, 65535),
    "allowed_aes": v.ae_list,
    "allowed_hosts": v.host_list,
    "destinations": v.destinations,
    "stable_seconds": v.float_range(0.0, 86400.0),
    "released_stable_seconds": v.float_range(0.0, 86400.0),
    "web_host": v.host,
    "web_port": v.int_range(1, 65535),
    "secret_key": v.secret,
    "model_path": v.path,
    "model_runtime": v.choice("auto", "keras", "litert"),
    "sop_classes": v.uid_list,
    "max_associations": v.int_range(1, 1000),
    "listener_processes": v.int_range(1, 64),
    "acse_timeout": v.float_range(1.0, 3600.0),
    "dimse_timeout": v.float_range(1.0, 3600.0),
    "network_timeout": v.float_range(1.0, 3600.0),
    "max_pdu": v.int_range(4096, 16 * 1024 * 1024),
    "association_request_seconds": v.float_range(1.0, 600.0),
    "listener_address": v.address,
    "listener_sweeper": v.boolean,
    "max_peer_connections": v.int_range(1, 1000),
    "min_free_disk_mb": v.int_range(0, 10**7),
    "spool_direct_io": v.boolean,
    "tls_cert": v.existing_file,
    "tls_key": v.existing_file,
    "tls_ca": v.existing_file,
    "sweep_seconds": v.float_range(0.1, 3600.0),
    "heartbeat_seconds": v.float_range(0.1, 600.0),
    "task_stale_seconds": v.float_range(1.0, 86400.0),
    "requeue_seconds": v.float_range(1.0, 86400.0),
    "redeliver_seconds": v.float_range(1.0, 86400.0),
    "incomplete_grace_seconds": v.float_range(0.0, 7 * 86400.0),
    "indeterminate_band": v.float_range(0.0, 0.5),
    "min_series_slices": v.int_range(1, 10000),
    "batch_size": v.int_range(1, 1024),
    "read_threads": v.int_range(1, 64),
    "sr_max_attempts": v.int_range(1, 100),
    "sr_retry_base_seconds": v.float_range(0.0, 3600.0),
    "dciodvfy": v.tool,
    "dicomweb_token": v.token,
    "webhook_urls": v.url_list,
    "webhook_secret": v.secret,
    "public_url": v.url,
    "hl7_destinations": v.address_list,
    "backfill_source": v.dicom_node,
    "max_upload_bytes": v.int_range(1024, 1024**3),
    "stow_max_bytes": v.int_range(1024 * 1024, 64 * 1024**3),
    "max_upload_pixels": v.int_range(1024, 10**9),
    "web_secure_cookies": v.boolean,
    "login_max_failures": v.int_range(1, 1000),
    "shared_uploads": v.boolean,
    "token_days": v.float_range(0.0, 3650.0),
    "login_window_seconds": v.float_range(10.0, 86400.0),
    "log_level": v.level,
    "database_url": v.db_url,
    "broker_url": v.broker_url,
    "data_dir": v.path,
}


def variable_names() -> list[str]:
    """Every environment variable covidct reads (for docs and the compose-file test)."""
    return sorted({PREFIX + name.upper() for name in PARSERS} | {PREFIX + "CONFIG"})


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _read_config_file(path: Path) -> dict[str, str]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SettingsError(f"COVIDCT_CONFIG: cannot read {path}: {exc}") from exc
    out = {}
    for key, value in data.items():
        name = key.lower()
        if name not in PARSERS:
            raise SettingsError(f"COVIDCT_CONFIG: unknown setting {key!r} in {path}")
        if isinstance(value, list):
            value = ",".join(str(v) for v in value)
        out[name] = str(value)
    return out


def load_settings(
    environ: Mapping[str, str] | None = None, *, create_dirs: bool = True
) -> Settings:
    """Read, validate and return the settings; raise :class:`SettingsError` on a bad value."""
    env = os.environ if environ is None else environ
    raw: dict[str, str] = {}
    if env.get(PREFIX + "CONFIG"):
        raw.update(_read_config_file(Path(env[PREFIX + "CONFIG"])))
    for name in PARSERS:
        if (PREFIX + name.upper()) in env:
            raw[name] = env[PREFIX + name.upper()]

    values: dict[str, Any] = {}
    for name, text in raw.items():
        try:
            values[name] = PARSERS[name](text)
        except ValueError as exc:
            raise SettingsError(f"{PREFIX}{name.upper()}={text!r}: {exc}") from None

    data_dir = Path(values.pop("data_dir", Path("var"))).resolve()
    values.setdefault("database_url", f"sqlite:///{data_dir / 'covidct.sqlite3'}")
    values.setdefault("broker_url", "filesystem://")

    host = values.get("dicom_host", "127.0.0.1")
    if values.get("allowed_aes", ("*",)) == ("*",) and not _is_loopback(host):
        raise SettingsError(
            f"{PREFIX}ALLOWED_AES='*' is only allowed while the SCP listens on loopback "
            f"({PREFIX}DICOM_HOST={host!r}): name the calling AE titles"
        )
    if values.get("webhook_urls") and not values.get("webhook_secret"):
        raise SettingsError(
            f"{PREFIX}WEBHOOK_URLS needs {PREFIX}WEBHOOK_SECRET (16 characters or more): every"
            " notification is signed with it"
        )
    if ("tls_cert" in values) != ("tls_key" in values):
        raise SettingsError(f"{PREFIX}TLS_CERT and {PREFIX}TLS_KEY must be set together")
    if "tls_ca" in values and "tls_cert" not in values:
        raise SettingsError(f"{PREFIX}TLS_CA needs {PREFIX}TLS_CERT and {PREFIX}TLS_KEY")
    if values.get("dimse_timeout", 30.0) >= values.get("network_timeout", 60.0):
        raise SettingsError(f"{PREFIX}DIMSE_TIMEOUT must be shorter than {PREFIX}NETWORK_TIMEOUT")
    if values.get("heartbeat_seconds", 2.0) * 2 > values.get("task_stale_seconds", 10.0):
        raise SettingsError(
            f"{PREFIX}TASK_STALE_SECONDS must be at least twice {PREFIX}HEARTBEAT_SECONDS"
        )

    if create_dirs:
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SettingsError(f"{PREFIX}DATA_DIR={str(data_dir)!r}: {exc}") from None
    if "secret_key" not in values:
        values["secret_key"] = _stored_secret(data_dir) if create_dirs else ""
    return Settings(data_dir=data_dir, **values)


def _stored_secret(data_dir: Path) -> str:
    """A random key made once and kept in the data dir, so sessions survive restarts."""
    path = data_dir / "secret_key"
    try:
        return path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        pass
    key = secrets.token_urlsafe(48)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(key)
    try:
        os.link(tmp, path)  # atomic and fails if another process won the race
    except FileExistsError:
        key = path.read_text(encoding="ascii").strip()
    finally:
        tmp.unlink(missing_ok=True)
    return key
