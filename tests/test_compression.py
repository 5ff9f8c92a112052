"""Update codecs against numpy references, error feedback's bookkeeping, and the codecs
inside the compiled round and the runner (bytes, resume)."""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from medichain_jax.compression import bf16, get_compressor, identity, int8, topk
from medichain_jax.engine.parallel import Parallelism
from medichain_jax.engine.round import build_round
from medichain_jax.fl.client import TrainHParams
from medichain_jax.fl.fedavg import fedavg
from sim.config import ConfigError, RunConfig
from sim.runner import run
from tests.conftest import make_clients


def tree(seed=0):
    r = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(r.normal(size=(30, 7)), jnp.float32),
        "b": jnp.asarray(r.normal(size=(5,)), jnp.float32),
    }


def test_bf16_matches_numpys_bfloat16_round_trip():
    u = tree()
    c = bf16()
    payload, _ = c.compress(u, jax.random.key(0), ())
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(payload))
    back = c.decompress(payload, u)
    for got, x in zip(jax.tree.leaves(back), jax.tree.leaves(u), strict=True):
        ref = np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float32)
        np.testing.assert_array_equal(got, ref)
    assert c.payload_bytes(u) == 2 * (30 * 7 + 5)


def test_int8_is_unbiased_and_within_one_step():
    u = tree(1)
    c = int8()
    keys = jax.random.split(jax.random.key(2), 4000)
    backs = jax.vmap(lambda k: c.decompress(c.compress(u, k, ())[0], u))(keys)
    for x, b in zip(jax.tree.leaves(u), jax.tree.leaves(backs), strict=True):
        x = np.asarray(x)
        step = np.abs(x).max() / 127
        assert np.all(np.abs(np.asarray(b) - x) <= step * (1 + 1e-5))
        # mean over draws: unbiased within 5 standard errors (variance <= step^2 / 4)
        se = step / 2 / np.sqrt(len(keys))
        assert np.all(np.abs(np.asarray(b).mean(axis=0) - x) <= 5 * se + 1e-7)
    payload, _ = c.compress(u, keys[0], ())
    assert payload["w"]["q"].dtype == jnp.int8
    assert c.payload_bytes(u) == 30 * 7 + 5 + 2 * 4


def test_topk_sends_the_largest_and_error_feedback_loses_nothing():
    c = topk(0.1)
    u0 = tree(2)
    k = int(np.ceil(0.1 * (30 * 7 + 5)))
    residual = c.init(u0)
    sent_total = jax.tree.map(jnp.zeros_like, u0)
    inputs_total = jax.tree.map(jnp.zeros_like, u0)
    for t in range(5):
        u = tree(10 + t)
        v = np.concatenate(
            [
                np.ravel(a + e)
                for a, e in zip(jax.tree.leaves(u), jax.tree.leaves(residual), strict=True)
            ]
        )
        payload, residual = c.compress(u, jax.random.key(t), residual)
        assert payload["index"].shape == (k,)
        expect = np.sort(np.argsort(-np.abs(v), kind="stable")[:k])
        np.testing.assert_array_equal(np.sort(np.asarray(payload["index"])), expect)
        sent = c.decompress(payload, u)
        nonzero = sum(int(np.count_nonzero(np.asarray(x))) for x in jax.tree.leaves(sent))
        assert nonzero == k
        sent_total = jax.tree.map(jnp.add, sent_total, sent)
        inputs_total = jax.tree.map(jnp.add, inputs_total, u)
    # what was sent plus what is still held back is exactly what came in
    jax.tree.map(
        lambda s, e, i: np.testing.assert_allclose(s + e, i, atol=1e-5),
        sent_total,
        residual,
        inputs_total,
    )
    assert c.payload_bytes(u0) == 8 * k
    with pytest.raises(ValueError, match="fraction"):
        topk(0.0)
    with pytest.raises(ValueError, match="compression must be one of"):
        get_compressor("zip")


def test_identity_and_full_topk_change_no_number(tiny_model):
    clients = make_clients([16, 9, 12])
    algo = fedavg(TrainHParams(model=tiny_model, batch_size=8, lr=0.1))
    init = tiny_model.init(jax.random.key(0))
    state = algo.init(init)

    def one_round(compressor, client_states=None):
        fn = jax.jit(build_round(algo, 3, 3, Parallelism("vmap"), compressor=compressor))
        return fn(state, clients, client_states, jnp.uint32(0))[0].params

    plain = one_round(None)
    jax.tree.map(np.testing.assert_array_equal, one_round(identity()), plain)
    full = topk(1.0)
    residual = jax.tree.map(lambda a: jnp.zeros((3, *a.shape)), init)
    got = one_round(full, {"algo": None, "residual": residual})
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7), got, plain)
    lossy = one_round(int8())
    assert not np.array_equal(lossy["params"]["fc2"]["kernel"], plain["params"]["fc2"]["kernel"])


TINY = dict(
    hospitals=3,
    rounds=4,
    train_per_hospital=24,
    test_per_hospital=8,
    image_size=16,
    batch_size=8,
    checkpoint_every=1,
)


def test_runner_counts_compressed_bytes_and_resumes_error_feedback(tmp_path):
    cfg = RunConfig(**TINY, compression="topk", topk_fraction=0.05)
    full = run(cfg, tmp_path / "full", progress=False, plots=False)
    recs = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    per_update = full["compression"]["bytes_up_per_update"]
    assert full["compression"]["ratio_vs_float32"] == pytest.approx(10, rel=0.01)
    assert all(r["bytes_up"] == per_update * 3 for r in recs)
    assert all(
        r["bytes_down"] == r["bytes_up"] * full["compression"]["ratio_vs_float32"] for r in recs
    )
    run(cfg, tmp_path / "part", stop_after=2, progress=False, plots=False)
    resumed = run(cfg, tmp_path / "part", resume=True, progress=False, plots=False)
    assert resumed["federated"] == full["federated"]  # the residuals were checkpointed


def test_compression_flags_are_validated():
    with pytest.raises(ConfigError, match="compression must be one of"):
        RunConfig(compression="gzip")
    with pytest.raises(ConfigError, match="cannot be combined with DP"):
        RunConfig(compression="int8", dp_clip=1.0, dp_noise=1.0)
    with pytest.raises(ConfigError, match="topk_fraction"):
        RunConfig(compression="topk", topk_fraction=1.5)
    assert RunConfig().run_id() == RunConfig(compression="none").run_id()
