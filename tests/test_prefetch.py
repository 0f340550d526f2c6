"""Prefetch is advice: every readable file is advised, a vanished one is skipped."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from worker import prefetch as prefetch_module
from worker.prefetch import prefetch

pytestmark = pytest.mark.unit


def test_every_file_is_advised_and_missing_ones_are_skipped(tmp_path: Path) -> None:
    if prefetch_module._WILLNEED is None:
        pytest.skip("no posix_fadvise on this platform")
    files = [tmp_path / f"{i}.dcm" for i in range(3)]
    for f in files:
        f.write_bytes(os.urandom(10_000))
    assert prefetch([*files, tmp_path / "gone.dcm", str(files[0])]) == 4


def test_without_fadvise_nothing_happens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prefetch_module, "_WILLNEED", None)
    (tmp_path / "a").write_bytes(b"x")
    assert prefetch([tmp_path / "a"]) == 0
