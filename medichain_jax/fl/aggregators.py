"""Aggregators: stacked client updates ``[clients, ...]`` + weights -> one update."""

from __future__ import annotations

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

AGGREGATORS: dict[str, Aggregator] = {"mean": weighted_mean}


def get_aggregator(name: str) -> Aggregator:
    """Look an aggregator up by name."""
    if name not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {name!r}; choose from {sorted(AGGREGATORS)}")
    return AGGREGATORS[name]
