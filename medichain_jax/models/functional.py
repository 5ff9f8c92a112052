"""Flax NNX modules used functionally: a model is ``init(key) -> variables`` and a pure ``apply``.

``variables = {"params": ..., "stats": ...}`` are plain nested dicts of arrays (``stats`` holds
normalization running statistics and is empty without batch norm), so they vmap, average,
serialize and checkpoint like any pytree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

Variables = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class FunctionalModel:
    """A flax module split once into ``graphdef`` + variables; ``apply`` is pure and jittable."""

    name: str
    build: Callable[[nnx.Rngs], nnx.Module]

    def _split(self, key: jax.Array):
        module = self.build(rngs=nnx.Rngs(params=key))
        return nnx.split(module, nnx.Param, nnx.BatchStat)

    def init(self, key: jax.Array) -> Variables:
        """Fresh variables from a jax.random key."""
        _, params, stats = self._split(key)
        return {"params": nnx.to_pure_dict(params), "stats": nnx.to_pure_dict(stats)}

    def apply(
        self,
        variables: Variables,
        x: jax.Array,
        *,
        train: bool = False,
        mask: jax.Array | None = None,
    ) -> tuple[jax.Array, Variables]:
        """Logits for ``x`` and the variables after the call (running stats move when ``train``)."""
        graphdef, params, stats = nnx.eval_shape(lambda: self._split(jax.random.key(0)))
        nnx.replace_by_pure_dict(params, variables["params"])
        nnx.replace_by_pure_dict(stats, variables["stats"])
        module = nnx.merge(graphdef, params, stats)
        logits = module(x, train=train, mask=mask)
        _, _, new_stats = nnx.split(module, nnx.Param, nnx.BatchStat)
        return logits, {"params": variables["params"], "stats": nnx.to_pure_dict(new_stats)}
