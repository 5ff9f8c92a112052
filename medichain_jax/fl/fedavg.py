"""FedAvg (McMahan et al. 2017) with an optax server optimizer (FedOpt, Reddi et al. 2021), and
FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks")."""

from __future__ import annotations

import dataclasses

import jax
import optax

from medichain_jax.fl.algorithm import (
    Algorithm,
    apply_pseudo_gradient,
    example_weight,
    init_server,
    tree_sub,
)
from medichain_jax.fl.client import TrainHParams, local_train
from medichain_jax.models import Variables
from medichain_jax.types import ClientData, ClientOutput, PyTree, ServerState


def fedavg(
    hp: TrainHParams,
    server_optimizer: optax.GradientTransformation | None = None,
    name: str = "fedavg",
) -> Algorithm:
    """Federated averaging: clients run ``local_train`` from the global model and send
    ``global - local``; the server feeds the example-weighted mean to ``server_optimizer``
    (``optax.sgd(1.0)``, the default, is plain FedAvg; see ``server_opt`` for FedAvgM / FedOpt).
    """
    tx = server_optimizer if server_optimizer is not None else optax.sgd(1.0)

    def init(variables: Variables) -> ServerState:
        return init_server(tx, variables)

    def client_update(
        global_vars: Variables,
        data: ClientData,
        key: jax.Array,
        client_state: PyTree = None,
        max_steps: jax.Array | None = None,
    ) -> ClientOutput:
        local_vars, metrics = local_train(global_vars, data, key, hp, max_steps=max_steps)
        return ClientOutput(
            update=tree_sub(global_vars, local_vars),
            weight=example_weight(data),
            metrics=metrics,
            state=client_state,
        )

    def server_update(state: ServerState, update: PyTree, participants=None) -> ServerState:
        return apply_pseudo_gradient(tx, state, update)

    return Algorithm(name, init, client_update, server_update)


def fedprox(
    hp: TrainHParams, mu: float, server_optimizer: optax.GradientTransformation | None = None
) -> Algorithm:
    """FedProx (Li et al. 2020): FedAvg whose local objective adds ``mu/2 ||w - w_global||^2``."""
    if mu < 0:
        raise ValueError(f"FedProx mu must be >= 0, got {mu}")
    return fedavg(dataclasses.replace(hp, prox_mu=mu), server_optimizer, name="fedprox")
