"""The segmented series: its HU grid assembled from the read-ahead, lungs segmented and
measured, and the per-slice masks saved for the dashboard's overlays.

The grid comes from the frames the read-ahead already decoded (``frame_and_grid``), so the
lungs cost no second read.  Memory: int16 at about 128 x 128 per slice, 32 KB, so a 600-slice
series is 20 MB however large its slices.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from classifier.lungs import Grid, Lungs, NoLungs, segment
from classifier.preprocess import grid_step
from classifier.quantify import Quantification, quantify
from worker.selection import SliceRef, orientation


@dataclass
class LungResult:
    series_uid: str
    grid: Grid
    lungs: Lungs
    quantification: Quantification
    index: dict[SliceRef, int]  # slice -> z index in the grid

    def lung_fraction(self, ref: SliceRef) -> float | None:
        """Share of the slice the segmented lungs cover; None for another series."""
        z = self.index.get(ref)
        if z is None:
            return None
        return float((self.lungs.labels[z] > 0).mean())

    def codes(self, z: int | slice = slice(None)) -> np.ndarray:
        """Masks of slice ``z`` (or all) as bits: 1 right lung, 2 left lung, 4 ground glass,
        8 consolidation (what :func:`classifier.render.draw_overlay` draws)."""
        code = self.lungs.labels[z].astype(np.uint8)
        opacity = self.quantification.opacity
        if opacity is not None:
            code |= np.where(opacity[z] == 1, 4, 0).astype(np.uint8)
            code |= np.where(opacity[z] == 2, 8, 0).astype(np.uint8)
        return code

    def code_at(self, ref: SliceRef) -> np.ndarray | None:
        """The mask bits of one slice; None for a slice of another series."""
        z = self.index.get(ref)
        return None if z is None else self.codes(z)

    def save_overlay(self, path: Path) -> None:
        """The masks of every slice for the dashboard (:meth:`codes`), with the slice
        positions (mm)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, code=self.codes(), positions=np.asarray(self.grid.positions))
        tmp.replace(path)


def _pixel_spacing(ds: Dataset) -> tuple[float, float]:
    for seq_name in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        seq = ds.get(seq_name)
        if seq:
            pm = seq[0].get("PixelMeasuresSequence")
            if pm and "PixelSpacing" in pm[0]:
                return float(pm[0].PixelSpacing[0]), float(pm[0].PixelSpacing[1])
    spacing = ds.get("PixelSpacing")
    if spacing and len(spacing) == 2:
        return float(spacing[0]), float(spacing[1])
    raise NoLungs("the series has no pixel spacing: volumes cannot be measured")


def _directions(ds: Dataset) -> tuple[bool, bool]:
    """(patient's left towards higher columns, head towards higher positions along the
    slice normal) from the image orientation; the usual (True, True) when it is missing."""
    iop = orientation(ds)
    if iop is None or len(iop) != 6:
        return True, True
    row, col = np.array(iop[:3]), np.array(iop[3:])
    return bool(row[0] >= 0), bool(np.cross(row, col)[2] >= 0)


def measure_lungs(grids: dict[SliceRef, np.ndarray], headers: dict[int, Dataset]) -> LungResult:
    """Segment and measure the series with the most decoded slices; raise
    :class:`NoLungs` with the reason if it shows none."""
    if not grids:
        raise NoLungs("no slice could be decoded")
    by_series: dict[str, list[SliceRef]] = {}
    for ref in grids:
        by_series.setdefault(ref.series_uid, []).append(ref)
    series_uid, refs = max(by_series.items(), key=lambda kv: len(kv[1]))
    shape = max(
        {grids[r].shape for r in refs}, key=lambda s: sum(grids[r].shape == s for r in refs)
    )
    refs = sorted((r for r in refs if grids[r].shape == shape), key=lambda r: r.position)
    header = headers[refs[0].instance_id]
    row_mm, col_mm = _pixel_spacing(header)
    left_high, head_high = _directions(header)
    n = grid_step((int(header.Rows), int(header.Columns)))
    grid = Grid(
        hu=np.stack([grids[r] for r in refs]),
        positions=np.array([r.position for r in refs], dtype=np.float64),
        pixel_mm=(row_mm * n, col_mm * n),
        left_at_high_col=left_high,
        head_at_high_z=head_high,
    )
    lungs = segment(grid)
    return LungResult(
        series_uid, grid, lungs, quantify(grid, lungs), {r: i for i, r in enumerate(refs)}
    )
