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


TASKS = ("classification", "segmentation")


def dice_per_row(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Dice 2|P & T| / (|P| + |T|) of each row's predicted (logit > 0) and true pixels
    (``[n, pixels]``); 1 where both are empty."""
    pred, truth = logits > 0, labels > 0.5
    total = pred.sum(-1) + truth.sum(-1)
    return jnp.where(total > 0, 2.0 * (pred & truth).sum(-1) / jnp.maximum(total, 1), 1.0)


def summarize(
    logits: jax.Array, labels: jax.Array, mask: jax.Array, task: str = "classification"
) -> dict[str, jax.Array]:
    """Metrics of ``[n, K]`` logits on masked rows. Classification: loss, accuracy, macro AUC
    over label columns and each column's AUC ``[K]``; segmentation (K = pixels): loss, pixel
    accuracy, mean per-image Dice and pixel-level AUC."""
    count = jnp.maximum(mask.sum(), 1)
    bce = optax.sigmoid_binary_cross_entropy(logits, labels).mean(axis=-1)
    correct = ((logits > 0) == (labels > 0.5)).mean(axis=-1)
    out = {
        "loss": jnp.sum(bce * mask) / count,
        "accuracy": jnp.sum(correct * mask) / count,
        "n": mask.sum(),
    }
    if task == "segmentation":
        pixels = labels.shape[-1]
        out["dice"] = jnp.sum(dice_per_row(logits, labels) * mask) / count
        out["auc"] = roc_auc(logits.reshape(-1), labels.reshape(-1), jnp.repeat(mask, pixels))
        return out
    aucs = jax.vmap(roc_auc, in_axes=(1, 1, None))(logits, labels, mask)
    out["auc"] = jnp.nanmean(aucs) if aucs.shape[0] > 1 else aucs[0]
    out["auc_per_label"] = aucs
    return out


def predict(model: FunctionalModel, variables: Variables, data: ClientData) -> jax.Array:
    """Logits ``[n_max, K]`` for one hospital's (padded) rows, in inference mode."""
    return model.apply(variables, data.x, train=False)[0]


def evaluate(
    model: FunctionalModel,
    variables: Variables | list,
    data: ClientData,
    per_client_vars: bool = False,
    task: str = "classification",
) -> dict[str, dict[str, jax.Array]]:
    """Metrics of each hospital's test rows (``per_hospital``: ``[N]`` arrays) and of all rows
    pooled (``pooled``). With ``per_client_vars`` each hospital uses its own variables
    (leading axis ``N``, e.g. local-only or personalized models)."""
    if per_client_vars:
        logits = jax.lax.map(lambda a: predict(model, a[0], a[1]), (variables, data))
    else:
        logits = jax.lax.map(lambda d: predict(model, variables, d), data)
    mask = data.mask()
    per = jax.vmap(lambda lg, y, m: summarize(lg, y, m, task))(logits, data.y, mask)
    k = logits.shape[-1]
    pooled = summarize(logits.reshape(-1, k), data.y.reshape(-1, k), mask.reshape(-1), task)
    return {"per_hospital": per, "pooled": pooled}
