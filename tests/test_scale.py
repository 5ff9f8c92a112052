"""Scale-out in one process: host-streamed cohorts, chunked streaming vs the full stack, memory
that follows the chunk and not the cohort, sharding over 8 fake devices, block rendering."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np

from medichain_jax.data.federation import _render_split
from medichain_jax.data.phantom import hospital_profiles
from medichain_jax.engine.parallel import Parallelism
from medichain_jax.engine.round import balanced_layout, build_round, client_mesh, sample_cohort
from medichain_jax.fl.aggregators import weighted_mean
from medichain_jax.fl.algorithm import initial_client_states
from medichain_jax.fl.client import TrainHParams
from medichain_jax.fl.fedavg import fedavg
from medichain_jax.fl.scaffold import scaffold
from medichain_jax.types import ClientData
from sim.runner import cohort_rows
from tests.conftest import make_clients


def tree_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_host_gathered_cohort_equals_gathering_inside_the_round(tiny_model):
    """Streaming the cohort's rows from host memory changes no bit, with client state and on a
    2-device mesh."""
    data = make_clients([6, 7, 0, 8, 5, 3, 5, 4])
    hp = TrainHParams(model=tiny_model, batch_size=5, lr=0.1)
    alg = scaffold(hp, num_clients=8)
    init = tiny_model.init(jax.random.key(0))
    for mesh in (None, client_mesh(2)):
        outs = []
        for gathered in (False, True):
            rf = jax.jit(build_round(alg, 8, 3, Parallelism("map"), mesh=mesh, gathered=gathered))
            state, cstates = alg.init(init), initial_client_states(alg, init, 8)
            for _ in range(2):
                d = data
                if gathered:
                    cohort = np.asarray(sample_cohort(jnp.uint32(7), state.round, 8, 3))
                    d = cohort_rows(data, cohort)
                state, cstates, info = rf(state, d, cstates, jnp.uint32(7))
            outs.append((state.params, cstates, info.metrics))
        tree_equal(outs[0], outs[1])


def test_chunked_streaming_equals_the_full_stack(tiny_model):
    """The chunked round streams sum_i w_i u_i chunk by chunk; it equals the mean of the stacked
    updates that a vmapped round returns (numpy reference)."""
    data = make_clients([12, 7, 3, 16, 11, 9, 5])
    hp = TrainHParams(model=tiny_model, batch_size=5, lr=0.1)
    alg = fedavg(hp)
    state0 = alg.init(tiny_model.init(jax.random.key(1)))
    seed = jnp.uint32(3)
    streamed = jax.jit(build_round(alg, 7, 7, Parallelism("chunked", 2)))
    stacked = jax.jit(build_round(alg, 7, 7, Parallelism("vmap"), return_updates=True))
    s_stream, _, i_stream = streamed(state0, data, None, seed)
    _, _, i_stack = stacked(state0, data, None, seed)
    assert i_stream.updates is None
    w = np.asarray(i_stack.weights, np.float64)
    mean = jax.tree.map(
        lambda u: np.tensordot(w, np.asarray(u, np.float64), axes=1) / w.sum(), i_stack.updates
    )
    expected = jax.tree.map(lambda p, u: np.asarray(p) - u, state0.params, mean)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        s_stream.params,
        expected,
    )


def temp_bytes(alg, model, clients, parallelism) -> int:
    n = int(clients.num_examples.shape[0])
    rf = jax.jit(build_round(alg, n, n, parallelism, weighted_mean))
    state = alg.init(model.init(jax.random.key(0)))
    compiled = rf.lower(state, clients, None, jnp.uint32(0)).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def test_chunked_round_memory_follows_the_chunk_not_the_cohort(tiny_model):
    """XLA's own buffer plan: the chunked round's scratch memory stays flat from 8 to 32
    clients, while vmapping all of them grows with the cohort."""
    hp = TrainHParams(model=tiny_model, batch_size=8, lr=0.1)
    alg = fedavg(hp)
    small, big = make_clients([8] * 8), make_clients([8] * 32)
    chunked = [temp_bytes(alg, tiny_model, c, Parallelism("chunked", 4)) for c in (small, big)]
    vmapped = [temp_bytes(alg, tiny_model, c, Parallelism("vmap")) for c in (small, big)]
    assert chunked[1] < 1.5 * chunked[0], chunked
    assert vmapped[1] > 2.5 * vmapped[0], vmapped


def test_block_rendering_is_independent_of_the_block_size():
    key = jax.random.key(5)
    labels = [np.array([0, 1, 1]), np.array([1]), np.array([0, 0, 1, 1, 0]), np.array([1, 0])]
    profiles, _ = hospital_profiles(jax.random.fold_in(key, 0), 4, 1.0)
    whole = _render_split(jax.random.fold_in(key, 1), labels, profiles, 16)
    blocks = _render_split(jax.random.fold_in(key, 1), labels, profiles, 16, block_images=3)
    tree_equal(whole, blocks)
    assert isinstance(whole, ClientData) and whole.x.shape == (4, 5, 16, 16, 1)
    np.testing.assert_array_equal(whole.num_examples, [3, 1, 5, 2])
    assert float(jnp.abs(whole.x[1, 1:]).sum()) == 0.0  # padding rows stay zero


def test_sharded_over_8_fake_devices_equals_single_device():
    """In a fresh process with 8 XLA host devices: the cohort split over 8 devices (with
    padding: 6 clients) gives the single-device round."""
    script = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, numpy as np
        jax.config.update("jax_default_matmul_precision", "highest")
        from medichain_jax.engine.parallel import Parallelism
        from medichain_jax.engine.round import build_round, client_mesh
        from medichain_jax.fl.client import TrainHParams
        from medichain_jax.fl.fedavg import fedavg
        from medichain_jax.models import get_model
        from medichain_jax.types import ClientData
        assert len(jax.devices()) == 8, jax.devices()
        model = get_model("cnn", image_size=16, norm="none")
        alg = fedavg(TrainHParams(model=model, batch_size=5, lr=0.1))
        rng = np.random.default_rng(0)
        sizes = np.array([12, 7, 0, 16, 11, 9, 5, 14, 3, 8], np.int32)
        x = rng.normal(size=(10, 16, 16, 16, 1)).astype(np.float32)
        y = (x[..., :8, :, :].mean(axis=(2, 3, 4)) > 0).astype(np.float32)[..., None]
        data = ClientData(jnp.asarray(x), jnp.asarray(y), jnp.asarray(sizes))
        s0 = alg.init(model.init(jax.random.key(0)))
        out = []
        for mesh in (None, client_mesh(8)):
            rf = jax.jit(build_round(alg, 10, 6, Parallelism("map"), mesh=mesh))
            s, _, info = rf(s0, data, None, jnp.uint32(2))
            out.append((s.params, info.weights, info.metrics["loss"]))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), *out)
        print("ok")
        """
    )
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_scaling_benchmark_point_reports_every_cohort():
    """``python -m sim.bench scaling`` measures each point with the runner's own round."""
    from sim.bench_scaling import measure_point

    out = measure_point(4, [4, 2], 16, 8, False, rounds=1)
    assert [c["cohort"] for c in out["cohorts"]] == [2, 4]
    assert out["capacity"] == 16 and out["federation_gib"] > 0
    for c in out["cohorts"]:
        assert c["round_s"] > 0 and c["peak_rss_gib"] >= out["rss_after_data_gib"] * 0.99
        assert c["clients_per_s"] == c["cohort"] / c["round_s"]


def test_balanced_layout_deals_examples_evenly_over_devices():
    """The default non-IID sizes: id order gives devices 100 / 66 SGD steps, the snake deal
    84 / 82; every client appears once and each device gets the same number of clients."""
    sizes = np.array([299, 459, 134, 512, 178, 512, 163, 136, 245, 392, 232, 149, 94, 91, 285])
    sizes = np.concatenate([sizes, [382, 191, 111, 356, 98]])
    steps = -(-sizes // 32)
    for n_dev, worst in ((2, 84), (4, 43)):
        order = np.asarray(balanced_layout(jnp.asarray(sizes), n_dev))
        assert sorted(order.tolist()) == list(range(20))
        per_device = steps[order].reshape(n_dev, -1).sum(1)
        assert per_device.max() <= worst, per_device
    assert steps[:10].sum() == 100  # what the id order gave
