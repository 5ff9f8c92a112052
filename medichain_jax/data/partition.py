"""Host-side (numpy) client partitions: label skew, quantity skew, Dirichlet and IID splits.

Every function takes ``rng`` as a seed int or a ``np.random.Generator``
(``np.random.default_rng(rng)``); no global random state is touched.
"""

from __future__ import annotations

import hashlib

import numpy as np

RngLike = int | np.random.Generator | None


def _rng(rng: RngLike) -> np.random.Generator:
    return np.random.default_rng(rng)


def label_skew_rates(
    rng: RngLike, num_clients: int, alpha: float, lo: float = 0.05, hi: float = 0.95
) -> np.ndarray:
    """Per-client positive rate ~ Dirichlet(alpha, alpha) = Beta(alpha, alpha), clipped."""
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    rates = _rng(rng).dirichlet([alpha, alpha], size=num_clients)[:, 1]
    return np.clip(rates, lo, hi)


def quantity_skew_sizes(
    rng: RngLike,
    num_clients: int,
    mean_size: float,
    sigma: float = 0.6,
    min_size: int | None = None,
    max_size: int | None = None,
) -> np.ndarray:
    """Lognormal client sizes rescaled to mean ~mean_size, clipped to [min_size, max_size]."""
    lo = max(1, int(np.rint(mean_size / 4))) if min_size is None else int(min_size)
    hi = int(np.rint(2 * mean_size)) if max_size is None else int(max_size)
    if lo > hi:
        raise ValueError(f"min_size {lo} > max_size {hi}")
    raw = _rng(rng).lognormal(0.0, sigma, size=num_clients)
    sizes = raw / raw.mean() * mean_size
    return np.clip(np.rint(sizes), lo, hi).astype(np.int64)


def iid_partition(rng: RngLike, n: int, num_clients: int) -> list[np.ndarray]:
    """Shuffle ``range(n)`` and split it into num_clients near-equal parts."""
    if num_clients > n:
        raise ValueError(f"cannot split {n} examples over {num_clients} clients")
    perm = _rng(rng).permutation(n)
    return [np.sort(p) for p in np.array_split(perm, num_clients)]


def dirichlet_partition(
    rng: RngLike, labels: np.ndarray, num_clients: int, alpha: float, min_per_client: int = 1
) -> list[np.ndarray]:
    """Dirichlet(alpha) label-skew split: each class is divided across clients by Dirichlet
    proportions; every index is used once and each client gets >= min_per_client examples."""
    gen = _rng(rng)
    labels = np.asarray(labels).reshape(-1)
    n = labels.shape[0]
    if n < num_clients * min_per_client:
        raise ValueError(f"{n} examples cannot give {num_clients} clients {min_per_client} each")
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in np.unique(labels):
        idx = gen.permutation(np.flatnonzero(labels == c))
        props = gen.dirichlet(np.full(num_clients, alpha))
        cuts = np.rint(np.cumsum(props)[:-1] * idx.size).astype(np.int64)
        for k, chunk in enumerate(np.split(idx, cuts)):
            parts[k].append(chunk)
    clients = [np.concatenate(p) if p else np.zeros(0, np.int64) for p in parts]
    # Repair: move random examples from the largest client to any client below the minimum.
    for k in range(num_clients):
        while clients[k].size < min_per_client:
            big = int(np.argmax([c.size for c in clients]))
            j = int(gen.integers(clients[big].size))
            clients[k] = np.append(clients[k], clients[big][j])
            clients[big] = np.delete(clients[big], j)
    return [np.sort(c).astype(np.int64) for c in clients]


def majority_label(group: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique groups (e.g. patients) and each one's most frequent label (ties: lowest)."""
    groups, inverse = np.unique(group, return_inverse=True)
    values, lab = np.unique(labels, return_inverse=True)
    counts = np.zeros((groups.size, values.size), np.int64)
    np.add.at(counts, (inverse, lab), 1)
    return groups, values[counts.argmax(1)]


def partition_groups(
    group: np.ndarray,
    kind: str,
    num_clients: int,
    rng: RngLike,
    labels: np.ndarray | None = None,
    alpha: float = 0.5,
) -> np.ndarray:
    """``[n]`` client id per row with whole groups (patients) kept together: ``iid`` (groups
    shuffled into near-equal parts), ``quantity`` (shuffled, cut into lognormal sizes) or
    ``dirichlet`` (label skew over each group's majority label, Hsu et al. 2019)."""
    groups, inverse = np.unique(group, return_inverse=True)
    if kind == "iid":
        parts = iid_partition(rng, groups.size, num_clients)
    elif kind == "quantity":
        gen = _rng(rng)
        if num_clients > groups.size:
            raise ValueError(f"cannot split {groups.size} groups over {num_clients} clients")
        sizes = quantity_skew_sizes(gen, num_clients, groups.size / num_clients, min_size=1)
        cuts = np.cumsum(sizes)[:-1] * groups.size // sizes.sum()
        parts = np.split(gen.permutation(groups.size), np.maximum.accumulate(cuts))
    elif kind == "dirichlet":
        if labels is None:
            raise ValueError("a dirichlet partition needs labels")
        parts = dirichlet_partition(rng, majority_label(group, labels)[1], num_clients, alpha)
    else:
        raise ValueError(f"unknown group partition {kind!r}; choose iid, quantity or dirichlet")
    client_of = np.empty(groups.size, np.int64)
    for k, idx in enumerate(parts):
        client_of[idx] = k
    return client_of[inverse]


def partition_by_feature(group: np.ndarray, value: np.ndarray, num_clients: int) -> np.ndarray:
    """``[n]`` client id: groups sorted by a feature (their first row's value; ties by group id)
    and cut into ``num_clients`` contiguous near-equal parts (feature-based skew)."""
    groups, first, inverse = np.unique(group, return_index=True, return_inverse=True)
    if num_clients > groups.size:
        raise ValueError(f"cannot split {groups.size} groups over {num_clients} clients")
    order = np.lexsort((groups, np.asarray(value)[first]))
    client_of = np.empty(groups.size, np.int64)
    for k, idx in enumerate(np.array_split(order, num_clients)):
        client_of[idx] = k
    return client_of[inverse]


def hash_test_split(group: np.ndarray, test_fraction: float = 0.2, salt: str = "") -> np.ndarray:
    """``[n]`` bool test mask decided per group (patient) by a SHA-256 hash of its id:
    deterministic, no group in both train and test, about ``test_fraction`` of groups in test."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    groups, inverse = np.unique(np.asarray(group, str), return_inverse=True)
    digest = [hashlib.sha256(f"{salt}{g}".encode()).digest()[:8] for g in groups]
    u = np.array([int.from_bytes(d, "big") for d in digest], np.float64) / 2.0**64
    return (u < test_fraction)[inverse]
