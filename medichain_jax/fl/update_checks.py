"""Checks and bounds applied to every client update before aggregation."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from medichain_jax.types import PyTree


def tree_all_finite(tree: PyTree) -> jax.Array:
    """True when no leaf holds a NaN or an Inf (True for an empty tree)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def global_norm(tree: PyTree) -> jax.Array:
    """L2 norm of all leaves together."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def clip_by_global_norm(tree: PyTree, max_norm: float) -> PyTree:
    """Scale ``tree`` so its L2 norm is at most ``max_norm`` (norm clipping of an update, as
    in Sun et al. 2019, "Can You Really Backdoor Federated Learning?")."""
    factor = jnp.minimum(1.0, max_norm / jnp.maximum(global_norm(tree), 1e-12))
    return jax.tree.map(lambda x: (x * factor).astype(x.dtype), tree)
