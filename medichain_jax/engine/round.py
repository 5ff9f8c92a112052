"""One compiled federated round: cohort -> local training of every client -> aggregate -> server."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from medichain_jax import rng
from medichain_jax.engine.parallel import Parallelism, run_cohort
from medichain_jax.fl.aggregators import Aggregator, finalize_mean, weighted_mean
from medichain_jax.fl.algorithm import Algorithm
from medichain_jax.types import ClientData, PyTree, ServerState


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
) -> Callable[[ServerState, ClientData, PyTree, jax.Array], tuple[ServerState, PyTree, RoundInfo]]:
    """Return a pure ``round_fn(state, data, client_states, seed) -> (state, client_states, info)``.

    ``data`` holds every registered hospital (leading axis ``num_clients``) and
    ``client_states`` their persistent per-client state (``None`` for stateless algorithms).
    Jit it once; it never recompiles across rounds.
    """
    if not 1 <= cohort_size <= num_clients:
        raise ValueError(f"cohort size must be in [1, {num_clients}], got {cohort_size}")

    def round_fn(state: ServerState, data: ClientData, client_states: PyTree, seed: jax.Array):
        cohort = sample_cohort(seed, state.round, num_clients, cohort_size)
        full = cohort_size == num_clients
        take = (lambda t: t) if full else (lambda t: jax.tree.map(lambda a: a[cohort], t))
        keys = jax.vmap(lambda c: rng.client_key(seed, state.round, c))(cohort)

        def client_fn(d, key, st):
            return algorithm.client_update(state.params, d, key, st)

        res = run_cohort(
            client_fn,
            take(data),
            keys,
            take(client_states),
            parallelism,
            keep_updates=not aggregator.linear,
        )
        if aggregator.linear:
            update = finalize_mean(res.update_sum, res.weight_sum)
        else:
            update = aggregator.aggregate(res.updates, res.weights)
        new_state = algorithm.server_update(state, update)
        if client_states is not None and not full:
            client_states = jax.tree.map(
                lambda a, s: a.at[cohort].set(s), client_states, res.states
            )
        elif client_states is not None:
            client_states = res.states
        return new_state, client_states, RoundInfo(cohort, res.weights, res.metrics)

    return round_fn
