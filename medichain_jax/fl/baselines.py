"""FLamby's comparison protocol: pooled (centralized) and local-only training at matched compute
(du Terrail et al. 2022, "FLamby: Datasets and Benchmarks for Cross-Silo Federated Learning")."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from medichain_jax.engine.parallel import Parallelism, run_cohort
from medichain_jax.fl.client import TrainHParams, local_train
from medichain_jax.models import Variables
from medichain_jax.types import ClientData, ClientOutput


def pool_clients(data: ClientData) -> ClientData:
    """Concatenate every hospital's real rows into one centralized dataset (host-side)."""
    x = np.asarray(data.x)
    y = np.asarray(data.y)
    n = np.asarray(data.num_examples)
    keep = np.arange(x.shape[1])[None, :] < n[:, None]
    return ClientData(x=x[keep], y=y[keep], num_examples=np.int32(keep.sum()))


def matched_epochs(rounds: int, local_epochs: int, client_fraction: float) -> int:
    """Epochs a baseline trains to match the federated run's expected optimizer steps."""
    return max(1, round(rounds * local_epochs * client_fraction))


def train_pooled(
    variables: Variables, pooled: ClientData, key: jax.Array, hp: TrainHParams, epochs: int
):
    """Centralized training on all hospitals' data for ``epochs`` epochs (same optimizer)."""
    return local_train(variables, pooled, key, dataclasses.replace(hp, epochs=epochs))


def train_local_only(
    variables: Variables,
    data: ClientData,
    keys: jax.Array,
    hp: TrainHParams,
    epochs: int,
    parallelism: Parallelism,
) -> tuple[Variables, dict[str, jax.Array]]:
    """Every hospital trains its own model from ``variables`` on its own data only.

    Returns stacked per-hospital variables (leading axis = hospitals) and per-hospital metrics.
    """
    hp = dataclasses.replace(hp, epochs=epochs)

    def client_fn(d, key, _state):
        local, metrics = local_train(variables, d, key, hp)
        return ClientOutput(
            update=local, weight=jnp.asarray(d.num_examples, jnp.float32), metrics=metrics
        )

    res = run_cohort(client_fn, data, keys, None, parallelism, keep_updates=True)
    return res.updates, res.metrics
