"""Lung segmentation, quantification and the study verdict, on drawn chests of known truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from classifier.aggregate import study_verdict
from classifier.lungcheck import LungCheck
from classifier.lungs import LEFT, RIGHT, Grid, Lungs, NoLungs, segment
from classifier.quantify import Quantification, Region, quantify, severity
from covidct.synthetic import Blob, Chest

pytestmark = pytest.mark.unit

ROWS = 128


def scan(
    chest: Chest,
    spacing: float,
    pixel_mm: float = 350.0 / ROWS,
    z_range: tuple[float, float] | None = None,
) -> tuple[Grid, dict[str, float]]:
    """The chest on the segmentation grid, and its truth: lung volume per side (mL) and the
    ground-glass and consolidation volumes inside the lungs."""
    rng = np.random.default_rng(7)
    lo, hi = z_range or (0.0, chest.height)
    zs = np.arange(lo, hi + 1e-6, spacing)
    truth = {"right": 0.0, "left": 0.0, "ggo": 0.0, "consolidation": 0.0}
    slices = []
    voxel = pixel_mm * pixel_mm * spacing / 1000.0
    for z in zs:
        lungs, _, ggo, cons = chest.masks(ROWS, pixel_mm, z)
        for side, mask in lungs.items():
            truth[side] += float(mask.sum()) * voxel
        truth["ggo"] += float(ggo.sum()) * voxel
        truth["consolidation"] += float(cons.sum()) * voxel
        slices.append(chest.hu(ROWS, pixel_mm, z, rng))
    hu = np.rint(np.stack(slices)).astype(np.int16)
    return Grid(hu, zs.astype(np.float64), (pixel_mm, pixel_mm)), truth


BLOBS = (
    Blob((-95.0, 15.0, 70.0), 22.0, -500.0),  # right lower zone, peripheral, ground glass
    Blob((95.0, 10.0, 80.0), 20.0, -450.0),  # left lower zone, ground glass
    Blob((-80.0, -30.0, 150.0), 18.0, 20.0),  # right middle zone, consolidation
)


def within(measured: float, truth: float, tolerance: float = 0.05) -> bool:
    return abs(measured - truth) <= tolerance * truth


@pytest.mark.parametrize("spacing", [1.0, 2.5, 5.0])
def test_volumes_and_opacity_match_the_truth(spacing: float) -> None:
    grid, truth = scan(Chest(blobs=BLOBS), spacing)
    lungs = segment(grid)
    q = quantify(grid, lungs)
    assert within(q.lungs["right"].volume_ml, truth["right"])
    assert within(q.lungs["left"].volume_ml, truth["left"])
    total_truth = truth["right"] + truth["left"]
    opacity_truth = 100 * (truth["ggo"] + truth["consolidation"]) / total_truth
    assert within(q.total.opacity_percent, opacity_truth)
    assert within(q.total.ggo_ml, truth["ggo"], 0.1)
    assert within(q.total.consolidation_ml, truth["consolidation"], 0.1)
    # vessels (4 mm across) and the airways are not opacity
    assert q.total.opacity_percent < opacity_truth * 1.05


def test_gaps_between_slices_and_contrast() -> None:
    """Every third slice missing (uneven gaps) and enhanced vessels (+300 HU, 6 mm across):
    volumes hold, and neither the gaps nor the contrast make opacity."""
    grid, truth = scan(Chest(vessel_radius=3.0, vessel_hu=300.0), 2.5)
    keep = np.arange(grid.hu.shape[0]) % 3 != 1
    gappy = Grid(grid.hu[keep], grid.positions[keep], grid.pixel_mm)
    q = quantify(gappy, segment(gappy))
    assert within(q.lungs["right"].volume_ml, truth["right"])
    assert within(q.lungs["left"].volume_ml, truth["left"])
    assert q.total.opacity_percent < 0.1


def test_the_diaphragm_dome_is_not_lung_nor_opacity() -> None:
    """The liver's dome rising 40 mm into the right base is seen in section as round islands
    of soft tissue inside the lung: left out of the lung, not counted as consolidation."""
    grid, truth = scan(Chest(dome=40.0), 2.5)
    q = quantify(grid, segment(grid))
    assert within(q.lungs["right"].volume_ml, truth["right"])
    assert q.total.consolidation_percent < 0.1 and q.pattern == "negative"


def test_left_and_right_are_not_swapped() -> None:
    grid, _ = scan(Chest(blobs=BLOBS), 5.0)
    labels = segment(grid).labels
    cols = np.arange(ROWS)
    # patient's right is -x: the low columns when the row direction is +x
    right_col = np.average(np.nonzero(labels == RIGHT)[2])
    left_col = np.average(np.nonzero(labels == LEFT)[2])
    assert right_col < cols.mean() < left_col
    flipped = Grid(
        grid.hu[:, :, ::-1].copy(), grid.positions, grid.pixel_mm, left_at_high_col=False
    )
    labels = segment(flipped).labels
    assert np.average(np.nonzero(labels == RIGHT)[2]) > cols.mean()


def test_the_right_lung_carries_the_right_blobs() -> None:
    grid, truth = scan(Chest(blobs=(BLOBS[0],)), 5.0)
    q = quantify(grid, segment(grid))
    assert q.lungs["right"].opacity_percent > 1.0
    assert q.lungs["left"].opacity_percent == pytest.approx(0.0, abs=0.1)
    assert not q.bilateral
    assert q.zone_scores()["right lower"] >= 2  # a 22 mm sphere fills over 5% of that zone


def test_normal_lungs_have_no_opacity() -> None:
    grid, _ = scan(Chest(), 2.5)
    q = quantify(grid, segment(grid))
    assert q.total.opacity_percent < 0.1
    assert q.pattern == "negative" and q.severity_score == 0


def test_one_lung() -> None:
    grid, truth = scan(Chest(lungs=("left",)), 5.0)
    lungs = segment(grid)
    q = quantify(grid, lungs)
    assert "right" not in q.lungs
    assert within(q.lungs["left"].volume_ml, truth["left"])
    assert "one lung only" in lungs.notes


def test_lungs_clipped_by_the_field_of_view() -> None:
    # 128 pixels of 1.8 mm: a 230 mm field of view, the lungs reach 118 mm from the middle
    grid, truth = scan(Chest(blobs=BLOBS), 5.0, pixel_mm=1.8)
    assert truth["right"] > 0
    q = quantify(grid, segment(grid))
    assert within(q.lungs["right"].volume_ml, truth["right"])
    assert within(q.lungs["left"].volume_ml, truth["left"])


def test_a_head_has_no_lungs() -> None:
    rng = np.random.default_rng(1)
    c = (np.arange(ROWS) - ROWS / 2) * 2.0
    yy, xx = np.meshgrid(c, c, indexing="ij")
    head = np.where((xx / 80) ** 2 + (yy / 95) ** 2 < 1, 40.0, -1000.0)
    head[(xx / 70) ** 2 + (yy / 85) ** 2 < 1] = 35.0  # brain
    # a sinus half filled with mucus: not pure air, so only its size tells it from a lung
    head[((xx - 20) / 12) ** 2 + ((yy + 60) / 12) ** 2 < 1] = -800.0
    hu = np.stack([head + rng.normal(0, 10, head.shape) for _ in range(40)]).astype(np.int16)
    with pytest.raises(NoLungs, match="does not show the lungs"):
        segment(Grid(hu, np.arange(40) * 3.0, (2.0, 2.0)))


def test_an_abdomen_with_the_lung_bases_is_not_a_chest() -> None:
    chest = Chest(blobs=())
    grid, _ = scan(chest, 5.0, z_range=(0.0, 80.0))  # the bottom third: the bases only
    with pytest.raises(NoLungs, match="lung bases"):
        segment(grid)


def test_periphery_runs_from_the_chest_wall_not_the_mediastinum() -> None:
    """RSNA's peripheral is subpleural along the chest wall: the same ground-glass sphere is
    rim against the ribs and core against the mediastinum (as perihilar opacity is)."""
    mid = 120.0
    lateral = Blob((-108.0, -5.0, mid), 14.0, -500.0)  # the right lung's outer edge
    medial = Blob((-28.0, -5.0, mid), 14.0, -500.0)  # its mediastinal edge
    measured = {}
    for name, blob in (("lateral", lateral), ("medial", medial)):
        grid, truth = scan(Chest(blobs=(blob,)), 2.5)
        q = quantify(grid, segment(grid))
        assert within(q.total.ggo_ml, truth["ggo"], 0.15)
        measured[name] = q
    assert measured["lateral"].rim.ggo_ml > 3 * measured["lateral"].core.ggo_ml
    assert measured["medial"].core.ggo_ml > 3 * measured["medial"].rim.ggo_ml
    assert measured["lateral"].peripheral_predominant
    assert not measured["medial"].peripheral_predominant


def test_the_envelope_is_each_slices_convex_hull() -> None:
    """The row-interval fill equals a brute-force hull test (scipy's Delaunay) on random
    shapes, and contains every shape."""
    from scipy.spatial import Delaunay

    from classifier.quantify import _hulls

    rng = np.random.default_rng(3)
    masks = np.zeros((6, 40, 50), dtype=bool)
    for z in range(6):
        for _ in range(z + 1):
            r, c = rng.integers(3, 37), rng.integers(3, 47)
            masks[z, max(0, r - 3) : r + rng.integers(1, 4), max(0, c - 4) : c + 2] = True
    masks[5] = False  # an empty slice stays empty
    hulls = _hulls(masks)
    yy, xx = np.mgrid[0:40, 0:50]
    centres = np.stack([yy.ravel(), xx.ravel()], axis=1)
    offsets = np.array([[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]])
    for z in range(5):
        corners = (np.argwhere(masks[z])[:, None, :] + offsets).reshape(-1, 2)
        expected = Delaunay(corners).find_simplex(centres) >= 0
        assert np.array_equal(hulls[z].ravel(), expected), z
        assert (hulls[z] >= masks[z]).all()
    assert not hulls[5].any()


def test_severity_follows_pan_et_al() -> None:
    assert [severity(p) for p in (0.0, 0.5, 2.0, 5.0, 30.0, 60.0, 80.0)] == [0, 0, 1, 2, 3, 4, 5]


def _quant(zones: dict[str, tuple[float, float]], rim_more: bool = True) -> Quantification:
    """A measurement with the given (ground glass %, consolidation %) per zone, 100 mL each."""
    names = [f"{s} {z}" for s in ("right", "left") for z in ("upper", "middle", "lower")]
    regions = {n: Region(100.0, *zones.get(n, (0.0, 0.0))) for n in names}

    def add(parts: list[Region]) -> Region:
        return Region(
            sum(r.volume_ml for r in parts),
            sum(r.ggo_ml for r in parts),
            sum(r.consolidation_ml for r in parts),
        )

    right = add([regions[n] for n in names[:3]])
    left = add([regions[n] for n in names[3:]])
    total = add([right, left])
    rim = Region(300.0, total.ggo_ml * (0.8 if rim_more else 0.2), 0.0)
    core = Region(300.0, total.ggo_ml * (0.2 if rim_more else 0.8), total.consolidation_ml)
    return Quantification({"right": right, "left": left, "total": total}, regions, rim, core)


def test_near_normal_lung_is_absent_unless_the_cnn_calls_present() -> None:
    """The CNN alone never makes near-normal lungs Present; when it calls Present the two
    disagree, and the study is Indeterminate rather than Absent."""
    q = _quant({"right lower": (3.0, 0.0)})  # one zone involved
    for low in (0.1, 0.52):  # Absent, and within the CNN's Indeterminate band
        call, why = study_verdict(low, 0.5, 0.05, q)
        assert call == "Absent" and why.startswith("near-normal lung: opacity in 1 of 6 zones")
    call, why = study_verdict(0.97, 0.5, 0.05, q)
    assert call == "Indeterminate"
    assert "CNN scores COVID-19 (0.970 against 0.500)" in why and "near-normal" in why


def test_typical_pattern_and_high_cnn_is_present() -> None:
    q = _quant({"right lower": (12.0, 1.0), "left lower": (9.0, 0.0), "left middle": (3.0, 0.0)})
    assert q.pattern == "typical"
    assert study_verdict(0.9, 0.5, 0.05, q)[0] == "Present"
    assert study_verdict(0.52, 0.5, 0.05, q)[0] == "Indeterminate"
    assert study_verdict(0.2, 0.5, 0.05, q)[0] == "Absent"


def test_lobar_consolidation_is_never_present() -> None:
    q = _quant({"right lower": (1.0, 30.0), "right middle": (0.5, 10.0)})
    assert q.pattern == "atypical"
    call, why = study_verdict(0.95, 0.5, 0.05, q)
    assert call == "Indeterminate" and "atypical" in why


def test_model_card_includes_the_hand_kept_notes(tmp_path: Path) -> None:
    import json
    import shutil

    from classifier.card import write_card_markdown

    models = Path(__file__).resolve().parent.parent / "models"
    card = json.loads((models / "covidct.card.json").read_text())
    out = tmp_path / "covidct.card.md"
    write_card_markdown(card, out)
    assert "## Study verdict" not in out.read_text()
    shutil.copy(models / "covidct.notes.md", tmp_path / "covidct.notes.md")
    write_card_markdown(card, out)
    text = out.read_text()
    assert "## Study verdict" in text and "## History" in text
    assert text.index("## History") < text.index("## Training history")
    # the shipped card is what the generator writes
    assert text == (models / "covidct.card.md").read_text()


# --- the sickest patients (#32): sick anatomy, and the gate that keeps a failure from Absent


@pytest.mark.parametrize(
    "chest",
    [
        Chest(wall=5.0),
        Chest(wall=5.0, blankets=True),
        Chest(blankets=True),
        Chest(emphysema=-975.0),
    ],
    ids=["5 mm chest wall", "5 mm wall in folded blankets", "blankets", "emphysema"],
)
def test_sick_anatomy_keeps_the_lungs(chest: Chest) -> None:
    """A chest wall one grid pixel thick still closes the lungs; air that a sheet closes
    against the skin is not lung; emphysema (-975 HU, bullae of pure air) stays lung."""
    grid, truth = scan(chest, 2.5)
    lungs = segment(grid)
    q = quantify(grid, lungs)
    assert within(q.lungs["right"].volume_ml, truth["right"], 0.1)
    assert within(q.lungs["left"].volume_ml, truth["left"], 0.1)
    assert q.check is not None and q.check.ok, q.check
    assert q.total.opacity_percent < 0.1  # neither the wall, the sheet nor emphysema is opacity


def test_a_pleural_effusion_is_not_lung() -> None:
    grid, truth = scan(Chest(effusion=30.0), 2.5)
    q = quantify(grid, segment(grid))
    assert truth["right"] < 0.85 * truth["left"]  # the fluid takes a sixth of the right side
    assert within(q.lungs["right"].volume_ml, truth["right"], 0.1)
    assert q.total.consolidation_percent < 0.5 and q.lungs_ok


def test_a_consolidated_lobe_left_out_is_never_absent_when_the_cnn_sees_it() -> None:
    """The limit of a threshold segmentation: a consolidated lobe that no aerated lung
    encloses stays outside the mask, and the lungs left measure near-normal.  The gate
    passes (the side keeps more than half the other's volume); a CNN that calls Present
    then makes the study Indeterminate, not Absent."""
    grid, truth = scan(Chest(consolidated_lobe=True), 2.5)
    q = quantify(grid, segment(grid))
    lost = truth["right"] - q.lungs["right"].volume_ml
    assert truth["consolidation"] > 150 and lost > 0.5 * truth["consolidation"]
    assert within(q.lungs["left"].volume_ml, truth["left"])
    assert q.check is not None and q.check.ok
    assert q.total.consolidation_ml < 0.1 * truth["consolidation"]
    assert study_verdict(0.9, 0.5, 0.05, q)[0] == "Indeterminate"
    assert study_verdict(0.1, 0.5, 0.05, q)[0] == "Absent"


def test_lungs_lost_below_the_apex_make_indeterminate_not_absent() -> None:
    """The failure seen on a real pneumonia: the lungs joined the outside air below the apices,
    so only the apices were segmented.  The gate fails with the figures; the call is
    Indeterminate however low the CNN scores, and the opacity rules are not used."""
    grid, truth = scan(Chest(leak=True), 2.5)
    q = quantify(grid, segment(grid))
    assert q.check is not None and not q.check.ok
    assert q.check.volume_ml < 0.2 * (truth["right"] + truth["left"])
    assert "less than an adult holds" in q.check.summary()
    call, basis = study_verdict(0.05, 0.5, 0.05, q)
    assert call == "Indeterminate"
    assert basis.startswith("lungs not segmented reliably") and "mL" in basis
    assert q.as_dict()["lungs_ok"] is False


def test_the_gate_names_each_failure() -> None:
    def check_lungs(g: Grid, lungs: Lungs) -> LungCheck:
        check = quantify(g, lungs).check
        assert check is not None
        return check

    grid, _ = scan(Chest(), 5.0)
    lungs = segment(grid)
    assert check_lungs(grid, lungs).ok
    # a slice in the middle lost its lung
    holed = Lungs(lungs.labels.copy(), lungs.airway_ml, [])
    holed.labels[grid.hu.shape[0] // 2] = 0
    assert any("no lung on 1 of the" in r for r in check_lungs(grid, holed).reasons)
    # one side lost, or much smaller than the other
    right_only = Lungs(np.where(lungs.labels == RIGHT, RIGHT, 0).astype(np.uint8), 0.0, [])
    assert any("only the right lung" in r for r in check_lungs(grid, right_only).reasons)
    shrunk = lungs.labels.copy()
    left_z = np.flatnonzero((shrunk == LEFT).any(axis=(1, 2)))
    shrunk[left_z[: 2 * len(left_z) // 3]] = np.where(
        shrunk[left_z[: 2 * len(left_z) // 3]] == LEFT, 0, shrunk[left_z[: 2 * len(left_z) // 3]]
    )
    reasons = check_lungs(grid, Lungs(shrunk, 0.0, [])).reasons
    assert any("the left lung measures" in r for r in reasons)
    # more lung than an adult holds
    big = Grid(grid.hu, grid.positions * 4.0, grid.pixel_mm)
    assert any("more than an adult holds" in r for r in check_lungs(big, lungs).reasons)


def test_a_series_cut_at_an_end_is_not_held_to_the_whole_volume() -> None:
    grid, _ = scan(Chest(), 2.5, z_range=(60.0, 240.0))  # the bases cut off
    lungs = segment(grid)
    assert "lung bases cut off at the bottom of the series" in lungs.notes
    small = Grid(grid.hu, grid.positions * 0.3, grid.pixel_mm)  # a third of the volume
    check = quantify(small, segment(small)).check
    assert check is not None and check.ok and check.volume_ml < 1200


def test_the_zone_of_a_slice_position() -> None:
    """The page names the zone of a key slice from the stored measurements: each lung's
    thirds from apex to base."""
    from classifier.quantify import zone_at

    grid, _ = scan(Chest(), 5.0)
    q = quantify(grid, segment(grid)).as_dict()
    lo, hi = q["extents"]["right"]  # type: ignore[index]
    assert zone_at(q, hi) == "upper" and zone_at(q, lo) == "lower"
    assert zone_at(q, (lo + hi) / 2) == "middle"
    assert zone_at(q, hi + 50.0) == ""
    uneven = {"extents": {"right": [0.0, 90.0], "left": [0.0, 60.0]}, "head_at_high": True}
    assert zone_at(uneven, 55.0) == "right middle, left upper"
    assert zone_at({"extents": {"right": [0.0, 90.0]}, "head_at_high": False}, 80.0) == "lower"
