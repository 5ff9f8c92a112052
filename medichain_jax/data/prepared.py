"""Prepared (cached) datasets: a folder of ``.npy`` arrays plus ``manifest.json`` with each
file's SHA-256, read through a grain data source. ``sim.prepare`` writes them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import grain
import numpy as np

MANIFEST = "manifest.json"
FORMAT = 1


class PreparedDataError(ValueError):
    """A prepared folder is missing, corrupted or of another format; the message names it."""


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    """The folder's manifest, or None when there is none; unreadable ones raise."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PreparedDataError(f"{path}: unreadable manifest ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PreparedDataError(f"{path}: not a format-{FORMAT} manifest")
    return manifest


def verify(folder: str | Path, manifest: dict[str, Any]) -> list[str]:
    """Problems with the folder's array files: missing, wrong size or SHA-256 mismatch."""
    problems = []
    for name, want in manifest.get("files", {}).items():
        path = Path(folder) / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != want["bytes"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, expected {want['bytes']}")
        elif file_sha256(path) != want["sha256"]:
            problems.append(f"{path}: SHA-256 mismatch (corrupted)")
    return problems


class PreparedSource:
    """grain random-access data source over a prepared folder: record ``i`` is a dict of the
    per-row arrays' ``i``-th entries, read from memory-mapped ``.npy`` files."""

    def __init__(self, folder: str | Path, verify_files: bool = True):
        self.folder = Path(folder)
        manifest = read_manifest(self.folder)
        if manifest is None:
            raise PreparedDataError(f"{self.folder}: no {MANIFEST}; run python -m sim.prepare")
        if verify_files and (problems := verify(self.folder, manifest)):
            raise PreparedDataError("; ".join(problems))
        self.manifest = manifest
        self.columns = {
            Path(name).stem: np.load(self.folder / name, mmap_mode="r", allow_pickle=False)
            for name in manifest["files"]
        }
        lengths = {k: v.shape[0] for k, v in self.columns.items()}
        if len(set(lengths.values())) > 1:
            raise PreparedDataError(f"{self.folder}: arrays differ in length {lengths}")
        self._len = next(iter(lengths.values()), 0)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {k: np.asarray(v[index]) for k, v in self.columns.items()}


def load_arrays(source: PreparedSource, batch_size: int = 4096) -> dict[str, np.ndarray]:
    """Every row of every column, read in batches through grain (empty columns kept)."""
    if len(source) == 0:
        return {k: np.asarray(v) for k, v in source.columns.items()}
    batches = list(grain.MapDataset.source(source).batch(batch_size))
    return {k: np.concatenate([b[k] for b in batches]) for k in source.columns}
