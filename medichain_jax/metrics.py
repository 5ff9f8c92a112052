"""Evaluation: masked loss, accuracy and ROC AUC per hospital and pooled, all in jax."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from medichain_jax.models import FunctionalModel, Variables
from medichain_jax.types import ClientData


def roc_auc(scores: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """Area under the ROC curve of one score column over the masked rows (ties count 1/2).

    Mann-Whitney form with tie-averaged ranks; NaN when a class is absent.
    """
    s = jnp.where(mask, scores, jnp.inf)
    srt = jnp.sort(s)
    lo = jnp.searchsorted(srt, s, side="left")
    hi = jnp.searchsorted(srt, s, side="right")
    rank = (lo + hi + 1) / 2.0  # 1-based, ties averaged
    pos = mask & (labels > 0.5)
    n_pos = pos.sum()
    n_neg = (mask & (labels <= 0.5)).sum()
    u = jnp.sum(jnp.where(pos, rank, 0.0)) - n_pos * (n_pos + 1) / 2.0
    denom = n_pos * n_neg
    return jnp.where(denom > 0, u / jnp.maximum(denom, 1), jnp.nan)


def summarize(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """Loss, accuracy and macro AUC (over label columns) of ``[n, K]`` logits on masked rows."""
    count = jnp.maximum(mask.sum(), 1)
    bce = optax.sigmoid_binary_cross_entropy(logits, labels).mean(axis=-1)
    correct = ((logits > 0) == (labels > 0.5)).mean(axis=-1)
    aucs = jax.vmap(roc_auc, in_axes=(1, 1, None))(logits, labels, mask)
    return {
        "loss": jnp.sum(bce * mask) / count,
        "accuracy": jnp.sum(correct * mask) / count,
        "auc": jnp.nanmean(aucs) if aucs.shape[0] > 1 else aucs[0],
        "n": mask.sum(),
    }


def predict(model: FunctionalModel, variables: Variables, data: ClientData) -> jax.Array:
    """Logits ``[n_max, K]`` for one hospital's (padded) rows, in inference mode."""
    return model.apply(variables, data.x, train=False)[0]


def evaluate(
    model: FunctionalModel,
    variables: Variables | list,
    data: ClientData,
    per_client_vars: bool = False,
) -> dict[str, dict[str, jax.Array]]:
    """Metrics of each hospital's test rows (``per_hospital``: ``[N]`` arrays) and of all rows
    pooled (``pooled``). With ``per_client_vars`` each hospital uses its own variables
    (leading axis ``N``, e.g. local-only or personalized models)."""
    if per_client_vars:
        logits = jax.lax.map(lambda a: predict(model, a[0], a[1]), (variables, data))
    else:
        logits = jax.lax.map(lambda d: predict(model, variables, d), data)
    mask = data.mask()
    per = jax.vmap(summarize)(logits, data.y, mask)
    k = logits.shape[-1]
    pooled = summarize(logits.reshape(-1, k), data.y.reshape(-1, k), mask.reshape(-1))
    return {"per_hospital": per, "pooled": pooled}
