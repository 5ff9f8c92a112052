"""Robust aggregators against numpy references, with absent (weight-0) clients holding garbage."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medichain_jax.fl.aggregators import (
    AGGREGATORS,
    coordinate_median,
    get_aggregator,
    krum,
    krum_scores,
    multi_krum,
    trimmed_mean,
    weighted_mean,
)

M = 9
WEIGHTS = np.array([3, 0, 5, 1, 0, 2, 7, 0, 4], np.float32)  # clients 1, 4, 7 are absent
PRESENT = WEIGHTS > 0


def random_tree(seed=0, garbage=True):
    """A pytree of ``[M, ...]`` leaves; absent rows hold NaN / Inf / huge values."""
    rng = np.random.default_rng(seed)
    tree = {
        "params": {"a": rng.normal(size=(M, 3, 2)), "b": rng.normal(size=(M, 4))},
        "stats": {},
    }
    tree = jax.tree.map(lambda x: x.astype(np.float32), tree)
    if garbage:
        for leaf in jax.tree.leaves(tree):
            leaf[1], leaf[4], leaf[7] = np.nan, np.inf, -1e30
    return tree


def np_trimmed(x, beta):
    k = len(x)
    b = int(np.floor(beta * k))
    return np.sort(x, axis=0)[b : k - b].mean(axis=0)


def check_tree(out, ref_fn, tree):
    assert jax.tree.structure(out) == jax.tree.structure(tree)
    for o, t in zip(jax.tree.leaves(out), jax.tree.leaves(tree), strict=True):
        assert o.dtype == t.dtype and o.shape == t.shape[1:]
        np.testing.assert_allclose(o, ref_fn(t[PRESENT]), rtol=1e-6, atol=1e-6)


def test_median_matches_numpy():
    tree = random_tree()
    out = jax.jit(coordinate_median.aggregate)(tree, jnp.asarray(WEIGHTS))
    check_tree(out, lambda x: np.median(x, axis=0), tree)
    assert out["stats"] == {}


@pytest.mark.parametrize("beta", [0.0, 0.2, 0.34, 0.49])
def test_trimmed_mean_matches_numpy(beta):
    tree = random_tree(seed=1)
    out = jax.jit(trimmed_mean(beta).aggregate)(tree, jnp.asarray(WEIGHTS))
    check_tree(out, lambda x: np_trimmed(x, beta), tree)


def test_trimmed_mean_traced_client_count():
    """One compiled function serves every number of present clients."""
    tree = random_tree(seed=2)
    agg = jax.jit(trimmed_mean(0.25).aggregate)
    for k in range(1, M + 1):
        w = np.zeros(M, np.float32)
        w[:k] = 1.0
        out = agg(jax.tree.map(lambda x: np.nan_to_num(x), tree), jnp.asarray(w))
        ref = np_trimmed(np.nan_to_num(tree["params"]["b"])[:k], 0.25)
        np.testing.assert_allclose(out["params"]["b"], ref, rtol=1e-6, atol=1e-6)


def byzantine_example(seed=0):
    """7 honest updates near ``c``, 2 Byzantine ones at ``-10 c``, 2 absent rows of NaN."""
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(5,)).astype(np.float32)
    honest = c + 0.1 * rng.normal(size=(7, 5)).astype(np.float32)
    flat = np.concatenate([honest[:3], [-10 * c, [np.nan] * 5], honest[3:], [-10 * c, c * 0]])
    flat = flat.astype(np.float32)
    flat[-1] = np.inf
    weights = np.array([1, 2, 3, 5, 0, 1, 1, 1, 1, 9, 0], np.float32)
    honest_idx = np.array([0, 1, 2, 5, 6, 7, 8])
    tree = {"w": flat[:, :3].reshape(-1, 3, 1), "b": flat[:, 3:], "empty": {}}
    return tree, flat, weights, honest_idx


def np_krum_scores(flat, weights, f):
    present = np.flatnonzero(weights > 0)
    k = len(present)
    n_nb = min(max(k - f - 2, 1), k - 1)
    scores = np.full(len(weights), np.inf)
    for i in present:
        d = sorted(np.sum((flat[i] - flat[j]) ** 2) for j in present if j != i)
        scores[i] = sum(d[:n_nb])
    return scores


@pytest.mark.parametrize("f", [0, 1, 2, 4])
def test_krum_scores_match_brute_force(f):
    tree, flat, weights, _ = byzantine_example()
    scores = jax.jit(krum_scores, static_argnums=2)(tree, jnp.asarray(weights), f)
    np.testing.assert_allclose(scores, np_krum_scores(flat, weights, f), rtol=1e-5)


def test_krum_selects_an_honest_update():
    tree, flat, weights, honest = byzantine_example()
    out = jax.jit(krum(2).aggregate)(tree, jnp.asarray(weights))
    best = int(np.argmin(np_krum_scores(flat, weights, 2)))
    assert best in honest
    got = np.concatenate([out["w"].ravel(), out["b"]])
    np.testing.assert_array_equal(got, flat[best])
    assert out["empty"] == {} and out["w"].shape == (3, 1) and out["w"].dtype == np.float32


@pytest.mark.parametrize("m", [None, 3])
def test_multi_krum_averages_the_honest_set(m):
    tree, flat, weights, honest = byzantine_example(seed=3)
    out = jax.jit(multi_krum(2, m).aggregate)(tree, jnp.asarray(weights))
    n = len(honest) if m is None else m  # k - f = 9 - 2 = 7 honest clients
    chosen = np.argsort(np_krum_scores(flat, weights, 2), kind="stable")[:n]
    assert set(chosen) <= set(honest)
    got = np.concatenate([out["w"].ravel(), out["b"]])
    np.testing.assert_allclose(got, flat[chosen].mean(axis=0), rtol=1e-5, atol=1e-6)


def test_single_present_client_is_returned():
    tree = random_tree(seed=4)
    w = np.zeros(M, np.float32)
    w[5] = 2.0
    for agg in (krum(1), multi_krum(1), coordinate_median, trimmed_mean(0.3)):
        out = jax.jit(agg.aggregate)(tree, jnp.asarray(w))
        np.testing.assert_allclose(out["params"]["b"], tree["params"]["b"][5], rtol=1e-6)


@pytest.mark.parametrize("name", AGGREGATORS)
def test_all_absent_gives_zeros_and_keeps_structure(name):
    garbage = name != "mean"  # the linear mean relies on the engine having zeroed absent rows
    tree = random_tree(seed=5, garbage=garbage)
    tree["params"]["h"] = np.full((M, 2), np.nan if garbage else 1.0, jnp.bfloat16)
    out = jax.jit(get_aggregator(name).aggregate)(tree, jnp.zeros(M, jnp.float32))
    assert jax.tree.structure(out) == jax.tree.structure(tree)
    for o, t in zip(jax.tree.leaves(out), jax.tree.leaves(tree), strict=True):
        assert o.dtype == t.dtype and o.shape == t.shape[1:]
        np.testing.assert_array_equal(o, 0)


def test_registry():
    assert AGGREGATORS == ("mean", "median", "trimmed_mean", "krum", "multi_krum")
    assert get_aggregator("mean") is weighted_mean and weighted_mean.linear
    for name in AGGREGATORS:
        agg = get_aggregator(name)
        assert agg.name == name and agg.linear == (name == "mean")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"name": "mediann"}, "choose from"),
        ({"name": "trimmed_mean", "trim_beta": 0.5}, "trim_beta"),
        ({"name": "trimmed_mean", "trim_beta": -0.1}, "trim_beta"),
        ({"name": "krum", "krum_f": -1}, "krum_f"),
        ({"name": "multi_krum", "krum_f": 1.5}, "krum_f"),
        ({"name": "multi_krum", "multi_krum_m": 0}, "multi_krum_m"),
    ],
)
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        get_aggregator(**kwargs)
