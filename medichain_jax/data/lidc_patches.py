"""LIDC nodule patches from a HU volume (numpy, host side): isotropic resampling, 2D / 2.5D
patch extraction around a nodule, and the malignancy label from readers' ratings. The HU window
is :func:`medichain_jax.data.phantom.window` (``window(hu, *LUNG_WINDOW)``).

2.5D = the axial, coronal and sagittal planes through the nodule centre as three channels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

AIR_HU = -1024.0
LUNG_WINDOW = (-600.0, 1500.0)  # level, width (HU) for phantom.window


def resample_isotropic(
    hu: np.ndarray, spacing: Sequence[float], target_mm: float = 1.0, order: int = 1
) -> tuple[np.ndarray, float]:
    """Resample a ``[z, y, x]`` volume with voxel ``spacing`` (mm) to ``target_mm`` cubes
    (trilinear by default). Voxel centre i of the output sits at ``i * target_mm`` mm from the
    first input voxel's centre; returns the volume and ``target_mm``."""
    if target_mm <= 0 or min(spacing) <= 0:
        raise ValueError(f"spacing and target must be > 0, got {tuple(spacing)} -> {target_mm}")
    extent = [(n - 1) * s for n, s in zip(hu.shape, spacing, strict=True)]
    shape = [int(np.floor(e / target_mm + 1e-6)) + 1 for e in extent]
    axes = [np.arange(n) * target_mm / s for n, s in zip(shape, spacing, strict=True)]
    grid = np.meshgrid(*axes, indexing="ij")
    out = ndimage.map_coordinates(
        np.asarray(hu, np.float32), grid, order=order, mode="nearest", prefilter=order > 1
    )
    return out.astype(np.float32), float(target_mm)


def _crop(volume: np.ndarray, center: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """A ``size`` block centred on ``center`` (even sizes: one more voxel before the centre),
    padded with air outside the volume."""
    out = np.full(tuple(size), AIR_HU, np.float32)
    src, dst = [], []
    for c, s, n in zip(center, size, volume.shape, strict=True):
        start = int(c) - s // 2
        lo, hi = max(start, 0), min(start + s, n)
        if lo >= hi:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - start, hi - start))
    out[tuple(dst)] = volume[tuple(src)]
    return out


def extract_patch(
    volume: np.ndarray, center: Sequence[int], size: int, mode: str = "2d"
) -> np.ndarray:
    """``[size, size, channels]`` patch around voxel ``center`` = (z, y, x): ``2d`` is the axial
    slice (1 channel), ``2.5d`` the axial, coronal and sagittal planes (3 channels)."""
    z, y, x = (int(c) for c in center)
    if mode == "2d":
        return _crop(volume, (z, y, x), (1, size, size))[0][..., None]
    if mode == "2.5d":
        axial = _crop(volume, (z, y, x), (1, size, size))[0]
        coronal = _crop(volume, (z, y, x), (size, 1, size))[:, 0]
        sagittal = _crop(volume, (z, y, x), (size, size, 1))[:, :, 0]
        return np.stack([axial, coronal, sagittal], axis=-1)
    raise ValueError(f"patch mode must be '2d' or '2.5d', got {mode!r}")


def malignancy_label(
    ratings: Sequence[int], benign_max: float = 2.0, malignant_min: float = 4.0
) -> int | None:
    """1 (malignant) when the median of the readers' malignancy ratings (1-5) is at least
    ``malignant_min``, 0 (benign) when at most ``benign_max``, else ``None`` (excluded: 3, and
    medians such as 2.5 or 3.5 between the two)."""
    if benign_max >= malignant_min:
        raise ValueError(f"benign_max {benign_max} must be below malignant_min {malignant_min}")
    if len(ratings) == 0:
        return None
    median = float(np.median(ratings))
    if median >= malignant_min:
        return 1
    if median <= benign_max:
        return 0
    return None
