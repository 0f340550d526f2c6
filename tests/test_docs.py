"""Every setting is documented, and the README gives the two commands."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.settings import variable_names

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", variable_names())
def test_every_setting_is_documented(name: str) -> None:
    assert name in (ROOT / "docs" / "configuration.md").read_text()


def test_readme_has_the_two_commands_and_the_disclaimer() -> None:
    text = (ROOT / "README.md").read_text()
    assert "./scripts/run.sh" in text and "./scripts/test.sh" in text
    assert "not a diagnosis" in text
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
