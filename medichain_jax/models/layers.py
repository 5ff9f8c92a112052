"""CPU-friendly building blocks: im2col convolution and reshape max-pooling.

XLA:CPU runs ``lax.conv`` gradients slowly inside ``scan`` (jax-ml/jax#12868) and turns
vmapped per-client conv weights into grouped convolutions; the im2col form below lowers
to plain (batched) matmuls instead, on every backend, with identical numbers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def im2col(x: jax.Array, kernel_size: int) -> jax.Array:
    """``[B, H, W, C]`` -> ``[B, H, W, k*k*C]`` patches for a stride-1 SAME convolution."""
    k = kernel_size
    lo = (k - 1) // 2
    hi = k - 1 - lo
    h, w = x.shape[1], x.shape[2]
    xp = jnp.pad(x, ((0, 0), (lo, hi), (lo, hi), (0, 0)))
    cols = [xp[:, i : i + h, j : j + w, :] for i in range(k) for j in range(k)]
    return jnp.concatenate(cols, axis=-1)


def space_to_depth(x: jax.Array, factor: int = 2) -> jax.Array:
    """``[B, H, W, C]`` -> ``[B, H/f, W/f, f*f*C]``: a lossless, free downsampling stem."""
    b, h, w, c = x.shape
    f = factor
    x = x.reshape(b, h // f, f, w // f, f, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // f, w // f, f * f * c)


def depth_to_space(x: jax.Array, factor: int = 2) -> jax.Array:
    """``[B, H, W, f*f*C]`` -> ``[B, H*f, W*f, C]``: the inverse of :func:`space_to_depth`."""
    b, h, w, c = x.shape
    f = factor
    x = x.reshape(b, h, w, f, f, c // (f * f)).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * f, w * f, c // (f * f))


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pooling with stride 2 as reshape + max (cheap gradient on XLA:CPU)."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class Im2ColConv(nnx.Module):
    """Stride-1 SAME 2D convolution computed as im2col + matmul; kernel layout ``[k, k, Cin, Cout]``."""

    def __init__(
        self, in_features: int, out_features: int, kernel_size: int = 3, *, rngs: nnx.Rngs
    ):
        self.kernel_size = kernel_size
        init = nnx.initializers.lecun_normal()
        shape = (kernel_size, kernel_size, in_features, out_features)
        self.kernel = nnx.Param(init(rngs.params(), shape, jnp.float32))
        self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        patches = im2col(x, self.kernel_size)
        return patches @ kernel.reshape(-1, kernel.shape[-1]) + self.bias[...]


class GroupNorm(nnx.Module):
    """Group normalization (Wu & He 2018) for NHWC inputs.

    Same numbers as ``nnx.GroupNorm`` (tested), computed from per-channel sums so the
    normalization folds into one scale-and-shift pass: about 7x faster fwd+bwd on XLA:CPU.
    """

    def __init__(self, features: int, num_groups: int, epsilon: float = 1e-6, *, rngs: nnx.Rngs):
        if features % num_groups:
            raise ValueError(f"{features} features do not split into {num_groups} groups")
        self.num_groups = num_groups
        self.epsilon = epsilon
        self.scale = nnx.Param(jnp.ones((features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((features,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        g = self.num_groups
        count = h * w * (c // g)
        mean = x.sum(axis=(1, 2)).reshape(b, g, c // g).sum(-1) / count
        sq = (x * x).sum(axis=(1, 2)).reshape(b, g, c // g).sum(-1) / count
        inv = jax.lax.rsqrt(jnp.maximum(sq - mean * mean, 0.0) + self.epsilon)
        a = jnp.repeat(inv, c // g, axis=1) * self.scale[...]
        shift = self.bias[...] - jnp.repeat(mean, c // g, axis=1) * a
        return x * a[:, None, None, :] + shift[:, None, None, :]
