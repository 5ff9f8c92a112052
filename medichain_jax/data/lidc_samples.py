"""Per-nodule samples of one LIDC-IDRI series: readers' marks (>= 3 mm) matched into nodules,
consensus masks, isotropic 2D / 2.5D patches windowed to [0, 1], per-reader malignancy ratings
and the median-rule label; plus the Dice overlap that scores segmentations.

Patches and masks are exactly the blocks that :func:`lidc_patches.extract_patch` cuts from the
:func:`lidc_patches.resample_isotropic` grid (same sample coordinates, interpolation and air
padding; masks nearest-neighbour), but only those grid points are sampled, never the whole
volume. Centres are in mm from the first voxel's centre along (slice, row, column): that grid's
frame (slice gaps of missing files are not accounted for, as in the resampling).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from medichain_jax.data.dicom import CTVolume
from medichain_jax.data.lidc_patches import AIR_HU, LUNG_WINDOW, malignancy_label
from medichain_jax.data.lidc_xml import LidcAnnotations, consensus_mask, match_nodules, nodule_mask
from medichain_jax.data.phantom import window

MIN_READER_COLUMNS = 4  # LIDC-IDRI: four readers per scan


@dataclasses.dataclass
class NoduleSamples:
    """Every matched nodule (>= 3 mm) of one series, one row per nodule."""

    series_uid: str
    patient_id: str
    manufacturer: str
    readers: tuple[str, ...]  # the columns of ``ratings``
    patches: np.ndarray  # [n, size, size, channels] float32 in [0, 1] (1 channel 2d, 3 for 2.5d)
    masks: np.ndarray  # [n, size, size] bool consensus (union if no pixel has enough readers)
    ratings: np.ndarray  # [n, max(4, readers)] int malignancy 1-5; 0 = not marked or not rated
    label: np.ndarray  # [n] int: 1 malignant, 0 benign, -1 excluded (median 3 or in between)
    num_readers: np.ndarray  # [n] int readers who marked the nodule
    centers_mm: np.ndarray  # [n, 3] float (z, y, x) mm from the first voxel's centre
    skipped: list[tuple[str, str]]  # (what, why) for dropped files, nodules and contours

    def __len__(self) -> int:
        """Number of nodules."""
        return len(self.label)


def _block(volume, shape, spacing, target_mm, center, size, order, fill, origin=(0, 0, 0)):
    """The ``size`` block around ``center`` of a ``shape`` volume's isotropic grid, sampled from
    ``volume`` = its voxels from ``origin`` on; ``fill`` outside the grid."""
    axes = [int(c) - s // 2 + np.arange(s) for c, s in zip(center, size, strict=True)]
    idx = np.meshgrid(*axes, indexing="ij")
    extent = [
        int(np.floor((n - 1) * s / target_mm + 1e-6)) + 1
        for n, s in zip(shape, spacing, strict=True)
    ]
    valid = np.logical_and.reduce([(i >= 0) & (i < n) for i, n in zip(idx, extent, strict=True)])
    out = np.full(tuple(size), fill, np.float32)
    if valid.any():  # the coordinates resample_isotropic uses, shifted to ``volume``
        coords = [
            i[valid] * target_mm / s - o for i, s, o in zip(idx, spacing, origin, strict=True)
        ]
        out[valid] = ndimage.map_coordinates(
            np.asarray(volume, np.float32),
            np.stack(coords),
            order=order,
            mode="nearest",
            prefilter=order > 1,
        )
    return out


def _patch(hu, spacing, target_mm, center, size, mode) -> np.ndarray:
    """HU patch as ``extract_patch(resample_isotropic(hu, spacing, target_mm), ...)``."""

    def cut(s):
        return _block(hu, hu.shape, spacing, target_mm, center, s, 1, AIR_HU)

    axial = cut((1, size, size))[0]
    if mode == "2d":
        return axial[..., None]
    return np.stack([axial, cut((size, 1, size))[:, 0], cut((size, size, 1))[:, :, 0]], -1)


def nodule_samples(
    volume: CTVolume,
    annotations: Sequence[LidcAnnotations],
    patch_size: int = 32,
    mode: str = "2d",
    target_mm: float = 1.0,
    at_least: int = 2,
) -> NoduleSamples:
    """Patches, consensus masks, ratings and labels of every nodule the readers marked."""
    if mode not in ("2d", "2.5d"):
        raise ValueError(f"patch mode must be '2d' or '2.5d', got {mode!r}")
    if at_least < 1:
        raise ValueError(f"at_least must be >= 1, got {at_least}")
    if target_mm <= 0 or min(volume.spacing) <= 0:
        raise ValueError(f"spacing and target must be > 0, got {volume.spacing} -> {target_mm}")
    meta = volume.metadata
    uid = str(meta.get("SeriesInstanceUID") or "")
    skipped: list[tuple[str, str]] = []
    readers: list[str] = []
    reads, voxels = [], {}
    for i, ann in enumerate(annotations):
        if ann.series_uid and uid and ann.series_uid != uid:
            skipped.append((ann.path, f"annotates series {ann.series_uid}, not {uid}"))
            continue
        tag = f"{i}:" if len(annotations) > 1 else ""  # readers of different files stay apart
        for name in [*ann.readers, *(r.reader for r in ann.nodules)]:
            if tag + name not in readers:
                readers.append(tag + name)
        for read in ann.nodules:
            read = dataclasses.replace(read, reader=tag + read.reader)
            what = f"reader {read.reader} nodule {read.nodule_id}"
            if read.small:
                skipped.append((what, "under 3 mm (marked by its centre only)"))
                continue
            shape = volume.hu.shape[1:]
            mask, lost = nodule_mask(read, volume.sop_uids, volume.positions, shape)
            where = f"{len(lost)} of {len(read.rois)} contours match no slice "
            where += f"(z = {sorted({r.z for r in lost})} mm)"
            if not mask.any():
                skipped.append((what, where if lost else "its contours cover no pixel"))
                continue
            if lost:
                skipped.append((what, where + "; the others kept"))
            reads.append(read)
            voxels[id(read)] = np.argwhere(mask)
    ncols = max(MIN_READER_COLUMNS, len(readers))
    patches, masks, ratings, labels, counts, centers = [], [], [], [], [], []
    spacing = np.asarray(volume.spacing, float)
    for group in match_nodules(reads, volume.spacing[1:]):
        pts = [voxels[id(r)] for r in group]
        both = np.concatenate(pts)
        lo = np.maximum(both.min(0) - 1, 0)  # a box with a zero border around the nodule
        hi = np.minimum(both.max(0) + 2, volume.hu.shape)
        boxes = [np.zeros(hi - lo, bool) for _ in pts]
        for box, p in zip(boxes, pts, strict=True):
            box[tuple((p - lo).T)] = True
        cons = consensus_mask(boxes, min(at_least, len(boxes)))
        if not cons.any():
            cons = consensus_mask(boxes, 1)
        center_mm = (np.argwhere(cons).mean(0) + lo) * spacing
        grid = np.rint(center_mm / target_mm).astype(int)
        patches.append(_patch(volume.hu, spacing, target_mm, grid, patch_size, mode))
        cut = (1, patch_size, patch_size)
        m = _block(cons, volume.hu.shape, spacing, target_mm, grid, cut, 0, 0.0, lo)
        masks.append(m[0] > 0.5)
        row = np.zeros(ncols, np.int64)
        for r in group:
            row[readers.index(r.reader)] = r.characteristics.get("malignancy", 0)
        label = malignancy_label([int(v) for v in row if v > 0])
        ratings.append(row)
        labels.append(-1 if label is None else label)
        counts.append(len(group))
        centers.append(center_mm)
    n, channels = len(labels), 1 if mode == "2d" else 3
    hu = np.stack(patches) if n else np.zeros((0, patch_size, patch_size, channels), np.float32)
    return NoduleSamples(
        series_uid=uid,
        patient_id=str(meta.get("PatientID") or ""),
        manufacturer=str(meta.get("Manufacturer") or ""),
        readers=tuple(readers),
        patches=np.array(window(hu, *LUNG_WINDOW), np.float32),
        masks=np.stack(masks) if n else np.zeros((0, patch_size, patch_size), bool),
        ratings=np.stack(ratings) if n else np.zeros((0, ncols), np.int64),
        label=np.asarray(labels, np.int64),
        num_readers=np.asarray(counts, np.int64),
        centers_mm=np.stack(centers) if n else np.zeros((0, 3)),
        skipped=skipped,
    )


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice overlap 2|A & B| / (|A| + |B|) of two boolean masks; 1.0 when both are empty."""
    a, b = np.asarray(pred, bool), np.asarray(truth, bool)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total
