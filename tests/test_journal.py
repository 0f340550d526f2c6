"""The listener's write-ahead journal: what was acknowledged survives, nothing else returns.

A lost page cache (power loss) is simulated by deleting or truncating spool files after the
writing process was killed with SIGKILL; the journal must bring every one back, byte for byte.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from ingest import journal as J
from ingest.journal import Journal, records, replay

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent


def spool_path(spool: Path, i: int, study: int = 1) -> Path:
    return spool / f"1.2.3.{study}" / "1.2.3.4" / f"1.2.3.4.{i}.dcm"


def payload(i: int, size: int = 200_000) -> bytes:
    return bytes([i % 251]) * (size - 8) + i.to_bytes(8, "little")


def test_write_is_visible_and_checkpointed(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    j = Journal(tmp_path / "journal", spool, 4 << 20)
    for i in range(30):  # 6 MB through two 4 MB segments: switches and checkpoints
        j.write(spool_path(spool, i), payload(i))
    j.close()
    for i in range(30):
        assert spool_path(spool, i).read_bytes() == payload(i)
    for segment in (tmp_path / "journal").glob("segment-*"):
        assert list(records(segment)) == []  # all checkpointed and recycled
        assert segment.stat().st_size == 4 << 20
    assert not list(spool.rglob("*.tmp"))


def test_concurrent_writers(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    j = Journal(tmp_path / "journal", spool, 1 << 20)
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for i in range(k * 25, k * 25 + 25):
                j.write(spool_path(spool, i), payload(i, 50_000))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    j.close()
    assert errors == []
    assert sorted(p.name for p in spool.rglob("*.dcm")) == sorted(
        spool_path(spool, i).name for i in range(100)
    )
    assert all(spool_path(spool, i).read_bytes() == payload(i, 50_000) for i in range(100))


WRITER = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    sys.path.insert(0, {root!r})
    from ingest.journal import Journal
    from tests.test_journal import payload, spool_path
    spool = Path({spool!r})
    j = Journal(Path({journal!r}), spool, 64 << 20)
    for i in range({n}):
        j.write(spool_path(spool, i), payload(i))
    print("acknowledged", flush=True)
    os.kill(os.getpid(), 9)  # no checkpoint, no close
    """
)


def killed_writer(tmp_path: Path, n: int) -> tuple[Path, Path]:
    spool, journal = tmp_path / "spool", tmp_path / "journal"
    code = WRITER.format(root=str(ROOT), spool=str(spool), journal=str(journal), n=n)
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert res.returncode == -signal.SIGKILL and "acknowledged" in res.stdout, res.stderr
    return spool, journal


def test_replay_restores_acknowledged_instances_after_a_crash(tmp_path: Path) -> None:
    """SIGKILL before any checkpoint, then the page cache 'lost': files deleted, truncated,
    or left stale.  Opening the journal again brings every instance back exactly."""
    spool, journal = killed_writer(tmp_path, 12)
    assert len([r for s in journal.glob("segment-*") for r in records(s)]) == 12
    spool_path(spool, 0).unlink()
    with spool_path(spool, 1).open("r+b") as fh:
        fh.truncate(1000)
    spool_path(spool, 2).write_bytes(b"\0" * 200_000)
    j = Journal(journal, spool, 64 << 20)  # replays, then recycles
    j.close()
    for i in range(12):
        assert spool_path(spool, i).read_bytes() == payload(i), i
    assert replay(journal, spool) == 0  # nothing left to replay


def test_recycled_records_never_come_back(tmp_path: Path) -> None:
    """A site prunes the spool after delivery: an instance checkpointed in an earlier
    generation is not resurrected by a later start."""
    spool = tmp_path / "spool"
    j = Journal(tmp_path / "journal", spool, 4 << 20)
    j.write(spool_path(spool, 1), payload(1))
    j.close()
    spool_path(spool, 1).unlink()
    Journal(tmp_path / "journal", spool, 4 << 20).close()
    assert not spool_path(spool, 1).exists()


def test_torn_record_is_skipped_and_the_others_replay(tmp_path: Path) -> None:
    """A crash in the middle of an append (never acknowledged), while a parallel association
    appended after it: the torn record is skipped, the records on both sides replay."""
    spool, journal = killed_writer(tmp_path, 3)
    segment = next(s for s in sorted(journal.glob("segment-*")) if list(records(s)))
    offsets = [J.ALIGN]
    for _, data in records(segment):
        rel_len = len("1.2.3.1/1.2.3.4/1.2.3.4.0.dcm")
        offsets.append(offsets[-1] + J._aligned(J.RECORD_HEADER.size + rel_len + len(data)))
    with segment.open("r+b") as fh:  # tear the middle record's payload
        fh.seek(offsets[1] + J.RECORD_HEADER.size + 100)
        fh.write(b"torn")
    for i in range(3):
        spool_path(spool, i).unlink()
    assert replay(journal, spool) == 2
    assert spool_path(spool, 0).read_bytes() == payload(0)
    assert not spool_path(spool, 1).exists()
    assert spool_path(spool, 2).read_bytes() == payload(2)


def test_hostile_path_in_a_record_is_refused(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    journal = tmp_path / "journal"
    journal.mkdir()
    rel, data = b"../1.2.3/1.2.3.4.dcm", b"evil"
    import zlib

    seg = bytearray(2 * J.ALIGN)
    seg[: J.SEGMENT_HEADER.size] = J.SEGMENT_HEADER.pack(J.SEGMENT_MAGIC, 7)
    head = J.RECORD_HEADER.pack(J.RECORD_MAGIC, 7, len(rel), len(data), zlib.crc32(rel + data))
    seg[J.ALIGN : J.ALIGN + len(head) + len(rel) + len(data)] = head + rel + data
    (journal / "segment-0").write_bytes(bytes(seg))
    assert replay(journal, spool) == 0  # logged and skipped: the listener still starts
    assert not (tmp_path / "1.2.3").exists() and not spool.exists()


def test_instance_larger_than_a_segment_is_written_directly(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    j = Journal(tmp_path / "journal", spool, 1 << 20)
    big = os.urandom(3 << 20)
    j.write(spool_path(spool, 1), big)
    j.close()
    assert spool_path(spool, 1).read_bytes() == big


def test_one_process_per_journal(tmp_path: Path) -> None:
    j = Journal(tmp_path / "journal", tmp_path / "spool", 1 << 20)
    try:
        with pytest.raises(RuntimeError, match="another listener"):
            Journal(tmp_path / "journal", tmp_path / "spool", 1 << 20)
    finally:
        j.close()


def test_a_file_removed_before_its_checkpoint_does_not_stop_the_journal(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    j = Journal(tmp_path / "journal", spool, 1 << 20)
    j.write(spool_path(spool, 1, study=9), payload(1))
    import shutil

    shutil.rmtree(spool / "1.2.3.9")  # pruned at once
    for i in range(2, 20):  # several checkpoints' worth: they must keep recycling segments
        j.write(spool_path(spool, i), payload(i))
    j.close()
    assert all(spool_path(spool, i).read_bytes() == payload(i) for i in range(2, 20))
