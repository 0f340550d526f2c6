"""The serving path on whole DICOM studies: measurements in the SR, evaluate-studies."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from core.settings import Settings
from covidct.synthetic import ROOT as SYN_ROOT
from covidct.synthetic import SeriesSpec, make_study, write_study
from tests.conftest import need_tool
from tests.helpers import make_tiny_model
from tests.sr_reading import read_finding, read_lung_measurements
from worker.analysis import analyse
from worker.sr import Finding, build_sr, lung_measurements

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # mean gray of a lung crop is about 0.3-0.4 of 255: this tiny model scores it above 0.5
    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny.keras", weight=12.0, bias=-3.0)


def settings_for(tmp_path: Path, model: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "var",
        database_url="sqlite://",
        broker_url="memory://",
        model_path=model,
    )


def study_files(tmp_path: Path, ground_glass: bool, rows: int = 256) -> list[Path]:
    study = make_study(
        [SeriesSpec(slices=40, ground_glass=ground_glass, rows=rows), SeriesSpec(kind="localizer")]
    )
    return write_study(study, tmp_path / study[0].StudyInstanceUID)


def test_shuffled_files_give_the_same_measurements(tmp_path: Path, tiny: Path) -> None:
    from classifier.inference import Classifier

    clf = Classifier(tiny)
    files = [str(p) for p in study_files(tmp_path, ground_glass=True)]
    settings = settings_for(tmp_path, tiny)
    ordered = analyse(list(enumerate(files)), settings, clf)
    shuffled_files = files[:]
    random.Random(3).shuffle(shuffled_files)
    shuffled = analyse(list(enumerate(shuffled_files)), settings, clf)
    assert ordered.lungs is not None and shuffled.lungs is not None
    a, b = ordered.lungs.quantification.as_dict(), shuffled.lungs.quantification.as_dict()
    assert a["lungs"] == b["lungs"] and a["zone_scores"] == b["zone_scores"]
    assert a["lungs"]["total"]["opacity_percent"] > 0.5
    assert ordered.verdict == shuffled.verdict
    assert ordered.probability == pytest.approx(shuffled.probability)


def test_sr_carries_lung_measurements_that_highdicom_reads_back(tmp_path: Path, tiny: Path) -> None:
    from classifier.inference import Classifier

    files = study_files(tmp_path, ground_glass=True)
    settings = settings_for(tmp_path, tiny)
    a = analyse(list(enumerate(str(p) for p in files)), settings, Classifier(tiny))
    assert a.lungs is not None and a.probability is not None and a.verdict is not None
    q = a.lungs.quantification
    evidence = [a.selection.headers[i] for i in sorted({r.instance_id for r in a.analysed})]
    sr = build_sr(
        evidence,
        [(evidence[0], None)],
        Finding(a.probability, a.verdict, 0.5, 0.05, "rule", "tiny-test-1", len(a.analysed)),
        lung_measurements(q),
    )
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    back = read_lung_measurements(pydicom.dcmread(path))
    assert set(back) == {"right", "left", "both"}
    assert back["right"]["Volume"] == pytest.approx(q.lungs["right"].volume_ml, abs=0.1)
    assert back["both"]["Percent of lung volume opacified"] == pytest.approx(
        q.total.opacity_percent, abs=0.01
    )
    assert back["both"]["Severity"] == q.severity_score
    assert read_finding(pydicom.dcmread(path))[1] == a.verdict
    out = subprocess.run([need_tool("dciodvfy"), str(path)], capture_output=True, text=True)
    errors = [x for x in (out.stdout + out.stderr).splitlines() if x.startswith("Error")]
    assert errors == []


def test_an_abdomen_with_the_lung_bases_is_not_analysable(tmp_path: Path, tiny: Path) -> None:
    from classifier.inference import Classifier

    files = study_files(tmp_path, ground_glass=False)
    # keep the bottom third of the chest: lung bases under the abdomen's top, no apices
    datasets = sorted((pydicom.dcmread(p) for p in files), key=lambda d: d.get("SliceLocation", 0))
    for p in files:
        p.unlink()
    kept = [d for d in datasets if d.ImageType[2] == "AXIAL"][:14]
    paths = write_study(kept, tmp_path / "abdomen")
    a = analyse(
        list(enumerate(str(p) for p in paths)), settings_for(tmp_path, tiny), Classifier(tiny)
    )
    assert a.verdict is None
    assert a.reason.startswith("no lungs to analyse:") and "lung bases" in a.reason


def test_evaluate_studies_prints_lines_and_one_json_object(tmp_path: Path, tiny: Path) -> None:
    root = tmp_path / "root"
    for label, gg in (("covid", True), ("normal", False)):
        study = make_study([SeriesSpec(slices=40, ground_glass=gg, rows=256)])
        write_study(study, root / label / f"{label}-study")
    # one slice of the COVID-19 study lost the end of its pixel data: counted, not hidden
    broken = sorted((root / "covid").rglob("*.dcm"))[20]
    broken.write_bytes(broken.read_bytes()[:-4096])
    env = {"COVIDCT_DATA_DIR": str(tmp_path / "var"), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "covidct.cli",
            "evaluate-studies",
            str(root),
            "--json",
            "--model",
            str(tiny),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert [s["label"] for s in result["studies"]] == ["covid", "normal"]
    for s in result["studies"]:
        assert set(s) == {
            "path",
            "label",
            "verdict",
            "probability",
            "percent_opacity",
            "severity_score",
            "seconds",
            "lung_volume_ml",
            "lung_slices",
            "lungs_ok",
            "series_instance_uid",
            "series_description",
            "slices_unreadable",
            "reason",
        }
        assert s["slices_unreadable"] == (1 if s["label"] == "covid" else 0)
        # a whole drawn adult chest: the gate passes with both lungs' volume (about 3 L)
        assert s["lungs_ok"] is True and 2500 < s["lung_volume_ml"] < 3500
        assert 30 <= s["lung_slices"] <= 40 and s["series_instance_uid"].startswith(SYN_ROOT)
    covid, normal = result["studies"]
    # the tiny model scores every lung above its threshold: on near-normal lungs the CNN and
    # the measurements disagree, so the normal study is Indeterminate, never Present
    assert normal["probability"] > 0.55 and normal["percent_opacity"] < 0.1
    assert normal["verdict"] == "Indeterminate"
    assert covid["percent_opacity"] > normal["percent_opacity"]
    m = result["metrics"]
    assert m["studies"] == 2 and m["non_covid_present"] == 0
    assert set(m["confusion"]) == {"covid", "normal"}
    assert m["auc_covid_vs_rest"] is not None
    human = subprocess.run(
        [sys.executable, "-m", "covidct.cli", "evaluate-studies", str(root), "--model", str(tiny)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert human.returncode == 0 and "calls right" in human.stdout
    assert "gate=ok" in human.stdout and "mL" in human.stdout
    assert "covid" in human.stdout.splitlines()[0]
    assert "[unreadable slices: 1]" in human.stdout.splitlines()[0]


def test_the_demo_studies_show_what_the_demo_help_says(tmp_path: Path) -> None:
    """`covidct demo` sends three studies, served by the shipped model: Present, Absent, and
    not analysable with the reason."""
    from classifier.inference import Classifier
    from core.db import upgrade
    from core.settings import SHIPPED_MODEL, load_settings
    from covidct.demo import demo_studies
    from covidct.testbed import spool_study
    from worker.pipeline import analyse_study

    settings = load_settings({"COVIDCT_DATA_DIR": str(tmp_path / "var")})
    upgrade(settings.database_url)
    clf = Classifier(SHIPPED_MODEL)
    studies = demo_studies(3)
    assert len(studies) == 3
    outcomes = [analyse_study(settings, spool_study(settings, st), clf) for st in studies]
    assert [(o.state, o.verdict) for o in outcomes] == [
        ("done", "Present"),
        ("done", "Absent"),
        ("not_analysable", None),
    ]
    assert "shorter than" in outcomes[2].reason


def test_lungs_that_fail_the_gate_give_indeterminate_and_an_sr_without_lung_figures(
    tmp_path: Path, tiny: Path
) -> None:
    """The lungs join the outside air below the apices (the failure seen on a real
    pneumonia): the study is Indeterminate with the gate's figures, every slice the framing
    kept still counts for the CNN, and the SR carries no lung group but says why."""
    from classifier.inference import Classifier

    study = make_study([SeriesSpec(slices=40, rows=256, chest=(("leak", True),))])
    files = write_study(study, tmp_path / "leak")
    a = analyse(
        list(enumerate(str(p) for p in files)), settings_for(tmp_path, tiny), Classifier(tiny)
    )
    assert a.lungs is not None and a.probability is not None
    q = a.lungs.quantification
    assert not q.lungs_ok and a.verdict == "Indeterminate"
    assert a.basis.startswith("lungs not segmented reliably") and "less than an adult" in a.basis
    assert not any(why == "no lung in the 3D segmentation" for _, why in a.skipped)
    evidence = [a.selection.headers[i] for i in sorted({r.instance_id for r in a.analysed})]
    sr = build_sr(
        evidence,
        [(evidence[0], None)],
        Finding(
            a.probability,
            a.verdict,
            0.5,
            0.05,
            "rule",
            "tiny-test-1",
            len(a.analysed),
            lungs_ok=q.lungs_ok,
        ),
        lung_measurements(q),
    )
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    back = pydicom.dcmread(path)
    assert read_lung_measurements(back) == {}
    assert read_finding(back)[1] == "Indeterminate"
    texts = [str(e.value) for e in back.iterall() if e.keyword == "TextValue"]
    assert "lung_segmentation=failed its checks, no lung figures" in texts
    out = subprocess.run([need_tool("dciodvfy"), str(path)], capture_output=True, text=True)
    assert [x for x in (out.stdout + out.stderr).splitlines() if x.startswith("Error")] == []
