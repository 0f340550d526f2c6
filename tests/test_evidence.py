"""The key images and key object selection (worker/evidence.py) without the network: what the
picture shows, which slices are key, orientation letters, and the SR's reference to both."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from classifier.aggregate import key_slice_indices
from classifier.render import OVERLAY_COLOURS
from covidct.synthetic import SeriesSpec, make_study
from worker.evidence import Caption, KeySlice, patient_orientation, picture
from worker.selection import SliceRef


def header(iop: list[float] | None) -> Dataset:
    ds = Dataset()
    if iop is not None:
        ds.ImageOrientationPatient = iop
    return ds


@pytest.mark.parametrize(
    ("iop", "letters"),
    [
        ([1, 0, 0, 0, 1, 0], ("L", "P")),  # supine, head first: the usual axial
        ([-1, 0, 0, 0, -1, 0], ("R", "A")),  # prone
        ([0.94, 0.34, 0, -0.34, 0.94, 0], ("LP", "PR")),  # rotated 20 degrees in plane
        ([0, 1, 0, 0, 0, -1], ("P", "F")),  # sagittal
        (None, ("L", "P")),  # unknown: the usual axial
    ],
)
def test_patient_orientation_letters(iop: list[float] | None, letters: tuple[str, str]) -> None:
    assert patient_orientation(header(iop)) == letters


def test_key_slices_are_the_best_ten_mm_apart() -> None:
    positions = [0.0, 2.5, 5.0, 7.5, 10.0, 12.5, 30.0, None]
    probs = [0.9, 0.95, 0.1, 0.2, 0.85, 0.3, 0.5, 0.99]
    # 0.99 has no position: taken; 0.95 at 2.5 mm; 0.9 (0 mm) and 0.85 (10 mm) lie within
    # 10 mm of it; 0.5 at 30 mm; 0.3 at 12.5 mm, 10 mm from 2.5: far enough
    assert key_slice_indices(positions, probs, count=4) == [7, 1, 6, 5]
    assert key_slice_indices([1.0, 2.0], [None, None]) == []


@pytest.fixture(scope="module")
def ct_slice(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Dataset]:
    ds = make_study([SeriesSpec(slices=12, rows=128)])[6]
    path = tmp_path_factory.mktemp("ct") / "slice.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, pydicom.dcmread(path, stop_before_pixels=True)


def key(path: Path, hdr: Dataset, code: np.ndarray | None) -> KeySlice:
    ref = SliceRef(1, path, 0, float(hdr.ImagePositionPatient[2]), str(hdr.SeriesInstanceUID))
    return KeySlice(ref, hdr, 0.83, "lower", code)


def colours(rgb: np.ndarray) -> set[tuple[int, int, int]]:
    return {tuple(int(v) for v in c) for c in rgb.reshape(-1, 3)}


def test_the_picture_shows_the_map_and_says_what_it_is(ct_slice: tuple[Path, Dataset]) -> None:
    path, hdr = ct_slice
    code = np.zeros((32, 32), dtype=np.uint8)
    code[8:24, 4:14] = 1  # right lung
    code[8:24, 18:28] = 2  # left lung
    code[12:16, 6:10] |= 8  # consolidation in it
    pixels = pydicom.dcmread(path)
    rgb = picture(key(path, hdr, code), pixels, Caption("Present", 0.91, "model-1", True))
    assert rgb.dtype == np.uint8 and rgb.shape[1] == 512 and rgb.shape[0] > 512
    seen = colours(rgb[:512])
    assert OVERLAY_COLOURS["right"] in seen and OVERLAY_COLOURS["left"] in seen
    band = rgb[512:]
    assert (band == 255).any() and not (band[..., 0] != band[..., 1]).any()  # white text


def test_no_map_when_the_lungs_failed_their_checks(ct_slice: tuple[Path, Dataset]) -> None:
    """A map of lungs the segmentation lost would mislead: the slice is drawn in grey."""
    path, hdr = ct_slice
    code = np.ones((32, 32), dtype=np.uint8)
    pixels = pydicom.dcmread(path)
    rgb = picture(key(path, hdr, code), pixels, Caption("Indeterminate", 0.5, "m", False))
    image = rgb[:512]
    assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()


def test_a_de_identified_study_gets_its_key_objects(tmp_path: Path) -> None:
    """Exports and anonymisers drop Type 2 patient and study attributes (the MIDRC-RICORD
    study has no Patient's Name): the key images and the key object selection are built with
    the empty values the standard allows, as the SR is."""
    from sqlalchemy import select

    from classifier.inference import Classifier
    from core.db import session_scope, upgrade
    from core.models import ReportObject
    from core.settings import load_settings
    from covidct.testbed import spool_study
    from worker.pipeline import analyse_study
    from worker.sr import TYPE2_PATIENT_STUDY

    settings = load_settings({"COVIDCT_DATA_DIR": str(tmp_path / "var")})
    upgrade(settings.database_url)
    study = make_study([SeriesSpec(slices=24, rows=128)])
    for ds in study:
        for keyword in TYPE2_PATIENT_STUDY:
            if keyword in ds:
                delattr(ds, keyword)
    outcome = analyse_study(settings, spool_study(settings, study), Classifier(settings.model_path))
    assert outcome.state == "done"
    with session_scope(settings.database_url) as s:
        paths = {o.kind: o.path for o in s.scalars(select(ReportObject))}
    assert set(paths) == {"sc", "ko"}
    for path in paths.values():
        ds = pydicom.dcmread(path)
        assert ds.PatientName == "" and ds.StudyInstanceUID == study[0].StudyInstanceUID
