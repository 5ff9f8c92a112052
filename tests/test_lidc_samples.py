"""Per-nodule LIDC samples on a synthetic DICOM series holding a bright sphere that three readers
outline: nodule count, centre, patches and masks against the full resampling path and the
analytic disk, labels from ratings, consensus levels, and what is skipped."""

import dataclasses

import numpy as np
import pytest

pytest.importorskip("pydicom")

from medichain_jax.data.dicom import CTVolume, find_series, load_series  # noqa: E402
from medichain_jax.data.lidc_patches import (  # noqa: E402
    LUNG_WINDOW,
    extract_patch,
    resample_isotropic,
)
from medichain_jax.data.lidc_samples import dice, nodule_samples  # noqa: E402
from medichain_jax.data.lidc_xml import (  # noqa: E402
    LidcAnnotations,
    NoduleRead,
    Roi,
    consensus_mask,
    nodule_mask,
    parse_lidc_xml,
)
from medichain_jax.data.phantom import window  # noqa: E402
from tests.test_dicom import write_slice  # noqa: E402
from tests.test_lidc_xml import CHARS, lidc_xml, roi_xml, square  # noqa: E402

SPACING = (2.5, 0.7, 0.8)  # slice step; write_slice's PixelSpacing (rows 0.7, columns 0.8)
CENTER = (6, 30, 34)  # sphere centre voxel (slice, row, column)
TRUTH_MM = np.multiply(CENTER, SPACING)
RADIUS, LUNG, TISSUE = 6.0, -800, 40


def disk(k, dcol=0):
    """Contour (x, y) of the sphere's section on slice k, shifted by dcol columns (0.35 mm
    inside the edge: outline pixels count as nodule, so their centres straddle the edge)."""
    r2 = RADIUS**2 - ((k - CENTER[0]) * SPACING[0]) ** 2
    if r2 <= 0:
        return []
    r, t = np.sqrt(r2) - 0.35, np.linspace(0, 2 * np.pi, 72, endpoint=False)
    xs = np.rint(CENTER[2] + dcol + r * np.cos(t) / SPACING[2]).astype(int)
    ys = np.rint(CENTER[1] + r * np.sin(t) / SPACING[1]).astype(int)
    pts = list(zip(xs.tolist(), ys.tolist(), strict=True))
    return [p for i, p in enumerate(pts) if p != pts[i - 1]]


def nodule(nid, rois, m=None):
    chars = CHARS.format(m=m) if m else ""
    return f"<unblindedReadNodule><noduleID>{nid}</noduleID>{chars}{''.join(rois)}</unblindedReadNodule>"


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """12 slices of 64 x 64; r1, r2 outline the sphere, r3 two columns to the right;
    r1 also marks a nodule on no slice, r4 a < 3 mm nodule and a square nodule alone."""
    tmp = tmp_path_factory.mktemp("lidc")
    axes = [np.arange(n) * s for n, s in zip((12, 64, 64), SPACING, strict=True)]
    zz, yy, xx = np.meshgrid(*axes, indexing="ij")
    ball = sum((a - t) ** 2 for a, t in zip((zz, yy, xx), TRUTH_MM, strict=True)) <= RADIUS**2
    hu = np.where(ball, TISSUE, LUNG)
    sops = [
        write_slice(tmp / "dcm" / f"{k}.dcm", "9.9.9", 2.5 * k, hu[k] + 1024) for k in range(12)
    ]

    def sphere(dcol):
        return [roi_xml(2.5 * k, sops[k], disk(k, dcol)) for k in range(12) if disk(k)]

    lost = roi_xml(400.0, "", square(5, 5, 9, 9))
    tiny = roi_xml(15.0, sops[6], [(50, 50)])
    box = [roi_xml(2.5 * k, sops[k], square(5, 5, 10, 10)) for k in (2, 3)]
    sessions = [
        "<servicingRadiologistID>r1</servicingRadiologistID>"
        + nodule("A", sphere(0), 4)
        + nodule("lost", [lost], 3),
        "<servicingRadiologistID>r2</servicingRadiologistID>" + nodule("A", sphere(0), 5),
        "<servicingRadiologistID>r3</servicingRadiologistID>" + nodule("A", sphere(2), 4),
        "<servicingRadiologistID>r4</servicingRadiologistID>"
        + nodule("tiny", [tiny])
        + nodule("B", box, 2),
    ]
    (tmp / "069.xml").write_text(lidc_xml(sessions))
    volume = load_series(find_series(tmp / "dcm").series["9.9.9"])
    return volume, [parse_lidc_xml(tmp / "069.xml")]


def test_nodules_centre_ratings_labels_and_skipped(series):
    vol, anns = series
    s = nodule_samples(vol, anns)
    assert len(s) == 2 and (s.series_uid, s.patient_id, s.manufacturer) == (
        "9.9.9",
        "LIDC-IDRI-0001",
        "SIEMENS",
    )
    assert s.num_readers.tolist() == [3, 1] and s.readers == ("r1", "r2", "r3", "r4")
    assert np.abs(s.centers_mm[0] - TRUTH_MM).max() < 1.0
    assert s.ratings.tolist() == [[4, 5, 4, 0], [0, 0, 0, 2]] and s.label.tolist() == [1, 0]
    skipped = dict(s.skipped)
    assert set(skipped) == {"reader r1 nodule lost", "reader r4 nodule tiny"}
    assert skipped["reader r1 nodule lost"] == "1 of 1 contours match no slice (z = [400.0] mm)"
    assert "under 3 mm" in skipped["reader r4 nodule tiny"]


@pytest.mark.parametrize("mode, channels", [("2d", 1), ("2.5d", 3)])
def test_patches_and_masks_equal_the_full_resampling_path(series, mode, channels):
    vol, anns = series
    s = nodule_samples(vol, anns, mode=mode)
    assert s.patches.shape == (2, 32, 32, channels) and s.patches.dtype == np.float32
    assert s.masks.shape == (2, 32, 32) and s.masks.dtype == bool
    assert s.patches.min() >= 0.0 and s.patches.max() <= 1.0
    lo, width = LUNG_WINDOW[0] - LUNG_WINDOW[1] / 2, LUNG_WINDOW[1]
    assert s.patches[0, 16, 16] == pytest.approx((TISSUE - lo) / width, abs=1e-6)
    assert s.patches[0, 0, 0, 0] == pytest.approx((LUNG - lo) / width, abs=1e-6)
    iso, _ = resample_isotropic(vol.hu, vol.spacing)
    for i, nid in enumerate(["A", "B"]):
        centre = np.rint(s.centers_mm[i]).astype(int)
        want = np.asarray(window(extract_patch(iso, centre, 32, mode), *LUNG_WINDOW))
        np.testing.assert_allclose(s.patches[i], want, atol=1e-6)
        reads = [n for n in anns[0].nodules if n.nodule_id == nid]
        marks = [nodule_mask(n, vol.sop_uids, vol.positions, vol.hu.shape[1:])[0] for n in reads]
        cons = consensus_mask(marks, min(2, len(marks))).astype(np.float32)
        cut = extract_patch(resample_isotropic(cons, vol.spacing, order=0)[0], centre, 32)
        np.testing.assert_array_equal(s.masks[i], cut[..., 0] > 0.5)


def test_mask_matches_the_analytic_disk(series):
    vol, anns = series
    s = nodule_samples(vol, anns)
    centre = np.rint(s.centers_mm[0]).astype(int)
    yy, xx = np.mgrid[:32, :32] - 16
    truth = (yy + centre[1] - TRUTH_MM[1]) ** 2 + (xx + centre[2] - TRUTH_MM[2]) ** 2 <= RADIUS**2
    assert centre[0] == TRUTH_MM[0] and dice(s.masks[0], truth) > 0.95


def test_at_least_levels_and_cap(series):
    vol, anns = series
    sums = [nodule_samples(vol, anns, at_least=k).masks.sum(axis=(1, 2)) for k in (1, 2, 3, 4)]
    assert sums[0][0] > sums[1][0] > sums[2][0] > 0  # union > r1 = r2 > all three
    assert sums[3][0] == sums[2][0]  # capped at the three readers who marked it
    assert all(x[1] == sums[0][1] > 0 for x in sums)  # one reader: its own mask
    with pytest.raises(ValueError, match="at_least"):
        nodule_samples(vol, anns, at_least=0)
    with pytest.raises(ValueError, match="mode"):
        nodule_samples(vol, anns, mode="3d")


def test_labels_from_ratings_and_foreign_series():
    vol = CTVolume(
        hu=np.full((4, 40, 40), -800.0, np.float32),
        spacing=(2.5, 0.7, 0.7),
        positions=np.arange(4) * 2.5,
        sop_uids=[f"1.{k}" for k in range(4)],
        metadata={"SeriesInstanceUID": "9.9.9"},
        missing_slices=0,
        uneven_spacing=False,
        bad=[],
    )
    # x of the nodule -> malignancy of readers r1..r4 (None: not marked; 0: marked, not rated)
    plan = {2: (4, 5, 4, None), 14: (1, 2, 0, None), 26: (3, None, None, 3)}
    reads = []
    for j, reader in enumerate(["r1", "r2", "r3", "r4"]):
        for x, marks in plan.items():
            if marks[j] is not None:
                chars = {"malignancy": marks[j]} if marks[j] else {"subtlety": 3}
                roi = Roi(2.5, "1.1", True, np.array(square(x, 10, x + 5, 15)))
                reads.append(NoduleRead(reader, f"{reader}-{x}", chars, (roi,)))
    ann = LidcAnnotations("x.xml", "9.9.9", tuple(reads), (), ("r1", "r2", "r3", "r4"))
    s = nodule_samples(vol, [ann], patch_size=16)
    assert s.ratings.tolist() == [[4, 5, 4, 0], [1, 2, 0, 0], [3, 0, 0, 3]]
    assert s.label.tolist() == [1, 0, -1] and s.num_readers.tolist() == [3, 3, 2]
    assert s.masks.shape == (3, 16, 16) and s.skipped == []
    twice = nodule_samples(vol, [ann, ann])  # readers of two files are kept apart
    assert twice.readers[4] == "1:r1" and twice.num_readers.tolist() == [6, 6, 4]
    other = nodule_samples(vol, [dataclasses.replace(ann, series_uid="1.2.3")])
    assert len(other) == 0 and other.patches.shape == (0, 32, 32, 1)
    assert other.skipped == [("x.xml", "annotates series 1.2.3, not 9.9.9")]


def test_dice_by_hand():
    a = np.array([[1, 1], [1, 0]], bool)
    b = np.array([[0, 1], [0, 0]], bool)
    assert dice(a, b) == pytest.approx(2 * 1 / (3 + 1))
    assert dice(a, a) == 1.0 and dice(a, ~a) == 0.0
    assert dice(np.zeros(3, bool), np.zeros(3, bool)) == 1.0
    with pytest.raises(ValueError, match="shapes"):
        dice(a, np.zeros(3, bool))
