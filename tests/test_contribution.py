"""Contribution scores: LOO and Monte Carlo Shapley against brute-force references."""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medichain_jax.fl.client import masked_bce
from medichain_jax.fl.contribution import (
    leave_one_out,
    monte_carlo_shapley,
    round_contributions,
    subset_update,
)
from medichain_jax.types import ClientData
from tests.conftest import make_clients


def subset_table(m, seed=0):
    """A non-additive utility tabulated over all 2^m subsets: sqrt of a weighted sum plus a
    pairwise synergy; index = sum_i mask_i 2^i."""
    a = np.random.default_rng(seed).uniform(0.5, 3.0, m)
    table = np.zeros(2**m)
    for idx in range(2**m):
        s = np.array([(idx >> i) & 1 for i in range(m)], bool)
        table[idx] = np.sqrt(a @ s) + 0.5 * (s[0] and s[1])
    return table


def table_utility(table):
    """Jittable ``u(mask)`` reading ``table`` (exact: integer index + gather)."""
    t = jnp.asarray(table, jnp.float32)
    m = int(np.log2(len(table)))
    return lambda mask: t[jnp.sum(mask.astype(jnp.int32) << jnp.arange(m))]


def exact_shapley(table, m):
    """Classic formula: phi_i = sum_{S not containing i} |S|!(m-|S|-1)!/m! (u(S+i) - u(S))."""
    phi = np.zeros(m)
    for i in range(m):
        others = [j for j in range(m) if j != i]
        for r in range(m):
            for s in itertools.combinations(others, r):
                idx = sum(1 << j for j in s)
                coef = math.factorial(r) * math.factorial(m - r - 1) / math.factorial(m)
                phi[i] += coef * (table[idx | (1 << i)] - table[idx])
    return phi


def exact_loo(table, m):
    full = 2**m - 1
    return np.array([table[full] - table[full & ~(1 << i)] for i in range(m)])


def drop_client(table, m, k):
    """The table of the same utility on m - 1 clients, client ``k`` never in any subset."""
    out = []
    for idx in range(2 ** (m - 1)):
        low, high = idx & ((1 << k) - 1), idx >> k
        out.append(table[low | (high << (k + 1))])
    return np.array(out)


def test_subset_update_weighted_mean_and_empty():
    u = {"w": jnp.array([[1.0, 2.0], [3.0, 4.0], [10.0, -2.0], [7.0, 7.0]])}
    w = jnp.array([1.0, 3.0, 0.0, 2.0])
    got = subset_update(u, w, jnp.array([True, True, True, False]))  # client 2 has weight 0
    np.testing.assert_allclose(got["w"], [(1 + 9) / 4, (2 + 12) / 4])
    got = subset_update(u, w, jnp.array([0.0, 0.0, 1.0, 0.0]))  # only a weight-0 client
    np.testing.assert_array_equal(got["w"], [0.0, 0.0])


@pytest.mark.parametrize("m", [4, 5])
def test_shapley_and_loo_match_brute_force(m):
    table = subset_table(m)
    u = table_utility(table)
    np.testing.assert_allclose(leave_one_out(u, m, batch_size=3), exact_loo(table, m), atol=1e-6)
    mc = jax.jit(monte_carlo_shapley, static_argnums=(0, 1, 3, 5))(
        u, m, jax.random.key(1), 2000, None, 256
    )
    np.testing.assert_allclose(mc, exact_shapley(table, m), atol=0.03)


def test_shapley_additive_utility_is_exact_and_efficiency_holds():
    a = jnp.array([1.0, -2.0, 0.5, 3.0, 0.25])  # dyadic: float sums are exact
    additive = lambda mask: jnp.sum(jnp.where(mask, a, 0.0))  # noqa: E731
    for p in (1, 3, 7):  # every marginal is exact; XLA's vectorized mean may round by 1 ulp
        mc = monte_carlo_shapley(additive, 5, jax.random.key(p), p, batch_size=4)
        np.testing.assert_array_max_ulp(mc, a, maxulp=1)
    table = subset_table(5, seed=3)
    mc = monte_carlo_shapley(table_utility(table), 5, jax.random.key(0), 3)
    np.testing.assert_allclose(mc.sum(), table[-1] - table[0], rtol=1e-6)


def test_absent_client_scores_zero_and_changes_nothing():
    m, k = 5, 2
    table = subset_table(m, seed=1)
    present = jnp.arange(m) != k
    small = drop_client(table, m, k)

    loo = leave_one_out(table_utility(table), m, present)
    want = leave_one_out(table_utility(small), m - 1)
    assert loo[k] == 0.0
    np.testing.assert_array_equal(np.delete(np.asarray(loo), k), want)

    mc = monte_carlo_shapley(table_utility(table), m, jax.random.key(2), 2000, present, 512)
    assert mc[k] == 0.0
    np.testing.assert_allclose(np.delete(np.asarray(mc), k), exact_shapley(small, m - 1), atol=0.03)
    np.testing.assert_allclose(mc.sum(), small[-1] - small[0], rtol=1e-5)


# utility "auc" runs with `-m slow` (same ranking code path as "loss", a different utility)
@pytest.mark.parametrize("utility", ["loss", pytest.param("auc", marks=pytest.mark.slow)])
def test_round_contributions_ranks_sign_flipping_client_last(tiny_model, utility):
    """3 honest hospitals (one SGD step each), 1 sending the negated honest mean, 1 absent; the
    server validates on data like the honest hospitals'. (Single steps on flipped labels from a
    random init are too noisy to rank reliably, so the attack is an explicit sign flip.)"""
    v0 = jax.jit(tiny_model.init)(jax.random.key(0))
    data = make_clients([16] * 5, seed=1)
    val = ClientData(data.x[:3].reshape(48, 16, 16, 1), data.y[:3].reshape(48, 1), jnp.int32(48))
    weights = jnp.array([16.0, 16.0, 16.0, 16.0, 0.0])  # client 4 absent

    def update(c: ClientData):
        def loss(v):
            return masked_bce(tiny_model.apply(v, c.x, train=False)[0], c.y, c.mask())

        return jax.tree.map(lambda g: 0.01 * g, jax.grad(loss)(v0))  # global - (global - lr*g)

    updates = jax.tree.map(lambda u: u.at[3].set(-u[:3].mean(0)), jax.jit(jax.vmap(update))(data))
    fn = jax.jit(
        functools.partial(
            round_contributions, tiny_model, permutations=8, batch_size=8, utility=utility
        )
    )
    out = fn(v0, updates, weights, val, jax.random.key(3))
    loo, shap = np.asarray(out["loo"]), np.asarray(out["shapley"])
    assert all(np.isfinite(v).all() for v in (loo, shap, out["utility_all"]))
    assert loo[4] == 0.0 and shap[4] == 0.0
    assert shap[3] < min(0.0, shap[:3].min()) and loo[3] < min(0.0, loo[:3].min())
    np.testing.assert_allclose(shap.sum(), out["utility_all"], rtol=1e-4, atol=1e-6)


def test_stratified_shapley_is_exact_for_size_only_utilities():
    """u(S) = f(|S|): every client's Shapley value is (f(m) - f(0)) / m. Stratified permutations
    put each client at each position once, so m of them give it exactly; random ones do not."""
    m = 6
    f = jnp.array([0.0, 5.0, 6.0, 6.5, 6.75, 6.875, 7.0])  # dyadic: exact float sums
    u = lambda mask: f[jnp.sum(mask)]  # noqa: E731
    strat = monte_carlo_shapley(u, m, jax.random.key(0), m)
    np.testing.assert_allclose(strat, np.full(m, 7.0 / m), rtol=1e-6)
    plain = monte_carlo_shapley(u, m, jax.random.key(0), m, stratified=False)
    assert np.ptp(np.asarray(plain)) > 0.5
