"""Which series the model and the lungs read, as a radiologist would pick it (#30): exports
marked SECONDARY or DERIVED are read; of several reconstructions the best is chosen; every
other series says why it was not read."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from covidct.synthetic import SeriesSpec, make_study, write_study
from worker.selection import Selection, kernel_sharpness, select, series_parameters

ROWS = 64  # headers and positions matter here, not pixels


def choose(tmp_path: Path, *specs: SeriesSpec, min_slices: int = 20) -> tuple[Selection, dict]:
    """Select from a study of ``specs``; the series UIDs by their SeriesNumber (1-based)."""
    datasets = make_study(list(specs))
    paths = write_study(datasets, tmp_path / "study")
    by_number: dict[int, str] = {}
    for ds in datasets:
        by_number[int(ds.SeriesNumber)] = str(ds.SeriesInstanceUID)
    instances = [(i + 1, str(p)) for i, p in enumerate(paths)]
    return select(instances, min_slices), by_number


def axial(slices: int = 49, **kw: object) -> SeriesSpec:
    return SeriesSpec(slices=slices, rows=ROWS, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "image_type",
    [("ORIGINAL", "SECONDARY", "AXIAL"), ("DERIVED", "SECONDARY", "AXIAL")],
    ids=["original-secondary", "derived-secondary"],
)
def test_an_exported_series_is_read(tmp_path: Path, image_type: tuple[str, ...]) -> None:
    """A GE series exported as ORIGINAL\\SECONDARY\\AXIAL was 'nothing analysable:
    secondary images'; a radiologist reads it, and so does the service."""
    selection, series = choose(tmp_path, axial(image_type=image_type))
    assert selection.chosen is not None and selection.chosen.uid == series[1]
    assert len(selection.slices) == 49 and selection.reason() == ""
    assert selection.chosen.why.startswith("the only candidate")


def test_the_soft_kernel_is_read_and_the_sharp_one_says_why_not(tmp_path: Path) -> None:
    selection, series = choose(tmp_path, axial(kernel="B70f"), axial(kernel="B30f"))
    assert selection.chosen is not None and selection.chosen.uid == series[2]
    assert "sharper kernel (B70f)" in selection.skipped[series[1]]
    assert {r.series_uid for r in selection.slices} == {series[2]}  # one series read


def test_thin_slices_are_read_before_thick_ones(tmp_path: Path) -> None:
    """49 slices over the 240 mm chest are 5 mm apart; 97 are 2.5 mm."""
    selection, series = choose(tmp_path, axial(49), axial(97))
    assert selection.chosen is not None and selection.chosen.uid == series[2]
    assert selection.chosen.thickness == pytest.approx(2.5)
    assert "5 mm, further from 1-3 mm" in selection.skipped[series[1]]


def test_original_before_derived_and_primary_before_secondary(tmp_path: Path) -> None:
    selection, series = choose(
        tmp_path,
        axial(image_type=("DERIVED", "PRIMARY", "AXIAL")),
        axial(image_type=("ORIGINAL", "SECONDARY", "AXIAL")),
        axial(image_type=("ORIGINAL", "PRIMARY", "AXIAL")),
    )
    assert selection.chosen is not None and selection.chosen.uid == series[3]
    assert selection.skipped[series[1]].startswith("derived images")
    assert selection.skipped[series[2]].startswith("secondary images")
    assert "ranked first of 3 candidates" in selection.chosen.why


def test_what_is_never_read_says_why(tmp_path: Path) -> None:
    selection, series = choose(
        tmp_path,
        axial(),
        SeriesSpec(slices=49, rows=ROWS, plane="coronal"),
        SeriesSpec(kind="localizer", rows=ROWS),
        SeriesSpec(kind="dose", slices=30, rows=ROWS),
        axial(slices=8),
    )
    assert selection.chosen is not None and selection.chosen.uid == series[1]
    assert selection.skipped[series[2]].startswith("not axial")
    assert selection.skipped[series[3]] == "localizer/scout images"
    assert selection.skipped[series[4]] == "a dose report"
    assert selection.skipped[series[5]] == "series of 8 slices is shorter than 20"


def test_a_series_with_gaps_is_passed_over_for_an_even_one_but_read_alone(
    tmp_path: Path,
) -> None:
    gappy = axial(missing=tuple(range(20, 26)))
    selection, series = choose(tmp_path, gappy, axial(kernel="B70f"))
    assert selection.chosen is not None and selection.chosen.uid == series[2]
    assert selection.skipped[series[1]].startswith("uneven slice spacing (a gap 7.0 times")
    alone, _ = choose(tmp_path / "alone", gappy)
    assert alone.chosen is not None and alone.chosen.largest_gap == pytest.approx(7.0)


def test_pixels_not_in_hounsfield_units_are_not_read(tmp_path: Path) -> None:
    datasets = make_study([axial()])
    for ds in datasets:
        del ds.RescaleSlope
        del ds.RescaleIntercept
    paths = write_study(datasets, tmp_path)
    selection = select([(i, str(p)) for i, p in enumerate(paths)], 20)
    assert selection.chosen is None
    assert selection.reason() == "nothing analysable: pixels not in Hounsfield units (no rescale)"


def test_a_secondary_capture_is_not_read(tmp_path: Path) -> None:
    datasets = make_study([axial()])
    for ds in datasets:
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # what dose reports usually are
    paths = write_study(datasets, tmp_path)
    selection = select([(i, str(p)) for i, p in enumerate(paths)], 20)
    assert "not a CT image" in selection.reason()


@pytest.mark.parametrize(
    "kernel,sharpness",
    [
        ("B30f", 0),
        ("Br40d", 0),
        ("B70f", 2),
        ("Bl57d", 2),
        ("I70f", 2),
        ("D40s", 0),
        ("STANDARD", 0),
        ("SOFT", 0),
        ("LUNG", 2),
        ("BONEPLUS", 2),
        ("FC03", 0),
        ("FC52", 2),
        ("YA", 2),
        ("B", 0),
        ("", 1),
        ("XYZ", 1),
    ],
)
def test_kernel_sharpness_from_the_vendors_names(kernel: str, sharpness: int) -> None:
    assert kernel_sharpness(kernel) == sharpness


def test_the_sr_parameters_name_the_series_and_why(tmp_path: Path) -> None:
    selection, _ = choose(tmp_path, axial(kernel="B30f"), axial(kernel="B70f"))
    params = series_parameters(selection.chosen)
    assert params[0].startswith("series=1 ") and "series_kernel=B30f" in params
    assert any(p.startswith("series_thickness_mm=5") for p in params)
    assert all(len(p) <= 64 for p in params)


def test_enhanced_ct_frames_count(tmp_path: Path) -> None:
    from tests.test_worker import enhanced_ct, to_bytes

    ds: Dataset = enhanced_ct(24, 64)
    path = tmp_path / "enhanced.dcm"
    path.write_bytes(to_bytes(ds))
    selection = select([(1, str(path))], 20)
    assert selection.chosen is not None and len(selection.slices) == 24


def test_with_a_sharp_and_a_soft_kernel_the_soft_one_keeps_the_figures(tmp_path: Path) -> None:
    """The same drawn lungs as a soft (15 HU of noise) and a sharp reconstruction (60 HU):
    with both sent, the soft one is read and the opacity figure is the soft one's."""
    from classifier.inference import Classifier
    from core.settings import load_settings
    from worker.analysis import analyse

    settings = load_settings({"COVIDCT_DATA_DIR": str(tmp_path / "var")})
    classifier = Classifier(settings.model_path)
    soft = SeriesSpec(slices=49, rows=256, ground_glass=True, kernel="B30f")
    sharp = SeriesSpec(
        slices=49, rows=256, ground_glass=True, kernel="B70f", chest=(("noise", 60.0),)
    )

    def opacity(name: str, *specs: SeriesSpec) -> tuple[str, float]:
        paths = write_study(make_study(list(specs)), tmp_path / name)
        a = analyse([(i, str(p)) for i, p in enumerate(paths)], settings, classifier)
        assert a.selection.chosen is not None and a.lungs is not None
        return a.selection.chosen.kernel, a.lungs.quantification.total.opacity_percent

    kernel, both = opacity("both", sharp, soft)
    assert kernel == "B30f"
    _, alone = opacity("soft", soft)
    assert abs(both - alone) <= 1.0
