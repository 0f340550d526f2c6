"""Pictures of a slice for people: the lung window with the segmentation drawn over it, square
pixels, a caption burned in.  The dashboard serves them as PNG and the worker sends them to the
PACS as Secondary Capture images, so both draw the same thing from one piece of code."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from scipy import ndimage

OVERLAY_COLOURS = {
    "right": (0, 255, 255),
    "left": (255, 255, 0),
    "ggo": (255, 150, 0),
    "consolidation": (255, 0, 0),
}


def draw_overlay(gray: np.ndarray, code: np.ndarray, size: int = 400) -> np.ndarray:
    """RGB picture: lung contours and the opacity map (``code`` bits from the worker's
    overlay: 1 right lung, 2 left lung, 4 ground glass, 8 consolidation, on the segmentation
    grid) over the windowed slice, at most ``size`` wide."""
    img = Image.fromarray(gray).convert("RGB")
    img.thumbnail((size, size))
    rgb = np.asarray(img).copy()
    shape = rgb.shape[:2]
    rows = np.minimum((np.arange(shape[0]) * code.shape[0]) // shape[0], code.shape[0] - 1)
    cols = np.minimum((np.arange(shape[1]) * code.shape[1]) // shape[1], code.shape[1] - 1)
    big = code[np.ix_(rows, cols)]
    for bit, name in ((4, "ggo"), (8, "consolidation")):
        m = (big & bit) > 0
        rgb[m] = (0.5 * rgb[m] + 0.5 * np.array(OVERLAY_COLOURS[name])).astype(np.uint8)
    for side, name in ((1, "right"), (2, "left")):
        lung = (big & 3) == side
        edge = lung & ~ndimage.binary_erosion(lung)
        rgb[edge] = OVERLAY_COLOURS[name]
    return rgb


def square_pixels(gray: np.ndarray, spacing: tuple[float, float], size: int) -> np.ndarray:
    """The slice resampled so that one screen pixel is as tall as it is wide in mm
    (PixelSpacing row, column), its longer side ``size`` pixels."""
    rows, cols = gray.shape
    height_mm, width_mm = rows * spacing[0], cols * spacing[1]
    scale = size / max(height_mm, width_mm)
    shape = (max(1, round(width_mm * scale)), max(1, round(height_mm * scale)))
    return np.asarray(Image.fromarray(gray).resize(shape, Image.Resampling.BILINEAR))


def pixel_spacing(ds: Dataset) -> tuple[float, float]:
    """PixelSpacing (row, column) in mm; (1, 1) when it is missing or nonsense, so that a
    picture is still drawn (its proportions then are the matrix's)."""
    try:
        row, col = (float(v) for v in ds.PixelSpacing)
        if row > 0 and col > 0:
            return row, col
    except (AttributeError, TypeError, ValueError):
        pass
    return 1.0, 1.0


CAPTION_PX = 16  # one line of the default font, with a margin


def with_caption(rgb: np.ndarray, lines: list[str]) -> np.ndarray:
    """``rgb`` with a black band below it holding ``lines`` in white: text burned into the
    pixels, which every viewer shows (a viewer's own overlays and annotations vary)."""
    font = ImageFont.load_default(size=CAPTION_PX - 2)
    band = CAPTION_PX * len(lines) + 4
    canvas = Image.new("RGB", (rgb.shape[1], rgb.shape[0] + band), (0, 0, 0))
    canvas.paste(Image.fromarray(rgb), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((4, rgb.shape[0] + 2 + i * CAPTION_PX), line, fill=(255, 255, 255), font=font)
    return np.asarray(canvas)
