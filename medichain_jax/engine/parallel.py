"""Client parallelism strategies: how one compiled round runs many hospitals.

* ``vmap``: every cohort client at once (GPU-friendly; memory grows with the cohort);
* ``map``: one client after another inside the compiled program (``lax.scan``);
* ``chunked``: ``vmap`` over chunks of ``k`` clients inside a ``lax.scan``.

All three return the same numbers (up to float summation order). With a linear aggregator
the weighted sum of updates is streamed chunk by chunk, so peak memory follows the chunk,
not the cohort.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from medichain_jax.fl.aggregators import weighted_sum
from medichain_jax.types import ClientData, ClientOutput, PyTree

STRATEGIES = ("auto", "vmap", "map", "chunked")

ClientFn = Callable[[ClientData, jax.Array, jax.Array], ClientOutput]


@dataclasses.dataclass(frozen=True)
class Parallelism:
    """A resolved strategy: ``kind`` in vmap / map / chunked and the chunk size for chunked."""

    kind: str = "map"
    chunk: int = 4

    def __post_init__(self):
        if self.kind not in STRATEGIES[1:]:
            raise ValueError(
                f"client parallelism must be one of {STRATEGIES[1:]}, got {self.kind!r}"
            )
        if self.chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {self.chunk}")

    def chunk_size(self, cohort: int) -> int:
        """Clients processed together by one vectorized call."""
        return {"vmap": cohort, "map": 1, "chunked": min(self.chunk, cohort)}[self.kind]


def resolve(kind: str, backend: str | None = None, chunk: int = 4) -> Parallelism:
    """Resolve ``auto`` for a backend by the rule measured in ``python -m sim.bench``:
    sequential ``map`` on CPU (XLA:CPU already spreads one client's matmuls over the cores and
    batching clients only adds memory traffic), ``vmap`` over chunks on accelerators."""
    if kind != "auto":
        return Parallelism(kind, chunk)
    backend = backend or jax.default_backend()
    if backend == "cpu":
        return Parallelism("map", chunk)
    return Parallelism("chunked", max(chunk, 64))


class CohortResult(NamedTuple):
    """Outputs of a cohort. ``update_sum`` is ``sum_i w_i u_i`` (streamed), ``updates`` the
    stacked ``[m, ...]`` updates (only when requested), ``weights`` / ``metrics`` per client."""

    update_sum: PyTree
    weight_sum: jax.Array
    updates: PyTree
    weights: jax.Array
    metrics: dict[str, jax.Array]
    states: PyTree


def _pad_clients(tree: PyTree, total: int) -> PyTree:
    """Pad the leading client axis by repeating client 0 (callers zero its example count)."""

    def pad(a):
        extra = total - a.shape[0]
        return jnp.concatenate([a, jnp.repeat(a[:1], extra, axis=0)]) if extra else a

    return jax.tree.map(pad, tree)


def run_cohort(
    client_fn: ClientFn,
    data: ClientData,
    keys: jax.Array,
    states: PyTree,
    parallelism: Parallelism,
    keep_updates: bool = False,
) -> CohortResult:
    """Run ``client_fn(data_i, key_i, state_i)`` for every client on the leading axis."""
    m = keys.shape[0]
    k = parallelism.chunk_size(m)
    chunks = -(-m // k)
    total = chunks * k
    xs = _pad_clients((data, keys, states), total) if total != m else (data, keys, states)
    if total != m:
        # padded clients hold zero examples, so their weight is zero as well
        xs = (xs[0].replace(num_examples=xs[0].num_examples.at[m:].set(0)), xs[1], xs[2])

    def one_chunk(chunk_xs):
        d, kk, st = chunk_xs
        if k == 1:
            out = client_fn(*jax.tree.map(lambda a: a[0], (d, kk, st)))
            out = jax.tree.map(lambda a: a[None], out)
        else:
            out = jax.vmap(client_fn)(d, kk, st)
        return out

    if chunks == 1:
        outs = one_chunk(xs)
        usum = weighted_sum(outs.update, outs.weight)
        stacked = outs
    else:
        xs = jax.tree.map(lambda a: a.reshape(chunks, k, *a.shape[1:]), xs)

        def body(acc, chunk_xs):
            out = one_chunk(chunk_xs)
            acc = jax.tree.map(jnp.add, acc, weighted_sum(out.update, out.weight))
            per_client = (out.weight, out.metrics, out.state)
            if keep_updates:
                per_client = per_client + (out.update,)
            return acc, per_client

        zero = jax.eval_shape(lambda: one_chunk(jax.tree.map(lambda a: a[0], xs)).update)
        zero = jax.tree.map(lambda s: jnp.zeros(s.shape[1:], s.dtype), zero)
        usum, per = jax.lax.scan(body, zero, xs)
        per = jax.tree.map(lambda a: a.reshape(total, *a.shape[2:]), per)
        stacked = ClientOutput(
            update=per[3] if keep_updates else None, weight=per[0], metrics=per[1], state=per[2]
        )

    cut = lambda t: jax.tree.map(lambda a: a[:m], t)  # noqa: E731
    weights = stacked.weight[:m]
    return CohortResult(
        update_sum=usum,
        weight_sum=weights.sum(),
        updates=cut(stacked.update) if keep_updates else None,
        weights=weights,
        metrics=cut(stacked.metrics),
        states=cut(stacked.state),
    )
