"""Simulated system heterogeneity and adversaries, per registered hospital: Byzantine flags,
step budgets before the round deadline (stragglers), join rounds and per-round dropout.

All of it enters the compiled round as masks, so no setting ever triggers a recompilation.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from medichain_jax import rng
from medichain_jax.fl.attacks import DEFAULT_SCALE, check_attack

NO_DEADLINE = np.iinfo(np.int32).max


class SystemModel(NamedTuple):
    """Per-hospital behaviour (``[N]`` arrays) plus round-level settings."""

    byzantine: np.ndarray  # bool: sends attacked updates
    max_steps: np.ndarray  # int32: local steps it finishes before the deadline
    join_round: np.ndarray  # int32: first round it takes part in
    dropout: float = 0.0  # probability of missing a round
    attack: str = "none"
    attack_scale: float = 0.0


def honest_system(num_clients: int) -> SystemModel:
    """Every hospital honest, on time, present from round 0."""
    return SystemModel(
        byzantine=np.zeros(num_clients, bool),
        max_steps=np.full(num_clients, NO_DEADLINE, np.int32),
        join_round=np.zeros(num_clients, np.int32),
    )


def _pick(seed: int, tag: int, num_clients: int, count: int) -> np.ndarray:
    """``count`` hospital ids drawn from (seed, tag) without replacement, as a bool mask."""
    mask = np.zeros(num_clients, bool)
    if count:
        key = jax.random.fold_in(rng.stream(seed, rng.SYSTEM), tag)
        mask[np.asarray(jax.random.permutation(key, num_clients))[:count]] = True
    return mask


def make_system(
    seed: int,
    planned_steps: np.ndarray,
    *,
    byzantine: int = 0,
    attack: str = "sign_flip",
    attack_scale: float | None = None,
    stragglers: float = 0.0,
    dropout: float = 0.0,
    late_join: int = 0,
    join_round: int = 0,
) -> SystemModel:
    """Draw which hospitals misbehave from ``seed`` (independently per property).

    ``planned_steps[i]``: local steps hospital i would take in a full round. A fraction
    ``stragglers`` of hospitals is slow: each finishes only ``speed * planned`` steps
    (at least 1) with speed uniform in [0.1, 0.9]. ``late_join`` hospitals take part only from
    round ``join_round`` on; every hospital skips a round with probability ``dropout``.
    """
    planned = np.asarray(planned_steps, np.int64)
    n = len(planned)
    for name, value, hi in (("byzantine", byzantine, n), ("late_join", late_join, n)):
        if not 0 <= value <= hi:
            raise ValueError(f"{name} must be in [0, {hi}], got {value}")
    if not 0 <= stragglers <= 1:
        raise ValueError(f"stragglers must be a fraction in [0, 1], got {stragglers}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be a probability in [0, 1), got {dropout}")
    check_attack(attack)
    slow = _pick(seed, 1, n, round(stragglers * n))
    speed = np.asarray(
        jax.random.uniform(
            jax.random.fold_in(rng.stream(seed, rng.SYSTEM), 2), (n,), minval=0.1, maxval=0.9
        )
    )
    steps = np.where(slow, np.maximum(1, np.floor(speed * planned)), NO_DEADLINE)
    late = _pick(seed, 3, n, late_join)
    return SystemModel(
        byzantine=_pick(seed, 0, n, byzantine),
        max_steps=steps.astype(np.int32),
        join_round=np.where(late, join_round, 0).astype(np.int32),
        dropout=float(dropout),
        attack=attack if byzantine else "none",
        attack_scale=float(DEFAULT_SCALE[attack] if attack_scale is None else attack_scale),
    )


def active_clients(
    system: SystemModel, seed: jax.Array, rnd: jax.Array, clients: jax.Array
) -> jax.Array:
    """Which of ``clients`` take part in round ``rnd`` (joined and not dropped out)."""
    joined = rnd >= jnp.asarray(system.join_round)[clients]
    if not system.dropout:
        return joined
    key = rng.round_key(seed, rng.DROPOUT, rnd)
    u = jax.vmap(lambda c: jax.random.uniform(jax.random.fold_in(key, c)))(clients)
    return joined & (u >= system.dropout)
