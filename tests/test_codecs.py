"""The GIL-free plugin decodes what pydicom's own plugins decode, bit for bit, on every JPEG
Lossless variant DCMTK writes and on JPEG-LS Lossless; a frame cut short is refused; a frame
it cannot decode still gets pydicom's plugins and a clear error."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import pixel_array

from classifier import codecs
from classifier.errors import UnusableInputError
from classifier.preprocess import _pixel_array
from covidct.synthetic import SeriesSpec, make_study
from tests.conftest import need_tool


def _slice(bits: int, signed: bool, seed: int) -> pydicom.Dataset:
    """A 128x128 CT slice whose stored values use ``bits`` bits (signed or not)."""
    ds = make_study([SeriesSpec(slices=1, rows=128)], seed=seed)[0]
    rng = np.random.default_rng(seed)
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1)) if signed else (0, 2**bits)
    arr = rng.integers(low, high, size=(128, 128), dtype=np.int32)
    arr[:40] = low  # flat runs and the extremes, as air and bone give
    arr[40:50] = high - 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits, bits - 1
    ds.PixelRepresentation = int(signed)
    ds.PixelData = arr.astype(np.int16 if signed else np.uint16).tobytes()
    return ds


def _jpeg(ds: pydicom.Dataset, flags: list[str], tmp_path: Path) -> pydicom.Dataset:
    src, dst = tmp_path / "plain.dcm", tmp_path / "jpeg.dcm"
    ds.save_as(src, enforce_file_format=True)
    program = need_tool("dcmcjpeg")
    subprocess.run([program, *flags, str(src), str(dst)], check=True, capture_output=True)
    return pydicom.dcmread(dst)


@pytest.mark.parametrize(
    "flags",
    [["+e1"], *(["+el", "+sv", str(sv)] for sv in range(1, 8))],
    ids=["sv1", *(f"process14-sv{sv}" for sv in range(1, 8))],
)
@pytest.mark.parametrize("bits,signed", [(16, True), (12, False), (16, False), (8, False)])
def test_plugin_decodes_as_pydicom_does(
    flags: list[str], bits: int, signed: bool, tmp_path: Path
) -> None:
    assert codecs.use()
    plain = _slice(bits, signed, seed=bits + 7 * signed)
    jpeg = _jpeg(plain.copy(), flags, tmp_path)
    assert jpeg.file_meta.TransferSyntaxUID in codecs.SYNTAXES
    ours = pixel_array(jpeg, decoding_plugin=codecs.PLUGIN)
    theirs = pixel_array(jpeg, decoding_plugin="pylibjpeg")
    assert ours.dtype == theirs.dtype == plain.pixel_array.dtype
    assert np.array_equal(ours, theirs)
    assert np.array_equal(ours, plain.pixel_array)
    assert np.array_equal(_pixel_array(jpeg), plain.pixel_array)


@pytest.mark.parametrize(
    "bits,signed", [(16, True), (12, True), (12, False), (16, False), (8, False)]
)
def test_jpeg_ls_lossless_decodes_as_pydicom_does(bits: int, signed: bool) -> None:
    plain = _slice(bits, signed, seed=bits + 11 * signed)
    jls = plain.copy()
    jls.compress(pydicom.uid.JPEGLSLossless)
    ours = pixel_array(jls, decoding_plugin=codecs.PLUGIN)
    theirs = pixel_array(jls, decoding_plugin="pylibjpeg")
    assert ours.dtype == theirs.dtype
    assert np.array_equal(ours, theirs)
    assert np.array_equal(ours, plain.pixel_array)
    assert np.array_equal(_pixel_array(jls), plain.pixel_array)


@pytest.mark.parametrize("cut", ["truncated", "zeroed-tail", "header-only"])
def test_a_frame_cut_short_is_refused_not_filled_in(cut: str, tmp_path: Path) -> None:
    """Every decoder here returns a full image for a truncated stream; the slice is refused
    with the reason instead."""
    jpeg = _jpeg(_slice(16, True, seed=3), ["+e1"], tmp_path)
    frame = next(pydicom.encaps.generate_frames(jpeg.PixelData, number_of_frames=1))
    half = len(frame) // 2
    broken = {
        "truncated": frame[:half],
        "zeroed-tail": frame[:half] + b"\x00" * (len(frame) - half),
        "header-only": frame[:200],
    }[cut]
    assert pixel_array(_with_frame(jpeg, broken), decoding_plugin=codecs.PLUGIN).shape == (128, 128)
    with pytest.raises(UnusableInputError, match="frame 1 is cut short"):
        _pixel_array(_with_frame(jpeg, broken))
    assert np.array_equal(_pixel_array(_with_frame(jpeg, frame + b"\x00")), pixel_array(jpeg))


@pytest.mark.parametrize("pad", [b"", b"\x00", b"\x0f", b"\xff", b"\x0f\x00\x00"])
def test_a_whole_frame_is_read_whatever_its_pad_byte(pad: bytes, tmp_path: Path) -> None:
    """An odd-length frame's pad byte is 00H by the standard but not always in practice (a
    real hospital's export ends frames FFD9 0F): the frame is whole and is read."""
    jpeg = _jpeg(_slice(16, True, seed=4), ["+e1"], tmp_path)
    frame = next(pydicom.encaps.generate_frames(jpeg.PixelData, number_of_frames=1))
    frame = frame.rstrip(b"\x00")
    assert frame.endswith(b"\xff\xd9")
    assert np.array_equal(_pixel_array(_with_frame(jpeg, frame + pad)), pixel_array(jpeg))
    with pytest.raises(UnusableInputError, match="cut short"):  # two bytes past it: not a pad
        _pixel_array(_with_frame(jpeg, frame[:-2] + b"\x12\x34" + pad))


def _with_frame(ds: pydicom.Dataset, frame: bytes) -> pydicom.Dataset:
    out = ds.copy()
    out.PixelData = pydicom.encaps.encapsulate([frame])
    return out


def test_a_frame_the_plugin_cannot_decode_goes_to_pydicoms_plugins(tmp_path: Path) -> None:
    """A colour-free stream the plugin refuses (its size disagrees with Rows) still gets
    pydicom's own plugins, whose error names the syntax."""
    jpeg = _jpeg(_slice(16, True, seed=5), ["+e1"], tmp_path)
    jpeg.Rows = 64
    with pytest.raises(UnusableInputError, match="1.2.840.10008.1.2.4.70"):
        _pixel_array(jpeg)


def test_use_registers_once() -> None:
    """A second call finds the plugin registered (pydicom refuses a label twice) and says so."""
    assert codecs.use() and codecs.use()
    decoder = pydicom.pixels.get_decoder(pydicom.uid.JPEGLosslessSV1)
    assert codecs.PLUGIN in decoder.available_plugins


def _pydicoms_compressed_files() -> list[Path]:
    """pydicom's own test files in the JPEG, JPEG-LS and JPEG 2000 families: encoders of
    several vendors (DCMTK, GDCM, dcmjs, Kakadu...), whatever pad byte each writes."""
    folder = Path(pydicom.__file__).parent / "data" / "test_files"
    found = []
    for path in sorted(folder.glob("*.dcm")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: S112 - pydicom's deliberately broken files
            continue
        if ds.file_meta.get("TransferSyntaxUID") in codecs.MARKER_ENDED:
            found.append(path)
    return found


def test_no_frame_pydicom_decodes_is_taken_for_cut_short() -> None:
    """The end-marker check refuses no frame of pydicom's own test files that pydicom
    decodes (its pydicom.examples.jpeg2k and JPGExtended end FFD9 FF)."""
    files = _pydicoms_compressed_files()
    assert len(files) >= 20
    checked = 0
    for path in files:
        ds = pydicom.dcmread(path)
        try:
            ds.pixel_array  # noqa: B018
        except Exception:  # noqa: S112 - a file pydicom itself cannot decode proves nothing
            continue
        codecs.check_complete(ds, None)
        checked += 1
    assert checked >= 20
