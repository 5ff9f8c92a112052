"""One compiled federated round: cohort -> local training of every client -> aggregate -> server."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from medichain_jax import rng
from medichain_jax.engine.parallel import Parallelism, run_cohort
from medichain_jax.fl.aggregators import Aggregator, finalize_mean, weighted_mean
from medichain_jax.fl.algorithm import Algorithm
from medichain_jax.types import ClientData, PyTree, ServerState

AXIS = "clients"


class RoundInfo(NamedTuple):
    """Per-round outputs besides the new server state (all ``[cohort]`` arrays)."""

    cohort: jax.Array
    weights: jax.Array
    metrics: dict[str, jax.Array]


def sample_cohort(seed: int | jax.Array, rnd: jax.Array, num_clients: int, cohort_size: int):
    """Sorted client ids of round ``rnd``, drawn from (seed, round) alone, without replacement."""
    if cohort_size >= num_clients:
        return jnp.arange(num_clients)
    key = rng.round_key(seed, rng.COHORT, rnd)
    return jnp.sort(jax.random.choice(key, num_clients, (cohort_size,), replace=False))


def build_round(
    algorithm: Algorithm,
    num_clients: int,
    cohort_size: int,
    parallelism: Parallelism,
    aggregator: Aggregator = weighted_mean,
    mesh: Mesh | None = None,
) -> Callable[[ServerState, ClientData, PyTree, jax.Array], tuple[ServerState, PyTree, RoundInfo]]:
    """Return a pure ``round_fn(state, data, client_states, seed) -> (state, client_states, info)``.

    ``data`` holds every registered hospital (leading axis ``num_clients``) and
    ``client_states`` their persistent per-client state (``None`` for stateless algorithms).
    With a ``mesh`` (one axis named ``clients``) the cohort is split over its devices, each runs
    ``parallelism`` on its share, and partial sums meet in a ``psum``. Jit it once; it never
    recompiles across rounds.
    """
    if not 1 <= cohort_size <= num_clients:
        raise ValueError(f"cohort size must be in [1, {num_clients}], got {cohort_size}")
    n_dev = 1 if mesh is None else int(mesh.devices.size)
    padded = -(-cohort_size // n_dev) * n_dev
    keep = not aggregator.linear

    def cohort_clients(params, d, keys, states):
        def client_fn(di, key, st):
            return algorithm.client_update(params, di, key, st)

        res = run_cohort(client_fn, d, keys, states, parallelism, keep_updates=keep)
        usum, wsum = res.update_sum, res.weight_sum
        if mesh is not None:
            usum, wsum = jax.lax.psum((usum, wsum), AXIS)
        return usum, wsum, res.updates, res.weights, res.metrics, res.states

    if mesh is not None:
        spec = P(AXIS)
        cohort_clients = jax.shard_map(
            cohort_clients,
            mesh=mesh,
            in_specs=(P(), spec, spec, spec),
            out_specs=(P(), P(), spec, spec, spec, spec),
            check_vma=False,
        )

    def round_fn(state: ServerState, data: ClientData, client_states: PyTree, seed: jax.Array):
        cohort = sample_cohort(seed, state.round, num_clients, cohort_size)
        # pad the cohort to a multiple of the device count with zero-example copies of client 0
        idx = jnp.concatenate([cohort, jnp.full((padded - cohort_size,), cohort[0])])
        real = jnp.arange(padded) < cohort_size
        identity = padded == num_clients and cohort_size == num_clients
        take = (lambda t: t) if identity else (lambda t: jax.tree.map(lambda a: a[idx], t))
        d = take(data)
        d = d.replace(num_examples=jnp.where(real, d.num_examples, 0))
        keys = jax.vmap(lambda c: rng.client_key(seed, state.round, c))(idx)
        usum, wsum, updates, weights, metrics, states = cohort_clients(
            state.params, d, keys, take(client_states)
        )
        cut = lambda t: jax.tree.map(lambda a: a[:cohort_size], t)  # noqa: E731
        weights, metrics, states = cut(weights), cut(metrics), cut(states)
        if aggregator.linear:
            update = finalize_mean(usum, wsum)
        else:
            update = aggregator.aggregate(cut(updates), weights)
        new_state = algorithm.server_update(state, update)
        if client_states is not None:
            client_states = jax.tree.map(lambda a, s: a.at[cohort].set(s), client_states, states)
        return new_state, client_states, RoundInfo(cohort, weights, metrics)

    return round_fn


def client_mesh(num_devices: int | None = None) -> Mesh | None:
    """A 1-D mesh named ``clients`` over the first ``num_devices`` local devices (all by default);
    ``None`` when only one device would be used."""
    devices = jax.devices()
    n = len(devices) if num_devices is None else num_devices
    if not 1 <= n <= len(devices):
        raise ValueError(f"asked for {n} devices, {len(devices)} available")
    return None if n == 1 else Mesh(np.array(devices[:n]), (AXIS,))


def replicate(tree: PyTree, mesh: Mesh | None) -> PyTree:
    """Place ``tree`` whole on every device of ``mesh`` (no-op without a mesh), so a round's
    inputs keep one sharding from the first call on and the round compiles once."""
    if mesh is None:
        return tree
    return jax.device_put(tree, NamedSharding(mesh, P()))
