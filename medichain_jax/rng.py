"""Key derivation: every random draw comes from (seed, stream, round, client).

``client_key(seed, round, client)`` = ``fold_in(fold_in(stream(seed, TRAIN), round), client)``,
so a hospital's randomness never depends on which other hospitals were sampled or on the
order clients are processed in, and a resumed run draws exactly what an uninterrupted one does.
"""

from __future__ import annotations

import jax

# Independent streams folded into the root key.
TRAIN, COHORT, INIT, DATA, BASELINE = 0, 1, 2, 3, 4
SYSTEM, DROPOUT, PERSONAL, CONTRIBUTION, LABEL_NOISE = 5, 6, 7, 8, 9
DP_NOISE, RECORD_NOISE = 10, 11


def stream(seed: int | jax.Array, tag: int) -> jax.Array:
    """The root key of one named stream."""
    return jax.random.fold_in(jax.random.key(seed), tag)


def round_key(seed: int | jax.Array, tag: int, rnd: int | jax.Array) -> jax.Array:
    """Key for one round of a stream."""
    return jax.random.fold_in(stream(seed, tag), rnd)


def client_key(seed: int | jax.Array, rnd: int | jax.Array, client: int | jax.Array) -> jax.Array:
    """Training key of ``client`` in round ``rnd``."""
    return jax.random.fold_in(round_key(seed, TRAIN, rnd), client)
