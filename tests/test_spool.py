"""The spool's durable write: every byte as given, through O_DIRECT or the page cache."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

from ingest import spool

pytestmark = pytest.mark.unit

CHUNK = spool._CHUNK
SIZES = [0, 1, 4095, 4096, 4097, 525_000, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 4099]


def _path(root: Path, name: str) -> Path:
    return spool.instance_path(root, "1.2.3", "1.2.3.4", f"1.2.3.4.{name}")


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
@pytest.mark.parametrize("size", SIZES)
def test_bytes_arrive_exactly(tmp_path: Path, size: int, direct: bool) -> None:
    data = os.urandom(size)
    for n, parts in enumerate(
        [(data,), (data[:7], data[7:]), (data[: size // 3], b"", data[size // 3 :])]
    ):
        path = _path(tmp_path, f"{size + 1}.{n + 1}")
        spool.write_durable(path, *parts, direct=direct)
        assert path.read_bytes() == data
        assert path.stat().st_mode & 0o777 == 0o640
    assert not list(tmp_path.rglob(".*.tmp"))


def test_the_direct_path_is_taken_on_this_file_system(tmp_path: Path) -> None:
    """Otherwise the tests above test the buffered path twice."""
    if not spool._O_DIRECT:
        pytest.skip("no O_DIRECT on this platform")
    spool.write_durable(_path(tmp_path, "1"), b"x" * 10)
    assert os.stat(tmp_path).st_dev not in spool._NO_DIRECT, "this file system refuses O_DIRECT"


def test_new_directories_are_made(tmp_path: Path) -> None:
    path = _path(tmp_path / "deep" / "spool", "1")
    spool.write_durable(path, b"abc")
    assert path.read_bytes() == b"abc"


def test_a_file_system_refusing_o_direct_gets_buffered_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not spool._O_DIRECT:
        pytest.skip("no O_DIRECT on this platform")
    real_open = os.open
    refused = []

    def open_refusing_direct(path: object, flags: int, *args: object) -> int:
        if flags & spool._O_DIRECT:
            refused.append(path)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(spool.os, "open", open_refusing_direct)
    monkeypatch.setattr(spool, "_NO_DIRECT", set())
    data = os.urandom(10_000)
    spool.write_durable(_path(tmp_path, "1"), data)
    spool.write_durable(_path(tmp_path, "2"), data)
    assert _path(tmp_path, "1").read_bytes() == data == _path(tmp_path, "2").read_bytes()
    assert len(refused) == 1, "the refusal is remembered for the device"


def test_a_refused_direct_write_is_rewritten_buffered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not spool._O_DIRECT:
        pytest.skip("no O_DIRECT on this platform")

    def refuse(fd: int, parts: object) -> None:
        os.write(fd, b"partial")  # whatever got there first must not survive
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(spool, "_write_direct", refuse)
    monkeypatch.setattr(spool, "_NO_DIRECT", set())
    spool.write_durable(_path(tmp_path, "1"), b"the data")
    assert _path(tmp_path, "1").read_bytes() == b"the data"
    assert os.stat(tmp_path).st_dev in spool._NO_DIRECT


def test_a_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(fd: int, parts: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool, "_write_direct", fail)
    monkeypatch.setattr(spool, "_write_buffered", fail)
    path = _path(tmp_path, "1")
    with pytest.raises(OSError, match="No space"):
        spool.write_durable(path, b"abc")
    assert not path.exists() and not list(tmp_path.rglob(".*.tmp"))


def test_threads_write_at_once_through_their_own_buffers(tmp_path: Path) -> None:
    payloads = {i: os.urandom(300_000 + i) for i in range(8)}
    errors: list[BaseException] = []

    def write(i: int) -> None:
        try:
            for k in range(5):
                spool.write_durable(_path(tmp_path, f"{i + 1}.{k + 1}"), payloads[i])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, data in payloads.items():
        for k in range(5):
            assert _path(tmp_path, f"{i + 1}.{k + 1}").read_bytes() == data
