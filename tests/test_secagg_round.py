"""Secure aggregation inside the compiled round (fast path) and around it (exact protocol)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medichain_jax.engine.parallel import Parallelism
from medichain_jax.engine.round import build_round, client_mesh, replicate
from medichain_jax.fl.client import TrainHParams
from medichain_jax.fl.fedavg import fedavg
from medichain_jax.privacy.field import dequantize, field_sum, levels, quantize
from medichain_jax.privacy.secagg import SecAggAbort
from sim.cli import main
from sim.config import RunConfig
from sim.runner import run
from tests.conftest import make_clients

SIZES = [16, 9, 12, 5, 7]


def rounds(model, **kw):
    algo = fedavg(TrainHParams(model=model, batch_size=8, lr=0.1))
    init = model.init(jax.random.key(0))
    plain = jax.jit(build_round(algo, 5, 5, Parallelism("vmap"), return_updates=True))
    secure = jax.jit(build_round(algo, 5, 5, Parallelism("vmap"), secagg=True, clip_norm=4.0, **kw))
    return algo, init, plain, secure


def test_fast_path_equals_the_numpy_field_sum_of_quantized_updates(tiny_model):
    clients = make_clients(SIZES)
    algo, init, plain, secure = rounds(tiny_model)
    state = algo.init(init)
    seed = jnp.uint32(0)
    ref_state, _, info = plain(state, clients, None, seed)
    new, _, _ = secure(state, clients, None, seed)
    w = np.asarray(info.weights, np.float32)
    bound = 4.0 * 16  # clip norm x the clients' capacity
    for g, u, got, mean in zip(
        jax.tree.leaves(init),
        jax.tree.leaves(info.updates),
        jax.tree.leaves(new.params),
        jax.tree.leaves(ref_state.params),
        strict=True,
    ):
        q = quantize(w.reshape((5,) + (1,) * (u.ndim - 1)) * np.asarray(u), bound, 5)
        total = dequantize(field_sum(q, axis=0), bound, 5)
        np.testing.assert_allclose(got, np.asarray(g) - total / w.sum(), rtol=1e-6, atol=1e-7)
        # and within the quantization error of the plain weighted mean
        step = bound / levels(5)
        np.testing.assert_allclose(got, mean, atol=5 * step / w.sum() + 1e-7)


def test_fast_path_sharded_equals_single_device(tiny_model):
    clients = make_clients(SIZES + [3])
    algo = fedavg(TrainHParams(model=tiny_model, batch_size=8, lr=0.1))
    init = tiny_model.init(jax.random.key(0))
    state = algo.init(init)
    one = jax.jit(build_round(algo, 6, 6, Parallelism("map"), secagg=True, clip_norm=4.0))
    mesh = client_mesh(2)
    two = jax.jit(
        build_round(algo, 6, 6, Parallelism("map"), mesh=mesh, secagg=True, clip_norm=4.0)
    )
    a, _, _ = one(state, clients, None, jnp.uint32(1))
    b, _, _ = two(replicate(state, mesh), replicate(clients, mesh), None, jnp.uint32(1))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-7), a.params, b.params)


def test_secagg_needs_a_bound(tiny_model):
    algo = fedavg(TrainHParams(model=tiny_model))
    with pytest.raises(ValueError, match="bounded updates"):
        build_round(algo, 3, 3, Parallelism("vmap"), secagg=True)


TINY = dict(
    hospitals=6,
    rounds=3,
    train_per_hospital=24,
    test_per_hospital=8,
    image_size=16,
    batch_size=8,
)


def test_exact_protocol_runs_every_round_with_dropouts(tmp_path):
    cfg = RunConfig(**TINY, dp_clip=0.5, dp_noise=0.5, secagg="exact", dropout=0.2)
    s = run(cfg, tmp_path / "exact", progress=False, plots=False)
    recs = [json.loads(x) for x in (tmp_path / "exact" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["secagg"]["verified"] for r in recs)
    assert any(r["secagg"]["dropped"] for r in recs)  # dropouts were recovered from
    for r in recs:
        assert sorted(r["secagg"]["dropped"]) == sorted(r["cohort"].index(h) for h in r["absent"])
    assert s["secagg"]["rounds_verified"] == 3 and s["secagg"]["threshold"] == 4
    # the fast path gives the same model (the protocol only checks, it changes no number)
    fast = run(
        RunConfig(**{**cfg.to_dict(), "secagg": "fast"}),
        tmp_path / "fast",
        progress=False,
        plots=False,
    )
    assert fast["federated"] == s["federated"]


def test_too_few_survivors_abort_the_round(tmp_path, capsys):
    cfg = RunConfig(**TINY, clip_norm=2.0, secagg="fast", dropout=0.6)
    with pytest.raises(SecAggAbort, match="below the secure-aggregation threshold 4"):
        run(cfg, tmp_path / "a", progress=False, plots=False)
    flags = ["--hospitals", "6", "--rounds", "3", "--train-per-hospital", "24"]
    flags += ["--test-per-hospital", "8", "--image-size", "16", "--batch-size", "8"]
    flags += ["--clip-norm", "2", "--secagg", "--dropout", "0.6", "--no-progress"]
    assert main([*flags, "--out", str(tmp_path / "b")]) == 3
    assert "aborted: round" in capsys.readouterr().err
