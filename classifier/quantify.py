"""Opacity in the segmented lungs, per lung and per zone, in Hounsfield-unit bands.

Bands, from the literature (none fitted on studies):

* well-aerated lung: -950 to -700 HU (Colombi et al., "Well-aerated Lung on Admitting Chest CT
  to Predict Adverse Outcome in COVID-19 Pneumonia", Radiology 2020;296:E86-E96);
* ground-glass band: -700 to -100 HU, lung above the well-aerated range but not yet
  non-aerated;
* consolidation band: -100 to +100 HU, the non-aerated compartment of Gattinoni et al.,
  "Lung recruitment in patients with the acute respiratory distress syndrome", N Engl J Med
  2006;354:1775-1786.

Opacity is counted in regions, not voxels: the band mask is opened in-plane with a disk of
``OPACITY_OPENING_MM`` radius, which removes vessels, their partial-volume rims, thin
atelectatic bands and noise (structures under about 7 mm across) and keeps patches of
ground glass or consolidation (COVID-19 lesions are centimetres across).  Voxels above +100 HU
(calcium, enhanced vessels) are never opacity.

Zones: each lung's cranio-caudal extent in thirds (upper, middle, lower); per slice, the
peripheral rim is the part of the lung within a third of its greatest depth from the lungs'
outer envelope (their convex hull in the slice, so from the chest wall, not the mediastinum),
the central core the rest.

Severity: per zone, the lobar score of Pan et al., "Time Course of Lung Changes at Chest CT
during Recovery from Coronavirus Disease 2019", Radiology 2020;295:715-721 (0 none, 1 under 5%,
2 5-25%, 3 26-49%, 4 50-75%, 5 over 75% involved), on six zones standing in for the five lobes
(the right lung's thirds roughly follow its three lobes; the left lung's two lobes are split in
three), so the total runs 0-30 instead of 0-25.  A zone counts as involved from
``INVOLVED_PERCENT`` opacity: below that, what remains after the opening is measurement noise
(mean of the phantoms' normal lung in the tests: under 0.1%).

Pattern, after the RSNA consensus statement (Simpson et al., Radiology: Cardiothoracic Imaging
2020;2:e200152): *typical* is bilateral, peripheral-predominant opacity with ground glass
(lower-zone predominance is reported, not required); *atypical* is unilateral opacity that is
mostly consolidation (lobar pneumonia); *indeterminate* is any other involvement; *negative*
none.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull

from classifier.lungcheck import LungCheck, check_lungs
from classifier.lungs import LEFT, RIGHT, Grid, Lungs

GGO_HU = (-700.0, -100.0)
CONSOLIDATION_HU = (-100.0, 100.0)
OPACITY_OPENING_MM = 5.0
INVOLVED_PERCENT = 1.0
SEVERITY_STEPS = (5.0, 25.0, 50.0, 75.0)  # upper bounds of scores 1-4 (Pan et al. 2020)
ZONES = ("upper", "middle", "lower")
SIDES = {RIGHT: "right", LEFT: "left"}


@dataclass(frozen=True)
class Region:
    """Volumes of one region of lung."""

    volume_ml: float
    ggo_ml: float
    consolidation_ml: float

    @property
    def ggo_percent(self) -> float:
        return 100.0 * self.ggo_ml / self.volume_ml if self.volume_ml else 0.0

    @property
    def consolidation_percent(self) -> float:
        return 100.0 * self.consolidation_ml / self.volume_ml if self.volume_ml else 0.0

    @property
    def opacity_percent(self) -> float:
        return self.ggo_percent + self.consolidation_percent

    def as_dict(self) -> dict[str, float]:
        return {
            "volume_ml": round(self.volume_ml, 1),
            "ggo_percent": round(self.ggo_percent, 2),
            "consolidation_percent": round(self.consolidation_percent, 2),
            "opacity_percent": round(self.opacity_percent, 2),
        }


def severity(percent: float) -> int:
    """Pan et al.'s 0-5 score for the share of a zone that is involved."""
    if percent < INVOLVED_PERCENT:
        return 0
    return 1 + sum(percent >= step for step in SEVERITY_STEPS)


@dataclass
class Quantification:
    """The lungs measured: per lung, per zone, rim and core, and what they add up to."""

    lungs: dict[str, Region]  # "right", "left", "total"
    zones: dict[str, Region]  # "right upper", ..., "left lower"
    rim: Region
    core: Region
    notes: list[str] = field(default_factory=list)
    # per voxel of the grid: 0 clear or outside the lungs, 1 ground glass, 2 consolidation
    opacity: np.ndarray | None = field(default=None, repr=False)
    # the quality gate (classifier.lungcheck); None only for quantifications built by hand
    check: LungCheck | None = None
    # per lung, the slice positions (mm) of its top and bottom: the zones are its thirds
    extents: dict[str, tuple[float, float]] = field(default_factory=dict)
    head_at_high: bool = True  # a higher slice position lies towards the head

    @property
    def lungs_ok(self) -> bool:
        """Whether the segmentation passed the gate, so the opacity figures can be used."""
        return self.check is None or self.check.ok

    @property
    def total(self) -> Region:
        return self.lungs["total"]

    def zone_scores(self) -> dict[str, int]:
        return {name: severity(z.opacity_percent) for name, z in self.zones.items()}

    @property
    def severity_score(self) -> int:
        return sum(self.zone_scores().values())

    @property
    def bilateral(self) -> bool:
        sides = [self.lungs.get(s) for s in ("right", "left")]
        return all(r is not None and r.opacity_percent >= INVOLVED_PERCENT for r in sides)

    @property
    def peripheral_predominant(self) -> bool:
        return self.rim.opacity_percent > self.core.opacity_percent

    @property
    def lower_predominant(self) -> bool:
        def third(name: str) -> float:
            parts = [z for k, z in self.zones.items() if k.endswith(name)]
            vol = sum(z.volume_ml for z in parts)
            return sum(z.ggo_ml + z.consolidation_ml for z in parts) / vol if vol else 0.0

        return third("lower") > third("upper")

    @property
    def involved(self) -> bool:
        return any(score > 0 for score in self.zone_scores().values())

    @property
    def pattern(self) -> str:
        """negative | typical | indeterminate | atypical (see the module docstring)."""
        if not self.involved:
            return "negative"
        ground_glass = self.total.ggo_ml >= self.total.consolidation_ml
        if self.bilateral and self.peripheral_predominant and ground_glass:
            return "typical"
        if not self.bilateral and not ground_glass:
            return "atypical"
        return "indeterminate"

    def as_dict(self) -> dict[str, object]:
        return {
            "lungs": {k: v.as_dict() for k, v in self.lungs.items()},
            "zones": {k: v.as_dict() for k, v in self.zones.items()},
            "zone_scores": self.zone_scores(),
            "rim": self.rim.as_dict(),
            "core": self.core.as_dict(),
            "severity_score": self.severity_score,
            "severity_max": 5 * len(self.zones),
            "bilateral": self.bilateral,
            "peripheral_predominant": self.peripheral_predominant,
            "lower_predominant": self.lower_predominant,
            "pattern": self.pattern,
            "notes": list(self.notes),
            "extents": {k: list(v) for k, v in self.extents.items()},
            "head_at_high": self.head_at_high,
            **(self.check.as_dict() if self.check is not None else {"lungs_ok": True}),
        }


def _crop(
    grid: Grid, lungs: Lungs
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[slice, slice, slice]]:
    """HU, labels and slice indices inside the lungs' bounding box (one voxel of margin):
    every later step touches a third of the grid or less."""
    lung = lungs.labels > 0
    zs = np.flatnonzero(lung.any(axis=(1, 2)))
    rows = np.flatnonzero(lung.any(axis=(0, 2)))
    cols = np.flatnonzero(lung.any(axis=(0, 1)))
    r0, r1 = max(0, rows[0] - 1), rows[-1] + 2
    c0, c1 = max(0, cols[0] - 1), cols[-1] + 2
    box = (slice(zs[0], zs[-1] + 1), slice(r0, r1), slice(c0, c1))
    return grid.hu[box], lungs.labels[box], np.arange(zs[0], zs[-1] + 1), box


def opacity_masks(hu: np.ndarray, labels: np.ndarray, pixel_mm: float) -> np.ndarray:
    """0 clear, 1 ground glass, 2 consolidation, per voxel inside the lungs, with the
    in-plane opening that removes vessels and thin bands."""
    band = (labels > 0) & (hu >= GGO_HU[0]) & (hu <= CONSOLIDATION_HU[1])
    radius = max(1, int(round(OPACITY_OPENING_MM / max(pixel_mm, 1e-6))))
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    disk = ((yy * yy + xx * xx) <= radius * radius)[np.newaxis]
    opacity = ndimage.binary_opening(band, structure=disk) & band
    kind = opacity.astype(np.uint8)
    kind[opacity & (hu >= CONSOLIDATION_HU[0])] = 2
    return kind


def zone_at(q: dict[str, object], position: float) -> str:
    """The zone a slice at ``position`` (mm) lies in, from stored measurements: "upper" when
    both lungs agree, "right upper, left middle" when they do not, "" outside the lungs."""
    extents = q.get("extents") or {}
    head_at_high = bool(q.get("head_at_high", True))
    named = []
    for side, (lo, hi) in extents.items():  # type: ignore[union-attr]
        if not lo - 1e-6 <= position <= hi + 1e-6:
            continue
        t = min(2, int((position - lo) / max(hi - lo, 1e-9) * 3))
        named.append((side, ZONES[2 - t if head_at_high else t]))
    if not named:
        return ""
    if len({zone for _, zone in named}) == 1:
        return named[0][1]
    return ", ".join(f"{side} {zone}" for side, zone in named)


def quantify(grid: Grid, lungs: Lungs) -> Quantification:
    """Measure ``lungs`` (segmented on ``grid``): one pass counts every voxel into
    (lung, zone, rim or core, clear / ground glass / consolidation), weighted by its volume."""
    if not (lungs.labels > 0).any():
        raise ValueError("no lung to measure")
    hu, labels, zs, box = _crop(grid, lungs)
    kind = opacity_masks(hu, labels, min(grid.pixel_mm))
    opacity = np.zeros(grid.hu.shape, dtype=np.uint8)
    opacity[box] = kind
    rim = _rim(labels)
    pos = np.asarray(grid.positions, dtype=np.float64)[zs]
    third = np.zeros((3, zs.size), dtype=np.int64)  # per side: zone index of each slice
    extents: dict[str, tuple[float, float]] = {}
    for side, side_name in SIDES.items():
        present = (labels == side).any(axis=(1, 2))
        if not present.any():
            continue
        lo, hi = pos[present].min(), pos[present].max()
        extents[side_name] = (float(lo), float(hi))
        t = np.clip(((pos - lo) / max(hi - lo, 1e-9) * 3).astype(np.int64), 0, 2)
        third[side] = 2 - t if grid.head_at_high_z else t  # 0 = upper
    zone = third[labels, np.arange(zs.size)[:, None, None]]
    # code = side (0-2) * 18 + zone (0-2) * 6 + rim (0-1) * 3 + kind (0-2)
    code = labels.astype(np.int64) * 18 + zone * 6 + rim.astype(np.int64) * 3 + kind
    voxel_ml = grid.voxel_ml()[zs]
    counts = np.zeros(54)
    for i in range(zs.size):
        counts += np.bincount(code[i].ravel(), minlength=54)[:54] * voxel_ml[i]
    c = counts.reshape(3, 3, 2, 3)  # side, zone, rim, kind

    def region(part: np.ndarray) -> Region:
        k = part.reshape(-1, 3).sum(axis=0)
        return Region(float(k.sum()), float(k[1]), float(k[2]))

    out_lungs: dict[str, Region] = {}
    zones: dict[str, Region] = {}
    for side, name in SIDES.items():
        if c[side].sum() > 0:
            out_lungs[name] = region(c[side])
            for z, zone_name in enumerate(ZONES):
                zones[f"{name} {zone_name}"] = region(c[side, z])
    out_lungs["total"] = region(c[1:])
    right, left = (out_lungs[n].volume_ml if n in out_lungs else 0.0 for n in ("right", "left"))
    return Quantification(
        out_lungs,
        zones,
        region(c[1:, :, 1]),
        region(c[1:, :, 0]),
        list(lungs.notes),
        opacity,
        check_lungs(lungs, right, left),
        extents,
        grid.head_at_high_z,
    )


_IN_PLANE_CROSS = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE_CROSS[1] = ndimage.generate_binary_structure(2, 1)
_IN_PLANE_SQUARE = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE_SQUARE[1] = True


def _rim(labels: np.ndarray) -> np.ndarray:
    """Per slice and lung: within a third of the greatest depth from the lungs' outer
    envelope (the convex hull of both lungs in the slice), so depth runs from the chest wall
    and the mediastinal surfaces, which lie inside the envelope, are not periphery: RSNA's
    peripheral is subpleural along the chest wall, and perihilar opacity is central.  Depth
    in pixels is the mean of the city-block and chessboard distances (an octagonal distance,
    within 8% of the Euclidean one): only ratios of depths on one slice matter."""
    envelope = np.pad(_hulls(labels > 0), ((0, 0), (1, 1), (1, 1)))
    depth = (
        ndimage.distance_transform_cdt(envelope, metric=_IN_PLANE_CROSS).astype(np.float32)
        + ndimage.distance_transform_cdt(envelope, metric=_IN_PLANE_SQUARE)
    )[:, 1:-1, 1:-1] / 2.0
    deepest = np.zeros((3, labels.shape[0]), dtype=np.float32)
    for side in SIDES:
        deepest[side] = np.where(labels == side, depth, 0).max(axis=(1, 2))
    limit = deepest[labels, np.arange(labels.shape[0])[:, None, None]] / 3.0
    return (labels > 0) & (depth <= limit)


def _hulls(mask: np.ndarray) -> np.ndarray:
    """The in-plane convex hull of ``mask`` on each slice: pixel centres inside the hull of
    the outer corners of each row's first and last pixel (the hull of those is the hull of
    the whole row), tested on the mask's bounding box only."""
    out = np.zeros_like(mask)
    for z in np.flatnonzero(mask.any(axis=(1, 2))):
        m = mask[z]
        rows = np.flatnonzero(m.any(axis=1))
        first = m[rows].argmax(axis=1)
        last = m.shape[1] - 1 - m[rows, ::-1].argmax(axis=1)
        r = rows.astype(np.float64)
        points = np.concatenate(
            [
                np.stack([r - 0.5, first - 0.5], axis=1),
                np.stack([r + 0.5, first - 0.5], axis=1),
                np.stack([r - 0.5, last + 0.5], axis=1),
                np.stack([r + 0.5, last + 0.5], axis=1),
            ]
        )
        a, b, c = ConvexHull(points).equations.T  # a*row + b*col + c <= 0 inside
        y = np.arange(rows[0], rows[-1] + 1, dtype=np.float64)[:, None]
        bound = -(a * y + c)  # b*col <= bound on each facet
        with np.errstate(divide="ignore", invalid="ignore"):
            upper = np.where(b > 1e-12, bound / b, np.inf).min(axis=1)
            lower = np.where(b < -1e-12, bound / b, -np.inf).max(axis=1)
        level = np.abs(b) <= 1e-12  # facets along a row: a row outside them is out
        lower[(level & (bound < -1e-9)).any(axis=1)] = np.inf
        cols = np.arange(m.shape[1], dtype=np.float64)
        out[z, rows[0] : rows[-1] + 1] = (cols >= lower[:, None] - 1e-9) & (
            cols <= upper[:, None] + 1e-9
        )
    return out | mask
