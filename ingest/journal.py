"""The listener's write-ahead journal: an instance is durable after one data flush.

Why: an instance written durably into its own file costs two file-system journal commits
(the file's fsync, then its directory's after the rename): 1.7-2.1 ms per 525 KB slice on
these machines, the largest single cost of a C-STORE (bench/ingest.py).  Appending the same
bytes to a file whose blocks already exist and flushing only the data (``fdatasync``; no
metadata changes, so no commit) costs 0.4-0.5 ms.  So each received instance is

1. appended to the journal with its spool path and a CRC, and flushed (durable from here);
2. written to its spool file (temporary name, rename: readers never see a partial file),
   without a flush;

and the SCP answers 0x0000 after both.  A checkpoint thread makes the spool files durable in
batches (fsync of each file and directory, where most flushes find nothing left to commit)
at most :data:`CHECKPOINT_SECONDS` after they were written, then recycles the journal
segment.  At start-up every record of the last generation is replayed: a spool file that is
missing or differs from its record is rewritten durably, one that matches is flushed.

Two pre-zeroed segments per listener process take turns, so appends go on while the other
is checkpointed; when both are full, appends wait for the checkpoint.  Each segment starts
with a header holding its generation, which a reset increments, so records of an earlier
generation left in the file are never replayed.  Concurrent appends (parallel associations)
reserve disjoint, block-aligned ranges under a lock and write and flush them outside it, so
their flushes overlap; replay therefore reads every block of a segment, takes each complete
record of the current generation (magic, generation and CRC32 all match) and skips torn ones
(an append that crashed was never answered).  An instance larger than a segment is written
the old way (:func:`ingest.spool.write_durable`).
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ingest.spool import InvalidUIDError, fsync_path, instance_path, write_atomic, write_durable

logger = logging.getLogger(__name__)

CHECKPOINT_SECONDS = 1.0  # well inside the sweeper's stability window (10 s by default)
WAIT_SECONDS = 30.0  # an append waits this long for a checkpoint before it fails (0xA700)
ALIGN = 4096
SEGMENT_MAGIC = b"CVJS"
RECORD_MAGIC = b"CVJR"
SEGMENT_HEADER = struct.Struct("<4sQ")  # magic, generation
RECORD_HEADER = struct.Struct("<4sQIQI")  # magic, generation, path bytes, data bytes, CRC32
SEGMENTS = 2


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass
class _Segment:
    path: Path
    fd: int
    size: int
    generation: int = 0
    offset: int = ALIGN
    inflight: int = 0
    written: list[Path] = field(default_factory=list)
    started: float = 0.0  # monotonic time of its first record since the last reset

    @property
    def empty(self) -> bool:
        return self.offset == ALIGN and self.inflight == 0 and not self.written


def _open_segment(path: Path, size: int) -> _Segment:
    """Open (or create, pre-zeroed and flushed, so later writes change no metadata)."""
    fresh = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
    if fresh or os.fstat(fd).st_size < size:
        zeros = bytes(1 << 20)
        os.lseek(fd, os.fstat(fd).st_size, os.SEEK_SET)
        remaining = size - os.fstat(fd).st_size
        while remaining > 0:
            remaining -= os.write(fd, zeros[: min(len(zeros), remaining)])
        os.fsync(fd)
        fsync_path(path.parent)
    size = os.fstat(fd).st_size
    magic, generation = SEGMENT_HEADER.unpack(os.pread(fd, SEGMENT_HEADER.size, 0))
    return _Segment(path, fd, size, generation if magic == SEGMENT_MAGIC else 0)


def records(path: Path) -> Iterator[tuple[str, bytes]]:
    """The complete records of a segment's current generation: (spool-relative path, bytes)."""
    with path.open("rb") as fh:
        head = fh.read(SEGMENT_HEADER.size)
        if len(head) < SEGMENT_HEADER.size:
            return
        magic, generation = SEGMENT_HEADER.unpack(head)
        if magic != SEGMENT_MAGIC:
            return
        size = os.fstat(fh.fileno()).st_size
        offset = ALIGN
        while offset + RECORD_HEADER.size <= size:
            fh.seek(offset)
            magic, gen, path_len, data_len, crc = RECORD_HEADER.unpack(fh.read(RECORD_HEADER.size))
            fits = offset + RECORD_HEADER.size + path_len + data_len <= size
            if magic == RECORD_MAGIC and gen == generation and fits:
                body = fh.read(path_len + data_len)
                if len(body) == path_len + data_len and zlib.crc32(body) == crc:
                    yield body[:path_len].decode("ascii"), body[path_len:]
                    offset += _aligned(RECORD_HEADER.size + path_len + data_len)
                    continue
                logger.warning("journal %s: record at %d incomplete (never answered)", path, offset)
            offset += ALIGN  # not a record of this generation: look in the next block


def lock(directory: Path) -> int | None:
    """An exclusive lock on a journal directory (a descriptor), or None if a running
    listener process holds it."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def replay_unlocked(directory: Path, spool: Path) -> int:
    """:func:`replay` unless a running listener process owns ``directory``."""
    fd = lock(directory)
    if fd is None:
        logger.info("journal %s is in use: not replayed", directory)
        return 0
    try:
        return replay(directory, spool)
    finally:
        os.close(fd)


def replay(directory: Path, spool: Path) -> int:
    """Make every journalled instance durable in its spool file; return how many were
    rewritten.  Safe to run twice; segments are left as they were."""
    rewritten = 0
    flushed_dirs: set[Path] = set()
    for segment in sorted(directory.glob("segment-*")):
        for rel, data in records(segment):
            parts = rel.split("/")
            try:
                if len(parts) != 3 or not parts[2].endswith(".dcm"):
                    raise InvalidUIDError("not <study>/<series>/<sop>.dcm")
                path = instance_path(spool, parts[0], parts[1], parts[2].removesuffix(".dcm"))
            except InvalidUIDError as exc:
                logger.error("journal %s: refusing path %r: %s", segment, rel, exc)
                continue
            try:
                same = path.read_bytes() == data
            except OSError:
                same = False
            if same:
                fsync_path(path)
                if path.parent not in flushed_dirs:
                    _fsync_tree(path.parent, spool)
                    flushed_dirs.add(path.parent)
            else:
                write_durable(path, data)
                rewritten += 1
    if rewritten:
        logger.warning("journal %s: rewrote %d instances into the spool", directory, rewritten)
    return rewritten


class Journal:
    """One listener process's journal (``directory``, two segments of ``segment_bytes``)."""

    def __init__(self, directory: Path, spool: Path, segment_bytes: int) -> None:
        lock_fd = lock(directory)
        if lock_fd is None:
            raise RuntimeError(f"journal {directory} is used by another listener process")
        self._lock_fd = lock_fd
        self.directory, self.spool = directory, spool
        replay(directory, spool)
        self._segments = [
            _open_segment(directory / f"segment-{i}", _aligned(segment_bytes))
            for i in range(SEGMENTS)
        ]
        for seg in self._segments:
            self._reset(seg)
        self._active = 0
        self._cond = threading.Condition()
        self._closed = False
        self._failed: str = ""
        self._thread = threading.Thread(target=self._run, name="journal-checkpoint", daemon=True)
        self._thread.start()

    # --- writing ----------------------------------------------------------------------

    def write(self, path: Path, data: bytes) -> None:
        """Store ``data`` at ``path`` (a spool path); durable when this returns."""
        rel = path.relative_to(self.spool).as_posix().encode("ascii")
        size = _aligned(RECORD_HEADER.size + len(rel) + len(data))
        if ALIGN + size > self._segments[0].size:
            write_durable(path, data)  # larger than a segment: the file's own flushes
            return
        crc = zlib.crc32(data, zlib.crc32(rel))
        with self._cond:
            seg = self._reserve(size)
            header = RECORD_HEADER.pack(RECORD_MAGIC, seg.generation, len(rel), len(data), crc)
            offset = seg.offset
            seg.offset += size
            seg.inflight += 1
            if not seg.started:
                seg.started = time.monotonic()
        ok = False
        try:  # concurrent writers append to disjoint ranges; their flushes overlap
            os.pwritev(seg.fd, [header, rel, data], offset)
            os.fdatasync(seg.fd)
            write_atomic(path, data, flush=False)
            ok = True
        finally:
            with self._cond:
                seg.inflight -= 1
                if ok:
                    seg.written.append(path)
                self._cond.notify_all()

    def _reserve(self, size: int) -> _Segment:
        """The active segment with ``size`` bytes free, switching or waiting as needed."""
        deadline = time.monotonic() + WAIT_SECONDS
        while True:
            if self._closed:
                raise OSError("the journal is closed")
            seg = self._segments[self._active]
            if seg.offset + size <= seg.size:
                return seg
            other = self._segments[1 - self._active]
            if other.empty:
                self._active = 1 - self._active
                self._cond.notify_all()  # the checkpoint thread: a full segment to flush
                continue
            self._cond.notify_all()
            left = deadline - time.monotonic()
            if left <= 0:
                raise OSError(f"journal checkpoint is not keeping up{self._failed}")
            self._cond.wait(min(left, 0.5))

    # --- checkpoints ------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                seg = self._due()
                while seg is None and not self._closed:
                    self._cond.wait(CHECKPOINT_SECONDS / 4)
                    seg = self._due()
                if seg is None:
                    return
                while seg.inflight:
                    self._cond.wait(0.1)
                paths = list(seg.written)
            try:
                self._flush(paths)
            except OSError as exc:  # keep the records; try again at the next turn
                logger.exception("journal checkpoint failed")
                self._failed = f" (last checkpoint failed: {exc})"
                time.sleep(CHECKPOINT_SECONDS)
                continue
            with self._cond:
                self._reset(seg)
                self._failed = ""
                self._cond.notify_all()

    def _due(self) -> _Segment | None:
        """The inactive segment holding records, after switching an active one that has held
        records for :data:`CHECKPOINT_SECONDS`; None when nothing is due."""
        other = self._segments[1 - self._active]
        if not other.empty:
            return other
        active = self._segments[self._active]
        old = active.started and time.monotonic() - active.started >= CHECKPOINT_SECONDS
        if (old or self._closed) and not active.empty:
            self._active = 1 - self._active
            return active
        return None

    def _flush(self, paths: list[Path]) -> None:
        dirs: set[Path] = set()
        for path in paths:
            try:
                fsync_path(path)
            except FileNotFoundError:  # removed since (a pruned study): nothing to keep
                logger.info("journal: %s is gone before its checkpoint", path.name)
            dirs.add(path.parent)
        for directory in dirs:
            try:
                _fsync_tree(directory, self.spool)
            except FileNotFoundError:
                logger.info("journal: %s is gone before its checkpoint", directory.name)

    def _reset(self, seg: _Segment) -> None:
        seg.generation += 1
        os.pwrite(seg.fd, SEGMENT_HEADER.pack(SEGMENT_MAGIC, seg.generation), 0)
        os.fdatasync(seg.fd)
        seg.offset, seg.written, seg.started = ALIGN, [], 0.0

    def close(self) -> None:
        """Checkpoint what is left and stop; later writes fail."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
        for seg in self._segments:
            os.close(seg.fd)
        os.close(self._lock_fd)


def _fsync_tree(directory: Path, spool: Path) -> None:
    """A series directory, the study directory above it and the spool: new entries durable."""
    fsync_path(directory)
    if directory.parent != spool:
        fsync_path(directory.parent)
    fsync_path(spool)
