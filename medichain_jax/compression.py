"""Update compression codecs, shared by the simulator and the real mode.

A :class:`Compressor` turns one hospital's update into a smaller payload and back (optax-style
named tuple of pure functions). Stateful codecs keep a per-hospital residual (error feedback)
in the hospital's client state. Codecs:

* ``bf16``: bfloat16 values (2 bytes per coordinate); round to nearest even.
* ``int8``: unbiased stochastic quantization to 8 bits with one float32 scale per leaf
  (QSGD-style; Alistarh et al. 2017, "QSGD: Communication-Efficient SGD via Gradient
  Quantization and Encoding"): ``E[decompress(compress(u))] = u``.
* ``topk``: the largest ``fraction`` of coordinates by magnitude (int32 index + float32 value
  each) with error feedback: what is not sent is added to the next round's update (Stich,
  Cordonnier & Jaggi 2018, "Sparsified SGD with Memory"; Karimireddy et al. 2019, "Error
  Feedback Fixes SignSGD").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from medichain_jax.types import PyTree

CODECS = ("none", "bf16", "int8", "topk")


class Compressor(NamedTuple):
    """``init(update_like) -> state``; ``compress(update, key, state) -> (payload, state)``;
    ``decompress(payload, update_like) -> update`` (``update_like`` gives shapes only);
    ``payload_bytes(update_like) -> int`` (static)."""

    name: str
    init: Callable[[PyTree], PyTree]
    compress: Callable[[PyTree, jax.Array, PyTree], tuple[PyTree, PyTree]]
    decompress: Callable[[PyTree, PyTree], PyTree]
    payload_bytes: Callable[[PyTree], int]
    stateful: bool = False


def _size(tree: PyTree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _no_state(_tree: PyTree) -> PyTree:
    return ()


def identity() -> Compressor:
    """No compression: the update itself (float32, 4 bytes per coordinate)."""
    return Compressor(
        "none",
        _no_state,
        lambda u, _k, s: (u, s),
        lambda p, _like: p,
        lambda t: sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(t)),
    )


def bf16() -> Compressor:
    """bfloat16 payload (2 bytes per coordinate)."""
    return Compressor(
        "bf16",
        _no_state,
        lambda u, _k, s: (jax.tree.map(lambda x: x.astype(jnp.bfloat16), u), s),
        lambda p, _like: jax.tree.map(lambda x: x.astype(jnp.float32), p),
        lambda t: 2 * _size(t),
    )


def _int8_leaf(x: jax.Array, key: jax.Array) -> dict[str, jax.Array]:
    x = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x)) / 127.0
    safe = jnp.where(scale > 0, scale, 1.0)
    noise = jax.random.uniform(key, x.shape, jnp.float32)
    q = jnp.clip(jnp.floor(x / safe + noise), -127, 127).astype(jnp.int8)
    return {"q": q, "scale": scale}


def int8() -> Compressor:
    """Unbiased stochastic 8-bit quantization, one float32 scale per leaf (QSGD-style)."""

    def compress(u: PyTree, key: jax.Array, s: PyTree) -> tuple[PyTree, PyTree]:
        leaves, treedef = jax.tree.flatten(u)
        keys = jax.random.split(key, max(len(leaves), 1))
        out = [_int8_leaf(x, k) for x, k in zip(leaves, keys, strict=False)]
        return jax.tree.unflatten(treedef, out), s

    def decompress(p: PyTree, _like: PyTree) -> PyTree:
        is_leaf = lambda d: isinstance(d, dict) and set(d) == {"q", "scale"}  # noqa: E731
        return jax.tree.map(lambda d: d["q"].astype(jnp.float32) * d["scale"], p, is_leaf=is_leaf)

    return Compressor(
        "int8", _no_state, compress, decompress, lambda t: _size(t) + 4 * len(jax.tree.leaves(t))
    )


def topk(fraction: float) -> Compressor:
    """The ``fraction`` largest-magnitude coordinates with error feedback (Stich et al. 2018)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"top-k fraction must be in (0, 1], got {fraction}")

    def k_of(tree: PyTree) -> int:
        return max(1, math.ceil(fraction * _size(tree)))

    def compress(u: PyTree, _key: jax.Array, residual: PyTree) -> tuple[PyTree, PyTree]:
        v = jax.tree.map(lambda a, e: a.astype(jnp.float32) + e, u, residual)
        flat, unravel = _ravel(v)
        _, idx = jax.lax.top_k(jnp.abs(flat), k_of(u))
        vals = flat[idx]
        sent = jnp.zeros_like(flat).at[idx].set(vals)
        payload = {"index": idx.astype(jnp.int32), "value": vals}
        return payload, unravel(flat - sent)

    def decompress(p: PyTree, like: PyTree) -> PyTree:
        flat, unravel = _ravel(like)
        return unravel(jnp.zeros_like(flat).at[p["index"]].set(p["value"]))

    return Compressor(
        "topk",
        lambda t: jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), t),
        compress,
        decompress,
        lambda t: 8 * k_of(t),
        stateful=True,
    )


def _ravel(tree: PyTree) -> tuple[jax.Array, Callable[[jax.Array], PyTree]]:
    leaves, treedef = jax.tree.flatten(tree)
    shapes = [x.shape for x in leaves]
    sizes = [math.prod(s) for s in shapes]
    flat = jnp.concatenate([x.reshape(-1).astype(jnp.float32) for x in leaves])

    def unravel(v: jax.Array) -> PyTree:
        parts, start = [], 0
        for shape, n in zip(shapes, sizes, strict=True):
            parts.append(v[start : start + n].reshape(shape))
            start += n
        return jax.tree.unflatten(treedef, parts)

    return flat, unravel


def get_compressor(name: str, topk_fraction: float = 0.01) -> Compressor:
    """The codec called ``name`` (one of :data:`CODECS`)."""
    if name == "none":
        return identity()
    if name == "bf16":
        return bf16()
    if name == "int8":
        return int8()
    if name == "topk":
        return topk(topk_fraction)
    raise ValueError(f"compression must be one of {CODECS}, got {name!r}")
