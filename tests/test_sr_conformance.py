"""The objects the service sends, checked by PixelMed's validators (what the IHE AI Results
profile's test tools run) beside dciodvfy (#21): the SR (IOD and TID 1500), the key object
selection (IOD and TID 2010) and the key images (Secondary Capture: dciodvfy only, since the
instance validator of Debian's PixelMed 2022 knows seven IODs and Secondary Capture is not one
of them).

One JVM run per document, on the objects the worker's own pipeline built for one study."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from sqlalchemy import select

from classifier.inference import Classifier
from core.db import session_scope, upgrade
from core.models import Report, ReportObject
from core.settings import load_settings
from covidct.synthetic import SeriesSpec, make_study
from covidct.testbed import spool_study
from tests.conftest import need, need_tool
from worker.pipeline import analyse_study

PIXELMED = Path("/usr/share/java/pixelmed.jar")
# current Java stops PixelMed's XSLT on an XPath limit without these (issue #21)
JAVA_FLAGS = [
    "-Djdk.xml.xpathExprOpLimit=0",
    "-Djdk.xml.xpathExprGrpLimit=0",
    "-Djdk.xml.xpathTotalOpLimit=0",
]
# the one warning the standard's TID 1501 leaves us: PixelMed's template has no row for a
# qualitative evaluation inside a measurement group (highdicom writes it there)
KNOWN_WARNING = 'CODE (840539006,SCT,"Disease caused by SARS-CoV-2"): Content Item not in template'


@pytest.fixture(scope="module")
def sent(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """The files the pipeline made for one drawn study, by kind: ``sr``, ``sc``, ``ko``."""
    tmp = tmp_path_factory.mktemp("sr")
    settings = load_settings({"COVIDCT_DATA_DIR": str(tmp / "var")})
    upgrade(settings.database_url)
    study = make_study([SeriesSpec(slices=49, rows=256, ground_glass=True, multifocal=True)])
    study_id = spool_study(settings, study)
    assert analyse_study(settings, study_id, Classifier(settings.model_path)).state == "done"
    out: dict[str, list[Path]] = {}
    with session_scope(settings.database_url) as s:
        report = s.scalar(select(Report))
        assert report is not None
        out["sr"] = [Path(report.path)]
        for obj in s.scalars(select(ReportObject)):
            out.setdefault(obj.kind, []).append(Path(obj.path))
    return out


@pytest.fixture(scope="module")
def sr_path(sent: dict[str, list[Path]]) -> Path:
    return sent["sr"][0]


def dciodvfy_errors(path: Path) -> list[str]:
    out = subprocess.run(
        [need_tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=120
    )
    return [line for line in out.stderr.splitlines() if line.startswith("Error")]


def pixelmed(validator: str, path: Path) -> list[str]:
    java = need_tool("java")
    need(PIXELMED.is_file(), "PixelMed (Debian's libpixelmed-java)")
    classpath = ":".join(str(p) for p in sorted(Path("/usr/share/java").glob("*.jar")))
    out = subprocess.run(
        [java, *JAVA_FLAGS, "-cp", classpath, f"com.pixelmed.validate.{validator}", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    return [line for line in (out.stdout + out.stderr).splitlines() if "SLF4J" not in line]


def test_pixelmed_and_dciodvfy_find_no_error_in_the_sr(sr_path: Path) -> None:
    """PixelMed's SR validator checks the Comprehensive 3D SR IOD and the TID 1500 template
    (its instance validator does not know this SOP class); dciodvfy checks the IOD."""
    lines = pixelmed("DicomSRValidator", sr_path)
    assert "Found Comprehensive3DSR IOD" in lines and "IOD validation complete" in lines, lines
    assert "Found Root Template TID_1500 (MeasurementReport)" in lines, lines
    assert [line for line in lines if line.startswith("Error")] == []
    warnings = [line for line in lines if line.startswith("Warning")]
    assert all(KNOWN_WARNING in w for w in warnings), warnings
    assert dciodvfy_errors(sr_path) == []


def test_pixelmed_finds_nothing_in_the_key_object_selection(sent: dict[str, list[Path]]) -> None:
    """TID 2010 as PixelMed reads it: no error and no warning (highdicom's concept name on
    the IMAGE items, which the template forbids, is taken out)."""
    (ko,) = sent["ko"]
    lines = pixelmed("DicomSRValidator", ko)
    assert "Found KeyObjectSelectionDocument IOD" in lines, lines
    assert "Found Root Template TID_2010 (KeyObjectSelection)" in lines, lines
    assert [line for line in lines if line.startswith(("Error", "Warning"))] == [], lines
    assert dciodvfy_errors(ko) == []


def test_dciodvfy_finds_no_error_in_the_key_images(sent: dict[str, list[Path]]) -> None:
    assert 1 <= len(sent["sc"]) <= 4
    for path in sent["sc"]:
        assert dciodvfy_errors(path) == [], path
