"""Shared fixtures: tiny synthetic clients so the core tests run in seconds on 2 CPU cores."""

from __future__ import annotations

import os

# four fake CPU devices (set before jax starts), so sharded rounds are tested on any machine
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from medichain_jax.models import get_model  # noqa: E402
from medichain_jax.types import ClientData  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def make_clients(sizes, capacity=None, image=16, seed=0) -> ClientData:
    """Random images with labels from a fixed linear rule, padded to ``capacity`` rows."""
    rng = np.random.default_rng(seed)
    cap = capacity or max(sizes)
    x = np.zeros((len(sizes), cap, image, image, 1), np.float32)
    y = np.zeros((len(sizes), cap, 1), np.float32)
    for i, n in enumerate(sizes):
        x[i, :n] = rng.normal(size=(n, image, image, 1))
        y[i, :n, 0] = (x[i, :n, : image // 2].mean(axis=(1, 2, 3)) > 0).astype(np.float32)
    return ClientData(jnp.asarray(x), jnp.asarray(y), jnp.asarray(sizes, jnp.int32))


@pytest.fixture
def tiny_model():
    return get_model("cnn", image_size=16, norm="none")


@pytest.fixture
def clients():
    return make_clients([24, 7, 0, 16, 11])


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster of 2 CPUs for the module's tests (skipped where Ray is absent)."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
