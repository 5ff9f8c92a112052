"""``python -m sim.prepare {nih,lidc} --data-dir RAW --out DIR``: decode and preprocess a real
dataset once into a verified cache (``.npy`` arrays + ``manifest.json`` with SHA-256s).

A second prepare with the same source and settings reuses the cache; a missing or corrupted
cache file is detected by its hash and the cache rebuilt. Bad input files are skipped, counted
and listed in the manifest's report, never fatal.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from medichain_jax.data import nih
from medichain_jax.data.dicom import find_series, load_series
from medichain_jax.data.lidc_samples import nodule_samples
from medichain_jax.data.lidc_xml import LidcXmlError, find_annotations, parse_lidc_xml
from medichain_jax.data.nih_images import find_images, load_images
from medichain_jax.data.prepared import (
    FORMAT,
    MANIFEST,
    PreparedDataError,
    file_sha256,
    read_manifest,
    verify,
)

DATASETS = ("nih", "lidc")
PREP_VERSION = 3  # bump when preprocessing changes: older caches are then rebuilt
CHUNK = 64  # images per task and progress-bar step


def _source_signature(root: Path, patterns: tuple[str, ...]) -> str:
    """Hash of the source tree's file names, sizes and modification times (not contents)."""
    digest = hashlib.sha256()
    for pattern in patterns:
        for path in sorted(root.glob(pattern)):
            st = path.stat()
            digest.update(f"{path.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _find_csv(root: Path) -> Path:
    found = sorted(root.glob("Data_Entry_2017*.csv*"))
    if not found:
        raise FileNotFoundError(f"{root}: no Data_Entry_2017*.csv(.gz) metadata file")
    return found[0]


def build_nih(root: Path, size: int, progress: bool) -> tuple[dict[str, np.ndarray], dict]:
    """NIH ChestX-ray14 images resized to ``size`` (uint8) with their metadata and split."""
    meta = nih.read_entries(_find_csv(root))
    index = find_images(root)
    images, kept, missing, bad = [], [], [], []
    bar = tqdm(total=len(meta), desc="nih images", unit="img", disable=not progress)
    starts = range(0, len(meta), CHUNK)
    # PNG decoding releases the GIL: chunks decode on all cores, results stay in order
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        parts = pool.map(lambda s: load_images(meta.image[s : s + CHUNK], index, size), starts)
        for start, part in zip(starts, parts, strict=True):
            images.append(np.rint(part.images * 255).astype(np.uint8))
            kept.append(part.kept + start)
            missing += part.missing
            bad += part.bad
            bar.update(min(CHUNK, len(meta) - start))
    bar.close()
    keep = np.concatenate(kept) if kept else np.zeros(0, np.int64)
    test_list = root / "test_list.txt"
    if test_list.is_file():
        test, split = nih.official_split(meta, test_list), "official test_list.txt"
    else:
        test, split = nih.hash_split(meta), "patient-id hash, 20% test"
    arrays = {
        "image": np.concatenate(images) if images else np.zeros((0, size, size), np.uint8),
        "name": meta.image[keep],
        "patient": meta.patient[keep],
        "labels": meta.labels[keep],
        "age": meta.age[keep],
        "sex": meta.sex[keep],
        "view": meta.view[keep],
        "pixel_spacing": meta.pixel_spacing[keep],
        "test": test[keep],
    }
    report = {
        "rows": len(meta),
        "images": int(keep.size),
        "split": split,
        "skipped_rows": [dataclasses.asdict(r) for r in meta.skipped],
        "missing_images": missing,
        "bad_files": [dataclasses.asdict(b) for b in bad + index.duplicates],
    }
    return arrays, report


def build_lidc(
    root: Path, size: int, mode: str, progress: bool
) -> tuple[dict[str, np.ndarray], dict]:
    """Per-nodule LIDC-IDRI patches (windowed, isotropic 1 mm), consensus masks and labels."""
    scan = find_series(root)
    xml_of, xml_bad = find_annotations(root)
    names = ("patch", "mask", "label", "ratings", "num_readers", "slice_spacing")
    cols: dict[str, list] = {k: [] for k in names}
    per_row: dict[str, list] = {"series": [], "patient": [], "manufacturer": []}
    skipped, bad = [], [*scan.bad]
    series = sorted(uid for uid in scan.series if uid in xml_of)
    for uid in tqdm(series, desc="lidc series", unit="series", disable=not progress):
        try:
            volume = load_series(scan.series[uid])
            notes = [parse_lidc_xml(p) for p in xml_of[uid]]
        except (ValueError, LidcXmlError) as err:
            skipped.append({"series": uid, "reason": str(err)})
            continue
        bad += volume.bad
        s = nodule_samples(volume, notes, patch_size=size, mode=mode)
        skipped += [{"series": uid, "item": w, "reason": r} for w, r in s.skipped]
        cols["patch"].append(s.patches.astype(np.float16))
        cols["mask"].append(s.masks)
        cols["label"].append(s.label)
        cols["ratings"].append(s.ratings[:, :4])
        cols["num_readers"].append(s.num_readers)
        cols["slice_spacing"].append(np.full(len(s), float(volume.spacing[0])))
        for key, value in (
            ("series", uid),
            ("patient", s.patient_id),
            ("manufacturer", s.manufacturer),
        ):
            per_row[key].append(np.full(len(s), value))
    channels = 1 if mode == "2d" else 3
    empty = {
        "patch": np.zeros((0, size, size, channels), np.float16),
        "mask": np.zeros((0, size, size), bool),
        "ratings": np.zeros((0, 4), np.int64),
    }
    arrays = {
        k: np.concatenate(v) if v else empty.get(k, np.zeros(0, np.int64)) for k, v in cols.items()
    }
    for key, parts in per_row.items():
        arrays[key] = np.concatenate(parts).astype(str) if parts else np.zeros(0, str)
    report = {
        "series_found": len(scan.series),
        "series_with_annotations": len(series),
        "series_without_annotations": len(scan.series) - len(series),
        "non_ct_series": scan.skipped_series,
        "nodules": int(arrays["label"].size),
        "bad_files": [dataclasses.asdict(b) for b in bad],
        "bad_xml": [{"path": p, "reason": r} for p, r in xml_bad],
        "skipped": skipped,
    }
    return arrays, report


def _settings(dataset: str, image_size: int, mode: str) -> dict[str, Any]:
    return {"dataset": dataset, "image_size": image_size, "version": PREP_VERSION} | (
        {"mode": mode} if dataset == "lidc" else {}
    )


def _signature(dataset: str, root: Path) -> str:
    patterns = ("Data_Entry_2017*", "*list*.txt", "**/images*/**/*.png")
    return _source_signature(root, patterns if dataset == "nih" else ("**/*",))


def prepare(
    dataset: str,
    data_dir: str | Path,
    out: str | Path,
    *,
    image_size: int = 64,
    mode: str = "2d",
    progress: bool = True,
    force: bool = False,
) -> dict[str, Any]:
    """Build (or reuse) the cache of ``dataset`` from ``data_dir`` in ``out``; returns the
    manifest, with ``status`` ``reused`` / ``built`` / ``rebuilt`` and the reason."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {DATASETS}")
    root, out = Path(data_dir).resolve(), Path(out)
    if not root.is_dir():
        raise FileNotFoundError(f"data dir {root} does not exist")
    settings = _settings(dataset, image_size, mode)
    source = {"path": str(root), "signature": _signature(dataset, root)}
    reason = "no cache yet"
    try:
        old = read_manifest(out)
    except PreparedDataError as err:
        old, reason = None, str(err)
    if old is not None:  # cheap checks first: hashing a large cache takes a while
        if force:
            reason = "--force"
        elif old["settings"] != settings or old["source"] != source:
            reason = "settings or source files changed"
        elif problems := verify(out, old):
            reason = "; ".join(problems)
        else:
            return {**old, "status": "reused", "reason": "hashes verified"}
    build = build_nih if dataset == "nih" else build_lidc
    extra = (image_size,) if dataset == "nih" else (image_size, mode)
    arrays, report = build(root, *extra, progress)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = {}
    for key, value in arrays.items():
        np.save(tmp / f"{key}.npy", value, allow_pickle=False)
        path = tmp / f"{key}.npy"
        files[path.name] = {"sha256": file_sha256(path), "bytes": path.stat().st_size}
    manifest = {
        "format": FORMAT,
        "settings": settings,
        "source": source,
        "rows": int(len(next(iter(arrays.values())))),
        "files": files,
        "report": report,
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)  # the cache appears whole or not at all
    status = "built" if reason == "no cache yet" else "rebuilt"
    return {**manifest, "status": status, "reason": reason}


def default_cache_dir(dataset: str, data_dir: str | Path, image_size: int, mode: str) -> Path:
    """``$MEDICHAIN_CACHE`` (default ``~/.cache/medichain``) / one folder per source+settings."""
    base = Path(os.environ.get("MEDICHAIN_CACHE", Path.home() / ".cache" / "medichain"))
    key = json.dumps([str(Path(data_dir).resolve()), _settings(dataset, image_size, mode)])
    return base / f"{dataset}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def describe(manifest: dict[str, Any]) -> str:
    """Two lines for the terminal: what happened and what was skipped."""
    r = manifest["report"]
    if manifest["settings"]["dataset"] == "nih":
        counts = (
            f"{r['images']} of {r['rows']} images; {len(r['missing_images'])} missing, "
            f"{len(r['bad_files'])} unreadable or duplicate, {len(r['skipped_rows'])} bad CSV rows"
        )
    else:
        counts = (
            f"{r['nodules']} nodules from {r['series_with_annotations']} annotated CT series; "
            f"{len(r['bad_files'])} bad files, {len(r['bad_xml'])} bad XML, "
            f"{len(r['skipped'])} skipped items, {len(r['non_ct_series'])} non-CT series"
        )
    return f"cache {manifest['status']} ({manifest['reason']})\n{counts}"


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m sim.prepare``."""
    p = argparse.ArgumentParser(prog="python -m sim.prepare", description=__doc__.split("\n")[0])
    p.add_argument("dataset", choices=DATASETS)
    p.add_argument("--data-dir", required=True, type=Path, help="the raw dataset folder")
    p.add_argument("--out", required=True, type=Path, help="cache folder to write / reuse")
    p.add_argument("--image-size", type=int, default=64, help="image / patch side (default 64)")
    p.add_argument("--mode", choices=("2d", "2.5d"), default="2d", help="lidc patch mode")
    p.add_argument("--force", action="store_true", help="rebuild even if the cache is valid")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.image_size < 8 or args.image_size % 8:
        p.error(f"--image-size must be a multiple of 8, got {args.image_size}")
    try:
        manifest = prepare(
            args.dataset,
            args.data_dir,
            args.out,
            image_size=args.image_size,
            mode=args.mode,
            progress=not args.no_progress,
            force=args.force,
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(describe(manifest))
    print(f"details: {args.out / MANIFEST}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
