"""Every object is checked by dciodvfy (dicom3tools) before it leaves, when dciodvfy is there:
an object with an error is not sent, and its delivery fails with the first errors named.

``COVIDCT_DCIODVFY``: ``auto`` (the default) uses the dciodvfy on PATH and skips the check
where there is none (a development machine; the container image has it), ``off`` never checks,
a path names the program.  A file is checked once per process (keyed by path, size and
modification time): about 13 ms an object, 2026-12-07.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path

TIMEOUT = 60.0


def program(setting: str) -> str | None:
    """The dciodvfy to run, or None when there is none to run."""
    if setting == "off":
        return None
    if setting == "auto":
        return shutil.which("dciodvfy")
    return setting


def errors(setting: str, path: str) -> list[str]:
    """dciodvfy's error lines for ``path`` (its warnings are left out); [] when not checked."""
    exe = program(setting)
    if exe is None:
        return []
    st = Path(path).stat()
    return list(_errors(exe, str(path), st.st_size, st.st_mtime_ns))


@functools.lru_cache(maxsize=4096)
def _errors(exe: str, path: str, size: int, mtime_ns: int) -> tuple[str, ...]:
    out = subprocess.run([exe, path], capture_output=True, text=True, timeout=TIMEOUT)
    lines = (out.stdout + out.stderr).splitlines()
    return tuple(line.strip() for line in lines if line.startswith("Error"))
