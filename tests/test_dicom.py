"""DICOM CT series reader on small TCIA-like trees written with pydicom, and pydicom's CT_small."""

from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid  # noqa: E402

from medichain_jax.data.dicom import find_series, load_series  # noqa: E402

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


def write_slice(
    path: Path,
    series_uid: str,
    z: float,
    stored: np.ndarray,
    *,
    slope: float = 1.0,
    intercept: float = -1024.0,
    modality: str = "CT",
    pixels: bool = True,
    patient: str = "LIDC-IDRI-0001",
    manufacturer: str = "SIEMENS",
) -> str:
    """One single-frame image file; returns its SOPInstanceUID."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage if modality == "CT" else CR_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PatientID = patient
    ds.StudyInstanceUID = "1.2.3.4"
    ds.SeriesInstanceUID = series_uid
    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = "Sensation 16"
    ds.SliceThickness = "2.5"
    ds.KVP = "120"
    ds.ConvolutionKernel = "B30f"
    ds.ImagePositionPatient = [-100.0, -120.0, z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.7, 0.8]
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    if pixels:
        ds.PixelData = stored.astype(np.int16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return ds.SOPInstanceUID


def stored_slice(k: int) -> np.ndarray:
    """Stored values of slice k (distinct per slice; one padding pixel of -2000 after rescale)."""
    img = (np.arange(12, dtype=np.int16).reshape(3, 4) * 10 + 100 * k).astype(np.int16)
    img[0, 0] = -976  # * 1 - 1024 = -2000 HU: scanner padding
    return img


@pytest.fixture
def tcia_tree(tmp_path):
    """Two layouts, shuffled names, decreasing z, a CR localizer, a missing slice, a truncated
    file, a file without pixel data, and a non-DICOM file."""
    rng = np.random.default_rng(0)
    root = tmp_path / "LIDC"
    old = generate_uid()  # classic layout, z decreasing with the slice index, slice 3 missing
    new = generate_uid()  # newer layout, slope 2 / intercept -1000
    truth = {}
    zs = [-10.0 - 2.5 * k for k in range(6)]
    names = rng.permutation(len(zs))
    for k, z in enumerate(zs):
        if k == 3:
            continue
        path = root / "LIDC-IDRI-0001" / "1.2.3.4" / old / f"{names[k]:06d}.dcm"
        truth[(old, z)] = write_slice(path, old, z, stored_slice(k))
    newdir = root / "LIDC-IDRI-0002" / "01-01-2000-NA-CT CHEST-12345" / "3000566.000000-NA-03192"
    for k in range(4):
        z = 5.0 + 1.25 * k
        write_slice(
            newdir / f"1-{names[k]:02d}.dcm", new, z, stored_slice(k), slope=2.0, intercept=-1000.0
        )
    cr = generate_uid()
    write_slice(root / "LIDC-IDRI-0001" / "cr" / "1.dcm", cr, 0.0, stored_slice(0), modality="CR")
    bad_dir = root / "LIDC-IDRI-0002" / "01-01-2000-NA-CT CHEST-12345" / "3000566.000000-NA-03192"
    write_slice(bad_dir / "nopixels.dcm", new, 100.0, stored_slice(0), pixels=False)
    full = bad_dir / "truncated.dcm"
    write_slice(full, new, 200.0, stored_slice(0))
    data = full.read_bytes()
    full.write_bytes(data[: len(data) - 10])
    (root / "LIDC-IDRI-0001" / "scan.raw").write_text("not dicom")
    (root / "LIDC-IDRI-0001" / "069.xml").write_text("<LidcReadMessage/>")  # annotations: ignored
    return root, old, new, cr, truth


def test_find_series_groups_by_uid_in_both_layouts(tcia_tree):
    root, old, new, cr, _ = tcia_tree
    scan = find_series(root)
    assert set(scan.series) == {old, new}
    assert len(scan.series[old]) == 5 and len(scan.series[new]) == 6  # + 2 bad files in series
    assert scan.skipped_series == {cr: "CR"}
    assert [(Path(b.path).name, b.reason) for b in scan.bad] == [("scan.raw", "not a DICOM file")]
    assert scan.files_seen == 13
    assert "2 CT series, 1 non-CT series skipped, 1 bad files" in scan.summary()


def test_load_series_orders_slices_converts_hu_and_reports_gaps(tcia_tree):
    root, old, _, _, truth = tcia_tree
    vol = load_series(find_series(root).series[old])
    assert vol.hu.shape == (5, 3, 4) and vol.hu.dtype == np.float32
    # increasing position along the normal (0, 0, 1): slices 5, 4, 2, 1, 0 of the acquisition
    np.testing.assert_allclose(vol.positions, [-22.5, -20.0, -15.0, -12.5, -10.0])
    for i, k in enumerate([5, 4, 2, 1, 0]):
        want = stored_slice(k).astype(np.float32) - 1024.0
        want[0, 0] = -1024.0  # -2000 HU padding clipped
        np.testing.assert_array_equal(vol.hu[i], want)
        assert vol.sop_uids[i] == truth[(vol.metadata["SeriesInstanceUID"], -10.0 - 2.5 * k)]
    assert vol.spacing == (2.5, 0.7, 0.8)
    assert vol.missing_slices == 1 and not vol.uneven_spacing
    assert vol.metadata["Manufacturer"] == "SIEMENS" and vol.metadata["KVP"] == 120.0
    assert vol.metadata["ConvolutionKernel"] == "B30f" and vol.metadata["SliceThickness"] == 2.5
    assert vol.bad == []


def test_bad_files_are_reported_and_good_slices_load(tcia_tree):
    root, _, new, _, _ = tcia_tree
    vol = load_series(find_series(root).series[new])
    assert vol.hu.shape == (4, 3, 4)
    want = stored_slice(0).astype(np.float32) * 2.0 - 1000.0
    want[0, 0] = -1024.0  # -2952 HU padding clipped
    np.testing.assert_array_equal(vol.hu[0], want)
    reasons = {Path(b.path).name: b.reason for b in vol.bad}
    assert reasons["nopixels.dcm"] == "no pixel data"
    assert reasons["truncated.dcm"].startswith(("bad pixel data", "unreadable"))
    assert all(str(root) in b.path for b in vol.bad)
    assert vol.spacing[0] == 1.25 and vol.missing_slices == 0


def test_uneven_spacing_and_duplicates(tmp_path):
    uid = generate_uid()
    for i, z in enumerate([0.0, 1.0, 2.0, 3.4, 3.4]):
        write_slice(tmp_path / f"{i}.dcm", uid, z, stored_slice(i))
    vol = load_series(sorted(tmp_path.glob("*.dcm")))
    assert vol.uneven_spacing and vol.hu.shape[0] == 4
    assert [b.reason for b in vol.bad] == ["duplicate slice position 3.400 mm"]


def test_series_without_usable_slices_names_a_file(tmp_path):
    uid = generate_uid()
    write_slice(tmp_path / "a.dcm", uid, 0.0, stored_slice(0), pixels=False)
    with pytest.raises(ValueError, match=r"a\.dcm.*none of its 1 files"):
        load_series([tmp_path / "a.dcm"])
    with pytest.raises(FileNotFoundError, match="not a directory"):
        find_series(tmp_path / "nope")


def test_pydicom_ct_small_loads_with_hu_and_metadata():
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    vol = load_series([path])
    want = np.maximum(ds.pixel_array.astype(np.float32) * 1.0 - 1024.0, -1024.0)
    np.testing.assert_array_equal(vol.hu[0], want)
    assert vol.hu.shape == (1, 128, 128)
    assert vol.metadata["Manufacturer"] == "GE MEDICAL SYSTEMS"
    assert vol.metadata["KVP"] == 120.0 and vol.metadata["SliceThickness"] == 5.0
    assert vol.spacing == (5.0, 0.661468, 0.661468)
    assert vol.metadata["ConvolutionKernel"] == "STANDARD"
