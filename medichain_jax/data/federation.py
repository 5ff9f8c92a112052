"""Federations of hospitals: stacked, padded train/test ClientData plus per-hospital metadata."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from medichain_jax.data.partition import label_skew_rates, quantity_skew_sizes
from medichain_jax.data.phantom import (
    VENDORS,
    ScannerProfile,
    _render_images,
    fold_in_range,
    hospital_profiles,
)
from medichain_jax.types import ClientData

# fold_in tags on jax.random.PRNGKey(seed).
_TAG_PROFILES, _TAG_TRAIN, _TAG_TEST = 0, 1, 2
_MIN_TEST_PER_CLASS = 4
_WIN_WIDTH = np.float32(1400.0)
_WIN_LO = np.float32(-300.0) - _WIN_WIDTH / 2


class FederationError(ValueError):
    """Data cannot be split into the requested hospitals (e.g. one would have no test rows)."""


@dataclasses.dataclass(frozen=True, eq=False)
class Federation:
    """A simulated federation: per-hospital train/test data (stacked, padded) and metadata."""

    train: ClientData
    test: ClientData
    vendors: tuple[str, ...]
    profiles: ScannerProfile | None
    train_sizes: np.ndarray
    test_sizes: np.ndarray
    train_pos_rate: np.ndarray
    test_pos_rate: np.ndarray
    name: str
    details: tuple[dict, ...] = ()  # per hospital, e.g. scan / patient counts
    info: dict = dataclasses.field(default_factory=dict)  # dataset facts (skipped items, ...)
    label_names: tuple[str, ...] = ()  # one per output column when there are several
    task: str = "classification"  # or "segmentation" (y = flattened masks)

    @property
    def num_hospitals(self) -> int:
        """Number of hospitals (clients)."""
        return len(self.vendors)


def pad_and_stack(
    list_of_x: Sequence[np.ndarray], list_of_y: Sequence[np.ndarray], capacity: int | None = None
) -> ClientData:
    """Stack per-client host arrays into one padded ClientData of host (numpy) arrays; padding
    rows are zero. ``jnp.asarray`` of a large array makes full copies; a round takes the rows it
    needs, and ``sim.runner.build`` puts whole federations on the devices when it needs them."""
    if len(list_of_x) != len(list_of_y) or not list_of_x:
        raise ValueError("need the same, non-zero number of x and y arrays")
    xs = [np.asarray(x, np.float32) for x in list_of_x]
    xs = [x[..., None] if x.ndim == 3 else x for x in xs]
    ys = [np.asarray(y, np.float32) for y in list_of_y]
    ys = [y[:, None] if y.ndim == 1 else y for y in ys]
    sizes = np.array([x.shape[0] for x in xs], np.int32)
    if any(y.shape[0] != n for y, n in zip(ys, sizes, strict=True)):
        raise ValueError("x and y row counts differ")
    cap = int(sizes.max()) if capacity is None else int(capacity)
    if sizes.max() > cap:
        raise ValueError(f"a client has {sizes.max()} rows > capacity {cap}")
    x_out = np.zeros((len(xs), cap) + xs[0].shape[1:], np.float32)
    y_out = np.zeros((len(ys), cap) + ys[0].shape[1:], np.float32)
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        x_out[i, : x.shape[0]] = x
        y_out[i, : y.shape[0]] = y
    return ClientData(x=x_out, y=y_out, num_examples=sizes)


def federation_from_rows(
    x: np.ndarray,
    y: np.ndarray,
    hospital: np.ndarray,
    is_test: np.ndarray,
    names: Sequence[str],
    name: str,
    **extra,
) -> Federation:
    """A federation from pooled rows: ``x [n, ...]``, ``y [n] or [n, K]``, each row's hospital
    id (``[n]``, into ``names``) and train/test flag; hospital ``h`` holds its own rows only."""
    x, y = np.asarray(x), np.asarray(y, np.float32)
    y = y[:, None] if y.ndim == 1 else y
    hospital, is_test = np.asarray(hospital), np.asarray(is_test, bool)
    if not x.shape[0] == y.shape[0] == hospital.shape[0] == is_test.shape[0]:
        raise ValueError("x, y, hospital and is_test must have one entry per row")
    n_h = len(names)
    if hospital.size and (hospital.min() < 0 or hospital.max() >= n_h):
        raise ValueError(f"hospital ids must be in [0, {n_h})")
    parts = {}
    for split, rows in (("train", ~is_test), ("test", is_test)):
        idx = [np.flatnonzero(rows & (hospital == h)) for h in range(n_h)]
        empty = [names[h] for h in range(n_h) if idx[h].size == 0]
        if empty:
            raise FederationError(
                f"no {split} rows for hospital(s) {', '.join(empty)}: too few patients for "
                "this partition; use fewer hospitals or another partition"
            )
        sizes = np.array([i.size for i in idx], np.int64)
        rate = np.array([y[i].mean() for i in idx])
        parts[split] = (pad_and_stack([x[i] for i in idx], [y[i] for i in idx]), sizes, rate)
    return Federation(
        train=parts["train"][0],
        test=parts["test"][0],
        vendors=tuple(names),
        profiles=None,
        train_sizes=parts["train"][1],
        test_sizes=parts["test"][1],
        train_pos_rate=parts["train"][2],
        test_pos_rate=parts["test"][2],
        name=name,
        **extra,
    )


def _render_split(
    key: jax.Array,
    labels: list[np.ndarray],
    profiles: ScannerProfile,
    size: int,
    block_images: int = 16384,
) -> ClientData:
    """Windowed images of every hospital (hospital h, image i uses fold_in(fold_in(key, h), i)),
    rendered a block of hospitals at a time straight into the padded ``[N, cap, size, size, 1]``
    array, so peak memory is that array plus one block (1,000 hospitals fit on a laptop)."""
    sizes = np.array([lab.size for lab in labels])
    cap = int(sizes.max())
    x = np.zeros((len(labels), cap, size, size, 1), np.float32)
    y = np.zeros((len(labels), cap, 1), np.float32)
    hospital_keys = fold_in_range(key, len(labels))
    lo = 0
    while lo < len(labels):
        hi = lo + 1
        while hi < len(labels) and sizes[lo : hi + 1].sum() <= block_images:
            hi += 1
        hosp = np.repeat(np.arange(lo, hi), sizes[lo:hi])
        idx = np.concatenate([np.arange(n) for n in sizes[lo:hi]]).astype(np.int32)
        flat_y = np.concatenate(labels[lo:hi]).astype(np.int32)
        prof = [np.asarray(f, np.float32)[hosp] for f in profiles]
        out = _render_images(hospital_keys[hosp], idx, flat_y, ScannerProfile(*prof), size)
        np.clip((out - _WIN_LO) / _WIN_WIDTH, 0.0, 1.0, out=out)  # = window(), on the host
        x[hosp, idx, ..., 0] = out
        y[hosp, idx, 0] = flat_y
        lo = hi
    return ClientData(x=x, y=y, num_examples=sizes.astype(np.int32))  # host arrays, as above


def _labels(rng: np.random.Generator, n: int, n_pos: int) -> np.ndarray:
    """Exactly n_pos ones among n labels, shuffled."""
    y = np.zeros(n, np.int32)
    y[:n_pos] = 1
    return rng.permutation(y)


def make_phantom_federation(
    seed: int,
    num_hospitals: int,
    non_iid: bool,
    alpha: float = 0.5,
    mean_train: int = 256,
    test_size: int = 64,
    image_size: int = 64,
    scanner_shift: float | None = None,
) -> Federation:
    """Build a deterministic CT-phantom federation (IID, or label + quantity + scanner skew)."""
    if test_size < 2 * _MIN_TEST_PER_CLASS:
        raise ValueError(f"test_size must be >= {2 * _MIN_TEST_PER_CLASS}")
    n_h = int(num_hospitals)
    rng = np.random.default_rng(seed)
    if non_iid:
        rates = label_skew_rates(rng, n_h, alpha)
        sizes = quantity_skew_sizes(rng, n_h, mean_train)
        shift = 1.0 if scanner_shift is None else float(scanner_shift)
    else:
        rates = np.full(n_h, 0.5)
        sizes = np.full(n_h, int(mean_train), np.int64)
        shift = 0.0 if scanner_shift is None else float(scanner_shift)
    train_pos = np.rint(rates * sizes).astype(np.int64)
    test_pos = np.clip(
        np.rint(rates * test_size), _MIN_TEST_PER_CLASS, test_size - _MIN_TEST_PER_CLASS
    ).astype(np.int64)
    y_train = [_labels(rng, int(n), int(p)) for n, p in zip(sizes, train_pos, strict=True)]
    y_test = [_labels(rng, test_size, int(p)) for p in test_pos]

    root = jax.random.PRNGKey(seed)
    profiles, vendor_ids = hospital_profiles(jax.random.fold_in(root, _TAG_PROFILES), n_h, shift)
    x_test = _render_split(jax.random.fold_in(root, _TAG_TEST), y_test, profiles, image_size)
    x_train = _render_split(jax.random.fold_in(root, _TAG_TRAIN), y_train, profiles, image_size)
    test_sizes = np.full(n_h, test_size, np.int64)
    kind = "noniid" if non_iid else "iid"
    return Federation(
        train=x_train,
        test=x_test,
        vendors=tuple(VENDORS[v] for v in vendor_ids),
        profiles=profiles,
        train_sizes=sizes.astype(np.int64),
        test_sizes=test_sizes,
        train_pos_rate=train_pos / np.maximum(sizes, 1),
        test_pos_rate=test_pos / test_size,
        name=f"phantom-{kind}-{n_h}h-seed{seed}",
    )


def with_label_noise(
    data: ClientData, noisy: np.ndarray, rate: float, key: jax.Array
) -> tuple[ClientData, np.ndarray]:
    """Flip each training label of the ``noisy`` hospitals (``[N]`` bool) with probability
    ``rate`` (symmetric label noise, e.g. an unreliable annotation pipeline). Returns the new
    data and the number of flipped labels per hospital."""
    if not 0 <= rate <= 1:
        raise ValueError(f"label noise rate must be in [0, 1], got {rate}")
    noisy = np.asarray(noisy, bool)
    u = jax.random.uniform(key, data.y.shape)
    flip = (u < rate) & jnp.asarray(noisy)[:, None, None] & data.mask()[..., None]
    y = jnp.where(flip, 1.0 - data.y, data.y)
    return data.replace(y=y), np.asarray(flip.any(axis=-1).sum(axis=-1))
