"""Simulated Byzantine hospitals: poisoned data or poisoned updates, applied inside the compiled
round with a per-client flag (honest hospitals pass through unchanged)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from medichain_jax.types import ClientData, PyTree

ATTACKS = ("none", "sign_flip", "scale", "gaussian", "label_flip")

# attack strength when none is given: sign_flip sends -4x its honest update, scale 10x,
# gaussian replaces the update with N(0, 1) noise
DEFAULT_SCALE = {"none": 0.0, "sign_flip": 4.0, "scale": 10.0, "gaussian": 1.0, "label_flip": 0.0}


def check_attack(attack: str) -> None:
    """Raise ``ValueError`` naming the choices for an unknown attack."""
    if attack not in ATTACKS:
        raise ValueError(f"unknown attack {attack!r}; choose from {ATTACKS}")


def poison_data(data: ClientData, byzantine: jax.Array, attack: str) -> ClientData:
    """Label flipping (Biggio et al. 2012; Tolpegin et al. 2020): a Byzantine hospital trains
    on ``1 - y``."""
    check_attack(attack)
    if attack != "label_flip":
        return data
    return data.replace(y=jnp.where(byzantine, 1.0 - data.y, data.y))


def poison_update(
    update: PyTree, byzantine: jax.Array, key: jax.Array, attack: str, scale: float
) -> PyTree:
    """Update attacks: ``sign_flip`` sends ``-scale * u`` (Damaskinos et al. 2018 / Li et al.
    2019 "RSA"), ``scale`` sends ``scale * u`` (model replacement, Bagdasaryan et al. 2020),
    ``gaussian`` sends ``N(0, scale^2)`` noise (Blanchard et al. 2017)."""
    check_attack(attack)
    if attack in ("none", "label_flip"):
        return update
    leaves, treedef = jax.tree.flatten(update)
    keys = jax.random.split(jax.random.fold_in(key, 0x5EED), max(len(leaves), 1))

    def bad(u, k):
        if attack == "sign_flip":
            return -scale * u
        if attack == "scale":
            return scale * u
        return scale * jax.random.normal(k, u.shape, u.dtype)

    out = [
        jnp.where(byzantine, bad(u, k), u).astype(u.dtype)
        for u, k in zip(leaves, keys[: len(leaves)], strict=True)
    ]
    return jax.tree.unflatten(treedef, out)
