"""A pydicom decoding plugin for JPEG Lossless and JPEG-LS Lossless that releases the GIL, so
that slices decode on every core.

GDCM and pylibjpeg-libjpeg hold the GIL while they decode: two threads decode a JPEG Lossless
study no faster than one.  imagecodecs' ``jpeg8_decode`` (libjpeg-turbo 3, which decodes
process 14 with any predictor) and ``jpegls_decode`` (CharLS) release it, and decode the same
samples: a test compares them with pylibjpeg frame by frame on every JPEG Lossless variant
DCMTK writes and on JPEG-LS Lossless at 8, 12 and 16 bits, signed and unsigned.  Measured on
40 COVID-CT-MD slices (512x512, 2 cores, 2026-12-07), one thread / two: JPEG Lossless 0.22 /
0.20 s with pydicom's default plugin (GDCM), 0.065 / 0.033 s here; the same slices in JPEG-LS
Lossless 0.31 / 0.31 s and 0.19 / 0.09 s.  JPEG 2000 is left to pydicom's plugins: OpenJPEG
there 0.79 / 0.79 s, imagecodecs' OpenJPEG 1.09 / 0.56 s, no gain on 2 cores beside inference.

:func:`use` registers it with pydicom under :data:`PLUGIN`; :mod:`classifier.preprocess`
asks for it by name for the syntaxes in :data:`SYNTAXES` and falls back to pydicom's own
plugins if it fails on a frame.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from pydicom import uid
from pydicom.encaps import generate_frames, get_frame
from pydicom.pixels import get_decoder

from classifier.errors import UnusableInputError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset
    from pydicom.pixels.decoders.base import DecodeRunner

PLUGIN = "covidct-imagecodecs"

#: transfer syntax -> imagecodecs' codec: JPEG Lossless (process 14, any predictor, and
#: selection value 1) and JPEG-LS Lossless.
_CODEC: dict[str, str] = {
    uid.JPEGLossless: "jpeg8",
    uid.JPEGLosslessSV1: "jpeg8",
    uid.JPEGLSLossless: "jpegls",
}
SYNTAXES: frozenset[str] = frozenset(_CODEC)

#: Every frame of these ends with 0xFFD9: JPEG's and JPEG-LS's end of image, JPEG 2000's end
#: of codestream, then at most padding: one byte to reach an even length (0x00 by the standard,
#: other values in some exports) and zeros.
MARKER_ENDED: frozenset[str] = frozenset(
    uid.JPEGTransferSyntaxes + uid.JPEGLSTransferSyntaxes + uid.JPEG2000TransferSyntaxes
)

DECODER_DEPENDENCIES = {ts: ("imagecodecs>=2024.1.1",) for ts in SYNTAXES}


def is_available(transfer_syntax: str) -> bool:
    """pydicom's plugin contract: whether this plugin can decode ``transfer_syntax``."""
    if transfer_syntax not in SYNTAXES:
        return False
    try:
        import imagecodecs
    except ImportError:
        return False
    return bool(getattr(imagecodecs, _CODEC[transfer_syntax].upper()).available)


def decode_frame(src: bytes, runner: DecodeRunner) -> bytes:
    """pydicom's plugin contract: one encoded frame in, its samples as little-endian bytes in
    the container ``runner`` expects (pydicom then applies sign and unused-bit rules)."""
    import imagecodecs

    if runner.samples_per_pixel != 1:
        raise ValueError("only single-sample (grayscale) frames are decoded here")
    codec = _CODEC[runner.transfer_syntax]
    arr = getattr(imagecodecs, f"{codec}_decode")(src)
    if arr.ndim != 2 or arr.shape != (runner.rows, runner.columns):
        raise ValueError(f"decoded shape {arr.shape} is not {runner.rows}x{runner.columns}")
    if codec == "jpegls":  # as pydicom's pylibjpeg plugin: the container follows the precision
        precision = runner.get_option("jls_precision", runner.bits_stored)
        runner.set_option("bits_allocated", 8 if 0 < precision <= 8 else 16)
    return np.ascontiguousarray(arr, dtype=f"<u{runner.bits_allocated // 8}").tobytes()


def use() -> bool:
    """Register the plugin with pydicom once; return whether it can decode anything here."""
    usable = False
    for ts in SYNTAXES:
        decoder = get_decoder(uid.UID(ts))
        try:
            decoder.add_plugin(PLUGIN, (__name__, "decode_frame"))
        except ValueError:  # registered already
            pass
        usable |= PLUGIN in decoder.available_plugins
    return usable


def check_complete(ds: Dataset, index: int | None) -> None:
    """Refuse a JPEG-family frame cut short (a sender that lost the end of a fragment): every
    decoder here, GDCM's included, returns a full-size image for a truncated stream, its
    missing rows filled, and the model would classify what is not there."""
    meta = getattr(ds, "file_meta", None)
    if meta is None or meta.get("TransferSyntaxUID") not in MARKER_ENDED:
        return
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if index is None:
        found = list(enumerate(generate_frames(ds.PixelData, number_of_frames=frames)))
    else:
        found = [(index, get_frame(ds.PixelData, index, number_of_frames=frames))]
    for i, frame in found:
        if not _ends(frame):
            raise UnusableInputError(
                f"frame {i + 1} is cut short: its compressed stream has no end marker"
            )


def _ends(frame: bytes) -> bool:
    """Whether the frame ends with its end marker (0xFFD9), after padding zeros and at most
    one pad byte of any value: PS3.5 A.4 pads an odd-length frame with 00H, but encoders
    write other values (49 of the 128 frames of the MIDRC-RICORD sample study end FFD9 and
    one non-zero byte).  0xFFD9 never occurs inside entropy-coded data (JPEG stuffs a 00H
    after every FFH; JPEG-LS and JPEG 2000 forbid a byte over 8FH after it), so it cannot be
    met by chance in a stream cut short."""
    tail = frame.rstrip(b"\x00")
    return tail.endswith(b"\xff\xd9") or tail[:-1].endswith(b"\xff\xd9")
