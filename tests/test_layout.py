"""The folder layout is the architecture: every import points down the data flow."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("core", "classifier", "worker", "ingest", "web", "covidct")
# what each package may import: covidct -> web -> ingest -> worker -> classifier, core (the web
# port's STOW-RS hands instances to ingest, as the DICOM port does; ingest never imports web)
ALLOWED = {
    "core": set(),
    "classifier": set(),
    "worker": {"core", "classifier"},
    "ingest": {"core", "worker", "classifier"},
    "web": {"core", "worker", "classifier", "ingest"},
    "covidct": {"core", "classifier", "worker", "ingest", "web"},
}


def project_imports(package: str) -> set[tuple[str, str]]:
    found = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top in PACKAGES and top != package:
                    found.add((str(path.relative_to(ROOT)), top))
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_point_down(package: str) -> None:
    wrong = {(f, t) for f, t in project_imports(package) if t not in ALLOWED[package]}
    assert not wrong, f"{package} imports upwards: {sorted(wrong)}"


def test_only_settings_reads_the_environment() -> None:
    offenders = []
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            text = path.read_text()
            reads = "os.environ[" in text or "os.getenv(" in text or "environ.get(" in text
            if reads and path.name != "settings.py":
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_only_the_lifecycle_writes_a_state() -> None:
    """Studies, uploads and deliveries change state through core/lifecycle.py alone, where
    each transition is a compare-and-set; a write elsewhere could skip that check."""
    writes = re.compile(r"\.state\s*=[^=]|\.state,\s.*=|\bstate=\w*State\.|\"state\":\s*\w*State\.")
    offenders = [
        f"{path.relative_to(ROOT)}:{n}"
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if path.name not in ("lifecycle.py", "models.py")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if writes.search(line)
    ]
    assert offenders == []


def test_modules_stay_small() -> None:
    """One job per module: none of the packages' modules is over 450 lines."""
    sizes = {
        str(path.relative_to(ROOT)): len(path.read_text().splitlines())
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if "migrations" not in path.parts
    }
    assert {name: n for name, n in sizes.items() if n > 450} == {}
