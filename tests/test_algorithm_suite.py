"""The shared suite: every algorithm x every aggregator on the quadratic problem, plus the
update checks (NaN / Inf rejection), attacks and system heterogeneity inside the round."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from medichain_jax.engine.parallel import Parallelism
from medichain_jax.engine.round import build_round
from medichain_jax.engine.system import NO_DEADLINE, honest_system, make_system
from medichain_jax.fl.aggregators import AGGREGATORS, get_aggregator
from medichain_jax.fl.attacks import poison_update
from medichain_jax.fl.fedavg import fedavg
from medichain_jax.fl.registry import ALGORITHMS, AlgorithmOptions, get_algorithm
from medichain_jax.fl.scaffold import scaffold
from medichain_jax.fl.update_checks import clip_by_global_norm
from tests import quadratic as q

SEED = jnp.uint32(0)
N = 8
# server learning rates that converge on the quadratic in the suite's round budget
FAST_SERVER_LR = {"fedadam": 0.1, "fedyogi": 0.1, "fedadagrad": 1.0, "fedavgm": 0.1}


def make_round(alg, aggregator="mean", *, cohort=N, system=None, clip_norm=None):
    agg = get_aggregator(aggregator, trim_beta=0.25, krum_f=2)
    return jax.jit(
        build_round(alg, N, cohort, Parallelism("map"), agg, system=system, clip_norm=clip_norm)
    )


def init(alg, n=N):
    state = alg.init(q.init_vars())
    states = None
    if alg.client_init is not None:
        one = alg.client_init(state.params)
        states = jax.tree.map(lambda a: jnp.broadcast_to(a, (n, *a.shape)), one)
    return state, states


@pytest.mark.parametrize("aggregator", AGGREGATORS)
@pytest.mark.parametrize("name", ALGORITHMS)
def test_every_algorithm_and_aggregator_converges_without_recompiling(name, aggregator):
    opts = AlgorithmOptions(server_lr=FAST_SERVER_LR.get(name))
    alg = get_algorithm(name, q.hparams(epochs=2, lr=0.3), num_clients=N, options=opts)
    data = q.clients(q.targets(N))
    rf = make_round(alg, aggregator)
    state, states = init(alg)
    struct0 = jax.tree.structure(state)
    dtypes0 = [x.dtype for x in jax.tree.leaves(state)]
    cstruct0 = jax.tree.structure(states)
    dist = []
    for _ in range(100):
        state, states, info = rf(state, data, states, SEED)
        dist.append(np.abs(q.weights_of(state.params) - q.OPTIMUM).max())
    assert rf._cache_size() == 1, "the round must compile once"
    assert jax.tree.structure(state) == struct0
    assert [x.dtype for x in jax.tree.leaves(state)] == dtypes0
    assert jax.tree.structure(states) == cstruct0
    assert dist[-1] < 0.05, f"{name}/{aggregator} ended {dist[-1]:.3f} from the optimum"
    assert dist[-1] < 0.1 * dist[0]
    assert int(state.round) == 100


@pytest.mark.parametrize("aggregator", AGGREGATORS)
def test_nan_update_is_excluded_and_reported(aggregator):
    b = q.targets(N)
    data = q.clients(b)
    bad = data.replace(x=data.x.at[3, 0].set(jnp.nan))
    alg = fedavg(q.hparams())
    rf = make_round(alg, aggregator)
    state, _ = init(alg)
    s_bad, _, info = rf(state, bad, None, SEED)
    rejected = np.asarray(info.metrics["rejected"])
    assert rejected.tolist() == [i == 3 for i in range(N)]
    assert float(info.weights[3]) == 0.0
    assert np.isfinite(q.weights_of(s_bad.params)).all()
    # identical to the same round where hospital 3 simply has no data
    empty = data.replace(num_examples=data.num_examples.at[3].set(0))
    s_ref, _, _ = rf(state, empty, None, SEED)
    np.testing.assert_allclose(q.weights_of(s_bad.params), q.weights_of(s_ref.params), atol=1e-6)


def test_inf_update_from_a_byzantine_scale_is_rejected_and_keeps_client_state():
    data = q.clients(q.targets(N))
    system = honest_system(N)._replace(
        byzantine=np.arange(N) == 5, attack="scale", attack_scale=float("inf")
    )
    alg = scaffold(q.hparams(), N)
    rf = make_round(alg, system=system)
    state, controls = init(alg)
    _, controls, info = rf(state, data, controls, SEED)
    assert np.asarray(info.metrics["rejected"]).tolist() == [i == 5 for i in range(N)]
    assert not np.asarray(controls["kernel"])[5].any(), "a rejected hospital keeps its state"
    assert np.asarray(controls["kernel"])[4].any()


def test_sign_flip_breaks_fedavg_but_not_the_median():
    b = q.targets(10)
    data = q.clients(b)
    system = make_system(0, np.full(10, 2), byzantine=2, attack="sign_flip", attack_scale=4.0)
    assert system.byzantine.sum() == 2
    alg = fedavg(q.hparams())
    out = {}
    for agg in ("mean", "median", "trimmed_mean"):
        rf = jax.jit(
            build_round(
                alg, 10, 10, Parallelism("map"), get_aggregator(agg, trim_beta=0.2), system=system
            )
        )
        state, _ = init(alg, 10)
        for _ in range(40):
            state, _, _ = rf(state, data, None, SEED)
        out[agg] = np.abs(q.weights_of(state.params) - q.OPTIMUM).max()
    assert out["median"] < 0.05 and out["trimmed_mean"] < 0.05
    assert out["mean"] > 0.5


def test_poison_update_formulas():
    u = {"a": jnp.array([1.0, -2.0])}
    key = jax.random.key(0)
    flip = poison_update(u, jnp.array(True), key, "sign_flip", 4.0)
    np.testing.assert_array_equal(flip["a"], [-4.0, 8.0])
    same = poison_update(u, jnp.array(False), key, "sign_flip", 4.0)
    np.testing.assert_array_equal(same["a"], u["a"])
    np.testing.assert_array_equal(poison_update(u, True, key, "scale", 10.0)["a"], [10.0, -20.0])
    noise = poison_update({"a": jnp.zeros(20000)}, True, key, "gaussian", 2.0)["a"]
    assert abs(float(noise.std()) - 2.0) < 0.05
    with pytest.raises(ValueError, match="unknown attack"):
        poison_update(u, True, key, "backdoor", 1.0)


def test_label_flip_trains_on_flipped_labels():
    from medichain_jax.fl.attacks import poison_data

    data = q.clients(q.targets(2))
    out = poison_data(data, jnp.array([True, False])[:, None, None], "label_flip")
    np.testing.assert_array_equal(out.y[0], 1.0 - data.y[0])
    np.testing.assert_array_equal(out.y[1], data.y[1])


def test_clipping_bounds_the_update_norm():
    u = {"a": jnp.array([3.0, 4.0]), "b": {"c": jnp.zeros(2)}}
    np.testing.assert_allclose(optax.tree.norm(clip_by_global_norm(u, 1.0)), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(clip_by_global_norm(u, 10.0)["a"], u["a"])
    alg = fedavg(q.hparams())
    rf = make_round(alg, clip_norm=0.01)
    state, _ = init(alg)
    state, _, _ = rf(state, q.clients(q.targets(N)), None, SEED)
    assert np.linalg.norm(q.weights_of(state.params)) <= 0.01 + 1e-6


def test_stragglers_dropouts_and_late_joiners_are_masks_not_recompiles():
    planned = np.full(N, 2)
    system = make_system(
        7, planned, stragglers=0.5, dropout=0.3, late_join=2, join_round=3, attack="none"
    )
    slow = system.max_steps < NO_DEADLINE
    assert slow.sum() == 4 and (system.max_steps[slow] == 1).all()  # floor(speed * 2) >= 1
    late = system.join_round > 0
    assert late.sum() == 2
    alg = scaffold(q.hparams(epochs=2), N)
    rf = make_round(alg, system=system)
    state, controls = init(alg)
    data = q.clients(q.targets(N))
    seen_dropout = False
    for r in range(8):
        prev = np.asarray(controls["kernel"]).copy()
        state, controls, info = rf(state, data, controls, SEED)
        active = np.asarray(info.metrics["active"])
        steps = np.asarray(info.metrics["steps"])
        if r < 3:
            assert not active[late].any()
        assert (steps[~active] == 0).all() and (np.asarray(info.weights)[~active] == 0).all()
        assert (steps[active & slow] == 1).all() and (steps[active & ~slow] == 2).all()
        # absent hospitals keep their control variate untouched
        np.testing.assert_array_equal(np.asarray(controls["kernel"])[~active], prev[~active])
        seen_dropout |= bool((~active[~late]).any())
    assert seen_dropout
    assert rf._cache_size() == 1


def test_system_draws_are_seeded():
    a = make_system(1, np.full(20, 4), byzantine=4, stragglers=0.25, late_join=3, join_round=5)
    b = make_system(1, np.full(20, 4), byzantine=4, stragglers=0.25, late_join=3, join_round=5)
    c = make_system(2, np.full(20, 4), byzantine=4, stragglers=0.25, late_join=3, join_round=5)
    np.testing.assert_array_equal(a.byzantine, b.byzantine)
    np.testing.assert_array_equal(a.max_steps, b.max_steps)
    assert not np.array_equal(a.byzantine, c.byzantine)
    with pytest.raises(ValueError, match="byzantine"):
        make_system(0, np.full(3, 1), byzantine=4)
    with pytest.raises(ValueError, match="dropout"):
        make_system(0, np.full(3, 1), dropout=1.0)
