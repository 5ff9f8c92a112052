"""Checks and bounds applied to every client update before aggregation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from medichain_jax.types import PyTree


def tree_all_finite(tree: PyTree) -> jax.Array:
    """True when no leaf holds a NaN or an Inf (True for an empty tree)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def clip_by_global_norm(tree: PyTree, max_norm: float) -> PyTree:
    """Scale ``tree`` so its L2 norm is at most ``max_norm`` (norm clipping of an update, as
    in Sun et al. 2019, "Can You Really Backdoor Federated Learning?"): optax's stateless
    ``clip_by_global_norm`` applied to one update."""
    clipped, _ = optax.clip_by_global_norm(max_norm).update(tree, optax.EmptyState())
    return clipped
