"""CT series from DICOM files (pydicom): find series anywhere under a root, load one as a HU
volume sorted along the slice normal, and report every file that could not be used.

Works for both TCIA layouts of LIDC-IDRI (``LIDC-IDRI-dddd/<study uid>/<series uid>/*.dcm`` and
the newer date-and-description folder names) because series are found by their
SeriesInstanceUID tag, never by folder names. A bad file never raises: it is skipped, and its
path and reason land in the returned report (only a series with no usable slice at all raises).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

PADDING_FLOOR_HU = -1024.0  # scanner padding (-2000, -3024) and anything below air is clipped here
METADATA_TAGS = (
    "Manufacturer",
    "ManufacturerModelName",
    "SliceThickness",
    "KVP",
    "ConvolutionKernel",
    "PatientID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
)
# a gap above this multiple of the median slice step counts as missing slices
MISSING_GAP = 1.5
# a step that is not a whole multiple of the median step within this fraction is "uneven"
UNEVEN_TOLERANCE = 0.01


@dataclasses.dataclass(frozen=True)
class BadFile:
    """A file that was skipped, and why."""

    path: str
    reason: str


@dataclasses.dataclass
class SeriesScan:
    """What :func:`find_series` saw under a root."""

    series: dict[str, list[str]]  # CT SeriesInstanceUID -> file paths
    skipped_series: dict[str, str]  # non-CT SeriesInstanceUID -> its Modality
    bad: list[BadFile]
    files_seen: int

    def summary(self) -> str:
        """One line of counts, for logs and progress output."""
        return (
            f"{self.files_seen} files: {len(self.series)} CT series, "
            f"{len(self.skipped_series)} non-CT series skipped, {len(self.bad)} bad files"
        )


@dataclasses.dataclass
class CTVolume:
    """One CT series in Hounsfield units, slices ordered along the slice normal."""

    hu: np.ndarray  # [slices, rows, cols] float32
    spacing: tuple[float, float, float]  # (slice step, row spacing, col spacing) in mm
    positions: np.ndarray  # [slices] position along the slice normal, increasing, mm
    sop_uids: list[str]  # SOPInstanceUID per slice, in volume order
    metadata: dict[str, str | float | None]
    missing_slices: int  # slices missing from gaps in the position sequence
    uneven_spacing: bool  # a step is not a whole multiple of the median step
    bad: list[BadFile]  # files of this series that could not be used


# files that sit beside the images in TCIA downloads and are not DICOM: annotations, licences
NOT_DICOM = (".xml", ".txt", ".csv", ".json", ".md")


def _candidate_files(root: Path) -> Iterable[Path]:
    for dirpath, _, names in os.walk(root):
        for name in sorted(names):
            if name.startswith(".") or name.lower().endswith(NOT_DICOM):
                continue
            yield Path(dirpath) / name


def _metadata(ds) -> dict[str, str | float | None]:
    out: dict[str, str | float | None] = {}
    for tag in METADATA_TAGS:
        value = ds.get(tag)
        if value is None or value == "":
            out[tag] = None
        elif tag in ("SliceThickness", "KVP"):
            out[tag] = float(value)
        else:
            out[tag] = str(value)
    return out


def find_series(root: str | Path) -> SeriesScan:
    """Group every DICOM file under ``root`` by SeriesInstanceUID (headers only).

    Non-DICOM or unreadable files and files without a SeriesInstanceUID are reported as bad;
    series whose Modality is not CT (LIDC also holds CR / DX localizer studies) are skipped and
    counted.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"DICOM root {root} is not a directory")
    series: dict[str, list[str]] = {}
    skipped: dict[str, str] = {}
    bad: list[BadFile] = []
    seen = 0
    for path in _candidate_files(root):
        seen += 1
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except InvalidDicomError:
            bad.append(BadFile(str(path), "not a DICOM file"))
            continue
        except Exception as err:  # truncated or corrupt header: report, keep going
            bad.append(BadFile(str(path), f"unreadable header: {type(err).__name__}: {err}"))
            continue
        uid = ds.get("SeriesInstanceUID")
        if not uid:
            bad.append(BadFile(str(path), "missing SeriesInstanceUID"))
            continue
        modality = str(ds.get("Modality", "") or "")
        if modality != "CT":
            skipped[str(uid)] = modality or "unknown"
            continue
        series.setdefault(str(uid), []).append(str(path))
    return SeriesScan(series=series, skipped_series=skipped, bad=bad, files_seen=seen)


def _slice_normal(orientation) -> np.ndarray:
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    normal = np.cross(row, col)
    return normal / np.linalg.norm(normal)


def _read_slice(path: str):
    """``(dataset, hu)`` of one slice, or a reason string why it cannot be used."""
    import pydicom

    try:
        ds = pydicom.dcmread(path)
    except Exception as err:
        return f"unreadable: {type(err).__name__}: {err}"
    for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        if ds.get(tag) is None:
            return f"missing tag {tag}"
    if "PixelData" not in ds:
        return "no pixel data"
    try:
        pixels = ds.pixel_array
    except Exception as err:  # truncated pixel data, unsupported transfer syntax
        return f"bad pixel data: {type(err).__name__}: {err}"
    if pixels.ndim != 2:
        return f"expected one 2D frame, got pixel array of shape {pixels.shape}"
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    hu = pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    return ds, np.maximum(hu, np.float32(PADDING_FLOOR_HU))


def load_series(paths: Iterable[str | Path]) -> CTVolume:
    """Load one CT series (its files in any order) as a HU volume.

    Slices are sorted by their position along the slice normal (the cross product of
    ImageOrientationPatient's row and column directions), so decreasing-z acquisitions come out
    in increasing order; pixels become HU by RescaleSlope / RescaleIntercept, and scanner padding
    is clipped to -1024 HU. Gaps in the position sequence are counted as missing slices; files
    that cannot be used (no pixel data, truncated, missing geometry, a shape or orientation that
    differs from the series) are skipped and reported. Raises ``ValueError`` naming the series
    only when no slice at all can be used.
    """
    paths = [str(p) for p in paths]
    bad: list[BadFile] = []
    slices = []
    for path in paths:
        got = _read_slice(path)
        if isinstance(got, str):
            bad.append(BadFile(path, got))
        else:
            slices.append((path, *got))
    if not slices:
        first = paths[0] if paths else "<no files>"
        raise ValueError(f"series of {first}: none of its {len(paths)} files holds a usable slice")
    ref = slices[0][1]
    normal = _slice_normal(ref.ImageOrientationPatient)
    shape = slices[0][2].shape
    kept = []
    for path, ds, hu in slices:
        if hu.shape != shape:
            bad.append(BadFile(path, f"slice shape {hu.shape} differs from the series' {shape}"))
        elif not np.allclose(_slice_normal(ds.ImageOrientationPatient), normal, atol=1e-3):
            bad.append(BadFile(path, "ImageOrientationPatient differs from the series'"))
        else:
            pos = float(np.dot(np.asarray(ds.ImagePositionPatient, float), normal))
            kept.append((pos, path, ds, hu))
    kept.sort(key=lambda item: item[0])
    dedup = [kept[0]]
    for item in kept[1:]:
        if abs(item[0] - dedup[-1][0]) < 1e-3:
            bad.append(BadFile(item[1], f"duplicate slice position {item[0]:.3f} mm"))
        else:
            dedup.append(item)
    kept = dedup
    positions = np.array([k[0] for k in kept])
    steps = np.diff(positions)
    if len(steps):
        step = float(np.median(steps))
        missing = int(np.sum(np.maximum(np.rint(steps / step) - 1, 0)[steps > MISSING_GAP * step]))
        multiple = steps / step  # a gap of k missing slices is k + 1 steps: not "uneven"
        uneven = bool(np.any(np.abs(multiple - np.rint(multiple)) > UNEVEN_TOLERANCE))
    else:
        thickness = ref.get("SliceThickness")
        step, missing, uneven = float(thickness) if thickness else 0.0, 0, False
    row_mm, col_mm = (float(v) for v in ref.PixelSpacing)
    return CTVolume(
        hu=np.stack([k[3] for k in kept]).astype(np.float32),
        spacing=(step, row_mm, col_mm),
        positions=positions,
        sop_uids=[str(k[2].get("SOPInstanceUID", "")) for k in kept],
        metadata=_metadata(ref),
        missing_slices=missing,
        uneven_spacing=uneven,
        bad=bad,
    )
