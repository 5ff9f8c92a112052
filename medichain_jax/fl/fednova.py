"""FedNova (Wang et al. 2020, "Tackling the Objective Inconsistency Problem in Heterogeneous
Federated Optimization"): normalized averaging for unequal local step counts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from medichain_jax.fl.algorithm import Algorithm
from medichain_jax.fl.client import TrainHParams
from medichain_jax.fl.fedavg import fedavg
from medichain_jax.models import Variables
from medichain_jax.types import ClientData, ClientOutput, PyTree, ServerState


def normalizer(steps: jax.Array, momentum: float) -> jax.Array:
    """``||a_i||_1`` of Wang et al. for local SGD with heavy-ball ``momentum`` rho:
    ``(tau - rho (1 - rho^tau) / (1 - rho)) / (1 - rho)``; equals ``tau`` for plain SGD."""
    tau = jnp.asarray(steps, jnp.float32)
    if not momentum:
        return tau
    rho = momentum
    return (tau - rho * (1 - rho**tau) / (1 - rho)) / (1 - rho)


def fednova(
    hp: TrainHParams, server_optimizer: optax.GradientTransformation | None = None
) -> Algorithm:
    """FedNova: hospital i sends ``d_i = (x - y_i) / ||a_i||_1`` and ``||a_i||_1``; the server
    steps by ``tau_eff * sum_i p_i d_i`` with ``tau_eff = sum_i p_i ||a_i||_1`` (p_i: example
    weights). Equal step counts reduce it to FedAvg."""
    base = fedavg(hp, server_optimizer, name="fednova")

    def client_update(
        global_vars: Variables,
        data: ClientData,
        key: jax.Array,
        client_state: PyTree = None,
        max_steps: jax.Array | None = None,
    ) -> ClientOutput:
        out = base.client_update(global_vars, data, key, client_state, max_steps)
        a = normalizer(out.metrics["steps"], hp.momentum)
        inv = jnp.where(a > 0, 1.0 / jnp.maximum(a, 1e-12), 0.0)
        d = jax.tree.map(lambda u: u * inv, out.update["params"])
        return out.replace(update={"params": d, "stats": out.update["stats"], "tau": a})

    def model_delta(update: PyTree) -> Variables:
        tau = update["tau"]
        return {
            "params": jax.tree.map(lambda d: d * tau, update["params"]),
            "stats": update["stats"],
        }

    def server_update(state: ServerState, update: PyTree, participants=None) -> ServerState:
        # the mean update carries tau_eff = sum_i p_i ||a_i||_1 and sum_i p_i d_i
        return base.server_update(state, model_delta(update), participants)

    return base._replace(
        client_update=client_update, server_update=server_update, model_delta=model_delta
    )
