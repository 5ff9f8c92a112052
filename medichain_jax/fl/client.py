"""``local_train``: one hospital's local training, the single function shared by the simulator
(vmapped / mapped over hospitals inside one compiled round) and the real-mode site runner."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from medichain_jax.models import FunctionalModel, Variables
from medichain_jax.types import ClientData, PyTree


@dataclasses.dataclass(frozen=True)
class TrainHParams:
    """Static hyper-parameters of local training (hashable: part of the compiled program)."""

    model: FunctionalModel
    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.0
    unroll: int = 1
    prox_mu: float = 0.0
    loss: Callable[[jax.Array, jax.Array, jax.Array], jax.Array] | None = None
    record_clip: float | None = None  # record-level DP-SGD: per-example gradient clip norm
    record_noise: float = 0.0  # record-level DP-SGD: noise multiplier (stddev / record_clip)

    def optimizer(self) -> optax.GradientTransformation:
        """The client optimizer: SGD, with heavy-ball momentum when ``momentum > 0``."""
        return optax.sgd(self.lr, momentum=self.momentum or None)

    def steps_per_epoch(self, capacity: int) -> int:
        """Minibatch steps per epoch for a client padded to ``capacity`` rows."""
        return max(1, math.ceil(capacity / self.batch_size))


def masked_mse(preds: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of ``0.5 * (pred - target)^2`` over the real rows (regression; quadratic tests)."""
    per_row = 0.5 * jnp.square(preds - targets).sum(axis=-1)
    return jnp.sum(per_row * mask) / jnp.maximum(jnp.sum(mask), 1)


def masked_bce(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean sigmoid binary cross-entropy over the real rows (labels ``[B, K]``, mask ``[B]``)."""
    per_row = optax.sigmoid_binary_cross_entropy(logits, labels).mean(axis=-1)
    return jnp.sum(per_row * mask) / jnp.maximum(jnp.sum(mask), 1)


def batch_loss(
    hp: TrainHParams, params: PyTree, stats: PyTree, x: jax.Array, y: jax.Array, mask: jax.Array
) -> tuple[jax.Array, PyTree]:
    """Training loss of one minibatch and the updated normalization statistics."""
    logits, new_vars = hp.model.apply({"params": params, "stats": stats}, x, train=True, mask=mask)
    loss = hp.loss or masked_bce
    return loss(logits, y, mask), new_vars["stats"]


RECORD_NOISE_TAG = 2**31 - 1


def private_batch_grad(grad_fn, hp: TrainHParams, params, stats, x, y, mask, key):
    """DP-SGD's gradient of one minibatch (Abadi et al. 2016): per-example gradients clipped to
    ``hp.record_clip`` in L2 norm, summed over the real rows, Gaussian noise of standard
    deviation ``hp.record_noise * hp.record_clip`` added, divided by the batch size. Returns the
    mean loss of the real rows, the private gradient and how many real rows were clipped."""

    def one(xi, yi, mi):
        (value, _), g = grad_fn(params, stats, xi[None], yi[None], mi[None])
        return value, g

    values, grads = jax.vmap(one)(x, y, mask)
    sq = sum(jnp.sum(jnp.square(g).reshape(g.shape[0], -1), axis=1) for g in jax.tree.leaves(grads))
    norms = jnp.sqrt(sq)
    scale = jnp.minimum(1.0, hp.record_clip / jnp.maximum(norms, 1e-12)) * mask
    leaves, treedef = jax.tree.flatten(grads)
    keys = jax.random.split(key, len(leaves))
    std = hp.record_noise * hp.record_clip
    noisy = [
        (jnp.tensordot(scale, g, axes=1) + std * jax.random.normal(k, g.shape[1:], g.dtype))
        / hp.batch_size
        for g, k in zip(leaves, keys, strict=True)
    ]
    value = jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1)
    clipped = jnp.sum((norms > hp.record_clip) & mask).astype(jnp.float32)
    return value, jax.tree.unflatten(treedef, noisy), clipped


def shuffled_order(key: jax.Array, num_examples: jax.Array, capacity: int) -> jax.Array:
    """A random order of the real rows first, padding rows last.

    Row ``i`` draws its sort key from ``fold_in(key, i)``, so the order of the real rows does
    not depend on how much padding a client carries.
    """
    u = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(key, i)))(jnp.arange(capacity))
    u = jnp.where(jnp.arange(capacity) < num_examples, u, 2.0)
    return jnp.argsort(u)


def local_train(
    variables: Variables,
    data: ClientData,
    key: jax.Array,
    hp: TrainHParams,
    *,
    anchor: PyTree | None = None,
    grad_offset: PyTree | None = None,
    max_steps: jax.Array | int | None = None,
) -> tuple[Variables, dict[str, jax.Array]]:
    """Train one hospital's copy of the model for ``hp.epochs`` epochs of minibatch SGD.

    Epochs are a ``lax.scan`` over minibatches; each epoch reshuffles from
    ``fold_in(key, epoch)``. Steps past the client's ``num_examples`` are skipped
    (``lax.cond``), so padding never changes a result. Optional pieces used by the algorithms:

    * ``hp.prox_mu``: proximal term ``mu/2 ||params - anchor||^2`` (FedProx, Ditto);
      ``anchor`` defaults to the starting params;
    * ``grad_offset``: added to every gradient (SCAFFOLD's ``c - c_i`` correction);
    * ``max_steps``: stop after this many optimizer steps (a straggler's deadline);
    * ``hp.record_clip``: record-level DP-SGD (Abadi et al. 2016, "Deep Learning with
      Differential Privacy"): per-example gradients (vmap) clipped to ``record_clip``, summed,
      ``N(0, (record_noise * record_clip)^2)`` noise added, divided by the batch size.

    Returns the new variables and ``{"loss": mean minibatch loss, "steps": steps taken}``.
    """
    capacity = data.capacity
    bsz = hp.batch_size
    steps = hp.steps_per_epoch(capacity)
    n = jnp.asarray(data.num_examples, jnp.int32)
    tx = hp.optimizer()
    grad_fn = jax.value_and_grad(functools.partial(batch_loss, hp), has_aux=True)
    anchor = variables["params"] if anchor is None else anchor
    limit = jnp.iinfo(jnp.int32).max if max_steps is None else jnp.asarray(max_steps, jnp.int32)
    noise_root = jax.random.fold_in(key, RECORD_NOISE_TAG)  # never an epoch index

    def sgd_step(carry, idx, mask, noise_key):
        params, stats, opt_state = carry
        x = jnp.take(data.x, idx, axis=0)
        y = jnp.take(data.y, idx, axis=0)
        if hp.record_clip is None:
            (value, new_stats), grads = grad_fn(params, stats, x, y, mask)
            clipped = jnp.zeros((), jnp.float32)
        else:
            value, grads, clipped = private_batch_grad(
                grad_fn, hp, params, stats, x, y, mask, noise_key
            )
            new_stats = stats
        if hp.prox_mu:
            grads = jax.tree.map(lambda g, p, a: g + hp.prox_mu * (p - a), grads, params, anchor)
        if grad_offset is not None:
            grads = jax.tree.map(jnp.add, grads, grad_offset)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), new_stats, opt_state), (value, clipped)

    def epoch(carry, e):
        done = e * ((n + bsz - 1) // bsz)  # real steps of earlier epochs (before any deadline)
        order = shuffled_order(jax.random.fold_in(key, e), n, capacity)
        order = jnp.pad(order, (0, steps * bsz - capacity)).reshape(steps, bsz)

        def step(carry, s):
            pos = s * bsz + jnp.arange(bsz)
            mask = pos < n
            active = (s * bsz < n) & (done + s < limit)
            noise_key = jax.random.fold_in(jax.random.fold_in(noise_root, e), s)
            carry, value = jax.lax.cond(
                active,
                lambda c: sgd_step(c, order[s], mask, noise_key),
                lambda c: (c, (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))),
                carry,
            )
            seen = jnp.where(active, mask.sum(), 0)
            return carry, (value, active, seen)

        carry, ((values, clipped), active, seen) = jax.lax.scan(
            step, carry, jnp.arange(steps), unroll=hp.unroll
        )
        return carry, (values.sum(), active.sum(), clipped.sum(), seen.sum())

    init = (variables["params"], variables["stats"], tx.init(variables["params"]))
    (params, stats, _), (loss_sums, counts, clipped, seen) = jax.lax.scan(
        epoch, init, jnp.arange(hp.epochs)
    )
    total_steps = counts.sum()
    metrics = {
        "loss": loss_sums.sum() / jnp.maximum(total_steps, 1),
        "steps": total_steps.astype(jnp.float32),
    }
    if hp.record_clip is not None:  # share of per-example gradients DP-SGD clipped
        metrics["clipped_fraction"] = clipped.sum() / jnp.maximum(seen.sum(), 1)
    return {"params": params, "stats": stats}, metrics
