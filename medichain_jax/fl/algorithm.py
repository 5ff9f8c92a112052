"""The shape every federated algorithm takes: a named tuple of pure functions (optax style),
and the pytree helpers the algorithms share."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from medichain_jax.models import Variables
from medichain_jax.types import ClientData, ClientOutput, PyTree, ServerState

ClientUpdate = Callable[[PyTree, ClientData, jax.Array, PyTree, jax.Array | None], ClientOutput]
Personalize = Callable[[PyTree, ClientData, jax.Array, PyTree], Variables]


def broadcast_params(state: ServerState) -> PyTree:
    """The default server -> client message: the global model variables."""
    return state.params


def same_update(update: PyTree) -> Variables:
    """The default ``model_delta``: the update already is ``global - local`` variables."""
    return update


class Algorithm(NamedTuple):
    """A federated algorithm as pure functions.

    * ``init(variables) -> ServerState``;
    * ``broadcast(state) -> message`` sent to every sampled hospital;
    * ``client_update(message, data, key, client_state, max_steps) -> ClientOutput`` for one
      hospital (``max_steps``: its step budget before the round deadline, or ``None``);
    * ``server_update(state, aggregated_update, participants) -> ServerState``
      (``participants``: number of hospitals whose update was aggregated);
    * ``client_init(variables) -> client_state`` for algorithms with per-hospital state
      (persisted across rounds, updated only when the hospital takes part);
    * ``personalize(message, data, key, client_state) -> variables``: the hospital's own model
      for per-hospital evaluation (``personalize_trains``: it runs local training);
    * ``model_delta(update) -> variables``: the ``global - local`` model change inside one
      client's message (used by contribution scores).
    """

    name: str
    init: Callable[[Variables], ServerState]
    client_update: ClientUpdate
    server_update: Callable[[ServerState, PyTree, jax.Array], ServerState]
    broadcast: Callable[[ServerState], PyTree] = broadcast_params
    client_init: Callable[[Variables], PyTree] | None = None
    personalize: Personalize | None = None
    personalize_trains: bool = False
    model_delta: Callable[[PyTree], Variables] = same_update


def initial_client_states(algorithm: Algorithm, variables: Variables, num_clients: int) -> PyTree:
    """Every hospital's starting client state, stacked (``None`` for stateless algorithms)."""
    if algorithm.client_init is None:
        return None
    one = algorithm.client_init(variables)
    return jax.tree.map(lambda a: jnp.array(jnp.broadcast_to(a, (num_clients, *a.shape))), one)


def tree_sub(a: PyTree, b: PyTree) -> PyTree:
    """``a - b`` leaf by leaf."""
    return jax.tree.map(jnp.subtract, a, b)


def tree_zeros_like(a: PyTree) -> PyTree:
    """Zeros shaped like ``a``."""
    return jax.tree.map(jnp.zeros_like, a)


def example_weight(data: ClientData) -> jax.Array:
    """A hospital's aggregation weight: its number of examples."""
    return jnp.asarray(data.num_examples, jnp.float32)


def init_server(tx: optax.GradientTransformation, variables: Variables, algo_state=None):
    """A round-0 server state whose optimizer state covers the trainable params."""
    return ServerState(
        params=variables,
        opt_state=tx.init(variables["params"]),
        round=jnp.zeros((), jnp.int32),
        algo_state=algo_state,
    )


def apply_pseudo_gradient(
    tx: optax.GradientTransformation, state: ServerState, delta: Variables
) -> ServerState:
    """Treat ``delta = global - mean local`` as a pseudo-gradient for the server optimizer ``tx``
    (Reddi et al. 2021, "Adaptive Federated Optimization"); normalization statistics are
    averaged directly. ``optax.sgd(1.0)`` lands exactly on the mean local model (FedAvg)."""
    variables = state.params
    steps, opt_state = tx.update(delta["params"], state.opt_state, variables["params"])
    params = optax.apply_updates(variables["params"], steps)
    stats = tree_sub(variables["stats"], delta["stats"])
    return state.replace(
        params={"params": params, "stats": stats}, opt_state=opt_state, round=state.round + 1
    )
