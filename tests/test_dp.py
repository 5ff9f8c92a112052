"""Differential privacy: clipping, the Gaussian mechanism, adaptive clipping, DP-SGD and the
accountant, against numpy / closed-form references; then DP inside the compiled round."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from medichain_jax import rng
from medichain_jax.engine.parallel import Parallelism
from medichain_jax.engine.round import build_round
from medichain_jax.fl.algorithm import tree_sub
from medichain_jax.fl.client import TrainHParams, batch_loss, local_train, private_batch_grad
from medichain_jax.fl.fedavg import fedavg
from medichain_jax.privacy import accounting
from medichain_jax.privacy.dp import (
    ClientDP,
    DPState,
    add_noise,
    clip_update,
    init_dp_state,
    private_mean,
    split_noise_multiplier,
)
from tests.conftest import make_clients


def tree_norm(t):
    return math.sqrt(sum(float(np.sum(np.asarray(x, np.float64) ** 2)) for x in jax.tree.leaves(t)))


@pytest.mark.parametrize("scale", [0.01, 1.0, 50.0])
def test_clip_update_bounds_the_norm_and_matches_numpy(scale):
    r = np.random.default_rng(0)
    tree = {"a": scale * r.normal(size=(7, 3)), "b": {"c": scale * r.normal(size=(11,))}}
    tree = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)
    clipped, norm = clip_update(tree, 1.5)
    ref = tree_norm(tree)
    assert float(norm) == pytest.approx(ref, rel=1e-5)
    assert tree_norm(clipped) <= 1.5 * (1 + 1e-6)
    factor = min(1.0, 1.5 / ref)
    jax.tree.map(
        lambda c, x: np.testing.assert_allclose(c, np.asarray(x) * factor, rtol=1e-5),
        clipped,
        tree,
    )


def test_gaussian_noise_has_the_requested_stddev():
    total = {"w": jnp.zeros((200_000,)), "b": jnp.full((3,), 2.0)}
    noisy = add_noise(total, jax.random.key(7), 0.3)
    z = np.asarray(noisy["w"], np.float64)
    n = z.size
    assert abs(z.mean()) < 5 * 0.3 / math.sqrt(n)
    assert z.std() == pytest.approx(0.3, rel=5 / math.sqrt(2 * n))  # 5 standard errors
    assert stats.kstest(z / 0.3, "norm").pvalue > 1e-3
    assert not np.allclose(noisy["b"], 2.0)  # every leaf gets noise


def test_private_mean_noise_over_many_draws_and_fixed_denominator():
    dp = ClientDP(clip_norm=2.0, noise_multiplier=0.8, expected_clients=10)
    total = {"w": jnp.ones((4,)) * 3.0}
    keys = jax.random.split(jax.random.key(3), 4000)
    draw = jax.vmap(lambda k: private_mean(total, jnp.float32(10), init_dp_state(dp), k, dp)[0])
    means = np.asarray(draw(keys)["w"], np.float64)
    # mean of (3 + N(0, (z C)^2)) / 10 per coordinate
    assert means.mean() == pytest.approx(0.3, abs=5 * 0.16 / math.sqrt(means.size))
    assert means.std() == pytest.approx(0.8 * 2.0 / 10, rel=5 / math.sqrt(2 * means.size))
    quiet = ClientDP(clip_norm=2.0, noise_multiplier=0.0, expected_clients=10)
    mean, state, _ = private_mean(total, jnp.float32(3), init_dp_state(quiet), keys[0], quiet)
    np.testing.assert_allclose(mean["w"], 0.3)
    assert int(state.rounds) == 1 and float(state.clip_norm) == 2.0


def test_split_noise_multiplier_by_hand():
    # z = 1, sigma_b = 1: (1 - 1/4)^-1/2
    assert split_noise_multiplier(1.0, 1.0) == pytest.approx(1 / math.sqrt(0.75))
    assert split_noise_multiplier(0.0, 0.5) == 0.0
    with pytest.raises(ValueError, match="sigma_b"):
        split_noise_multiplier(1.0, 0.4)
    with pytest.raises(ValueError, match="sigma_b"):
        ClientDP(clip_norm=1.0, noise_multiplier=1.0, expected_clients=5, adaptive=True)


def test_adaptive_clipping_moves_geometrically_towards_the_quantile():
    dp = ClientDP(
        clip_norm=1.0,
        noise_multiplier=0.0,
        expected_clients=10,
        adaptive=True,
        target_quantile=0.5,
        clip_lr=0.2,
        count_stddev=1e-9,
    )
    state = DPState(jnp.float32(1.0), jnp.int32(0))
    total = {"w": jnp.zeros((2,))}
    # 9 of 10 updates unclipped: clip too large -> shrink by exp(-0.2 (0.9 - 0.5))
    _, s1, st = private_mean(total, jnp.float32(9), state, jax.random.key(0), dp)
    assert float(s1.clip_norm) == pytest.approx(math.exp(-0.2 * 0.4), rel=1e-5)
    assert float(st["unclipped_estimate"]) == pytest.approx(0.9, rel=1e-5)
    # 1 of 10 unclipped: grow
    _, s2, _ = private_mean(total, jnp.float32(1), state, jax.random.key(0), dp)
    assert float(s2.clip_norm) == pytest.approx(math.exp(0.2 * 0.4), rel=1e-5)


def gaussian_delta(eps, mu):
    """Exact delta(eps) of a Gaussian mechanism with mu = sensitivity / sigma (Balle & Wang
    2018, Theorem 8); T compositions at multiplier z are one with mu = sqrt(T) / z."""
    return stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2)


@pytest.mark.parametrize(("z", "rounds"), [(1.0, 10), (2.0, 50), (0.7, 3)])
def test_epsilon_without_sampling_matches_the_exact_gaussian_mechanism(z, rounds):
    delta = 1e-5
    mu = math.sqrt(rounds) / z
    lo, hi = 0.0, 200.0
    for _ in range(200):  # solve gaussian_delta(eps) = delta by bisection
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if gaussian_delta(mid, mu) > delta else (lo, mid)
    exact = hi
    pld_eps = accounting.epsilon(z, 1.0, rounds, delta, "pld")
    rdp_eps = accounting.epsilon(z, 1.0, rounds, delta, "rdp")
    assert pld_eps == pytest.approx(exact, rel=0.01)
    assert exact <= rdp_eps <= 1.3 * exact  # RDP is an upper bound


def test_epsilon_equals_dp_accounting_for_sampled_rounds():
    import dp_accounting
    from dp_accounting import pld, rdp

    z, q, t, delta = 1.1, 0.05, 200, 1e-5
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), t
    )
    for kind, acc in (("rdp", rdp.RdpAccountant()), ("pld", pld.PLDAccountant())):
        acc.compose(event)
        assert accounting.epsilon(z, q, t, delta, kind) == acc.get_epsilon(delta)
    assert accounting.epsilon(0.0, q, t, delta) == math.inf
    assert accounting.epsilon(z, q, 0, delta) == 0.0


def test_calibrated_noise_spends_the_target():
    z = accounting.calibrate_noise(3.0, 0.25, 40, 1e-5)
    eps = accounting.epsilon(z, 0.25, 40, 1e-5)
    assert eps <= 3.0 and eps == pytest.approx(3.0, rel=0.02)
    assert accounting.epsilon(z * 0.95, 0.25, 40, 1e-5) > 3.0


def test_record_level_budget_uses_each_hospitals_rate():
    b = accounting.RecordLevelBudget(1.2, batch_size=8, epochs=2, delta=1e-5)
    assert b.hospital_epsilon(40, 3) == accounting.epsilon(1.2, 8 / 40, 3 * 2 * 5, 1e-5)
    assert b.hospital_epsilon(40, 0) == 0.0
    assert b.epsilon_after([40, 10], [3, 3]) == max(
        b.hospital_epsilon(40, 3), b.hospital_epsilon(10, 3)
    )


# -- record-level DP-SGD ---------------------------------------------------------------------


def test_private_batch_grad_matches_per_example_numpy_reference(tiny_model):
    data = make_clients([6], capacity=8)
    x, y = data.x[0], data.y[0]
    mask = jnp.arange(8) < 6
    variables = tiny_model.init(jax.random.key(0))
    hp = TrainHParams(model=tiny_model, batch_size=8, record_clip=0.05, record_noise=0.0)
    grad_fn = jax.value_and_grad(
        lambda p, s, xx, yy, m: batch_loss(hp, p, s, xx, yy, m), has_aux=True
    )
    value, g, clipped = private_batch_grad(
        grad_fn, hp, variables["params"], variables["stats"], x, y, mask, jax.random.key(1)
    )
    n_clipped = 0
    ref = jax.tree.map(jnp.zeros_like, variables["params"])
    for i in range(6):  # one example at a time, clipped in numpy
        (_, _), gi = grad_fn(
            variables["params"], variables["stats"], x[i : i + 1], y[i : i + 1], jnp.ones(1)
        )
        f = min(1.0, 0.05 / tree_norm(gi))
        n_clipped += f < 1
        ref = jax.tree.map(lambda r, a, f=f: r + np.asarray(a) * f, ref, gi)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, np.asarray(b) / 8, atol=1e-7), g, ref)
    full, _ = batch_loss(hp, variables["params"], variables["stats"], x, y, mask)
    assert float(value) == pytest.approx(float(full), rel=1e-5)
    assert int(clipped) == n_clipped > 0


def test_private_batch_grad_noise_stddev(tiny_model):
    data = make_clients([4], capacity=16)
    variables = tiny_model.init(jax.random.key(0))
    hp = TrainHParams(model=tiny_model, batch_size=16, record_clip=2.0, record_noise=1.5)
    grad_fn = jax.value_and_grad(
        lambda p, s, xx, yy, m: batch_loss(hp, p, s, xx, yy, m), has_aux=True
    )
    mask = jnp.zeros(16, bool)  # no real row: the gradient is pure noise
    _, g, _ = private_batch_grad(
        grad_fn,
        hp,
        variables["params"],
        variables["stats"],
        data.x[0],
        data.y[0],
        mask,
        jax.random.key(5),
    )
    z = np.concatenate([np.ravel(a) for a in jax.tree.leaves(g)])
    assert z.size > 1000
    assert z.std() == pytest.approx(1.5 * 2.0 / 16, rel=5 / math.sqrt(2 * z.size))


@pytest.mark.slow  # DP-SGD's numbers are checked by the per-example reference test above
def test_record_level_dp_sgd_trains_and_is_deterministic(tiny_model):
    data = make_clients([20], capacity=24)
    one = jax.tree.map(lambda a: a[0], data)
    variables = tiny_model.init(jax.random.key(0))
    hp = TrainHParams(model=tiny_model, batch_size=8, lr=0.1, record_clip=1.0, record_noise=1.0)
    a, ma = local_train(variables, one, jax.random.key(2), hp)
    b, _ = local_train(variables, one, jax.random.key(2), hp)
    c, _ = local_train(variables, one, jax.random.key(3), hp)
    plain, _ = local_train(
        variables, one, jax.random.key(2), TrainHParams(model=tiny_model, batch_size=8, lr=0.1)
    )
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert not np.allclose(a["params"]["fc2"]["kernel"], c["params"]["fc2"]["kernel"])
    assert not np.allclose(a["params"]["fc2"]["kernel"], plain["params"]["fc2"]["kernel"])
    assert int(ma["steps"]) == 3
    assert 0 <= float(ma["clipped_fraction"]) <= 1


# -- inside the compiled round ----------------------------------------------------------------


def dp_round(model, dp, clients, cohort=None, **kw):
    hp = TrainHParams(model=model, batch_size=8, lr=0.1)
    algo = fedavg(hp)
    n = clients.y.shape[0]
    fn = jax.jit(build_round(algo, n, cohort or n, Parallelism("vmap"), dp=dp, **kw))
    init = model.init(jax.random.key(0))
    state = algo.init(init).replace(privacy_state=init_dp_state(dp))
    return algo, hp, init, fn, state


def test_dp_round_is_the_fixed_denominator_mean_of_clipped_updates(tiny_model):
    clients = make_clients([16, 9, 12, 5])
    dp = ClientDP(clip_norm=0.05, noise_multiplier=0.0, expected_clients=4)
    algo, hp, init, fn, state = dp_round(tiny_model, dp, clients)
    seed = jnp.uint32(0)
    new, _, info = fn(state, clients, None, seed)
    ref = None
    for i in range(4):
        one = jax.tree.map(lambda a, i=i: a[i], clients)
        local, _ = local_train(init, one, rng.client_key(seed, 0, i), hp)
        upd = tree_sub(init, local)
        f = min(1.0, 0.05 / tree_norm(upd))
        upd = jax.tree.map(lambda u, f=f: np.asarray(u, np.float64) * f, upd)
        ref = upd if ref is None else jax.tree.map(np.add, ref, upd)
        assert float(info.metrics["update_norm"][i]) == pytest.approx(
            tree_norm(tree_sub(init, local)), rel=1e-4
        )
    expect = jax.tree.map(lambda g, r: np.asarray(g) - r / 4, init, ref)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), new.params, expect)
    assert np.all(np.asarray(info.metrics["clipped"]))  # every update was above 0.05
    assert np.all(np.asarray(info.weights) == 1.0)
    assert tree_norm(tree_sub(init, new.params)) <= 0.05 * (1 + 1e-5)
    assert int(new.privacy_state.rounds) == 1


def test_dp_round_noise_is_keyed_by_seed_and_round(tiny_model):
    clients = make_clients([16, 9, 12, 5])
    dp = ClientDP(clip_norm=0.05, noise_multiplier=1.0, expected_clients=4)
    _, _, init, fn, state = dp_round(tiny_model, dp, clients)
    a, _, info = fn(state, clients, None, jnp.uint32(0))
    b, _, _ = fn(state, clients, None, jnp.uint32(0))
    c, _, _ = fn(state, clients, None, jnp.uint32(1))
    jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
    assert not np.allclose(a.params["params"]["fc2"]["kernel"], c.params["params"]["fc2"]["kernel"])
    assert float(info.server["noise_stddev"]) == pytest.approx(0.05)


def test_dp_round_sharded_equals_single_device(tiny_model):
    from medichain_jax.engine.round import client_mesh, replicate

    clients = make_clients([16, 9, 12, 5])
    dp = ClientDP(
        clip_norm=0.05, noise_multiplier=0.5, expected_clients=4, adaptive=True, count_stddev=1.0
    )
    algo, hp, init, single, state = dp_round(tiny_model, dp, clients)
    mesh = client_mesh(2)
    sharded = jax.jit(build_round(algo, 4, 4, Parallelism("map"), mesh=mesh, dp=dp))
    a, _, ia = single(state, clients, None, jnp.uint32(0))
    b, _, ib = sharded(replicate(state, mesh), replicate(clients, mesh), None, jnp.uint32(0))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), a.params, b.params)
    assert float(a.privacy_state.clip_norm) == pytest.approx(
        float(b.privacy_state.clip_norm), rel=1e-6
    )
    np.testing.assert_allclose(ia.metrics["update_norm"], ib.metrics["update_norm"], rtol=1e-5)
