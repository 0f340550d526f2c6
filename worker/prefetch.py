"""Ask the kernel to read a study's files into the page cache before the worker needs them.

The listener writes the spool with O_DIRECT (:mod:`ingest.spool`), so a study's files are
on disk but not in memory when the worker picks the study up.  Read one by one, on demand,
300 slices of 525 KB took 0.8-0.9 s here against 0.26-0.31 s from the page cache.
``POSIX_FADV_WILLNEED`` for every file at the start lets the disk read them all at once,
while the selection parses the headers.  It is advice: where it is missing, or a file has
gone, nothing happens and the reads simply wait for the disk.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

_WILLNEED: int | None = getattr(os, "POSIX_FADV_WILLNEED", None)


def prefetch(paths: Iterable[str | os.PathLike[str]]) -> int:
    """Start reading ``paths`` into the page cache; return how many files were advised."""
    if _WILLNEED is None:
        return 0
    advised = 0
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, _WILLNEED)
            advised += 1
        except OSError:
            pass
        finally:
            os.close(fd)
    return advised
