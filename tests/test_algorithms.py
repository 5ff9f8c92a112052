"""Every algorithm against a hand-computed numpy reference (on the quadratic problem) or against
FedAvg where the paper says they coincide."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from medichain_jax import rng
from medichain_jax.engine.parallel import Parallelism
from medichain_jax.engine.round import build_round, client_mesh, replicate
from medichain_jax.engine.system import honest_system
from medichain_jax.fl.client import TrainHParams, local_train
from medichain_jax.fl.fedavg import fedavg, fedprox
from medichain_jax.fl.fednova import fednova, normalizer
from medichain_jax.fl.personalized import ditto, fedbn, finetune, local_leaves, merge_local
from medichain_jax.fl.scaffold import scaffold
from medichain_jax.fl.server_opt import scale_by_fedopt, server_optimizer
from medichain_jax.models import get_model
from tests import quadratic as q
from tests.conftest import make_clients

SEED = jnp.uint32(0)


def allclose_tree(a, b, **kw):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **kw), a, b)


def run_rounds(alg, data, rounds, *, cohort=None, system=None, states=None, v0=None, mesh=None):
    n = data.x.shape[0]
    rf = jax.jit(build_round(alg, n, cohort or n, Parallelism("map"), mesh=mesh, system=system))
    state = alg.init(q.init_vars() if v0 is None else v0)
    if states is None and alg.client_init is not None:
        one = alg.client_init(state.params)
        states = jax.tree.map(lambda a: jnp.broadcast_to(a, (n, *a.shape)), one)
    infos = []
    for _ in range(rounds):
        state, states, info = rf(replicate(state, mesh), data, replicate(states, mesh), SEED)
        infos.append(info)
    assert rf._cache_size() == 1
    return state, states, infos


def test_fedprox_mu0_equals_fedavg_on_cnn():
    model = get_model("cnn", image_size=16, norm="group")
    data = make_clients([12, 7, 9])
    hp = TrainHParams(model=model, epochs=2, batch_size=4, lr=0.1)
    v0 = model.init(jax.random.key(0))
    a, _, _ = run_rounds(fedavg(hp), data, 2, v0=v0)
    b, _, _ = run_rounds(fedprox(hp, 0.0), data, 2, v0=v0)
    allclose_tree(b.params, a.params, rtol=0, atol=0)


def test_fedprox_matches_numpy():
    b = q.targets(4, spread=0.5)
    hp, mu = q.hparams(epochs=3, lr=0.2), 0.5
    state, _, _ = run_rounds(fedprox(hp, mu), q.clients(b), 2)
    w = np.zeros(q.D)
    for _ in range(2):
        w = np.mean([q.local_gd(w, bi, 3, 0.2, prox=mu) for bi in b], axis=0)
    np.testing.assert_allclose(q.weights_of(state.params), w, rtol=1e-5, atol=1e-6)


def test_scaffold_zero_controls_one_step_equals_fedavg():
    model = get_model("cnn", image_size=16, norm="none")
    data = make_clients([8, 8, 8])
    hp = TrainHParams(model=model, epochs=1, batch_size=8, lr=0.1)
    v0 = model.init(jax.random.key(1))
    a, _, _ = run_rounds(fedavg(hp), data, 1, v0=v0)
    b, controls, _ = run_rounds(scaffold(hp, 3), data, 1, v0=v0)
    allclose_tree(b.params, a.params, rtol=1e-6, atol=1e-7)
    assert any(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(controls))


def test_scaffold_matches_numpy_with_partial_participation():
    n, cohort, steps, lr = 6, 3, 3, 0.2
    b = q.targets(n, spread=1.0)
    alg = scaffold(q.hparams(epochs=steps, lr=lr), n)
    state, controls, infos = run_rounds(alg, q.clients(b), 3, cohort=cohort)
    x, c, ci = np.zeros(q.D), np.zeros(q.D), np.zeros((n, q.D))
    for info in infos:
        sampled = np.asarray(info.cohort)
        dy, dc = [], []
        for i in sampled:
            y = q.local_gd(x, b[i], steps, lr, offset=c - ci[i])
            new = ci[i] - c + (x - y) / (steps * lr)
            dy.append(y - x)
            dc.append(new - ci[i])
            ci[i] = new
        x = x + np.mean(dy, axis=0)
        c = c + cohort / n * np.mean(dc, axis=0)
    np.testing.assert_allclose(q.weights_of(state.params), x, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(state.algo_state["kernel"])[:, 0], c, atol=1e-5)
    np.testing.assert_allclose(np.asarray(controls["kernel"])[:, :, 0], ci, atol=1e-5)
    never = set(range(n)) - {int(i) for info in infos for i in np.asarray(info.cohort)}
    for i in never:  # hospitals never sampled keep their (zero) control variate
        assert not np.asarray(controls["kernel"])[i].any()


def numpy_fedopt(kind, grads, lr, b1=0.9, b2=0.99, tau=1e-3, x0=0.0):
    """Algorithm 2 of Reddi et al. 2021, written out (x moves along +Delta = -pseudo-grad)."""
    x, m, v = np.full_like(grads[0], x0), np.zeros_like(grads[0]), np.full_like(grads[0], tau**2)
    for g in grads:
        delta = -g
        m = b1 * m + (1 - b1) * delta
        if kind == "adagrad":
            v = v + delta**2
        elif kind == "yogi":
            v = v - (1 - b2) * delta**2 * np.sign(v - delta**2)
        else:
            v = b2 * v + (1 - b2) * delta**2
        x = x + lr * m / (np.sqrt(v) + tau)
    return x


@pytest.mark.parametrize("kind", ["adam", "yogi", "adagrad"])
def test_fedopt_transform_matches_paper_formulas(kind):
    grads = [np.random.default_rng(i).normal(size=(5,)).astype(np.float32) for i in range(6)]
    tx = server_optimizer(kind, 0.05)
    x = jnp.zeros(5)
    st = tx.init(x)
    for g in grads:
        upd, st = tx.update(jnp.asarray(g), st, x)
        x = optax.apply_updates(x, upd)
    np.testing.assert_allclose(x, numpy_fedopt(kind, grads, 0.05), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["adam", "yogi", "adagrad"])
def test_fedopt_round_on_quadratic_matches_numpy(kind):
    b = q.targets(4, spread=0.5)
    alg = fedavg(q.hparams(epochs=2, lr=0.3), server_optimizer(kind, 0.1))
    state, _, _ = run_rounds(alg, q.clients(b), 3)
    x, grads = np.zeros(q.D, np.float32), []
    # replay: pseudo-gradient = x - mean local, fed through the numpy optimizer
    m, v = np.zeros(q.D), np.full(q.D, 1e-6)
    for _ in range(3):
        g = x - np.mean([q.local_gd(x, bi, 2, 0.3) for bi in b], axis=0)
        grads.append(g)
        x = numpy_fedopt(kind, grads, 0.1)
    np.testing.assert_allclose(q.weights_of(state.params), x, rtol=1e-4, atol=1e-6)
    del m, v


def test_fedopt_state_shape():
    st = scale_by_fedopt("adam").init({"a": jnp.ones(3)})
    np.testing.assert_allclose(st.v["a"], 1e-6)
    with pytest.raises(ValueError, match="FedOpt kind"):
        scale_by_fedopt("rmsprop")


def test_fedavgm_matches_numpy_heavy_ball():
    b = q.targets(4, spread=0.5)
    alg = fedavg(q.hparams(epochs=1, lr=0.5), server_optimizer("momentum", 1.0, momentum=0.9))
    state, _, _ = run_rounds(alg, q.clients(b), 4)
    x, mom = np.zeros(q.D), np.zeros(q.D)
    for _ in range(4):
        g = x - np.mean([q.local_gd(x, bi, 1, 0.5) for bi in b], axis=0)
        mom = 0.9 * mom + g
        x = x - mom
    np.testing.assert_allclose(q.weights_of(state.params), x, rtol=1e-5, atol=1e-6)


def test_fednova_equals_fedavg_with_equal_steps():
    model = get_model("cnn", image_size=16, norm="none")
    data = make_clients([8, 8, 8])
    hp = TrainHParams(model=model, epochs=2, batch_size=4, lr=0.1, momentum=0.5)
    v0 = model.init(jax.random.key(2))
    a, _, _ = run_rounds(fedavg(hp), data, 2, v0=v0)
    b, _, _ = run_rounds(fednova(hp), data, 2, v0=v0)
    allclose_tree(b.params, a.params, rtol=2e-5, atol=1e-6)


def test_fednova_matches_numpy_with_stragglers():
    n, steps, lr = 4, 4, 0.2
    b = q.targets(n, spread=1.0)
    system = honest_system(n)._replace(max_steps=np.array([4, 1, 2, 3], np.int32))
    state, _, infos = run_rounds(
        fednova(q.hparams(epochs=steps, lr=lr)), q.clients(b), 2, system=system
    )
    np.testing.assert_array_equal(infos[0].metrics["steps"], [4, 1, 2, 3])
    x = np.zeros(q.D)
    for _ in range(2):
        taus = np.array([4, 1, 2, 3])
        d = [(x - q.local_gd(x, b[i], taus[i], lr)) / taus[i] for i in range(n)]
        x = x - taus.mean() * np.mean(d, axis=0)
    np.testing.assert_allclose(q.weights_of(state.params), x, rtol=1e-5, atol=1e-6)
    # FedAvg with the same stragglers lands elsewhere (objective inconsistency)
    fa, _, _ = run_rounds(fedavg(q.hparams(epochs=steps, lr=lr)), q.clients(b), 2, system=system)
    assert np.abs(q.weights_of(fa.params) - x).max() > 1e-3


def test_fednova_normalizer_with_momentum():
    rho, tau = 0.5, 3
    # a_i = sum_k (1 - rho^(tau-k)) / (1 - rho) over the tau local steps
    want = sum((1 - rho ** (tau - k)) / (1 - rho) for k in range(tau))
    np.testing.assert_allclose(normalizer(tau, rho), want, rtol=1e-6)
    assert float(normalizer(tau, 0.0)) == tau


@pytest.mark.parametrize("norm", ["group", "batch"])
def test_fedbn_keeps_each_hospitals_norm_leaves_as_local_training_made_them(norm):
    model = get_model("cnn", image_size=16, norm=norm)
    data = make_clients([10, 6, 8], capacity=10)
    hp = TrainHParams(model=model, epochs=1, batch_size=4, lr=0.1)
    alg = fedbn(hp)
    v0 = model.init(jax.random.key(3))
    state0 = alg.init(v0)
    n = 3
    own0 = jax.tree.map(lambda a: jnp.broadcast_to(a, (n, *a.shape)), alg.client_init(v0))
    state, own, infos = run_rounds(alg, data, 2, states=own0, v0=v0)
    assert own.keys() and all(("norm" in k) or k.startswith("stats") for k in own)
    # replay round by round with local_train itself
    s, ref_own = state0, [jax.tree.map(lambda a, i=i: a[i], own0) for i in range(n)]
    w = np.asarray(data.num_examples, np.float32)
    for r in range(2):
        locals_ = []
        for i in range(n):
            d = jax.tree.map(lambda a, i=i: a[i], data)
            start = merge_local(s.params, ref_own[i])
            local, _ = local_train(start, d, rng.client_key(SEED, r, i), hp)
            locals_.append(local)
            ref_own[i] = local_leaves(local)
        mean_params = jax.tree.map(
            lambda *xs: np.tensordot(w, np.stack(xs), axes=1) / w.sum(),
            *[lc["params"] for lc in locals_],
        )
        new = jax.tree_util.tree_map_with_path(
            lambda p, g, m: g if "norm" in jax.tree_util.keystr(p) else m,
            s.params["params"],
            mean_params,
        )
        s = s.replace(params={"params": new, "stats": s.params["stats"]}, round=s.round + 1)
    for i in range(n):
        allclose_tree(jax.tree.map(lambda a, i=i: a[i], own), ref_own[i], rtol=1e-5, atol=1e-6)
    allclose_tree(state.params, s.params, rtol=1e-5, atol=1e-6)
    # the global model's normalization leaves never moved
    allclose_tree(local_leaves(state.params), local_leaves(v0), rtol=0, atol=0)


def test_ditto_matches_numpy():
    n, lam, lr = 4, 0.5, 0.2
    b = q.targets(n, spread=1.0)
    alg = ditto(q.hparams(epochs=2, lr=lr), lam)
    state, personal, _ = run_rounds(alg, q.clients(b), 3)
    w, v = np.zeros(q.D), np.zeros((n, q.D))
    for _ in range(3):
        for i in range(n):
            v[i] = q.local_gd(v[i], b[i], 2, lr, prox=lam, anchor=w)
        w = np.mean([q.local_gd(w, bi, 2, lr) for bi in b], axis=0)
    np.testing.assert_allclose(q.weights_of(state.params), w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(personal["params"]["kernel"])[:, :, 0], v, atol=1e-5)
    one = jax.tree.map(lambda a: a[1], personal)
    got = alg.personalize(state.params, None, None, one)
    allclose_tree(got, one, rtol=0, atol=0)


def test_finetune_personalizes_with_local_training():
    b = q.targets(2, spread=1.0)
    hp = q.hparams(epochs=1, lr=0.5)
    alg = finetune(hp, epochs=3)
    state, _, _ = run_rounds(alg, q.clients(b), 2)
    d = jax.tree.map(lambda a: a[0], q.clients(b))
    pers = alg.personalize(state.params, d, jax.random.key(0), None)
    w = q.local_gd(q.weights_of(state.params), b[0], 3, 0.5)
    np.testing.assert_allclose(q.weights_of(pers), w, rtol=1e-5, atol=1e-6)
    assert alg.personalize_trains


def test_sharded_scaffold_equals_single_device():
    n = 6
    b = q.targets(n, spread=1.0)
    alg = scaffold(q.hparams(epochs=2, lr=0.2), n)
    outs = [run_rounds(alg, q.clients(b), 2, cohort=4, mesh=client_mesh(k)) for k in (1, 2, 4)]
    for state, controls, _ in outs[1:]:
        allclose_tree(state.params, outs[0][0].params, rtol=1e-5, atol=1e-6)
        allclose_tree(controls, outs[0][1], rtol=1e-5, atol=1e-6)


def test_hparams_are_static():
    hp = q.hparams()
    assert hash(dataclasses.replace(hp, prox_mu=0.1)) != hash(hp)
