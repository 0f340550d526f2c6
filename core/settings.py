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
import re
import secrets
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PREFIX = "COVIDCT_"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII, no backslash
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
SHIPPED_MODEL = Path(__file__).resolve().parent.parent / "models" / "covidct.keras"


class SettingsError(ValueError):
    """A setting has a value covidct cannot use; the message names the variable."""


@dataclass(frozen=True)
class Destination:
    """A DICOM peer that receives our SRs (``AE@host:port``)."""

    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


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
    batch_size: int = 32
    read_threads: int = 1
    sr_max_attempts: int = 6
    sr_retry_base_seconds: float = 10.0
    max_upload_bytes: int = 20 * 1024 * 1024
    max_upload_pixels: int = 40_000_000
    web_secure_cookies: bool = False
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
            if f.name == "secret_key":
                value = "***"
            elif f.name in ("database_url", "broker_url"):
                value = _mask_url(str(value))
            elif isinstance(value, tuple):
                value = ",".join(str(v) for v in value)
            elif isinstance(value, Path):
                value = str(value)
            out[f.name] = value
        return out

    def log_effective(self, log: logging.Logger | None = None) -> None:
        """Log the effective settings once, at start-up."""
        (log or logger).info(
            "effective settings: %s", " ".join(f"{k}={v}" for k, v in self.masked().items())
        )


def _mask_url(url: str) -> str:
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


# --- parsers: each takes the raw string and returns the typed value or raises ValueError ---


def _int(lo: int, hi: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        value = int(raw.strip())
        if not lo <= value <= hi:
            raise ValueError(f"must be between {lo} and {hi}")
        return value

    return parse


def _float(lo: float, hi: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        value = float(raw.strip())
        if not lo <= value <= hi:
            raise ValueError(f"must be between {lo} and {hi}")
        return value

    return parse


def _ae(raw: str) -> str:
    value = raw.strip()
    if not _AE_RE.match(value) or not value.strip():
        raise ValueError("an AE title is 1-16 printable ASCII characters without backslash")
    return value


def _ae_list(raw: str) -> tuple[str, ...]:
    items = tuple(p.strip() for p in raw.split(",") if p.strip())
    if not items:
        raise ValueError("give at least one AE title, or * for any")
    if "*" in items:
        if len(items) > 1:
            raise ValueError("* cannot be combined with named AE titles")
        return items
    return tuple(_ae(i) for i in items)


def _host(raw: str) -> str:
    value = raw.strip()
    if not value or not re.match(r"^[A-Za-z0-9.:\-\[\]]+$", value):
        raise ValueError("not a host name or IP address")
    return value


def _address(raw: str) -> str:
    """``host:port``, or empty for none."""
    value = raw.strip()
    if not value:
        return ""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError("not host:port")
    _host(host)
    return value


def _host_list(raw: str) -> tuple[str, ...]:
    return tuple(_host(p) for p in raw.split(",") if p.strip())


def _destinations(raw: str) -> tuple[Destination, ...]:
    out = []
    for item in (p.strip() for p in raw.split(",")):
        if not item:
            continue
        m = re.match(r"^([^@]+)@(.+):(\d+)$", item)
        if not m:
            raise ValueError(f"{item!r} is not AE@host:port")
        port = _int(1, 65535)(m.group(3))
        out.append(Destination(_ae(m.group(1)), _host(m.group(2)), port))
    return tuple(out)


def _uid_list(raw: str) -> tuple[str, ...]:
    items = tuple(p.strip() for p in raw.split(",") if p.strip())
    if not items:
        raise ValueError("give at least one SOP Class UID")
    for uid in items:
        if len(uid) > 64 or not _UID_RE.match(uid):
            raise ValueError(f"{uid!r} is not a UID")
    return items


def _path(raw: str) -> Path:
    if not raw.strip():
        raise ValueError("empty path")
    return Path(raw.strip()).expanduser()


def _existing_file(raw: str) -> Path:
    path = _path(raw)
    if not path.is_file():
        raise ValueError(f"{path} is not a readable file")
    return path


def _db_url(raw: str) -> str:
    value = raw.strip()
    if not re.match(r"^(sqlite|postgresql)(\+\w+)?://", value):
        raise ValueError("must be an SQLAlchemy URL for sqlite or postgresql")
    return value


def _broker_url(raw: str) -> str:
    value = raw.strip()
    if not re.match(r"^(redis|rediss|filesystem)://", value):
        raise ValueError("must be redis://host:port/db (or filesystem:// for the embedded one)")
    return value


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return value

    return parse


def _level(raw: str) -> str:
    value = raw.strip().upper()
    if value not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
    return value


def _secret(raw: str) -> str:
    if len(raw) < 16:
        raise ValueError("must be at least 16 characters")
    return raw


PARSERS: dict[str, Callable[[str], Any]] = {
    "ae_title": _ae,
    "dicom_host": _host,
    "dicom_port": _int(1, 65535),
    "allowed_aes": _ae_list,
    "allowed_hosts": _host_list,
    "destinations": _destinations,
    "stable_seconds": _float(0.0, 86400.0),
    "web_host": _host,
    "web_port": _int(1, 65535),
    "secret_key": _secret,
    "model_path": _path,
    "model_runtime": _choice("auto", "keras", "litert"),
    "sop_classes": _uid_list,
    "max_associations": _int(1, 1000),
    "listener_processes": _int(1, 64),
    "acse_timeout": _float(1.0, 3600.0),
    "dimse_timeout": _float(1.0, 3600.0),
    "network_timeout": _float(1.0, 3600.0),
    "max_pdu": _int(4096, 16 * 1024 * 1024),
    "association_request_seconds": _float(1.0, 600.0),
    "listener_address": _address,
    "listener_sweeper": _bool,
    "max_peer_connections": _int(1, 1000),
    "min_free_disk_mb": _int(0, 10**7),
    "spool_direct_io": _bool,
    "tls_cert": _existing_file,
    "tls_key": _existing_file,
    "tls_ca": _existing_file,
    "sweep_seconds": _float(0.1, 3600.0),
    "heartbeat_seconds": _float(0.1, 600.0),
    "task_stale_seconds": _float(1.0, 86400.0),
    "requeue_seconds": _float(1.0, 86400.0),
    "redeliver_seconds": _float(1.0, 86400.0),
    "incomplete_grace_seconds": _float(0.0, 7 * 86400.0),
    "indeterminate_band": _float(0.0, 0.5),
    "min_series_slices": _int(1, 10000),
    "batch_size": _int(1, 1024),
    "read_threads": _int(1, 64),
    "sr_max_attempts": _int(1, 100),
    "sr_retry_base_seconds": _float(0.0, 3600.0),
    "max_upload_bytes": _int(1024, 1024**3),
    "max_upload_pixels": _int(1024, 10**9),
    "web_secure_cookies": _bool,
    "log_level": _level,
    "database_url": _db_url,
    "broker_url": _broker_url,
    "data_dir": _path,
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
