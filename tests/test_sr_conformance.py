"""The SR the service sends, checked by PixelMed's validators (what the IHE AI Results
profile's test tools run) beside dciodvfy: the IOD and the TID 1500 template (#21).

One JVM run, on one SR built by the worker's own pipeline."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from sqlalchemy import select

from classifier.inference import Classifier
from core.db import session_scope, upgrade
from core.models import Report
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
def sr_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("sr")
    settings = load_settings({"COVIDCT_DATA_DIR": str(tmp / "var")})
    upgrade(settings.database_url)
    study = make_study([SeriesSpec(slices=49, rows=256, ground_glass=True, multifocal=True)])
    study_id = spool_study(settings, study)
    assert analyse_study(settings, study_id, Classifier(settings.model_path)).state == "done"
    with session_scope(settings.database_url) as s:
        path = s.scalar(select(Report.path))
    assert path is not None
    return Path(path)


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
    out = subprocess.run(
        [need_tool("dciodvfy"), str(sr_path)], capture_output=True, text=True, timeout=120
    )
    assert [line for line in out.stderr.splitlines() if line.startswith("Error")] == []
