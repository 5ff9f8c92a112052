"""A linear model over flattened inputs (logistic / linear regression baseline)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class Linear(nnx.Module):
    """``logits = flatten(x) @ kernel (+ bias)``; zero-initialized, so runs start at the origin."""

    def __init__(self, in_features: int, num_outputs: int = 1, use_bias: bool = False, *, rngs):
        self.kernel = nnx.Param(jnp.zeros((in_features, num_outputs), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_outputs,), jnp.float32)) if use_bias else None

    def __call__(self, x: jax.Array, train: bool = False, mask: jax.Array | None = None):
        out = x.reshape(x.shape[0], -1) @ self.kernel[...]
        return out if self.bias is None else out + self.bias[...]
