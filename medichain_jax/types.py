"""Core pytree types shared by the simulator and the real-mode site runner."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

PyTree = Any


@struct.dataclass
class ClientData:
    """One hospital's examples, padded to a common length.

    ``x``: ``[n_max, ...]`` float32 model inputs (images ``[H, W, C]`` or feature vectors
    ``[F]``); ``y``: ``[n_max, K]`` float32
    multi-hot labels (K = 1 for binary tasks); ``num_examples``: int32 scalar, the
    count of real rows (rows ``>= num_examples`` are padding and never touch a
    result). Stacked along a leading axis this holds many hospitals at once.
    """

    x: jax.Array
    y: jax.Array
    num_examples: jax.Array

    @property
    def capacity(self) -> int:
        """Padded length (static)."""
        return int(self.y.shape[-2])

    def mask(self) -> jax.Array:
        """``[..., n_max]`` bool: True for real rows."""
        idx = jnp.arange(self.capacity)
        return idx < jnp.asarray(self.num_examples)[..., None]


@struct.dataclass
class ClientOutput:
    """What a client sends back: ``update`` = global - local params (the algorithm's message),
    ``weight`` (examples seen), scalar ``metrics`` and persistent per-client ``state``."""

    update: PyTree
    weight: jax.Array
    metrics: dict[str, jax.Array]
    state: PyTree = None


@struct.dataclass
class ServerState:
    """Everything the server carries between rounds; checkpointed as one pytree."""

    params: PyTree
    opt_state: PyTree
    round: jax.Array
    algo_state: PyTree = None
    agg_state: PyTree = None
    privacy_state: PyTree = None
