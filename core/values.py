"""The typed values settings are made of, and their parsers: each parser takes the raw string
and returns the value or raises ValueError with what is wrong (core.settings names the
variable)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII, no backslash
UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


OBJECT_KINDS = ("sr", "sc", "ko")  # the SR, key images (Secondary Capture), key objects


@dataclass(frozen=True)
class Destination:
    """A peer that receives our results: a DICOM node (``AE@host:port``), or a DICOMweb
    service (``url``: its base URL, STOW-RS), optionally ``?objects=sr+ko``: which of
    :data:`OBJECT_KINDS` it gets, all by default.  ``str()`` names it without credentials
    (it is stored with each delivery and shown on the dashboard)."""

    ae_title: str
    host: str
    port: int
    objects: tuple[str, ...] = OBJECT_KINDS
    url: str = ""  # DICOMweb base URL, without credentials
    username: str = field(default="", repr=False)
    password: str = field(default="", repr=False)

    @property
    def is_dicomweb(self) -> bool:
        return bool(self.url)

    def __str__(self) -> str:
        if self.url:
            return self.url
        return f"{self.ae_title}@{self.host}:{self.port}"


def mask_url(url: str) -> str:
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def int_range(lo: int, hi: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        value = int(raw.strip())
        if not lo <= value <= hi:
            raise ValueError(f"must be between {lo} and {hi}")
        return value

    return parse


def float_range(lo: float, hi: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        value = float(raw.strip())
        if not lo <= value <= hi:
            raise ValueError(f"must be between {lo} and {hi}")
        return value

    return parse


def ae_title(raw: str) -> str:
    value = raw.strip()
    if not AE_RE.match(value) or not value.strip():
        raise ValueError("an AE title is 1-16 printable ASCII characters without backslash")
    return value


def ae_list(raw: str) -> tuple[str, ...]:
    items = tuple(p.strip() for p in raw.split(",") if p.strip())
    if not items:
        raise ValueError("give at least one AE title, or * for any")
    if "*" in items:
        if len(items) > 1:
            raise ValueError("* cannot be combined with named AE titles")
        return items
    return tuple(ae_title(i) for i in items)


def host(raw: str) -> str:
    value = raw.strip()
    if not value or not re.match(r"^[A-Za-z0-9.:\-\[\]]+$", value):
        raise ValueError("not a host name or IP address")
    return value


def address(raw: str) -> str:
    """``host:port``, or empty for none."""
    value = raw.strip()
    if not value:
        return ""
    name, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError("not host:port")
    host(name)
    return value


def host_list(raw: str) -> tuple[str, ...]:
    return tuple(host(p) for p in raw.split(",") if p.strip())


def destinations(raw: str) -> tuple[Destination, ...]:
    out = []
    for item in (p.strip() for p in raw.split(",")):
        if not item:
            continue
        if re.match(r"^https?://", item, re.IGNORECASE):
            out.append(dicomweb_destination(item))
            continue
        m = re.match(r"^([^@]+)@(.+):(\d+)(?:\?objects=([a-z+]*))?$", item)
        if not m:
            raise ValueError(
                f"{mask_url(item)!r} is not AE@host:port or a DICOMweb URL"
                " (either may end in ?objects=sr+sc+ko)"
            )
        port = int_range(1, 65535)(m.group(3))
        objects = OBJECT_KINDS if m.group(4) is None else object_kinds(m.group(4))
        out.append(Destination(ae_title(m.group(1)), host(m.group(2)), port, objects))
    return tuple(out)


def dicomweb_destination(item: str) -> Destination:
    """``http(s)://[user:password@]host[:port]/path[?objects=...]``: a STOW-RS service."""
    parts = urlsplit(item)
    query = parts.query
    objects = OBJECT_KINDS
    if query:
        if not query.startswith("objects="):
            raise ValueError(f"{mask_url(item)!r}: the only query a destination takes is objects=")
        objects = object_kinds(query.removeprefix("objects="))
    if not parts.hostname:
        raise ValueError(f"{mask_url(item)!r} has no host")
    host(parts.hostname)
    netloc = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
    url = urlunsplit((parts.scheme.lower(), netloc, parts.path.rstrip("/"), "", ""))
    return Destination(
        "",
        parts.hostname,
        parts.port or (443 if parts.scheme.lower() == "https" else 80),
        objects,
        url=url,
        username=unquote(parts.username or ""),
        password=unquote(parts.password or ""),
    )


def object_kinds(raw: str) -> tuple[str, ...]:
    """``sr+sc+ko`` or a part of it, in that order."""
    named = [p for p in raw.split("+") if p]
    wrong = [p for p in named if p not in OBJECT_KINDS]
    if wrong or not named:
        raise ValueError(f"objects= takes {', '.join(OBJECT_KINDS)} joined by +, not {raw!r}")
    return tuple(k for k in OBJECT_KINDS if k in named)


def uid_list(raw: str) -> tuple[str, ...]:
    items = tuple(p.strip() for p in raw.split(",") if p.strip())
    if not items:
        raise ValueError("give at least one SOP Class UID")
    for uid in items:
        if len(uid) > 64 or not UID_RE.match(uid):
            raise ValueError(f"{uid!r} is not a UID")
    return items


def path(raw: str) -> Path:
    if not raw.strip():
        raise ValueError("empty path")
    return Path(raw.strip()).expanduser()


def existing_file(raw: str) -> Path:
    found = path(raw)
    if not found.is_file():
        raise ValueError(f"{found} is not a readable file")
    return found


def db_url(raw: str) -> str:
    value = raw.strip()
    if not re.match(r"^(sqlite|postgresql)(\+\w+)?://", value):
        raise ValueError("must be an SQLAlchemy URL for sqlite or postgresql")
    return value


def broker_url(raw: str) -> str:
    value = raw.strip()
    if not re.match(r"^(redis|rediss|filesystem)://", value):
        raise ValueError("must be redis://host:port/db (or filesystem:// for the embedded one)")
    return value


def boolean(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def choice(*allowed: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return value

    return parse


def level(raw: str) -> str:
    value = raw.strip().upper()
    if value not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
    return value


def secret(raw: str) -> str:
    if len(raw) < 16:
        raise ValueError("must be at least 16 characters")
    return raw


def tool(raw: str) -> str:
    """A program: ``auto`` (found on PATH when there), ``off``, or its path."""
    value = raw.strip()
    if value in ("auto", "off"):
        return value
    if not value or not Path(value).is_file():
        raise ValueError("give auto, off, or the path of the program")
    return value


def token(raw: str) -> str:
    """An HTTP bearer token: printable ASCII without spaces (RFC 6750's token68 and more)."""
    value = raw.strip()
    if not re.match(r"^[\x21-\x7e]+$", value):
        raise ValueError("a bearer token is printable ASCII without spaces")
    return value


def url(raw: str) -> str:
    """An http(s) URL with a host, without a trailing slash."""
    value = raw.strip().rstrip("/")
    parts = urlsplit(value)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{mask_url(value)!r} is not an http(s) URL")
    return value


def url_list(raw: str) -> tuple[str, ...]:
    return tuple(url(p) for p in raw.split(",") if p.strip())


def address_list(raw: str) -> tuple[str, ...]:
    """``host:port`` items, comma-separated."""
    return tuple(address(p) for p in raw.split(",") if p.strip())


def dicom_node(raw: str) -> str:
    """One ``AE@host:port`` (checked, returned as written)."""
    found = destinations(raw)
    if len(found) != 1 or found[0].is_dicomweb:
        raise ValueError("give one DICOM node, AE@host:port")
    return str(found[0])
