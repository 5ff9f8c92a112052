"""SCAFFOLD (Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning"), option II control variates."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from medichain_jax.fl.algorithm import (
    Algorithm,
    apply_pseudo_gradient,
    example_weight,
    init_server,
    tree_sub,
    tree_zeros_like,
)
from medichain_jax.fl.client import TrainHParams, local_train
from medichain_jax.models import Variables
from medichain_jax.types import ClientData, ClientOutput, PyTree, ServerState


def scaffold(
    hp: TrainHParams,
    num_clients: int,
    server_optimizer: optax.GradientTransformation | None = None,
) -> Algorithm:
    """SCAFFOLD: local steps use ``g - c_i + c``; afterwards (option II)
    ``c_i+ = c_i - c + (x - y_i) / (K lr)`` with K the hospital's steps taken. The server moves
    ``x`` with the mean of ``x - y_i`` (through ``server_optimizer``, default ``sgd(1.0)``) and
    ``c += (|S| / N) * mean(c_i+ - c_i)``. Each hospital's ``c_i`` is its persistent client
    state, updated only when it takes part. (Option II assumes plain client SGD.)"""
    tx = server_optimizer if server_optimizer is not None else optax.sgd(1.0)

    def init(variables: Variables) -> ServerState:
        return init_server(tx, variables, algo_state=tree_zeros_like(variables["params"]))

    def broadcast(state: ServerState) -> PyTree:
        return {"variables": state.params, "control": state.algo_state}

    def client_update(
        message: PyTree,
        data: ClientData,
        key: jax.Array,
        control_i: PyTree,
        max_steps: jax.Array | None = None,
    ) -> ClientOutput:
        x, c = message["variables"], message["control"]
        offset = tree_sub(c, control_i)
        y, metrics = local_train(x, data, key, hp, grad_offset=offset, max_steps=max_steps)
        k = metrics["steps"]
        scale = jnp.where(k > 0, 1.0 / (jnp.maximum(k, 1.0) * hp.lr), 0.0)
        new_control = jax.tree.map(
            lambda ci, cc, xx, yy: jnp.where(k > 0, ci - cc + (xx - yy) * scale, ci),
            control_i,
            c,
            x["params"],
            y["params"],
        )
        return ClientOutput(
            update={"delta": tree_sub(x, y), "control": tree_sub(new_control, control_i)},
            weight=example_weight(data),
            metrics=metrics,
            state=new_control,
        )

    def server_update(state: ServerState, update: PyTree, participants) -> ServerState:
        new = apply_pseudo_gradient(tx, state, update["delta"])
        frac = jnp.asarray(participants, jnp.float32) / num_clients
        control = jax.tree.map(lambda c, d: c + frac * d, state.algo_state, update["control"])
        return new.replace(algo_state=control)

    def client_init(variables: Variables) -> PyTree:
        return tree_zeros_like(variables["params"])

    return Algorithm(
        "scaffold",
        init,
        client_update,
        server_update,
        broadcast,
        client_init,
        model_delta=lambda update: update["delta"],
    )
