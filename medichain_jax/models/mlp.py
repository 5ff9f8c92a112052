"""A small multilayer perceptron for tabular features (e.g. nodule geometry)."""

from __future__ import annotations

import jax
from flax import nnx


class MLP(nnx.Module):
    """``flatten(x) -> dense(hidden) -> relu -> dense(hidden) -> relu -> dense(num_outputs)``."""

    def __init__(self, in_features: int, num_outputs: int = 1, hidden: int = 32, *, rngs):
        self.fc1 = nnx.Linear(in_features, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, num_outputs, rngs=rngs)

    def __call__(self, x: jax.Array, train: bool = False, mask: jax.Array | None = None):
        h = jax.nn.relu(self.fc1(x.reshape(x.shape[0], -1)))
        return self.out(jax.nn.relu(self.fc2(h)))
