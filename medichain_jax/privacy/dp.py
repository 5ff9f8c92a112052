"""Client-level differential privacy for federated averaging, as pure functions.

DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models"):
each hospital's update is clipped to L2 norm ``C`` (:func:`clip_update`, per client); the
server adds Gaussian noise of standard deviation ``z * C`` to the *sum* of the clipped updates
(:func:`add_noise`) and divides by the expected number of clients per round (a fixed
denominator, so one hospital changes the mean by at most ``C / m``).

Adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with Adaptive
Clipping"): every client also reports whether its update was within the clip norm; the server
estimates that fraction with Gaussian noise and moves ``C`` geometrically towards the
``target_quantile`` of the update norms. The update noise and the count noise share the budget
of one Gaussian mechanism of noise multiplier ``z`` (:func:`split_noise_multiplier`).

Accounting lives in :mod:`medichain_jax.privacy.accounting` (host side, dp-accounting).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from medichain_jax.types import PyTree


@dataclasses.dataclass(frozen=True)
class ClientDP:
    """Static settings of client-level DP (part of the compiled round).

    ``noise_multiplier`` is the ``z`` the accountant sees (with adaptive clipping the update
    noise is the larger ``z_delta`` of :func:`split_noise_multiplier`); ``expected_clients``
    is the fixed denominator ``m`` (the cohort size); ``count_stddev`` is ``sigma_b`` of the
    clipped-fraction estimate (default ``m / 20``, as in Andrew et al.)."""

    clip_norm: float
    noise_multiplier: float
    expected_clients: int
    adaptive: bool = False
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    count_stddev: float | None = None

    def __post_init__(self):
        if not self.clip_norm > 0:
            raise ValueError(f"dp clip norm must be > 0, got {self.clip_norm}")
        if not self.noise_multiplier >= 0:
            raise ValueError(f"dp noise multiplier must be >= 0, got {self.noise_multiplier}")
        if self.expected_clients < 1:
            raise ValueError(f"expected clients must be >= 1, got {self.expected_clients}")
        if not 0 < self.target_quantile < 1:
            raise ValueError(f"target quantile must be in (0, 1), got {self.target_quantile}")
        if not self.clip_lr > 0:
            raise ValueError(f"clip learning rate must be > 0, got {self.clip_lr}")
        if self.adaptive:
            split_noise_multiplier(self.noise_multiplier, self.sigma_b)  # raises if infeasible

    @property
    def sigma_b(self) -> float:
        """Standard deviation of the noise on the count of unclipped updates."""
        return self.count_stddev if self.count_stddev is not None else self.expected_clients / 20

    @property
    def update_noise_multiplier(self) -> float:
        """Noise multiplier of the update sum (``z`` itself without adaptive clipping)."""
        if not self.adaptive:
            return self.noise_multiplier
        return split_noise_multiplier(self.noise_multiplier, self.sigma_b)


class DPState(NamedTuple):
    """Server-side DP state, checkpointed with the server: the current clip norm and the number
    of DP rounds composed so far (what the host accountant needs to resume)."""

    clip_norm: jax.Array
    rounds: jax.Array


def init_dp_state(dp: ClientDP) -> DPState:
    """Round-0 DP state."""
    return DPState(jnp.asarray(dp.clip_norm, jnp.float32), jnp.zeros((), jnp.int32))


def split_noise_multiplier(z: float, sigma_b: float) -> float:
    """Update-sum noise multiplier ``z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2`` that, together with
    count noise ``sigma_b``, spends the budget of one Gaussian mechanism with multiplier ``z``
    (Andrew et al. 2021, Theorem 1). ``z = 0`` (no noise) gives 0."""
    if z == 0:
        return 0.0
    rest = z**-2 - (2 * sigma_b) ** -2
    if rest <= 0:
        raise ValueError(
            f"adaptive clipping: count noise sigma_b={sigma_b:g} must exceed z/2={z / 2:g}"
            " (raise the cohort size or lower the noise multiplier)"
        )
    return 1 / math.sqrt(rest)


def global_norm(tree: PyTree) -> jax.Array:
    """L2 norm of all leaves of ``tree`` together."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def clip_update(update: PyTree, clip_norm: jax.Array | float) -> tuple[PyTree, jax.Array]:
    """Scale one client's update to L2 norm at most ``clip_norm``; returns it and its norm
    before clipping (McMahan et al. 2018)."""
    norm = global_norm(update)
    scale = jnp.minimum(1.0, clip_norm / jnp.maximum(norm, jnp.finfo(jnp.float32).tiny))
    return jax.tree.map(lambda u: (u * scale).astype(u.dtype), update), norm


def add_noise(total: PyTree, key: jax.Array, stddev: jax.Array | float) -> PyTree:
    """Add independent ``N(0, stddev^2)`` noise to every coordinate of ``total`` (the Gaussian
    mechanism on the sum of clipped updates)."""
    leaves, treedef = jax.tree.flatten(total)
    keys = jax.random.split(key, max(len(leaves), 1))
    noisy = [
        u + (stddev * jax.random.normal(k, u.shape, jnp.float32)).astype(u.dtype)
        for u, k in zip(leaves, keys, strict=False)
    ]
    return jax.tree.unflatten(treedef, noisy)


def private_mean(
    total: PyTree, unclipped: jax.Array, state: DPState, key: jax.Array, dp: ClientDP
) -> tuple[PyTree, DPState, dict[str, jax.Array]]:
    """The server half of DP-FedAvg: ``(sum of clipped updates + N(0, (z C)^2)) / m``, and, with
    adaptive clipping, the next clip norm from the noisy fraction of unclipped updates
    (``unclipped``: how many clients' updates were within ``C``). Returns the private mean,
    the new state and ``{"clip_norm", "noise_stddev", "unclipped_estimate"}``."""
    k_update, k_count = jax.random.split(key)
    stddev = dp.update_noise_multiplier * state.clip_norm
    noisy = add_noise(total, k_update, stddev)
    mean = jax.tree.map(lambda s: s / dp.expected_clients, noisy)
    clip = state.clip_norm
    estimate = unclipped.astype(jnp.float32) / dp.expected_clients
    if dp.adaptive:
        noisy_count = unclipped + dp.sigma_b * jax.random.normal(k_count, (), jnp.float32)
        estimate = noisy_count / dp.expected_clients
        clip = clip * jnp.exp(-dp.clip_lr * (estimate - dp.target_quantile))
    stats = {"clip_norm": state.clip_norm, "noise_stddev": stddev, "unclipped_estimate": estimate}
    return mean, DPState(clip, state.rounds + 1), stats
