"""FedAvg with an optax server optimizer (McMahan et al. 2017; Reddi et al. 2021 "FedOpt")."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from medichain_jax.fl.algorithm import Algorithm
from medichain_jax.fl.client import TrainHParams, local_train
from medichain_jax.models import Variables
from medichain_jax.types import ClientData, ClientOutput, PyTree, ServerState


def tree_sub(a: PyTree, b: PyTree) -> PyTree:
    """``a - b`` leaf by leaf."""
    return jax.tree.map(jnp.subtract, a, b)


def fedavg(
    hp: TrainHParams, server_optimizer: optax.GradientTransformation | None = None
) -> Algorithm:
    """Federated averaging: clients run ``local_train``; the server treats the example-weighted
    mean of ``global - local`` as a pseudo-gradient for ``server_optimizer``
    (``optax.sgd(1.0)``, the default, is plain FedAvg; ``optax.adam`` gives FedAdam).
    Normalization statistics (``stats``) are averaged directly."""
    tx = server_optimizer if server_optimizer is not None else optax.sgd(1.0)

    def init(variables: Variables) -> ServerState:
        return ServerState(
            params=variables,
            opt_state=tx.init(variables["params"]),
            round=jnp.zeros((), jnp.int32),
        )

    def client_update(
        global_vars: Variables, data: ClientData, key: jax.Array, client_state: PyTree = None
    ) -> ClientOutput:
        local_vars, metrics = local_train(global_vars, data, key, hp)
        return ClientOutput(
            update=tree_sub(global_vars, local_vars),
            weight=jnp.asarray(data.num_examples, jnp.float32),
            metrics=metrics,
            state=client_state,
        )

    def server_update(state: ServerState, update: PyTree) -> ServerState:
        variables = state.params
        # global - local is a pseudo-gradient: sgd(1.0) lands exactly on the mean local model.
        steps, opt_state = tx.update(update["params"], state.opt_state, variables["params"])
        params = optax.apply_updates(variables["params"], steps)
        stats = tree_sub(variables["stats"], update["stats"])
        return state.replace(
            params={"params": params, "stats": stats}, opt_state=opt_state, round=state.round + 1
        )

    return Algorithm("fedavg", init, client_update, server_update)
