"""Multi-node simulation (``python -m sim --ray``): shards of hospitals on Ray actors.

Each actor holds one contiguous block of hospitals (it loads the same dataset from the same
config and keeps only its block) and the compiled cohort step of
``medichain_jax.engine.round.build_cohort_step`` -- the very code a single-process round runs.
Every round the driver samples the cohort with the same ``sample_cohort``, sends each actor the
global message and the ids of its cohort members, adds the actors' weighted sums and applies
the same ``server_step``. Results equal the single-process run up to the order of one float
addition per actor.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from medichain_jax.engine.round import (
    CohortSums,
    RoundInfo,
    build_cohort_step,
    sample_cohort,
    server_step,
)
from sim.config import ConfigError, RunConfig
from sim.devices import worker_env


def import_ray():
    """The ``ray`` module, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError as err:
        raise ConfigError('Ray is not installed: pip install -e ".[ray]"') from err
    return ray


def shard_bounds(num_clients: int, shards: int) -> np.ndarray:
    """``[shards + 1]`` boundaries of contiguous, near-equal blocks of client ids."""
    if not 1 <= shards <= num_clients:
        raise ValueError(f"cannot split {num_clients} hospitals over {shards} actors")
    return np.linspace(0, num_clients, shards + 1).round().astype(np.int64)


def padded_share(count: int, bucket: int, limit: int) -> int:
    """Rows an actor computes for ``count`` cohort members: rounded up to a multiple of
    ``bucket`` (so a sampled cohort compiles a handful of shapes, not one per count), at most
    ``limit`` (its shard)."""
    return min(limit, -(-max(count, 1) // bucket) * bucket)


class ShardWorker:
    """A Ray actor's state: its hospitals' training rows and the compiled cohort step."""

    def __init__(self, config_dict: dict[str, Any], lo: int, hi: int):
        from sim.runner import build_federation, training_parts

        config = RunConfig.from_dict(config_dict)
        fed, _ = build_federation(config)
        parts = training_parts(config, fed)
        self.lo, self.hi = lo, hi
        self.algorithm = parts.algorithm
        self.data = jax.device_put(jax.tree.map(lambda a: np.asarray(a)[lo:hi], fed.train))
        step = build_cohort_step(
            parts.algorithm,
            parts.parallelism,
            system=parts.system,
            clip_norm=config.clip_norm,
            keep_updates=config.contribution or not parts.aggregator.linear,
        )

        def shard_step(data, message, rows, real, ids, states, seed, rnd):
            d = jax.tree.map(lambda a: a[rows], data)
            d = d.replace(num_examples=jnp.where(real, d.num_examples, 0))
            return step(message, d, ids, states, seed, rnd)

        self._step = jax.jit(shard_step)

    def ready(self) -> dict[str, Any]:
        """Where this actor runs (pid, host, JAX devices): the driver waits on it at start."""
        import socket

        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "hospitals": [self.lo, self.hi],
            "devices": [str(d) for d in jax.devices()],
        }

    def run(self, message, ids: np.ndarray, count: int, states, seed, rnd) -> CohortSums:
        """Train cohort members ``ids[:count]`` (global ids, inside this shard; the rest is
        padding) and return their sums as host arrays."""
        real = np.arange(len(ids)) < count
        rows = np.where(real, ids - self.lo, 0)
        out = self._step(self.data, message, rows, real, jnp.asarray(ids), states, seed, rnd)
        return jax.device_get(out)


class RayRound:
    """Drop-in for the jitted ``round_fn``: same signature and outputs, run on Ray actors."""

    def __init__(self, config: RunConfig, parts, options) -> None:
        ray = import_ray()

        self._ray = ray
        self._started = not ray.is_initialized()
        if self._started:
            ray.init(address=options.address, include_dashboard=False, log_to_driver=False)
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        cpus = int(resources.get("CPU", 1))
        actors = options.actors or (gpus if gpus else cpus)
        actors = max(1, min(actors, config.hospitals))
        cpu_each = options.cpus_per_actor
        if cpu_each is None:
            cpu_each = 1.0 if gpus else float(max(1, cpus // actors))
        gpu_each = options.gpus_per_actor if options.gpus_per_actor is not None else float(gpus > 0)
        self.bounds = shard_bounds(config.hospitals, actors)
        self.num_clients, self.cohort_size = config.hospitals, config.cohort_size
        self.bucket = max(1, -(-self.cohort_size // actors))
        self.algorithm, self.aggregator = parts.algorithm, parts.aggregator
        self.return_updates = config.contribution
        remote = ray.remote(ShardWorker).options(
            num_cpus=cpu_each, num_gpus=gpu_each, runtime_env=worker_env(1)
        )
        self.actors = [
            remote.remote(config.to_dict(), int(lo), int(hi))
            for lo, hi in zip(self.bounds[:-1], self.bounds[1:], strict=True)
        ]
        placed = ray.get([a.ready.remote() for a in self.actors])
        self.description = {
            "kind": "ray",
            "address": options.address or "local",
            "actors": placed,
            "cpus_per_actor": cpu_each,
            "gpus_per_actor": gpu_each,
        }
        self._sample = jax.jit(sample_cohort, static_argnums=(2, 3))
        self._broadcast = jax.jit(self.algorithm.broadcast)
        self._server = jax.jit(
            lambda state, sums: server_step(self.algorithm, self.aggregator, state, sums)[0]
        )

    def __call__(self, state, data, client_states, seed):
        """One round: ``data`` is unused (the actors hold the hospitals' rows)."""
        del data
        ray = self._ray
        cohort = np.asarray(self._sample(seed, state.round, self.num_clients, self.cohort_size))
        message = jax.device_get(self._broadcast(state))
        seed_h, rnd_h = np.asarray(seed), np.asarray(state.round)
        owner = np.searchsorted(self.bounds, cohort, side="right") - 1
        calls = []
        for j, actor in enumerate(self.actors):
            ids = cohort[owner == j]
            if not len(ids):
                continue
            size = padded_share(len(ids), self.bucket, int(self.bounds[j + 1] - self.bounds[j]))
            padded = np.concatenate([ids, np.full(size - len(ids), ids[0])])
            states = None
            if client_states is not None:
                states = jax.device_get(jax.tree.map(lambda a, rows=padded: a[rows], client_states))
            calls.append(
                (len(ids), actor.run.remote(message, padded, len(ids), states, seed_h, rnd_h))
            )
        parts = [(n, ray.get(ref)) for n, ref in calls]
        usum = parts[0][1].update_sum
        for _, p in parts[1:]:
            usum = jax.tree.map(np.add, usum, p.update_sum)
        wsum = np.sum([p.weight_sum for _, p in parts], dtype=np.float32)

        def joined(get):
            return jax.tree.map(
                lambda *xs: np.concatenate(xs),
                *[jax.tree.map(lambda a, n=n: a[:n], get(p)) for n, p in parts],
            )

        keep = self.return_updates or not self.aggregator.linear
        sums = CohortSums(
            update_sum=usum,
            weight_sum=wsum,
            weights=joined(lambda p: p.weights),
            metrics=joined(lambda p: p.metrics),
            states=None if client_states is None else joined(lambda p: p.states),
            updates=joined(lambda p: p.updates) if keep else None,
        )
        new_state = self._server(state, sums)
        if client_states is not None:
            client_states = jax.tree.map(
                lambda a, s: a.at[cohort].set(s), client_states, sums.states
            )
        info = RoundInfo(
            jnp.asarray(cohort),
            jnp.asarray(sums.weights),
            sums.metrics,
            sums.updates if self.return_updates else None,
        )
        return new_state, client_states, info

    def close(self) -> None:
        """Stop the actors (and the local cluster this run started)."""
        for actor in self.actors:
            self._ray.kill(actor)
        if self._started:
            self._ray.shutdown()
