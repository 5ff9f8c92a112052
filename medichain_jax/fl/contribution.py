"""Hospital contribution scores from one round's client updates: leave-one-out and Monte Carlo
Shapley values of a subset utility, evaluated for many subsets at once (no loop over clients).

A utility maps a ``[m]`` bool subset mask to a scalar. Absent clients (``present[i]`` False, e.g.
weight 0) are forced out of every subset, so they score exactly 0 and never change other scores.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from medichain_jax.fl.aggregators import finalize_mean, weighted_sum
from medichain_jax.fl.client import masked_bce
from medichain_jax.metrics import summarize
from medichain_jax.models import FunctionalModel, Variables
from medichain_jax.types import ClientData, PyTree

Utility = Callable[[jax.Array], jax.Array]


def subset_update(updates: PyTree, weights: jax.Array, mask: jax.Array) -> PyTree:
    """Example-weighted mean of the updates with ``mask[i]`` and ``weights[i] > 0`` (FedAvg,
    McMahan et al. 2017, on a subset); zeros for an empty subset."""
    weights = jnp.asarray(weights, jnp.float32)
    w = jnp.where(jnp.asarray(mask).astype(bool) & (weights > 0), weights, 0.0)
    return finalize_mean(weighted_sum(updates, w), w.sum())


def _present(num_clients: int, present: jax.Array | None) -> jax.Array:
    """``[m]`` bool presence mask (all present when ``None``)."""
    if present is None:
        return jnp.ones(num_clients, bool)
    return jnp.asarray(present).astype(bool)


def _evaluate(utility: Utility, masks: jax.Array, batch_size: int | None) -> jax.Array:
    """``utility`` on each row of ``masks`` ``[s, m]``: vmapped in chunks of ``batch_size``."""
    if batch_size is None or batch_size >= masks.shape[0]:
        return jax.vmap(utility)(masks)
    return jax.lax.map(utility, masks, batch_size=batch_size)


def leave_one_out(
    utility: Utility,
    num_clients: int,
    present: jax.Array | None = None,
    batch_size: int | None = None,
) -> jax.Array:
    """``[m]`` leave-one-out scores ``u(N) - u(N \\ {i})`` (Cook 1977; in FL: Wang et al. 2019,
    "Measure contributions of participants in federated learning")."""
    pres = _present(num_clients, present)
    masks = jnp.concatenate([jnp.ones((1, num_clients), bool), ~jnp.eye(num_clients, dtype=bool)])
    vals = _evaluate(utility, masks & pres, batch_size)
    return jnp.where(pres, vals[0] - vals[1:], 0.0)


def monte_carlo_shapley(
    utility: Utility,
    num_clients: int,
    key: jax.Array,
    permutations: int,
    present: jax.Array | None = None,
    batch_size: int | None = None,
    stratified: bool = True,
) -> jax.Array:
    """``[m]`` permutation-sampling Shapley estimate (Castro et al. 2009; in FL: Song et al. 2019,
    GTG-Shapley, Liu et al. 2022); per permutation the scores sum to ``u(N) - u({})``.

    ``stratified``: the permutations are the ``m`` cyclic rotations of ``ceil(permutations / m)``
    random ones, so every client sits at every position equally often (position-stratified
    sampling, Maleki et al. 2013); a client's marginal gain depends mostly on how many clients
    precede it, and this removes that source of variance.
    """
    m = num_clients
    pres = _present(m, present)
    if stratified:
        base = -(-permutations // m)
        roots = jax.vmap(lambda k: jax.random.permutation(k, m))(jax.random.split(key, base))
        shifts = (jnp.arange(m)[:, None] + jnp.arange(m)[None, :]) % m  # [rotation, position]
        perms = roots[:, shifts].reshape(base * m, m)
    else:
        perms = jax.vmap(lambda k: jax.random.permutation(k, m))(
            jax.random.split(key, permutations)
        )
    count = perms.shape[0]
    rank = jnp.argsort(perms, axis=1)  # [P, m]: position of client i in permutation p
    prefix = rank[:, None, :] < jnp.arange(m + 1)[None, :, None]  # [P, m+1, m]: first k clients
    vals = _evaluate(utility, (prefix & pres).reshape(-1, m), batch_size).reshape(count, m + 1)
    after = jnp.take_along_axis(vals, rank + 1, axis=1)
    before = jnp.take_along_axis(vals, rank, axis=1)
    return jnp.where(pres, (after - before).mean(axis=0), 0.0)


UTILITIES = ("loss", "auc")


def validation_loss(model: FunctionalModel, variables: Variables, val: ClientData) -> jax.Array:
    """Mean BCE of ``model`` (eval mode) over the real rows of one validation set."""
    logits, _ = model.apply(variables, val.x, train=False)
    return masked_bce(logits, val.y, val.mask())


def validation_auc_loss(model: FunctionalModel, variables: Variables, val: ClientData) -> jax.Array:
    """``1 - macro ROC AUC`` of ``model`` on one validation set: a loss that ignores calibration,
    so a hospital whose labels are skewed is not scored as harmful for shifting the bias (nor one
    whose noisy labels shrink the logits, which can even raise AUC, like label smoothing)."""
    logits, _ = model.apply(variables, val.x, train=False)
    return 1.0 - summarize(logits, val.y, val.mask())["auc"]


def round_contributions(
    model: FunctionalModel,
    global_vars: Variables,
    updates: PyTree,
    weights: jax.Array,
    val: ClientData,
    key: jax.Array,
    permutations: int = 8,
    batch_size: int = 16,
    utility: str = "loss",
) -> dict[str, jax.Array]:
    """LOO and Shapley scores of one round; a subset's utility is how much applying its averaged
    update lowers the validation loss (``loss``: BCE; ``auc``: 1 - AUC) (one-round
    reconstruction, Song et al. 2019, "Profit allocation for federated learning")."""
    if utility not in UTILITIES:
        raise ValueError(f"contribution utility must be one of {UTILITIES}, got {utility!r}")
    m = weights.shape[0]
    present = jnp.asarray(weights) > 0
    fn = validation_auc_loss if utility == "auc" else validation_loss
    loss = functools.partial(fn, model, val=val)
    base = loss(global_vars)

    def gain(mask: jax.Array) -> jax.Array:
        delta = subset_update(updates, weights, mask)
        return base - loss(jax.tree.map(jnp.subtract, global_vars, delta))

    return {
        "loo": leave_one_out(gain, m, present, batch_size),
        "shapley": monte_carlo_shapley(gain, m, key, permutations, present, batch_size),
        "utility_all": gain(present),
    }
