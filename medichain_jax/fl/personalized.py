"""Algorithms that give each hospital its own model: FedBN, local fine-tuning and Ditto."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from medichain_jax.fl.algorithm import example_weight, tree_sub
from medichain_jax.fl.client import TrainHParams, local_train
from medichain_jax.fl.fedavg import fedavg
from medichain_jax.models import Variables
from medichain_jax.types import ClientData, ClientOutput, PyTree


def _path_name(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def is_norm_leaf(name: str) -> bool:
    """Normalization leaves: running statistics and params of modules named ``norm*``."""
    parts = name.split(".")
    return parts[0] == "stats" or any(p.startswith("norm") for p in parts[1:])


def local_leaves(variables: Variables) -> dict[str, jax.Array]:
    """The normalization leaves of ``variables`` as a flat ``{"params.norm1...": array}`` dict."""
    flat = jax.tree_util.tree_flatten_with_path(variables)[0]
    return {_path_name(p): leaf for p, leaf in flat if is_norm_leaf(_path_name(p))}


def merge_local(global_vars: Variables, local: dict[str, jax.Array]) -> Variables:
    """``global_vars`` with its normalization leaves replaced by a hospital's own."""
    return jax.tree_util.tree_map_with_path(lambda p, g: local.get(_path_name(p), g), global_vars)


def fedbn(hp: TrainHParams, server_optimizer: optax.GradientTransformation | None = None):
    """FedBN (Li et al. 2021, "FedBN: Federated Learning on Non-IID Features via Local Batch
    Normalization"): normalization params and statistics never leave the hospital (its
    persistent client state); everything else is federated as in FedAvg."""
    base = fedavg(hp, server_optimizer, name="fedbn")

    def client_update(
        global_vars: Variables,
        data: ClientData,
        key: jax.Array,
        own: dict[str, jax.Array],
        max_steps: jax.Array | None = None,
    ) -> ClientOutput:
        start = merge_local(global_vars, own)
        local, metrics = local_train(start, data, key, hp, max_steps=max_steps)
        # shared leaves move the global model; normalization leaves are never sent
        update = jax.tree_util.tree_map_with_path(
            lambda p, g, y: jnp.zeros_like(g) if is_norm_leaf(_path_name(p)) else g - y,
            start,
            local,
        )
        return ClientOutput(
            update=update, weight=example_weight(data), metrics=metrics, state=local_leaves(local)
        )

    def personalize(global_vars, data, key, own) -> Variables:
        return merge_local(global_vars, own)

    return base._replace(
        client_update=client_update, client_init=local_leaves, personalize=personalize
    )


def finetune(
    hp: TrainHParams, epochs: int = 1, server_optimizer: optax.GradientTransformation | None = None
):
    """FedAvg, then each hospital fine-tunes the global model on its own data for ``epochs``
    epochs before evaluation (local adaptation; Wang et al. 2019, "Federated Evaluation of
    On-device Personalization")."""
    if epochs < 1:
        raise ValueError(f"fine-tuning epochs must be >= 1, got {epochs}")
    base = fedavg(hp, server_optimizer, name="finetune")
    hp_ft = dataclasses.replace(hp, epochs=epochs)

    def personalize(global_vars, data, key, client_state=None) -> Variables:
        return local_train(global_vars, data, key, hp_ft)[0]

    return base._replace(personalize=personalize, personalize_trains=True)


def ditto(
    hp: TrainHParams, lam: float, server_optimizer: optax.GradientTransformation | None = None
):
    """Ditto (Li et al. 2021, "Ditto: Fair and Robust Federated Learning Through
    Personalization"): the global model is trained as in FedAvg; each hospital also keeps a
    personal model ``v_i`` (its client state) trained with ``lam/2 ||v_i - w_global||^2``."""
    if lam < 0:
        raise ValueError(f"Ditto lambda must be >= 0, got {lam}")
    base = fedavg(hp, server_optimizer, name="ditto")
    hp_personal = dataclasses.replace(hp, prox_mu=lam)

    def client_update(
        global_vars: Variables,
        data: ClientData,
        key: jax.Array,
        personal: Variables,
        max_steps: jax.Array | None = None,
    ) -> ClientOutput:
        local, metrics = local_train(global_vars, data, key, hp, max_steps=max_steps)
        personal, _ = local_train(
            personal,
            data,
            jax.random.fold_in(key, 1),
            hp_personal,
            anchor=global_vars["params"],
            max_steps=max_steps,
        )
        return ClientOutput(
            update=tree_sub(global_vars, local),
            weight=example_weight(data),
            metrics=metrics,
            state=personal,
        )

    def personalize(global_vars, data, key, personal: PyTree) -> Variables:
        return personal

    return base._replace(
        client_update=client_update, client_init=lambda v: v, personalize=personalize
    )
