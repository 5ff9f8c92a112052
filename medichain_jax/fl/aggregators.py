"""Aggregators: stacked client updates ``[clients, ...]`` + weights -> one update.

A client with weight 0 is absent (padding, dropped out or rejected). The robust aggregators
mask absent rows with ``jnp.where``, so nothing in them (not even NaN/Inf) reaches the result;
they are unweighted over the present clients, jit-able with traced weights, and return zeros
when no client is present.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from medichain_jax.types import PyTree


class Aggregator(NamedTuple):
    """``aggregate(stacked, weights) -> update``. ``linear`` aggregators are a weighted sum divided
    by the total weight, so the engine may stream them over chunks of clients instead of
    stacking every update."""

    name: str
    linear: bool
    aggregate: Callable[[PyTree, jax.Array], PyTree]


def weighted_sum(stacked: PyTree, weights: jax.Array) -> PyTree:
    """``sum_i w_i u_i`` over the leading (client) axis."""
    return jax.tree.map(lambda u: jnp.tensordot(weights.astype(u.dtype), u, axes=1), stacked)


def finalize_mean(total: PyTree, total_weight: jax.Array) -> PyTree:
    """Divide a streamed weighted sum by its total weight (zero weight gives a zero update)."""
    denom = jnp.maximum(total_weight, jnp.finfo(jnp.float32).tiny)
    return jax.tree.map(lambda s: s / denom.astype(s.dtype), total)


def weighted_mean_fn(stacked: PyTree, weights: jax.Array) -> PyTree:
    """Example-weighted mean of client updates (McMahan et al. 2017, FedAvg)."""
    return finalize_mean(weighted_sum(stacked, weights), weights.sum())


weighted_mean = Aggregator("mean", True, weighted_mean_fn)


def _rows(mask: jax.Array, u: jax.Array) -> jax.Array:
    """Broadcast a ``[m]`` mask against a ``[m, ...]`` leaf."""
    return mask.reshape(mask.shape + (1,) * (u.ndim - 1))


def _wide(u: jax.Array) -> jax.Array:
    """Compute in at least float32 (results are cast back to the leaf's dtype)."""
    return u.astype(jnp.promote_types(u.dtype, jnp.float32))


def coordinate_median_fn(stacked: PyTree, weights: jax.Array) -> PyTree:
    """Coordinate-wise median of the present clients, unweighted (Yin et al. 2018, ICML)."""
    present = weights > 0

    def leaf(u):
        med = jnp.nanmedian(jnp.where(_rows(present, u), _wide(u), jnp.nan), axis=0)
        return jnp.where(present.any(), med, 0).astype(u.dtype)

    return jax.tree.map(leaf, stacked)


# Yin et al. 2018, "Byzantine-robust distributed learning: towards optimal statistical rates"
coordinate_median = Aggregator("median", False, coordinate_median_fn)


def trimmed_mean(beta: float) -> Aggregator:
    """Coordinate-wise mean after dropping the floor(beta*k) largest and smallest of the k present
    values, unweighted (Yin et al. 2018, "Byzantine-robust distributed learning")."""
    if not 0 <= beta < 0.5:
        raise ValueError(f"trimmed mean needs 0 <= beta < 0.5 (option trim_beta), got {beta}")

    def aggregate(stacked: PyTree, weights: jax.Array) -> PyTree:
        present = weights > 0
        k = present.sum()
        m = present.shape[0]
        # exact floor(beta * k) for every possible k, looked up with the traced k
        b = jnp.asarray([math.floor(beta * j) for j in range(m + 1)], jnp.int32)[k]
        pos = jnp.arange(m)
        keep = (pos >= b) & (pos < k - b)

        def leaf(u):
            srt = jnp.sort(jnp.where(_rows(present, u), _wide(u), jnp.inf), axis=0)  # absent last
            total = jnp.where(_rows(keep, srt), srt, 0).sum(axis=0)
            return (total / jnp.maximum(k - 2 * b, 1)).astype(u.dtype)

        return jax.tree.map(leaf, stacked)

    return Aggregator("trimmed_mean", False, aggregate)


def krum_scores(stacked: PyTree, weights: jax.Array, f: int) -> jax.Array:
    """``[m]`` Krum scores: each present client's summed squared distance to its k-f-2 (at least 1)
    nearest present neighbours; absent clients score +inf (Blanchard et al. 2017)."""
    present = weights > 0
    k = present.sum()
    m = present.shape[0]
    leaves = [
        jnp.where(_rows(present, u), _wide(u), 0).reshape(m, -1) for u in jax.tree.leaves(stacked)
    ]
    if not leaves:
        return jnp.where(present, 0.0, jnp.inf)

    def dist_row(i):  # squared distances from client i to every client, one row at a time
        return sum(jnp.sum((x - x[i]) ** 2, axis=1) for x in leaves)

    d = jax.lax.map(dist_row, jnp.arange(m))
    neighbour = present[None, :] & ~jnp.eye(m, dtype=bool)
    d = jnp.sort(jnp.where(neighbour, d, jnp.inf), axis=1)
    n_nb = jnp.minimum(jnp.maximum(k - f - 2, 1), k - 1)
    scores = jnp.where(jnp.arange(m)[None, :] < n_nb, d, 0).sum(axis=1)
    return jnp.where(present, scores, jnp.inf)


def _check_f(f: int) -> None:
    if not isinstance(f, int) or isinstance(f, bool) or f < 0:
        raise ValueError(f"Krum needs an integer f >= 0 (option krum_f), got {f!r}")


def krum(f: int) -> Aggregator:
    """The present update with the lowest Krum score, for at most ``f`` Byzantine clients
    (Blanchard et al. 2017, "Machine learning with adversaries: Byzantine tolerant GD")."""
    _check_f(f)

    def aggregate(stacked: PyTree, weights: jax.Array) -> PyTree:
        present = weights > 0
        best = jnp.argmin(krum_scores(stacked, weights, f))
        return jax.tree.map(lambda u: jnp.where(present[best], u[best], 0).astype(u.dtype), stacked)

    return Aggregator("krum", False, aggregate)


def multi_krum(f: int, m: int | None = None) -> Aggregator:
    """Unweighted mean of the ``m`` (default k-f, at least 1) present updates with the lowest Krum
    scores (Blanchard et al. 2017, "Machine learning with adversaries")."""
    _check_f(f)
    if m is not None and (not isinstance(m, int) or isinstance(m, bool) or m < 1):
        raise ValueError(f"Multi-Krum needs m >= 1 or None (option multi_krum_m), got {m!r}")

    def aggregate(stacked: PyTree, weights: jax.Array) -> PyTree:
        present = weights > 0
        k = present.sum()
        n = jnp.maximum(k - f, 1) if m is None else m
        n = jnp.minimum(n, k)  # only present clients (finite scores) are ever chosen
        order = jnp.argsort(krum_scores(stacked, weights, f))
        chosen = jnp.zeros_like(present).at[order].set(jnp.arange(present.shape[0]) < n)

        def leaf(u):
            total = jnp.where(_rows(chosen, u), _wide(u), 0).sum(axis=0)
            return (total / jnp.maximum(n, 1)).astype(u.dtype)

        return jax.tree.map(leaf, stacked)

    return Aggregator("multi_krum", False, aggregate)


AGGREGATORS: tuple[str, ...] = ("mean", "median", "trimmed_mean", "krum", "multi_krum")


def get_aggregator(
    name: str, *, trim_beta: float = 0.2, krum_f: int = 1, multi_krum_m: int | None = None
) -> Aggregator:
    """Build an aggregator by name; the options apply only to the aggregators that use them."""
    if name == "mean":
        return weighted_mean
    if name == "median":
        return coordinate_median
    if name == "trimmed_mean":
        return trimmed_mean(trim_beta)
    if name == "krum":
        return krum(krum_f)
    if name == "multi_krum":
        return multi_krum(krum_f, multi_krum_m)
    raise ValueError(f"unknown aggregator {name!r}; choose from {list(AGGREGATORS)}")
