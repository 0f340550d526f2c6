"""The spool's durable write: every byte as given, through O_DIRECT or the page cache."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

from ingest import direct_write, spool

pytestmark = pytest.mark.unit

CHUNK = direct_write.CHUNK
SIZES = [0, 1, 4095, 4096, 4097, 525_000, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 4099]


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0


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


def test_the_direct_path_is_taken_where_the_file_system_allows_it(tmp_path: Path) -> None:
    """Otherwise the tests above would test the buffered path twice."""
    if not direct_write.O_DIRECT:
        pytest.skip("no O_DIRECT on this platform")
    try:
        os.close(os.open(tmp_path / "probe", os.O_WRONLY | os.O_CREAT | direct_write.O_DIRECT))
    except OSError:
        pytest.skip(f"{tmp_path} refuses O_DIRECT")
    fd, is_direct = direct_write.open_new(tmp_path / "new", direct=True)
    os.close(fd)
    assert is_direct
    spool.write_durable(_path(tmp_path, "1"), b"x" * 10)
    assert os.stat(tmp_path).st_dev not in direct_write._no_direct


def test_new_directories_are_made(tmp_path: Path) -> None:
    path = _path(tmp_path / "deep" / "spool", "1")
    spool.write_durable(path, b"abc")
    assert path.read_bytes() == b"abc"


def test_a_file_system_refusing_o_direct_gets_buffered_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not direct_write.O_DIRECT:
        pytest.skip("no O_DIRECT on this platform")
    real_open = os.open
    refused = []

    def open_refusing_direct(path: object, flags: int, *args: object) -> int:
        if flags & direct_write.O_DIRECT and Path(str(path)).parent.is_dir():  # as the kernel
            refused.append(path)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(direct_write.os, "open", open_refusing_direct)
    monkeypatch.setattr(direct_write, "_no_direct", set())
    data = os.urandom(10_000)
    spool.write_durable(_path(tmp_path, "1"), data)
    spool.write_durable(_path(tmp_path, "2"), data)
    assert _path(tmp_path, "1").read_bytes() == data == _path(tmp_path, "2").read_bytes()
    assert len(refused) == 1, "the refusal is remembered for the device"


def test_a_refused_direct_write_is_rewritten_buffered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not direct_write.O_DIRECT:
        pytest.skip("no O_DIRECT on this platform")

    def refuse(fd: int, parts: object) -> None:
        os.write(fd, b"partial")  # whatever got there first must not survive
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(direct_write, "_write_direct", refuse)
    monkeypatch.setattr(direct_write, "_no_direct", set())
    spool.write_durable(_path(tmp_path, "1"), b"the data")
    assert _path(tmp_path, "1").read_bytes() == b"the data"
    assert os.stat(tmp_path).st_dev in direct_write._no_direct


def test_a_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool.write_durable(_path(tmp_path, "2"), b"makes the directories")

    def fail(fd: int, parts: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(direct_write, "_write_direct", fail)
    monkeypatch.setattr(direct_write, "_write_buffered", fail)
    path = _path(tmp_path, "1")
    before = _open_fds()
    for direct in (True, False):
        with pytest.raises(OSError, match="No space"):
            spool.write_durable(path, b"abc", direct=direct)
    assert not path.exists() and not list(tmp_path.rglob(".*.tmp"))
    assert _open_fds() == before, "a failed write leaks no descriptor"


def test_threads_write_at_once_through_pooled_buffers(tmp_path: Path) -> None:
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
    assert len(direct_write._free) <= direct_write.POOL
    for i, data in payloads.items():
        for k in range(5):
            assert _path(tmp_path, f"{i + 1}.{k + 1}").read_bytes() == data
