"""Lung segmentation in 3D from a CT series in Hounsfield units, without learned weights.

A classical pipeline after Hu, Hoffman and Reinhardt, "Automatic lung segmentation for accurate
quantitation of volumetric X-ray CT images", IEEE TMI 20(6):490-498, 2001:

1. air inside the body: voxels below -400 HU that no path of air joins to the image border in
   their slice (the border closes the outline where the field of view clips the chest);
   tissue is not opened first, so a chest wall of 5 mm still encloses the lungs;
2. 3D components of that air; gas that is pure air (mean below -950 HU: stomach, bowel,
   sinuses) and specks under ``MIN_COMPONENT_ML`` are dropped;
3. trachea and main bronchi removed: tracked from the top slice down as small blobs of air
   until they join the lungs at the hila;
4. left and right apart: two components by their centroid, one merged component cut at the
   column where the lungs' projection is thinnest (the anterior/posterior junction), a single
   lung kept alone;
5. per slice and lung: a closing with a disk of ``CLOSING_MM`` (juxta-pleural opacities and the
   hilum's bites stay inside the lung), then holes filled (vessels, nodules, ground glass and
   consolidation enclosed by aerated lung), except organs seen in section: islands wider than
   ``MAX_ISLAND_CM2`` that continue across slices into tissue outside the lung (the
   diaphragm's domes, the heart's border).

The input is a subsampled grid (every n-th pixel: the worker keeps about 128 pixels a side,
2.5-3.5 mm), so a 600-slice series is 600 x 128 x 128 int16, 20 MB: the segmentation's memory
does not depend on the slice matrix.  Subsampling, not averaging, keeps HU values unblurred, so
volume fractions in HU bands stay unbiased.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

AIR_HU = -400.0  # lungs and gas are below this (Hu et al. found -400 to -500 optimal)
PURE_AIR_HU = -950.0  # outside air, gas and airway lumen are below this; aerated lung is not
MIN_COMPONENT_ML = 5.0
# an adult's mid-chest section holds 150-300 cm2 of lung; sinuses, mastoids and bowel gas
# that is not pure air stay far below this
MIN_SECTION_CM2 = 30.0
MAX_AIRWAY_CM2 = 6.0  # a trachea is 15-25 mm across (2-5 cm2), a main bronchus less
CLOSING_MM = 10.0
MAX_ISLAND_CM2 = 3.0  # an island wider than about 2 cm that leaves the lung is an organ
BODY_OPENING_MM = 5.0
TOP_CUT_FRACTION = 0.5  # lungs this wide at the series' top slice are cut off, not covered

RIGHT, LEFT = 1, 2


class NoLungs(ValueError):
    """The series holds no lungs fit to analyse; ``str()`` says why."""


@dataclass(frozen=True)
class Grid:
    """A subsampled series: ``hu[z, row, col]`` in HU, slices in ascending ``positions`` (mm
    along the slice normal).  ``left_at_high_col``: the patient's left lies towards higher
    columns (IOP row direction +x); ``head_at_high_z``: the head lies towards higher
    positions (slice normal +z)."""

    hu: np.ndarray
    positions: np.ndarray
    pixel_mm: tuple[float, float]  # row and column spacing of the grid, mm
    left_at_high_col: bool = True
    head_at_high_z: bool = True

    def slab_mm(self) -> np.ndarray:
        """Thickness each slice stands for: half the distance to each neighbour (gaps and
        uneven spacing included); a single slice stands for 1 mm."""
        z = np.asarray(self.positions, dtype=np.float64)
        if z.size < 2:
            return np.ones(z.size)
        d = np.diff(z)
        out = np.empty(z.size)
        out[0], out[-1] = d[0], d[-1]
        out[1:-1] = (d[:-1] + d[1:]) / 2.0
        return np.abs(out)

    def voxel_ml(self) -> np.ndarray:
        """Volume of one voxel of each slice, mL."""
        return self.slab_mm() * self.pixel_mm[0] * self.pixel_mm[1] / 1000.0


@dataclass
class Lungs:
    """Labels per voxel of the grid: 0 outside, :data:`RIGHT`, :data:`LEFT`."""

    labels: np.ndarray
    airway_ml: float
    notes: list[str]
    cut_off: bool = False  # the series cuts the lungs at an end: they are not all in it


def _disk(radius: int) -> np.ndarray:
    r = max(1, radius)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return (yy * yy + xx * xx) <= r * r


_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)


def fill_holes_2d(stack: np.ndarray) -> np.ndarray:
    """Holes filled in every slice of ``stack`` at once: background components (4-connected,
    never across slices) that do not touch their slice's border are holes."""
    background, _ = ndimage.label(~stack, structure=_IN_PLANE)
    edge = np.unique(
        np.concatenate(
            [
                background[:, 0].ravel(),
                background[:, -1].ravel(),
                background[:, :, 0].ravel(),
                background[:, :, -1].ravel(),
            ]
        )
    )
    return stack | ~np.isin(background, edge)


def _inner_air(hu: np.ndarray, grid: Grid) -> np.ndarray:
    """Step 1: air inside the body, per slice: air that no 4-connected path of air joins to
    the image border.  Tissue is taken as it is, not opened, so a chest wall one pixel thick
    (5 mm on the grid) still closes the lungs; air that sheets, blankets or the mattress close
    against the skin is enclosed too, and dropped in step 2 as pure air or as too small.
    Where the body meets the image border (a field of view that clips the chest) the border
    closes it; the body there is the largest 3D component of tissue after an in-plane opening
    of ``BODY_OPENING_MM`` (which parts it from the table, the mattress and bedding)."""
    tissue = hu > AIR_HU
    radius = max(1, int(round(BODY_OPENING_MM / max(min(grid.pixel_mm), 1e-6))))
    opened = ndimage.binary_opening(tissue, structure=_disk(radius)[np.newaxis])
    labels, count = ndimage.label(opened)
    if count == 0:
        raise NoLungs("no body in the series")
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    body = labels == int(sizes.argmax())
    frame = np.pad(tissue, ((0, 0), (1, 1), (1, 1)))
    frame[:, 0, :] = body[:, 0, :].any(axis=1)[:, None]
    frame[:, -1, :] = body[:, -1, :].any(axis=1)[:, None]
    frame[:, :, 0] = body[:, :, 0].any(axis=1)[:, None]
    frame[:, :, -1] = body[:, :, -1].any(axis=1)[:, None]
    return fill_holes_2d(frame)[:, 1:-1, 1:-1] & ~tissue


def _airways(component: np.ndarray, grid: Grid) -> np.ndarray:
    """Step 3: the trachea and main bronchi of ``component``, tracked from the top slice
    down while they stay small separate blobs (at most ``MAX_AIRWAY_CM2`` each); tracking
    stops where a bronchus joins the lung at the hilum.  A series that starts below the
    apices shows no trachea alone: nothing is removed."""
    pixel_cm2 = grid.pixel_mm[0] * grid.pixel_mm[1] / 100.0
    zs = np.flatnonzero(component.any(axis=(1, 2)))
    order = zs[::-1] if grid.head_at_high_z else zs
    tree = np.zeros_like(component)
    previous: np.ndarray | None = None
    for z in order:
        labels, count = ndimage.label(component[z])
        areas = np.bincount(labels.ravel(), minlength=count + 1) * pixel_cm2
        if previous is None:
            if count != 1 or areas[1] > MAX_AIRWAY_CM2:
                return tree  # the top is lung, not a tube of air
            ids = np.array([1])
        else:
            ids = np.unique(labels[_grown(previous, 2) & component[z]])
            ids = ids[(ids > 0) & (areas[ids] <= MAX_AIRWAY_CM2)]
            if ids.size == 0:
                break
        previous = np.isin(labels, ids)
        tree[z] = previous
    return tree


def _grown(mask: np.ndarray, pixels: int) -> np.ndarray:
    """``mask`` dilated ``pixels`` times by the 4-connected cross, on its bounding box only."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    r0, r1 = max(0, rows[0] - pixels), min(mask.shape[0], rows[-1] + pixels + 1)
    c0, c1 = max(0, cols[0] - pixels), min(mask.shape[1], cols[-1] + pixels + 1)
    out = np.zeros_like(mask)
    out[r0:r1, c0:c1] = ndimage.binary_dilation(mask[r0:r1, c0:c1], iterations=pixels)
    return out


def _split(mask: np.ndarray, body_col: float) -> tuple[np.ndarray, np.ndarray]:
    """Step 4 for one merged component: cut at the thinnest column near the middle."""
    profile = mask.sum(axis=(0, 1)).astype(np.float64)
    cols = np.flatnonzero(profile)
    lo, hi = cols[0], cols[-1]
    span = hi - lo
    window = profile[lo + span // 4 : hi - span // 4 + 1]
    if window.size == 0:
        cut = int(round(body_col))
    else:
        cut = lo + span // 4 + int(np.argmin(window))
    a = mask.copy()
    a[:, :, cut:] = False
    b = mask & ~a
    return a, b


def segment(grid: Grid) -> Lungs:
    """Segment the lungs of ``grid``; raise :class:`NoLungs` with the reason if none."""
    hu = grid.hu
    if hu.ndim != 3 or hu.shape[0] < 1:
        raise NoLungs("no slices to segment")
    voxel_ml = grid.voxel_ml()
    notes: list[str] = []
    candidates = _inner_air(hu, grid)
    labels, count = ndimage.label(candidates)
    if count == 0:
        raise NoLungs("no air inside the body: the series shows no lungs")
    index = np.arange(1, count + 1)
    per_slice = np.stack(
        [np.bincount(labels[z].ravel(), minlength=count + 1) for z in range(hu.shape[0])]
    )
    volumes = (per_slice * voxel_ml[:, None]).sum(axis=0)[1:]
    inside = labels[candidates]
    means = np.bincount(inside, weights=hu[candidates], minlength=count + 1)[1:] / np.maximum(
        per_slice.sum(axis=0)[1:], 1
    )
    lung_ids = [
        int(i)
        for i, v, m in zip(index, volumes, means, strict=True)
        if v >= MIN_COMPONENT_ML and m >= PURE_AIR_HU
    ]
    if not lung_ids:
        raise NoLungs("no aerated lung inside the body: only gas or nothing below -400 HU")
    lung_ids.sort(key=lambda i: -volumes[i - 1])
    # the lungs: the largest component and any other at least a tenth its size
    big = [i for i in lung_ids if volumes[i - 1] >= 0.1 * volumes[lung_ids[0] - 1]][:2]
    pixel_cm2 = grid.pixel_mm[0] * grid.pixel_mm[1] / 100.0
    widest = float(per_slice[:, big].sum(axis=1).max()) * pixel_cm2
    if widest < MIN_SECTION_CM2:
        raise NoLungs(
            f"the widest section of aerated air inside the body holds {widest:.0f} cm2, under"
            f" {MIN_SECTION_CM2:.0f} cm2: the series does not show the lungs"
        )
    airway = np.zeros_like(candidates)
    pieces: list[np.ndarray] = []
    for i in big:
        component = labels == i
        tree = _airways(component, grid)
        airway |= tree
        rest = component & ~tree
        if tree.any():  # removing the trachea may leave the two lungs apart
            sub, n = ndimage.label(rest)
            if n > 1:
                sizes = np.bincount(sub.ravel())[1:]
                order = np.argsort(-sizes)
                kept = [order[0]] + [j for j in order[1:2] if sizes[j] >= 0.1 * sizes[order[0]]]
                pieces.extend(sub == (j + 1) for j in kept)
                continue
        pieces.append(rest)
    pieces.sort(key=lambda p: -int(p.sum()))
    pieces = pieces[:2]
    cols = np.arange(hu.shape[2], dtype=np.float64)
    body_col = float(np.average(cols, weights=(hu > AIR_HU).sum(axis=(0, 1)) + 1e-9))
    if len(pieces) == 1:
        nz = np.flatnonzero(pieces[0].sum(axis=(0, 1)))
        # one piece spanning both sides of the body's middle is two lungs that touch
        if nz[0] < body_col - 0.1 * hu.shape[2] and nz[-1] > body_col + 0.1 * hu.shape[2]:
            pieces = list(_split(pieces[0], body_col))
            notes.append("lungs touching: cut at the thinnest junction")
        else:
            notes.append("one lung only")
    out = np.zeros(hu.shape, dtype=np.uint8)
    centres = [float(np.average(cols, weights=p.sum(axis=(0, 1)) + 1e-12)) for p in pieces]
    for piece, centre in zip(pieces, centres, strict=True):
        if len(pieces) == 2:
            high = centre == max(centres)
        else:
            high = centre > body_col
        side = LEFT if high == grid.left_at_high_col else RIGHT
        out[_close_and_fill(piece, grid, candidates, hu) & (out == 0)] = side
    airway_ml = float((airway.sum(axis=(1, 2)) * voxel_ml).sum())
    cut_off = _check_coverage(out, grid, notes)
    return Lungs(out, airway_ml, notes, cut_off)


def _close_and_fill(
    piece: np.ndarray, grid: Grid, candidates: np.ndarray, hu: np.ndarray
) -> np.ndarray:
    """Step 5, in-plane: closing with a disk, then holes filled, on the piece's bounding
    box; the closing never takes air that belongs to the other lung or lies outside; organs
    seen in section as islands are left out (:func:`_organs`)."""
    radius = int(round(CLOSING_MM / max(min(grid.pixel_mm), 1e-6)))
    pad = radius + 1
    zs = np.flatnonzero(piece.any(axis=(1, 2)))
    rows = np.flatnonzero(piece.any(axis=(0, 2)))
    cols = np.flatnonzero(piece.any(axis=(0, 1)))
    r0, r1 = max(0, rows[0] - pad), min(piece.shape[1], rows[-1] + pad + 1)
    c0, c1 = max(0, cols[0] - pad), min(piece.shape[2], cols[-1] + pad + 1)
    box = (slice(zs[0], zs[-1] + 1), slice(r0, r1), slice(c0, c1))
    padded = np.pad(piece[box], ((0, 0), (pad, pad), (pad, pad)))
    closed = ndimage.binary_closing(padded, structure=_disk(radius)[np.newaxis])
    filled = fill_holes_2d(closed)[:, pad:-pad, pad:-pad]
    closed = closed[:, pad:-pad, pad:-pad]
    filled &= ~_organs(filled & ~closed, filled, hu[box], grid)
    other_air = candidates[box] & ~piece[box]
    out = np.zeros_like(piece)
    out[box] = filled & ~other_air
    return out


def _organs(holes: np.ndarray, lung: np.ndarray, hu: np.ndarray, grid: Grid) -> np.ndarray:
    """Islands inside the lung's outline that are organs, not lung: near the bases the domes
    of the diaphragm (liver, spleen, stomach) and beside the heart its border cut through the
    lung as round islands.  An island is an organ when, in 3D, it continues across slices into
    tissue outside the lung and one of its sections is wider than ``MAX_ISLAND_CM2``; a
    nodule or consolidation enclosed by lung ends inside it, and vessels are narrower."""
    per_slice, _ = ndimage.label(holes, structure=_IN_PLANE)
    pixel_cm2 = grid.pixel_mm[0] * grid.pixel_mm[1] / 100.0
    section = np.bincount(per_slice.ravel()) * pixel_cm2
    bodies, count = ndimage.label(holes)
    if count == 0:
        return np.zeros_like(holes)
    widest = np.zeros(count + 1)
    inside = per_slice > 0
    np.maximum.at(widest, bodies[inside], section[per_slice[inside]])
    tissue_outside = ~lung & (hu > AIR_HU)
    touches = np.zeros(count + 1, dtype=bool)
    touches[bodies[1:][holes[1:] & tissue_outside[:-1]]] = True
    touches[bodies[:-1][holes[:-1] & tissue_outside[1:]]] = True
    organ = touches & (widest > MAX_ISLAND_CM2)
    organ[0] = False
    return organ[bodies]


def _check_coverage(labels: np.ndarray, grid: Grid, notes: list[str]) -> bool:
    """An abdomen that shows the lung bases is not a chest CT: its top slice cuts wide through
    the lungs while their bases end inside the series.  A series cut at both ends (a limited
    scan of the mid-chest) is analysed, with a note.  Whether the lungs are cut off."""
    area = (labels > 0).sum(axis=(1, 2))
    if not area.max():
        return False
    top, bottom = (-1, 0) if grid.head_at_high_z else (0, -1)
    cut_top = area[top] > TOP_CUT_FRACTION * area.max()
    cut_bottom = area[bottom] > TOP_CUT_FRACTION * area.max()
    if cut_top and not cut_bottom:
        raise NoLungs(
            "the lungs are cut off at the top of the series and end inside it: it shows the"
            " lung bases, not the chest"
        )
    if cut_top:
        notes.append("lungs cut off at both ends of the series: partial coverage")
    elif cut_bottom:
        notes.append("lung bases cut off at the bottom of the series")
    return bool(cut_top or cut_bottom)
