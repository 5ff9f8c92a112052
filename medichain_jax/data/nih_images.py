"""NIH ChestX-ray14 PNGs: find them under a root, load them as [0, 1] grayscale, report bad files."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from medichain_jax.data.dicom import BadFile

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
UNREADABLE = (
    UnidentifiedImageError,
    OSError,
    SyntaxError,
    ValueError,
    Image.DecompressionBombError,
)


@dataclasses.dataclass
class ImageIndex:
    """PNG file name -> path, and the files dropped because their name was already taken."""

    paths: dict[str, Path]
    duplicates: list[BadFile]


@dataclasses.dataclass
class NihImages:
    """Loaded images, which of the requested names they are, and what could not be loaded."""

    images: np.ndarray  # [m, size, size] float32 in [0, 1]
    kept: np.ndarray  # [m] int64 indices into the requested names
    missing: list[str]  # requested names with no file in the index
    bad: list[BadFile]  # files that exist but could not be read

    def summary(self) -> str:
        """One line of counts, for logs and progress output."""
        total = len(self.kept) + len(self.missing) + len(self.bad)
        return (
            f"loaded {len(self.kept)} of {total} images; "
            f"{len(self.missing)} missing, {len(self.bad)} unreadable"
        )


def _in_images_dir(path: Path, root: Path) -> bool:
    return any(part.startswith("images") for part in path.relative_to(root).parts[:-1])


def find_images(root: str | Path) -> ImageIndex:
    """Every ``*.png`` below a directory named ``images*`` under ``root`` (``images_001/images``
    ... ``images_012/images``, or one flat ``images``). A name seen twice keeps its first path in
    sorted order; the others are reported in ``duplicates``."""
    root = Path(root)
    if not any(d.is_dir() for d in root.rglob("images*")):
        raise FileNotFoundError(
            f"no images* directory under {root} (expected images_001/images/*.png or images/*.png)"
        )
    paths: dict[str, Path] = {}
    duplicates: list[BadFile] = []
    for path in sorted(root.rglob("*.png")):
        if path.name.startswith(".") or not _in_images_dir(path, root):
            continue
        if path.name in paths:
            duplicates.append(BadFile(str(path), f"duplicate of {paths[path.name]}"))
        else:
            paths[path.name] = path
    return ImageIndex(paths, duplicates)


def _to_float(img: Image.Image) -> Image.Image:
    """Mode ``F`` grayscale in [0, 1]: 16-bit modes over 65535, everything else via ``L`` / 255."""
    if img.mode in SIXTEEN_BIT_MODES:
        return Image.fromarray(np.asarray(img).astype(np.float32) / np.float32(65535.0))
    return Image.fromarray(np.asarray(img.convert("L")).astype(np.float32) / np.float32(255.0))


def load_image(path: str | Path, size: int) -> np.ndarray:
    """``[size, size]`` float32 grayscale in [0, 1]; area (BOX) filter when shrinking, BILINEAR
    when a side grows. Raises ValueError naming the file when it cannot be read."""
    try:
        with Image.open(path) as img:
            img.load()
            gray = _to_float(img)
    except UNREADABLE as err:
        raise ValueError(f"{path}: cannot read image ({err})") from err
    if gray.size != (size, size):
        shrink = min(gray.size) >= size
        method = Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR
        gray = gray.resize((size, size), method)
    out = np.asarray(gray, np.float32)
    if out.shape != (size, size):
        raise ValueError(f"{path}: expected a 2-D {size}x{size} image, got shape {out.shape}")
    return np.clip(out, 0.0, 1.0)


def load_images(names: Sequence[str] | np.ndarray, index: ImageIndex, size: int) -> NihImages:
    """Load ``names`` (e.g. ``NihMetadata.image``) through ``index``; a missing or unreadable
    file never raises, it is counted and reported."""
    out = np.empty((len(names), size, size), np.float32)
    kept: list[int] = []
    missing: list[str] = []
    bad: list[BadFile] = []
    for i, name in enumerate(names):
        path = index.paths.get(str(name))
        if path is None:
            missing.append(str(name))
            continue
        try:
            out[len(kept)] = load_image(path, size)
        except ValueError as err:
            bad.append(BadFile(str(path), str(err)))
            continue
        kept.append(i)
    return NihImages(out[: len(kept)], np.asarray(kept, np.int64), missing, bad)
