"""Federations of the real image datasets (NIH ChestX-ray14, LIDC-IDRI patches) from their
prepared caches, prepared on first use."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from medichain_jax.data import nih
from medichain_jax.data.federation import Federation, federation_from_rows
from medichain_jax.data.lidc_db import VENDORS
from medichain_jax.data.partition import hash_test_split, partition_by_feature, partition_groups
from medichain_jax.data.prepared import MANIFEST, PreparedSource, load_arrays
from sim.config import ConfigError, RunConfig
from sim.prepare import default_cache_dir, describe, prepare


def prepared_folder(config: RunConfig, progress: bool = True) -> tuple[Path, bool]:
    """``data_dir`` itself when it is a prepared folder, else its cache (built or reused), and
    whether its files' hashes were just checked (by ``prepare``)."""
    data_dir = Path(config.data_dir)
    if (data_dir / MANIFEST).is_file():
        return data_dir, False
    mode = "2d"
    out = (
        Path(config.cache_dir)
        if config.cache_dir
        else default_cache_dir(config.dataset, data_dir, config.image_size, mode)
    )
    manifest = prepare(
        config.dataset, data_dir, out, image_size=config.image_size, mode=mode, progress=progress
    )
    print(f"{config.dataset}: {describe(manifest)}\n({out})", file=sys.stderr)
    return out, True


def _source(config: RunConfig, progress: bool) -> tuple[dict[str, np.ndarray], dict]:
    folder, verified = prepared_folder(config, progress)
    source = PreparedSource(folder, verify_files=not verified)  # each SHA-256 checked once
    settings = source.manifest["settings"]
    if settings["dataset"] != config.dataset:
        raise ConfigError(f"data_dir: {folder} holds {settings['dataset']}, not {config.dataset}")
    return load_arrays(source), source.manifest


def nih_federation(config: RunConfig, progress: bool = True) -> Federation:
    """NIH ChestX-ray14: 14-finding multi-label images split by patient, Dirichlet over labels
    or detector pixel spacing; train/test by the official list (or a patient hash)."""
    a, manifest = _source(config, progress)
    meta = nih.NihMetadata(
        image=a["name"],
        patient=a["patient"],
        labels=a["labels"],
        age=a["age"],
        sex=a["sex"],
        view=a["view"],
        pixel_spacing=a["pixel_spacing"],
        skipped=[],
    )
    if config.partition == "pixel_spacing":  # groups of >= 1000 images (>= 10% on small data)
        min_images = min(1000, max(1, len(meta) // 10))
        hospital, names = nih.partition_by_pixel_spacing(meta, min_images=min_images)
    else:
        hospital, names = nih.partition(
            meta, config.partition, config.hospitals, config.alpha, config.seed
        )
    table = nih.label_table(meta, hospital)
    details = tuple(
        {
            "images": int(table["images"][h]),
            "patients": int(table["patients"][h]),
            "no_finding": int(table["no_finding"][h]),
            "findings": dict(zip(nih.FINDINGS, table["findings"][h].tolist(), strict=True)),
        }
        for h in range(len(names))
    )
    x = (a["image"].astype(np.float32) / 255.0)[..., None]
    return federation_from_rows(
        x,
        a["labels"],
        hospital,
        a["test"],
        names,
        name=f"nih-{config.partition}-{len(names)}h",
        details=details,
        info={"prepared": manifest["settings"], **_counts(manifest)},
        label_names=nih.FINDINGS,
    )


def vendor_index(manufacturer: np.ndarray) -> np.ndarray:
    """Index into VENDORS of each DICOM Manufacturer string (by its first word, any case);
    ``len(VENDORS)`` for anything else."""
    first = {v.split()[0].lower(): i for i, v in enumerate(VENDORS)}
    return np.array(
        [first.get((m.split() or [""])[0].lower(), len(VENDORS)) for m in manufacturer], np.int64
    )


def lidc_federation(config: RunConfig, progress: bool = True) -> Federation:
    """LIDC-IDRI nodules on prepared patches (malignancy, or masks for segmentation): hospitals
    by scanner vendor (the DICOM Manufacturer of each series), by slice spacing (patients sorted
    and cut into equal groups) or synthetic patient-level splits; 25% of patients test."""
    a, manifest = _source(config, progress)
    segment = config.task == "segmentation"
    ok = np.ones(a["label"].shape, bool) if segment else a["label"] >= 0
    patient, test = a["patient"][ok], hash_test_split(a["patient"][ok], 0.25, salt="lidc")
    if config.partition == "vendor":
        vendor = vendor_index(a["manufacturer"][ok])
        present = np.unique(vendor)
        names = [(*VENDORS, "other")[v] for v in present]
        hospital = np.searchsorted(present, vendor)
    elif config.partition == "thickness":  # feature-based: patients sorted by slice spacing
        spacing = a["slice_spacing"][ok]
        hospital = partition_by_feature(patient, spacing, config.hospitals)
        names = [
            f"{spacing[hospital == h].min():g}-{spacing[hospital == h].max():g} mm slices"
            for h in range(config.hospitals)
        ]
    else:
        names = [f"hospital {h}" for h in range(config.hospitals)]
        hospital = partition_groups(
            patient, config.partition, config.hospitals, config.seed, a["label"][ok], config.alpha
        )
    target = a["mask"][ok].reshape(int(ok.sum()), -1) if segment else a["label"][ok]
    return federation_from_rows(
        a["patch"][ok].astype(np.float32),
        target,
        hospital,
        test,
        names,
        name=f"lidc-{config.task}-{config.partition}-{len(names)}h",
        task=config.task,
        details=tuple(
            {"nodules": int((hospital == h).sum()), "patients": len(set(patient[hospital == h]))}
            for h in range(len(names))
        ),
        info={"prepared": manifest["settings"], **_counts(manifest)},
    )


def _counts(manifest: dict) -> dict:
    """Skipped-item counts from a prepare report (the lists stay in the manifest)."""
    return {k: (len(v) if isinstance(v, list | dict) else v) for k, v in manifest["report"].items()}


def prepared_federation(config: RunConfig, progress: bool = True) -> Federation:
    """The federation of a real image dataset named by ``config.dataset``."""
    if config.dataset == "nih":
        return nih_federation(config, progress)
    if config.dataset == "lidc":
        return lidc_federation(config, progress)
    raise ConfigError(f"dataset {config.dataset!r} has no prepared form")
