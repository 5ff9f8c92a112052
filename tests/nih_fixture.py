"""A small NIH ChestX-ray14 download on disk: two images_00x folders of PNGs in several modes
and sizes, the metadata CSV, the official split lists, some corrupted and some missing files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from medichain_jax.data.nih import FINDINGS

HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,{sex},View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)
# (mode, width, height), cycled over the images
KINDS = (("L", 48, 48), ("L", 64, 40), ("RGBA", 48, 48), ("I;16", 56, 56))
SPACINGS = (0.143, 0.168, 0.139)


def _pixels(rng: np.random.Generator, w: int, h: int, finding: bool) -> np.ndarray:
    """[h, w] in [0, 1]: a vertical gradient and noise, plus a bright blob when ``finding``."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = 0.25 + 0.2 * y / h + rng.normal(0.0, 0.03, (h, w))
    if finding:
        cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
        img += 0.45 * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * (min(w, h) / 6) ** 2))
    return np.clip(img, 0.0, 1.0)


def _write_png(path: Path, gray: np.ndarray, mode: str) -> None:
    if mode == "I;16":
        Image.fromarray(np.round(gray * 65535).astype(np.uint16)).save(path)
        return
    g8 = np.round(gray * 255).astype(np.uint8)
    if mode == "RGBA":
        g8 = np.stack([g8, g8, g8, np.full_like(g8, 255)], axis=-1)
    Image.fromarray(g8).save(path)


def make_nih_tree(
    root: Path,
    patients: int = 6,
    images_per_patient: int = 3,
    header: str = "Patient Gender",
    seed: int = 0,
    corrupt: int = 1,
    missing: int = 1,
) -> dict:
    """Write the tree under ``root``; return its paths and the names of the files that are
    corrupted (truncated) or listed in the CSV without a file."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    dirs = [root / "images_001" / "images", root / "images_002" / "images"]
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    names = [
        f"{p:08d}_{k:03d}.png" for p in range(1, patients + 1) for k in range(images_per_patient)
    ]
    pick = rng.permutation(len(names))
    missing_names = sorted(names[i] for i in pick[:missing])
    corrupt_names = sorted(names[i] for i in pick[missing : missing + corrupt])
    lines, files, modes = [HEADER.format(sex=header)], {}, {}
    for i, name in enumerate(names):
        pid, follow = int(name[:8]), int(name[9:12])
        if rng.random() < 0.4:
            labels = "No Finding"
        else:
            labels = "|".join(sorted(rng.choice(FINDINGS, rng.integers(1, 3), replace=False)))
        spacing = SPACINGS[(pid + (follow == 2)) % len(SPACINGS)]  # some patients on 2 detectors
        lines.append(
            f"{name},{labels},{follow},{pid},{int(rng.integers(20, 90))},{'MF'[pid % 2]},"
            f"{'PA' if rng.random() < 0.7 else 'AP'},2500,2048,{spacing},{spacing}"
        )
        if name in missing_names:
            continue
        mode, w, h = KINDS[i % len(KINDS)]
        path = dirs[0 if i < len(names) // 2 else 1] / name
        _write_png(path, _pixels(rng, w, h, labels != "No Finding"), mode)
        if name in corrupt_names:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        files[name], modes[name] = path, mode
    csv = root / "Data_Entry_2017.csv"
    csv.write_text("\n".join(lines) + "\n")
    ids = rng.permutation(np.arange(1, patients + 1))
    test_ids = set(ids[: max(1, patients // 3)].tolist())
    split = {True: [], False: []}
    for name in names:
        split[int(name[:8]) in test_ids].append(name)
    (root / "test_list.txt").write_text("\n".join(split[True]) + "\n")
    (root / "train_val_list.txt").write_text("\n".join(split[False]) + "\n")
    return {
        "root": root,
        "csv": csv,
        "test_list": root / "test_list.txt",
        "train_val_list": root / "train_val_list.txt",
        "image_dirs": dirs,
        "names": names,
        "files": files,
        "modes": modes,
        "corrupt": corrupt_names,
        "missing": missing_names,
    }
