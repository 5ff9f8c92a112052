"""NIH ChestX-ray14 metadata (``Data_Entry_2017*.csv``, plain or gzipped) and patient-level
partitions: IID by patient, Dirichlet over labels, and a natural-like split by detector pixel
spacing. No patient ever sits in two hospitals.

Reads both header spellings (``Patient Gender`` / ``Patient Sex``). Rows that cannot be parsed
are skipped and reported with file, line and reason; an unknown finding name is such a row.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
from pathlib import Path

import numpy as np

from medichain_jax.data.partition import (
    RngLike,
    dirichlet_partition,
    hash_test_split,
    iid_partition,
)

FINDINGS = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NO_FINDING = "No Finding"
SEX_COLUMNS = ("Patient Gender", "Patient Sex")
PARTITIONS = ("patient", "dirichlet", "pixel_spacing")


class NihMetadataError(ValueError):
    """The metadata file itself is unusable (missing, or a required column is absent)."""


@dataclasses.dataclass(frozen=True)
class SkippedRow:
    """A metadata row that was not used, and why."""

    path: str
    line: int
    reason: str


@dataclasses.dataclass
class NihMetadata:
    """One row per image, in file order."""

    image: np.ndarray  # [n] str: Image Index (file name)
    patient: np.ndarray  # [n] int64
    labels: np.ndarray  # [n, 14] uint8 multi-hot over FINDINGS (all zero: No Finding)
    age: np.ndarray  # [n] float32 (NaN where not given)
    sex: np.ndarray  # [n] str: "M" / "F" / ""
    view: np.ndarray  # [n] str: "PA" / "AP"
    pixel_spacing: np.ndarray  # [n] float64, mm (OriginalImagePixelSpacing x)
    skipped: list[SkippedRow]

    def __len__(self) -> int:
        return int(self.image.shape[0])


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")  # noqa: SIM115


def read_entries(path: str | Path) -> NihMetadata:
    """Read ``Data_Entry_2017*.csv[.gz]``; bad rows are skipped and listed in ``skipped``."""
    path = Path(path)
    if not path.is_file():
        raise NihMetadataError(f"NIH metadata file {path} does not exist")
    finding_index = {name: i for i, name in enumerate(FINDINGS)}
    cols: dict[str, list] = {k: [] for k in ("image", "patient", "labels", "age", "sex", "view")}
    cols["pixel_spacing"] = []
    skipped: list[SkippedRow] = []
    with _open_text(path) as f:
        reader = csv.reader(f)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise NihMetadataError(f"{path}: empty file") from None
        where = {h: i for i, h in enumerate(header)}
        sex_col = next((c for c in SEX_COLUMNS if c in where), None)
        required = ["Image Index", "Finding Labels", "Patient ID", "View Position"]
        missing = [c for c in required if c not in where]
        spacing_col = next(
            (i for i, h in enumerate(header) if h.startswith("OriginalImagePixel")), None
        )
        if missing or sex_col is None or spacing_col is None:
            need = missing + ([] if sex_col else [" or ".join(SEX_COLUMNS)])
            need += [] if spacing_col is not None else ["OriginalImagePixelSpacing[x,y]"]
            raise NihMetadataError(f"{path}: missing column(s) {need}; header is {header}")
        for line, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            try:
                if len(row) <= spacing_col:
                    raise ValueError(f"{len(row)} fields, expected at least {spacing_col + 1}")
                multi = np.zeros(len(FINDINGS), np.uint8)
                for name in row[where["Finding Labels"]].split("|"):
                    name = name.strip()
                    if name == NO_FINDING:
                        continue
                    if name not in finding_index:
                        raise ValueError(f"unknown finding {name!r}")
                    multi[finding_index[name]] = 1
                patient = int(row[where["Patient ID"]])
                age_text = row[where["Patient Age"]].strip() if "Patient Age" in where else ""
                age = float(age_text.rstrip("Y")) if age_text else float("nan")
                spacing = float(row[spacing_col])
            except ValueError as err:
                skipped.append(SkippedRow(str(path), line, str(err)))
                continue
            cols["image"].append(row[where["Image Index"]].strip())
            cols["patient"].append(patient)
            cols["labels"].append(multi)
            cols["age"].append(age)
            cols["sex"].append(row[where[sex_col]].strip())
            cols["view"].append(row[where["View Position"]].strip())
            cols["pixel_spacing"].append(spacing)
    n = len(cols["image"])
    return NihMetadata(
        image=np.asarray(cols["image"], dtype=str),
        patient=np.asarray(cols["patient"], np.int64),
        labels=np.asarray(cols["labels"], np.uint8).reshape(n, len(FINDINGS)),
        age=np.asarray(cols["age"], np.float32),
        sex=np.asarray(cols["sex"], dtype=str),
        view=np.asarray(cols["view"], dtype=str),
        pixel_spacing=np.asarray(cols["pixel_spacing"], np.float64),
        skipped=skipped,
    )


def official_split(meta: NihMetadata, test_list: str | Path) -> np.ndarray:
    """``[n]`` bool, True for images named in the official ``test_list.txt``."""
    names = {line.strip() for line in Path(test_list).read_text().splitlines() if line.strip()}
    return np.isin(meta.image, list(names))


def hash_split(meta: NihMetadata, test_fraction: float = 0.2, salt: str = "") -> np.ndarray:
    """``[n]`` bool test mask decided per patient by a hash of its id: deterministic, no
    patient in both train and test, about ``test_fraction`` of the patients in test."""
    return hash_test_split(meta.patient, test_fraction, salt)


def _expand(patients: np.ndarray, groups: list[np.ndarray], meta: NihMetadata) -> np.ndarray:
    """Per-image hospital id from groups of indices into ``patients``."""
    hospital_of = np.full(patients.shape[0], -1, np.int64)
    for h, idx in enumerate(groups):
        hospital_of[idx] = h
    return hospital_of[np.searchsorted(patients, meta.patient)]


def partition_by_patient(meta: NihMetadata, num_hospitals: int, rng: RngLike) -> np.ndarray:
    """``[n]`` hospital id: patients shuffled and split into near-equal groups (IID)."""
    patients = np.unique(meta.patient)
    return _expand(patients, iid_partition(rng, patients.shape[0], num_hospitals), meta)


def patient_primary_label(meta: NihMetadata) -> tuple[np.ndarray, np.ndarray]:
    """Sorted patient ids and each one's most frequent finding over its images
    (``len(FINDINGS)`` = No Finding); ties go to the lower index."""
    patients, inverse = np.unique(meta.patient, return_inverse=True)
    counts = np.zeros((patients.shape[0], len(FINDINGS) + 1), np.int64)
    np.add.at(counts, inverse, np.concatenate([meta.labels, (meta.labels.sum(1) == 0)[:, None]], 1))
    return patients, counts.argmax(1)


def partition_dirichlet(
    meta: NihMetadata, num_hospitals: int, alpha: float, rng: RngLike
) -> np.ndarray:
    """``[n]`` hospital id: Dirichlet(alpha) label skew over patients' primary findings (Hsu et
    al. 2019), every patient in one hospital."""
    patients, primary = patient_primary_label(meta)
    groups = dirichlet_partition(rng, primary, num_hospitals, alpha)
    return _expand(patients, groups, meta)


def spacing_groups(meta: NihMetadata, decimals: int = 3) -> np.ndarray:
    """``[n]`` detector pixel spacing rounded to ``decimals`` mm (the acquisition device)."""
    return np.round(meta.pixel_spacing, decimals)


def partition_by_pixel_spacing(
    meta: NihMetadata, min_images: int = 1000, decimals: int = 3
) -> tuple[np.ndarray, list[str]]:
    """``[n]`` hospital id and names: one hospital per detector pixel-spacing group with at
    least ``min_images`` images (the rest pooled as ``other``), largest first. A patient imaged
    on several detectors goes wholly to the group holding most of its images (ties: the larger
    group)."""
    group = spacing_groups(meta, decimals)
    values, counts = np.unique(group, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    big = [v for v in values[order] if counts[values == v][0] >= min_images]
    names = [f"{v:.{decimals}f} mm" for v in big]
    gid = np.full(len(meta), len(big), np.int64)  # "other"
    for h, v in enumerate(big):
        gid[group == v] = h
    if (gid == len(big)).any():
        names.append("other")
    patients, inverse = np.unique(meta.patient, return_inverse=True)
    per = np.zeros((patients.shape[0], len(names)), np.int64)
    np.add.at(per, (inverse, gid), 1)
    # most images; ties to the lower group id (= the larger group)
    return per.argmax(1)[inverse], names


def label_table(meta: NihMetadata, hospital: np.ndarray) -> dict[str, np.ndarray]:
    """Per-hospital counts: ``images``, ``patients``, ``no_finding`` and ``[hospitals, 14]``
    ``findings`` (a row's prevalences = findings / images)."""
    hospitals = int(hospital.max()) + 1
    findings = np.zeros((hospitals, len(FINDINGS)), np.int64)
    np.add.at(findings, hospital, meta.labels.astype(np.int64))
    return {
        "images": np.bincount(hospital, minlength=hospitals),
        "patients": np.array(
            [np.unique(meta.patient[hospital == h]).shape[0] for h in range(hospitals)]
        ),
        "no_finding": np.bincount(hospital[meta.labels.sum(1) == 0], minlength=hospitals),
        "findings": findings,
    }


def partition(
    meta: NihMetadata, kind: str, num_hospitals: int = 5, alpha: float = 0.5, seed: int = 0
) -> tuple[np.ndarray, list[str]]:
    """Any partition by name: ``patient``, ``dirichlet`` or ``pixel_spacing`` (its own
    number of hospitals)."""
    if kind == "patient":
        hosp = partition_by_patient(meta, num_hospitals, seed)
    elif kind == "dirichlet":
        hosp = partition_dirichlet(meta, num_hospitals, alpha, seed)
    elif kind == "pixel_spacing":
        return partition_by_pixel_spacing(meta)
    else:
        raise ValueError(f"unknown NIH partition {kind!r}; choose from {PARTITIONS}")
    return hosp, [f"hospital {h}" for h in range(num_hospitals)]
