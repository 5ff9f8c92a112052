"""Server optimizers for FedOpt (Reddi et al. 2021, "Adaptive Federated Optimization") as optax
transformations of the pseudo-gradient ``global - mean local``."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

FEDOPT_KINDS = ("adam", "yogi", "adagrad")
SERVER_OPTIMIZERS = ("sgd", "momentum", *FEDOPT_KINDS)


class FedOptState(NamedTuple):
    """First moment ``m`` and second moment ``v`` of Reddi et al.'s Algorithm 2."""

    m: optax.Updates
    v: optax.Updates


def scale_by_fedopt(
    kind: str, b1: float = 0.9, b2: float = 0.99, tau: float = 1e-3
) -> optax.GradientTransformation:
    """FedAdagrad / FedYogi / FedAdam direction ``m / (sqrt(v) + tau)`` exactly as Algorithm 2 of
    Reddi et al. 2021: ``m = b1 m + (1 - b1) g``; ``v`` starts at ``tau^2`` and follows
    Adagrad (``v + g^2``), Yogi (``v - (1 - b2) g^2 sign(v - g^2)``) or Adam
    (``b2 v + (1 - b2) g^2``); no bias correction (unlike ``optax.adam``)."""
    if kind not in FEDOPT_KINDS:
        raise ValueError(f"FedOpt kind must be one of {FEDOPT_KINDS}, got {kind!r}")

    def init(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return FedOptState(m=zeros, v=jax.tree.map(lambda p: jnp.full_like(p, tau**2), params))

    def second_moment(v, g):
        g2 = jnp.square(g)
        if kind == "adagrad":
            return v + g2
        if kind == "yogi":
            return v - (1 - b2) * g2 * jnp.sign(v - g2)
        return b2 * v + (1 - b2) * g2

    def update(updates, state, params=None):
        del params
        m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.m, updates)
        v = jax.tree.map(second_moment, state.v, updates)
        out = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + tau), m, v)
        return out, FedOptState(m=m, v=v)

    return optax.GradientTransformation(init, update)


def server_optimizer(
    name: str,
    lr: float = 1.0,
    *,
    momentum: float = 0.9,
    b1: float = 0.9,
    b2: float = 0.99,
    tau: float = 1e-3,
) -> optax.GradientTransformation:
    """``sgd`` (FedAvg), ``momentum`` (FedAvgM, Hsu et al. 2019: heavy-ball server momentum) or a
    FedOpt kind (``adam`` / ``yogi`` / ``adagrad``) with server learning rate ``lr``."""
    if name == "sgd":
        return optax.sgd(lr)
    if name == "momentum":
        return optax.sgd(lr, momentum=momentum)
    if name in FEDOPT_KINDS:
        return optax.chain(scale_by_fedopt(name, b1, b2, tau), optax.scale(-lr))
    raise ValueError(f"server optimizer must be one of {SERVER_OPTIMIZERS}, got {name!r}")
