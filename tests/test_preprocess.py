"""The one preprocessing path, against values computed by hand."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from classifier.errors import SliceSkipped, UnusableInputError
from classifier.preprocess import (
    DEFAULT_FRAMING,
    Framing,
    dicom_inputs,
    lung_box,
    to_model_input,
    window,
)
from covidct.synthetic import SeriesSpec, make_study

pytestmark = pytest.mark.unit

NO_CROP = Framing(crop=False)


def ct_dataset(hu: np.ndarray, *, photometric: str = "MONOCHROME2") -> pydicom.Dataset:
    """A synthetic CT slice of exactly these Hounsfield units (stored as HU + 2048)."""
    (ds,) = make_study([SeriesSpec(slices=1, rows=hu.shape[0])])[:1]
    ds.Rows, ds.Columns = hu.shape
    ds.PhotometricInterpretation = photometric
    ds.BitsStored, ds.HighBit = 16, 15
    ds.RescaleIntercept = -2048
    ds.PixelData = (hu.astype(np.int32) + 2048).astype(np.uint16).tobytes()
    return ds


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_window_maps_a_known_hu_ramp() -> None:
    # centre -600, width 1500: -1350 HU -> 0, 150 HU -> 255, linear between
    hu = np.array([-2000, -1350, -975, -600, -225, 150, 1000], np.float32)
    assert window(hu, -600, 1500).tolist() == [0, 0, 64, 128, 191, 255, 255]


def test_dicom_hu_ramp_through_the_whole_path() -> None:
    # 200x200 so no resize happens: every output pixel is hand-computable
    columns = np.linspace(-1350, 150, 200).astype(np.float32)
    hu = np.tile(np.rint(columns), (200, 1))
    out = to_model_input(ct_dataset(hu), framing=NO_CROP)
    assert out.shape == (200, 200, 3) and out.dtype == np.uint8
    expected = np.clip(np.rint((np.rint(columns) + 1350) * 255 / 1500), 0, 255)
    assert np.array_equal(out[0, :, 0], expected.astype(np.uint8))
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])


def test_rescale_slope_and_intercept_are_applied() -> None:
    hu = np.full((200, 200), -600.0, np.float32)
    ds = ct_dataset(hu)
    # store HU/2 + 512 with slope 2 and intercept -1024: same Hounsfield units
    ds.PixelData = ((hu + 1024) / 2).astype(np.uint16).tobytes()
    ds.RescaleSlope, ds.RescaleIntercept = 2, -1024
    assert np.all(to_model_input(ds, framing=NO_CROP) == 128)


def test_monochrome1_is_inverted() -> None:
    hu = np.tile(np.linspace(-1350, 150, 200, dtype=np.float32), (200, 1))
    mono2 = to_model_input(ct_dataset(hu), framing=NO_CROP)
    mono1 = to_model_input(ct_dataset(hu, photometric="MONOCHROME1"), framing=NO_CROP)
    assert np.array_equal(mono1, 255 - mono2)


def test_rgba_png_is_composited_on_black() -> None:
    img = Image.new("RGBA", (200, 200), (200, 200, 200, 255))
    img.paste((200, 200, 200, 0), (0, 0, 100, 200))  # left half fully transparent
    out = to_model_input(png_bytes(img))
    assert out[0, 0, 0] == 0 and out[0, 199, 0] == 200


def test_sixteen_bit_png_is_scaled_to_eight_bits() -> None:
    arr = np.zeros((200, 200), np.uint16)
    arr[:, 100:] = 65535
    arr[:, 50:100] = 32768  # 32768 * 255 / 65535 = 127.5 -> 128
    img = Image.fromarray(arr)
    assert img.mode.startswith("I;16")
    out = to_model_input(png_bytes(img))
    assert (out[0, 0, 0], out[0, 75, 0], out[0, 150, 0]) == (0, 128, 255)


@pytest.mark.parametrize("mode", ["L", "RGB", "P", "LA", "1"])
def test_every_png_mode_gives_gray_rgb(mode: str) -> None:
    img = Image.new("L", (300, 150), 255).convert(mode)
    out = to_model_input(png_bytes(img))
    assert out.shape == (200, 200, 3) and out.dtype == np.uint8
    assert int(out.min()) == 255


def test_jpeg_accepted_and_resized() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (640, 480), (90, 90, 90)).save(buf, format="JPEG", quality=95)
    out = to_model_input(buf.getvalue())
    assert out.shape == (200, 200, 3) and abs(int(out[100, 100, 0]) - 90) <= 2


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"this is text, not a picture", "not a PNG or JPEG"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "damaged image|not a PNG"),
    ],
)
def test_unusable_files_raise_the_clear_error(data: bytes, message: str) -> None:
    with pytest.raises(UnusableInputError, match=message):
        to_model_input(data)


def test_truncated_png_raises() -> None:
    data = png_bytes(Image.effect_noise((300, 300), 50).convert("L"))
    with pytest.raises(UnusableInputError, match="damaged"):
        to_model_input(data[: len(data) // 2])


def test_gif_is_refused_by_content() -> None:
    buf = io.BytesIO()
    Image.new("L", (10, 10)).save(buf, format="GIF")
    with pytest.raises(UnusableInputError, match="GIF images are not accepted"):
        to_model_input(buf.getvalue())


def test_pixel_count_limit() -> None:
    data = png_bytes(Image.new("L", (2000, 2000)))
    with pytest.raises(UnusableInputError, match="exceeds the limit"):
        to_model_input(data, max_pixels=1_000_000)


def test_dicom_without_pixels_raises() -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del ds.PixelData
    with pytest.raises(UnusableInputError, match="no pixel data"):
        to_model_input(ds)


def test_truncated_dicom_file_raises(tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = open(get_testdata_file("CT_small.dcm"), "rb").read()  # noqa: SIM115
    with pytest.raises(UnusableInputError):
        to_model_input(data[:200])


@pytest.mark.parametrize("name", ["CT_small.dcm", "693_J2KI.dcm", "J2K_pixelrep_mismatch.dcm"])
def test_pydicom_ct_files(name: str) -> None:
    ds = pydicom.dcmread(get_testdata_file(name))
    out = to_model_input(ds, framing=NO_CROP)
    assert out.shape == (200, 200, 3) and out.std() > 0


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless])
def test_lossless_syntaxes_give_identical_inputs(syntax: str) -> None:
    (ds,) = make_study([SeriesSpec(slices=1)])[:1]
    plain = to_model_input(ds)
    ds.compress(syntax)
    again = pydicom.dcmread(io.BytesIO(_to_bytes(ds)))
    assert again.file_meta.TransferSyntaxUID == syntax
    assert np.array_equal(to_model_input(again), plain)


def _to_bytes(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_lung_box_and_skip() -> None:
    (ds,) = make_study([SeriesSpec(slices=1)])[:1]
    hu = ds.pixel_array.astype(np.float32) - 1024
    r0, r1, c0, c1 = lung_box(hu)
    # the synthetic lungs lie at x in 0.20..0.80 and y around 0.47 of 512 pixels
    assert 60 < c0 < 110 and 400 < c1 < 450 and 100 < r0 < 200 and 280 < r1 < 380
    body_only = np.where(hu > -500, hu, -1000).astype(np.float32)
    body_only[hu < -500] = -1000
    body_only[(hu < -500) & (hu > -1000)] = 40  # fill the lungs with soft tissue
    body_only[150:350, 130:380] = 40
    with pytest.raises(SliceSkipped, match="too little lung"):
        lung_box(body_only)


def test_multiframe_frames_are_yielded_one_by_one() -> None:
    from tests.factories import enhanced_ct  # noqa: PLC0415

    ds = enhanced_ct(frames=4)
    items = list(dicom_inputs(ds))
    assert [i.frame for i in items] == [0, 1, 2, 3]
    assert all(i.array is not None and i.array.shape == (200, 200, 3) for i in items)
    assert np.array_equal(items[1].array, to_model_input(ds, frame=1))


@pytest.mark.parametrize(
    ("dtype", "slope", "intercept", "photometric"),
    [
        ("<i2", 1.0, 0.0, "MONOCHROME2"),
        ("<u2", 1.0, -1024.0, "MONOCHROME2"),
        ("<u2", 0.5, -1024.0, "MONOCHROME1"),
        ("<i2", 2.0, -3.5, "MONOCHROME1"),
    ],
)
def test_lookup_framing_equals_the_hounsfield_path(
    dtype: str, slope: float, intercept: float, photometric: str
) -> None:
    """The fast path (a stored-value table on the crop) gives the same bytes as converting
    the whole slice to Hounsfield units first, for every kind of 16-bit storage."""
    from classifier.preprocess import _frame_by_lookup, _frame_from_hu, _to_hu

    (axial,) = make_study([SeriesSpec(slices=1)], seed=3)[:1]
    hu = axial.pixel_array.astype(np.float64) * float(axial.RescaleSlope) + float(
        axial.RescaleIntercept
    )
    rng = np.random.default_rng(0)
    hu = hu + rng.normal(0, 30, hu.shape)  # every stored value differs from its neighbours
    stored = np.rint((hu - intercept) / slope)
    info = np.iinfo(np.dtype(dtype))
    stored = np.clip(stored, info.min, info.max).astype(dtype)
    ds = ct_dataset(np.zeros((2, 2)), photometric=photometric)
    ds.Rows, ds.Columns = stored.shape
    ds.PixelRepresentation = 1 if dtype == "<i2" else 0
    ds.PixelData = stored.tobytes()
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    raw = ds.pixel_array
    assert raw.dtype == np.dtype(dtype)
    fast = _frame_by_lookup(ds, raw, 0, DEFAULT_FRAMING)
    slow = _frame_from_hu(ds, _to_hu(ds, raw, 0), DEFAULT_FRAMING)
    assert np.array_equal(fast, slow)
    assert np.array_equal(to_model_input(ds), fast)


def test_fill_holes_equals_scipy() -> None:
    from scipy import ndimage

    from classifier.preprocess import _fill_holes

    rng = np.random.default_rng(1)
    for _ in range(20):
        mask = ndimage.binary_opening(rng.random((128, 128)) > 0.45)
        assert np.array_equal(_fill_holes(mask), ndimage.binary_fill_holes(mask))
