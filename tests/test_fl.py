"""FedAvg, aggregation and the engine's client-parallelism strategies against references."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from medichain_jax import rng
from medichain_jax.engine.parallel import Parallelism, resolve
from medichain_jax.engine.round import build_round, client_mesh, replicate, sample_cohort
from medichain_jax.fl.aggregators import weighted_mean
from medichain_jax.fl.client import TrainHParams, local_train, masked_bce
from medichain_jax.fl.fedavg import fedavg
from medichain_jax.types import ClientData
from tests.conftest import make_clients

STRATEGIES = [
    Parallelism("map"),
    Parallelism("vmap"),
    Parallelism("chunked", 2),
    Parallelism("chunked", 3),
]


def allclose_tree(a, b, **kw):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **kw), a, b)


def test_weighted_mean_exact():
    u = {"w": jnp.array([[1.0, 2.0], [3.0, 4.0], [10.0, -2.0]])}
    w = jnp.array([1.0, 3.0, 0.0])
    out = weighted_mean.aggregate(u, w)
    np.testing.assert_array_equal(out["w"], [(1 + 9) / 4, (2 + 12) / 4])


def test_fedavg_one_client_one_step_equals_centralized_sgd(tiny_model):
    data = make_clients([12])
    one = jax.tree.map(lambda a: a[0], data)
    hp = TrainHParams(model=tiny_model, epochs=1, batch_size=12, lr=0.1)
    alg = fedavg(hp)
    v0 = tiny_model.init(jax.random.key(0))
    state = alg.init(v0)
    rf = jax.jit(build_round(alg, 1, 1, Parallelism("map")))
    state, _, _ = rf(state, data, None, jnp.uint32(0))

    def loss(p):
        logits, _ = tiny_model.apply({"params": p, "stats": {}}, one.x, train=True)
        return masked_bce(logits, one.y, jnp.ones(12, bool))

    grads = jax.grad(loss)(v0["params"])
    want = jax.tree.map(lambda p, g: p - 0.1 * g, v0["params"], grads)
    allclose_tree(state.params["params"], want, rtol=1e-5, atol=1e-7)


def test_padding_changes_no_client_result(tiny_model):
    hp = TrainHParams(model=tiny_model, epochs=2, batch_size=4, lr=0.05)
    v0 = tiny_model.init(jax.random.key(0))
    key = jax.random.key(7)
    outs = []
    for cap in (10, 13, 24):
        d = jax.tree.map(lambda a: a[0], make_clients([10], capacity=cap))
        outs.append(jax.jit(lambda v, d: local_train(v, d, key, hp))(v0, d))
    for out in outs[1:]:
        allclose_tree(out, outs[0], rtol=1e-6, atol=1e-7)
    assert float(outs[0][1]["steps"]) == 2 * 3  # ceil(10 / 4) steps per epoch, padding skipped


def test_empty_client_is_a_noop(tiny_model):
    hp = TrainHParams(model=tiny_model, batch_size=4)
    v0 = tiny_model.init(jax.random.key(0))
    d = jax.tree.map(lambda a: a[0], make_clients([0], capacity=8))
    v1, m = local_train(v0, d, jax.random.key(1), hp)
    allclose_tree(v1, v0, rtol=0, atol=0)
    assert float(m["steps"]) == 0


def sequential_reference(alg, state, data, seed, cohort):
    """A plain Python loop over clients + numpy weighted mean: what every strategy must equal."""
    updates, weights = [], []
    for c in cohort:
        d = jax.tree.map(lambda a, c=c: a[c], data)
        out = alg.client_update(state.params, d, rng.client_key(seed, state.round, c), None)
        updates.append(out.update)
        weights.append(float(out.weight))
    w = np.array(weights)
    mean = jax.tree.map(
        lambda *u: np.tensordot(w, np.stack(u), axes=1) / max(w.sum(), 1e-30), *updates
    )
    return alg.server_update(state, mean)


# the full cohort (5) runs with `-m slow`; the sampled cohort (3) covers every strategy in CI
@pytest.mark.parametrize("cohort_size", [pytest.param(5, marks=pytest.mark.slow), 3])
def test_every_strategy_matches_sequential_reference(tiny_model, clients, cohort_size):
    hp = TrainHParams(model=tiny_model, epochs=2, batch_size=5, lr=0.1, momentum=0.5)
    alg = fedavg(hp, optax.adam(0.01))
    state0 = alg.init(tiny_model.init(jax.random.key(0)))
    seed = jnp.uint32(3)
    s_ref = state0
    for _ in range(2):
        cohort = np.asarray(sample_cohort(seed, s_ref.round, 5, cohort_size))
        s_ref = sequential_reference(alg, s_ref, clients, seed, cohort)
    for strat, n_dev in [(s, 1) for s in STRATEGIES] + [
        (Parallelism("map"), 2),
        (Parallelism("chunked", 2), 4),
    ]:
        mesh = client_mesh(n_dev)
        rf = jax.jit(build_round(alg, 5, cohort_size, strat, mesh=mesh))
        s = replicate(state0, mesh)
        for _ in range(2):
            s, _, info = rf(s, clients, None, seed)
        assert rf._cache_size() == 1, "the round must compile once"
        allclose_tree(s.params, s_ref.params, rtol=2e-5, atol=2e-6)
        assert int(s.round) == 2


def test_sharded_equals_single_device_with_client_state(tiny_model, clients):
    """Sharding over 1, 2 and 4 devices gives the same params and per-client outputs."""
    hp = TrainHParams(model=tiny_model, batch_size=5, lr=0.1)
    alg = fedavg(hp)
    state0 = alg.init(tiny_model.init(jax.random.key(0)))
    outs = []
    for n_dev in (1, 2, 4):
        rf = jax.jit(build_round(alg, 5, 5, Parallelism("map"), mesh=client_mesh(n_dev)))
        s, _, info = rf(state0, clients, None, jnp.uint32(0))
        outs.append((s.params, info))
    assert len(jax.devices()) >= 4
    for params, info in outs[1:]:
        allclose_tree(params, outs[0][0], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(info.cohort, outs[0][1].cohort)
        np.testing.assert_array_equal(info.weights, outs[0][1].weights)
        allclose_tree(info.metrics, outs[0][1].metrics, rtol=1e-5, atol=1e-6)


def test_cohort_depends_on_seed_and_round_only():
    a = sample_cohort(jnp.uint32(1), jnp.int32(4), 100, 10)
    b = sample_cohort(jnp.uint32(1), jnp.int32(4), 100, 10)
    c = sample_cohort(jnp.uint32(1), jnp.int32(5), 100, 10)
    np.testing.assert_array_equal(a, b)
    assert len(set(np.asarray(a).tolist())) == 10
    assert not np.array_equal(a, c)


def test_auto_strategy_rule():
    assert resolve("auto", backend="cpu").kind == "map"
    assert resolve("auto", backend="gpu").kind == "chunked"
    assert resolve("vmap").kind == "vmap"
    with pytest.raises(ValueError, match="client parallelism"):
        Parallelism("pmap")


def test_client_data_mask():
    d = ClientData(jnp.zeros((2, 4, 8, 8, 1)), jnp.zeros((2, 4, 1)), jnp.array([1, 3]))
    np.testing.assert_array_equal(d.mask(), [[1, 0, 0, 0], [1, 1, 1, 0]])
