"""LIDC XML annotations: parsing, masks rebuilt against hand-drawn ground truth, nodule matching
across readers, consensus masks, and clear errors for malformed files."""

from pathlib import Path

import numpy as np
import pytest

from medichain_jax.data.lidc_xml import (
    LidcXmlError,
    Roi,
    consensus_mask,
    find_annotations,
    match_nodules,
    nodule_mask,
    parse_lidc_xml,
    slice_index,
)

SOPS = ["1.1", "1.2", "1.3", "1.4"]
POSITIONS = np.array([-30.0, -27.5, -25.0, -22.5])
SHAPE = (12, 12)


def square(x0, y0, x1, y1):
    """Outline pixels of a rectangle, in contour order (as LIDC edge maps list them)."""
    top = [(x, y0) for x in range(x0, x1 + 1)]
    right = [(x1, y) for y in range(y0 + 1, y1 + 1)]
    bottom = [(x, y1) for x in range(x1 - 1, x0 - 1, -1)]
    left = [(x0, y) for y in range(y1 - 1, y0, -1)]
    return top + right + bottom + left


def roi_xml(z, sop, points, inclusion=True):
    edges = "".join(
        f"<edgeMap><xCoord>{x}</xCoord><yCoord>{y}</yCoord></edgeMap>" for x, y in points
    )
    sop_xml = f"<imageSOP_UID>{sop}</imageSOP_UID>" if sop else ""
    inc = "TRUE" if inclusion else "FALSE"
    return (
        f"<roi><imageZposition>{z}</imageZposition>{sop_xml}<inclusion>{inc}</inclusion>"
        f"{edges}</roi>"
    )


CHARS = (
    "<characteristics><subtlety>5</subtlety><internalStructure>1</internalStructure>"
    "<calcification>6</calcification><sphericity>4</sphericity><margin>3</margin>"
    "<lobulation>2</lobulation><spiculation>1</spiculation><texture>5</texture>"
    "<malignancy>{m}</malignancy></characteristics>"
)


def lidc_xml(sessions, series_uid="9.9.9"):
    body = "".join(f"<readingSession>{s}</readingSession>" for s in sessions)
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<LidcReadMessage xmlns="http://www.nih.gov" uid="1">'
        f"<ResponseHeader><SeriesInstanceUid>{series_uid}</SeriesInstanceUid></ResponseHeader>"
        f"{body}</LidcReadMessage>"
    )


@pytest.fixture
def xml_file(tmp_path):
    a = (
        "<servicingRadiologistID>reader-a</servicingRadiologistID>"
        "<unblindedReadNodule><noduleID>N1</noduleID>"
        + CHARS.format(m=4)
        # slice 1 by SOP UID, with an exclusion; slice 2 by z only (no SOP UID); one far away
        + roi_xml(-27.5, "1.2", square(2, 3, 6, 7))
        + roi_xml(-27.5, "1.2", square(3, 4, 5, 6), inclusion=False)
        + roi_xml(-25.1, "", square(3, 4, 5, 6))
        + roi_xml(40.0, "", square(3, 4, 5, 6))
        + "</unblindedReadNodule>"
        "<unblindedReadNodule><noduleID>small-1</noduleID>"
        + roi_xml(-22.5, "1.4", [(9, 9)])
        + "</unblindedReadNodule>"
        "<nonNodule><nonNoduleID>NN1</nonNoduleID><imageZposition>-30.0</imageZposition>"
        "<imageSOP_UID>1.1</imageSOP_UID><locus><xCoord>1</xCoord><yCoord>10</yCoord></locus>"
        "</nonNodule>"
    )
    b = (
        "<servicingRadiologistID>reader-b</servicingRadiologistID>"
        "<unblindedReadNodule><noduleID>IL057</noduleID>"
        + CHARS.format(m=5)
        # the same nodule one pixel to the right
        + roi_xml(-27.5, "1.2", square(3, 3, 7, 7))
        + "</unblindedReadNodule>"
    )
    path = tmp_path / "069.xml"
    path.write_text(lidc_xml([a, b]))
    return path


def test_parse_sessions_characteristics_small_nodules_and_non_nodules(xml_file):
    ann = parse_lidc_xml(xml_file)
    assert ann.series_uid == "9.9.9" and ann.readers == ("reader-a", "reader-b")
    big, small, other = ann.nodules
    assert big.characteristics["malignancy"] == 4 and len(big.characteristics) == 9
    assert other.characteristics["malignancy"] == 5 and other.reader == "reader-b"
    assert [r.inclusion for r in big.rois] == [True, False, True, True]
    assert small.small and not big.small and small.rois[0].points.tolist() == [[9, 9]]
    (nn,) = ann.non_nodules
    assert (nn.reader, nn.non_nodule_id, nn.sop_uid, nn.point) == (
        "reader-a",
        "NN1",
        "1.1",
        (1, 10),
    )


def test_masks_match_hand_drawn_ground_truth(xml_file):
    big, small, other = parse_lidc_xml(xml_file).nodules
    mask, unmapped = nodule_mask(big, SOPS, POSITIONS, SHAPE)
    truth = np.zeros((4, *SHAPE), bool)
    truth[1, 3:8, 2:7] = True  # 5 x 5 square on the slice of SOP 1.2
    truth[1, 5, 4] = False  # the exclusion's single interior pixel; its outline stays
    truth[2, 4:7, 3:6] = True  # 3 x 3 square mapped by nearest z (-25.1 -> -25.0)
    dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
    assert dice == 1.0
    assert [r.z for r in unmapped] == [40.0]  # reported, not silently dropped
    small_mask, _ = nodule_mask(small, SOPS, POSITIONS, SHAPE)
    assert small_mask.sum() == 1 and small_mask[3, 9, 9]


def test_slice_index_by_uid_then_nearest_z():
    pts = np.array([[0, 0]])
    assert slice_index(Roi(99.0, "1.3", True, pts), SOPS, POSITIONS) == 2  # UID wins over z
    assert slice_index(Roi(-23.0, "x", True, pts), SOPS, POSITIONS) == 3
    assert slice_index(Roi(-23.0, "", True, pts), SOPS, POSITIONS, tolerance_mm=0.1) is None


def test_nodules_matched_across_readers_and_consensus(xml_file):
    nodules = parse_lidc_xml(xml_file).nodules
    groups = match_nodules(nodules, spacing_xy=(0.7, 0.7))
    assert sorted(sorted(n.nodule_id for n in g) for g in groups) == [["IL057", "N1"], ["small-1"]]
    a, b = next(g for g in groups if len(g) == 2)
    ma, _ = nodule_mask(a, SOPS, POSITIONS, SHAPE)
    mb, _ = nodule_mask(b, SOPS, POSITIONS, SHAPE)
    union, both = consensus_mask([ma, mb], 1), consensus_mask([ma, mb], 2)
    np.testing.assert_array_equal(union, ma | mb)
    np.testing.assert_array_equal(both, ma & mb)
    assert both[1].sum() == 5 * 4 - 1  # columns 3-6 overlap, minus a's excluded pixel
    with pytest.raises(ValueError, match="at_least"):
        consensus_mask([ma, mb], 3)


def test_one_reader_never_matched_to_itself(tmp_path):
    a = (
        "<servicingRadiologistID>r</servicingRadiologistID>"
        "<unblindedReadNodule><noduleID>1</noduleID>"
        + roi_xml(-27.5, "1.2", [(4, 4)])
        + "</unblindedReadNodule><unblindedReadNodule><noduleID>2</noduleID>"
        + roi_xml(-27.5, "1.2", [(5, 4)])
        + "</unblindedReadNodule>"
    )
    path = tmp_path / "a.xml"
    path.write_text(lidc_xml([a]))
    groups = match_nodules(parse_lidc_xml(path).nodules, spacing_xy=(0.7, 0.7))
    assert len(groups) == 2


@pytest.mark.parametrize(
    "body, needle",
    [
        (
            "<unblindedReadNodule><noduleID>N9</noduleID><roi><imageSOP_UID>1</imageSOP_UID>"
            "<edgeMap><xCoord>1</xCoord><yCoord>1</yCoord></edgeMap></roi></unblindedReadNodule>",
            r"nodule N9 has no <imageZposition>",
        ),
        (
            "<unblindedReadNodule><noduleID>N8</noduleID>"
            + roi_xml("abc", "1", [(1, 1)])
            + "</unblindedReadNodule>",
            r"nodule N8 <imageZposition> is not a number: 'abc'",
        ),
        (
            "<unblindedReadNodule><noduleID>N7</noduleID><roi><imageZposition>1</imageZposition>"
            "</roi></unblindedReadNodule>",
            r"nodule N7 has no edge map points",
        ),
    ],
)
def test_malformed_annotations_name_file_and_element(tmp_path, body, needle):
    path = tmp_path / "bad.xml"
    path.write_text(lidc_xml([body]))
    with pytest.raises(LidcXmlError, match=needle) as info:
        parse_lidc_xml(path)
    assert str(path) in str(info.value)
    path.write_text("<LidcReadMessage><unclosed>")
    with pytest.raises(LidcXmlError, match="cannot parse XML"):
        parse_lidc_xml(path)


def test_find_annotations_by_series_uid(xml_file, tmp_path):
    sub = tmp_path / "LIDC-IDRI-0002" / "x"
    sub.mkdir(parents=True)
    (sub / "broken.xml").write_text("<LidcReadMessage")
    (sub / "noheader.xml").write_text('<LidcReadMessage xmlns="http://www.nih.gov"/>')
    found, bad = find_annotations(tmp_path)
    assert found == {"9.9.9": [str(xml_file)]}
    reasons = {Path(p).name: r for p, r in bad}
    assert "cannot parse XML" in reasons["broken.xml"]
    assert reasons["noheader.xml"] == "no SeriesInstanceUid in ResponseHeader"
