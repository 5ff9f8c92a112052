"""Tests for the host-side partition helpers."""

from __future__ import annotations

import numpy as np
import pytest

from medichain_jax.data.partition import (
    dirichlet_partition,
    hash_test_split,
    iid_partition,
    label_skew_rates,
    majority_label,
    partition_by_feature,
    partition_groups,
    quantity_skew_sizes,
)


def _check_exact_cover(parts: list[np.ndarray], n: int) -> None:
    allidx = np.concatenate(parts)
    assert allidx.size == n
    np.testing.assert_array_equal(np.sort(allidx), np.arange(n))


def test_label_skew_rates_bounds_and_alpha_effect() -> None:
    """Rates stay in [lo, hi]; small alpha spreads them, large alpha concentrates at 0.5."""
    small = label_skew_rates(0, 2000, 0.1)
    large = label_skew_rates(0, 2000, 100.0)
    assert small.shape == (2000,)
    assert small.min() >= 0.05 and small.max() <= 0.95
    assert np.abs(large - 0.5).max() < 0.2
    assert np.mean(np.abs(small - 0.5)) > 0.3
    assert abs(large.mean() - 0.5) < 0.01
    np.testing.assert_array_equal(label_skew_rates(3, 10, 0.5), label_skew_rates(3, 10, 0.5))
    r = label_skew_rates(1, 500, 0.5, lo=0.2, hi=0.7)
    assert r.min() >= 0.2 and r.max() <= 0.7


def test_quantity_skew_sizes() -> None:
    """Sizes are ints, vary, average ~ the target and respect the clip bounds."""
    sizes = quantity_skew_sizes(0, 1000, 256)
    assert sizes.dtype.kind == "i"
    assert sizes.min() >= 64 and sizes.max() <= 512
    assert abs(sizes.mean() - 256) < 0.08 * 256
    assert sizes.std() > 50
    s2 = quantity_skew_sizes(np.random.default_rng(1), 50, 100, min_size=90, max_size=110)
    assert s2.min() >= 90 and s2.max() <= 110
    np.testing.assert_array_equal(quantity_skew_sizes(5, 20, 64), quantity_skew_sizes(5, 20, 64))
    with pytest.raises(ValueError):
        quantity_skew_sizes(0, 5, 100, min_size=50, max_size=10)


def test_iid_partition() -> None:
    """Every index exactly once, near-equal sizes."""
    parts = iid_partition(0, 103, 10)
    _check_exact_cover(parts, 103)
    sizes = [p.size for p in parts]
    assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError):
        iid_partition(0, 3, 5)


@pytest.mark.parametrize("alpha", [0.05, 0.5, 1000.0])
def test_dirichlet_partition_covers_and_nonempty(alpha: float) -> None:
    """Exact cover, no empty client, deterministic for a seed."""
    labels = np.random.default_rng(0).integers(0, 3, 900)
    parts = dirichlet_partition(1, labels, 30, alpha, min_per_client=2)
    assert len(parts) == 30
    _check_exact_cover(parts, labels.size)
    assert min(p.size for p in parts) >= 2
    again = dirichlet_partition(1, labels, 30, alpha, min_per_client=2)
    for a, b in zip(parts, again, strict=True):
        np.testing.assert_array_equal(a, b)


def test_dirichlet_partition_skew_depends_on_alpha() -> None:
    """Large alpha gives each client ~ the global label mix; small alpha skews it."""
    labels = np.repeat([0, 1], 2000)
    rng = np.random.default_rng(0)
    uniform = dirichlet_partition(rng, labels, 10, 1000.0)
    skewed = dirichlet_partition(rng, labels, 10, 0.1)
    pos_u = np.array([labels[p].mean() for p in uniform])
    pos_s = np.array([labels[p].mean() for p in skewed])
    assert np.abs(pos_u - 0.5).max() < 0.05
    assert np.abs(pos_s - 0.5).mean() > 0.25
    sizes_u = np.array([p.size for p in uniform])
    assert np.abs(sizes_u - 400).max() < 40


def test_dirichlet_partition_too_few_examples() -> None:
    """Asking for more than the data allows raises."""
    with pytest.raises(ValueError):
        dirichlet_partition(0, np.zeros(5, int), 4, 1.0, min_per_client=2)


def test_label_noise_flips_only_noisy_hospitals_real_rows():
    import jax

    from medichain_jax.data.federation import with_label_noise
    from tests.conftest import make_clients

    data = make_clients([200, 150, 0], capacity=200)
    noisy = np.array([True, False, True])
    out, flipped = with_label_noise(data, noisy, 0.3, jax.random.key(0))
    changed = np.asarray(out.y != data.y)[..., 0]
    assert changed[1].sum() == 0 and changed[2].sum() == 0
    assert not changed[0, 200:].any()
    assert 0.2 < changed[0].mean() < 0.4 and flipped.tolist() == [changed[0].sum(), 0, 0]
    np.testing.assert_array_equal(np.asarray(out.y)[changed], 1 - np.asarray(data.y)[changed])
    with pytest.raises(ValueError, match="label noise rate"):
        with_label_noise(data, noisy, 1.5, jax.random.key(0))


def test_majority_label_by_hand():
    groups, label = majority_label(np.array(["b", "a", "b", "a", "b"]), np.array([1, 0, 1, 1, 0]))
    assert groups.tolist() == ["a", "b"] and label.tolist() == [0, 1]  # a: tie -> lowest


@pytest.mark.parametrize("kind", ["iid", "quantity", "dirichlet"])
def test_group_partitions_keep_groups_whole(kind):
    rng = np.random.default_rng(0)
    group = rng.integers(0, 60, 400)  # 60 patients, several rows each
    labels = rng.integers(0, 2, 400)
    client = partition_groups(group, kind, 5, 3, labels, alpha=0.3)
    assert set(client.tolist()) == set(range(5))
    for g in np.unique(group):
        assert np.unique(client[group == g]).size == 1
    np.testing.assert_array_equal(client, partition_groups(group, kind, 5, 3, labels, alpha=0.3))
    if kind == "quantity":  # patients per client are unequal
        per = [np.unique(group[client == k]).size for k in range(5)]
        assert max(per) > 1.5 * min(per) and sum(per) == 60


def test_feature_partition_sorts_groups_by_value():
    group = np.array([3, 1, 2, 1, 0, 3])
    value = np.array([0.5, 2.0, 1.0, 9.9, 3.0, 0.7])  # a group's first row counts
    # groups sorted by value: 3 (0.5), 2 (1.0), 1 (2.0), 0 (3.0) -> 2 clients of 2 groups
    np.testing.assert_array_equal(partition_by_feature(group, value, 2), [0, 1, 0, 1, 1, 0])
    with pytest.raises(ValueError, match="cannot split 4 groups"):
        partition_by_feature(group, value, 5)


def test_hash_split_is_per_group_and_deterministic():
    group = np.repeat(np.arange(400).astype(str), 3)
    test = hash_test_split(group, 0.25)
    assert (test.reshape(-1, 3) == test.reshape(-1, 3)[:, :1]).all()
    assert 0.18 < test.mean() < 0.32
    np.testing.assert_array_equal(test, hash_test_split(group, 0.25))
    assert not np.array_equal(test, hash_test_split(group, 0.25, salt="x"))
