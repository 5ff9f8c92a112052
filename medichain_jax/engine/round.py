"""One compiled federated round: cohort -> local training of every client -> aggregate -> server."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from medichain_jax import rng
from medichain_jax.compression import Compressor
from medichain_jax.engine.parallel import Parallelism, run_cohort
from medichain_jax.engine.system import SystemModel, active_clients
from medichain_jax.fl.aggregators import Aggregator, finalize_mean, weighted_mean
from medichain_jax.fl.algorithm import Algorithm
from medichain_jax.fl.attacks import poison_data, poison_update
from medichain_jax.fl.update_checks import clip_by_global_norm, tree_all_finite
from medichain_jax.privacy.dp import ClientDP, clip_update, private_mean
from medichain_jax.privacy.field import dequantize, field_sum, quantize
from medichain_jax.types import ClientData, ClientOutput, PyTree, ServerState

AXIS = "clients"
COMPRESS_TAG = 2**31 - 2  # folded into a client's key for stochastic compression


class RoundInfo(NamedTuple):
    """Per-round outputs besides the new server state (all ``[cohort]`` arrays).

    ``metrics`` holds each client's training metrics plus ``active`` (took part) and
    ``rejected`` (its update held NaN/Inf and was excluded); ``updates`` is the stacked cohort
    updates when the round was built with ``return_updates``; ``server`` holds the server
    step's scalars (DP: ``clip_norm``, ``noise_stddev``, ``unclipped_estimate``)."""

    cohort: jax.Array
    weights: jax.Array
    metrics: dict[str, jax.Array]
    updates: PyTree = None
    server: dict[str, jax.Array] | None = None


def sample_cohort(seed: int | jax.Array, rnd: jax.Array, num_clients: int, cohort_size: int):
    """Sorted client ids of round ``rnd``, drawn from (seed, round) alone, without replacement."""
    if cohort_size >= num_clients:
        return jnp.arange(num_clients)
    key = rng.round_key(seed, rng.COHORT, rnd)
    return jnp.sort(jax.random.choice(key, num_clients, (cohort_size,), replace=False))


def guarded_client_fn(
    algorithm: Algorithm,
    message: PyTree,
    system: SystemModel | None,
    clip_norm: float | None,
    dp: ClientDP | None = None,
    dp_clip: jax.Array | None = None,
    compressor: Compressor | None = None,
) -> Callable:
    """One client's work inside the round, with the simulation's masks and the update checks:
    inactive hospitals train on zero examples (a no-op), Byzantine ones are attacked, updates
    are norm-clipped, and an update holding NaN/Inf gets weight 0 and a zero update (never
    averaged in, by any aggregator). A hospital that did not contribute keeps its old state.
    With client-level ``dp`` every update is clipped to ``dp_clip`` and weighs 1 (DP-FedAvg).
    A ``compressor`` encodes the update as the hospital would send it and decodes it as the
    server would (a lossy transfer); a stateful one keeps its residual in the client state
    (``{"algo": ..., "residual": ...}``)."""
    stateful = compressor is not None and compressor.stateful

    def client_fn(data: ClientData, key: jax.Array, packed):
        state, sysc = packed
        residual = None
        if stateful:
            state, residual = state["algo"], state["residual"]
        data = data.replace(num_examples=jnp.where(sysc["active"], data.num_examples, 0))
        attack = "none" if system is None else system.attack
        data = poison_data(data, sysc["byzantine"], attack)
        max_steps = None if system is None else sysc["max_steps"]
        out = algorithm.client_update(message, data, key, state, max_steps)
        update = out.update
        if attack != "none":
            update = poison_update(update, sysc["byzantine"], key, attack, system.attack_scale)
        if clip_norm is not None:
            update = clip_by_global_norm(update, clip_norm)
        finite = tree_all_finite(update) & jnp.isfinite(out.weight)
        ok = finite & (out.weight > 0)
        update = jax.tree.map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), update)
        new_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), out.state, state)
        metrics = dict(out.metrics)
        metrics["active"] = sysc["active"] & (data.num_examples > 0)
        metrics["rejected"] = ~finite
        weight = jnp.where(ok, out.weight, 0.0)
        if compressor is not None:
            payload, new_residual = compressor.compress(
                update, jax.random.fold_in(key, COMPRESS_TAG), residual
            )
            update = compressor.decompress(payload, update)
            if stateful:
                new_residual = jax.tree.map(
                    lambda new, old: jnp.where(ok, new, old), new_residual, residual
                )
                new_state = {"algo": new_state, "residual": new_residual}
        if dp is not None:
            update, norm = clip_update(update, dp_clip)
            metrics["update_norm"] = norm
            metrics["clipped"] = ok & (norm > dp_clip)
            weight = ok.astype(jnp.float32)
        return ClientOutput(update=update, weight=weight, metrics=metrics, state=new_state)

    return client_fn


def balanced_layout(num_examples: jax.Array, num_devices: int) -> jax.Array:
    """Positions of the cohort's clients when split into ``num_devices`` equal contiguous blocks,
    balancing examples (hence SGD steps) per device: clients sorted by size are dealt in snake
    order (0, 1, .., d-1, d-1, .., 0, ...). Returns ``order`` with ``layout = cohort[order]``.

    A device's round lasts as long as its largest total, so with quantity skew this matters:
    the default 20 hospitals split 100 / 66 steps in id order, 84 / 82 dealt this way."""
    m = num_examples.shape[0]
    per_device = m // num_devices
    ranks = jnp.argsort(-num_examples, stable=True)
    r = jnp.arange(m)
    lane = r % num_devices
    device = jnp.where((r // num_devices) % 2 == 0, lane, num_devices - 1 - lane)
    position = device * per_device + r // num_devices
    return jnp.zeros((m,), ranks.dtype).at[position].set(ranks)


class CohortSums(NamedTuple):
    """A cohort's (or a shard of a cohort's) contribution to one round: the streamed weighted
    sum of updates and of weights, and per-client ``[m]`` weights, metrics, new states and
    (when kept) updates. Partial sums of disjoint shards add up to the whole cohort's."""

    update_sum: PyTree
    weight_sum: jax.Array
    weights: jax.Array
    metrics: dict[str, jax.Array]
    states: PyTree
    updates: PyTree = None


def system_inputs(
    system: SystemModel | None, seed: jax.Array, rnd: jax.Array, ids: jax.Array
) -> dict[str, jax.Array]:
    """Per-client simulation masks of round ``rnd`` for client ids ``ids``."""
    if system is None:
        m = ids.shape[0]
        return {
            "active": jnp.ones((m,), bool),
            "byzantine": jnp.zeros((m,), bool),
            "max_steps": jnp.zeros((m,), jnp.int32),
        }
    return {
        "active": active_clients(system, seed, rnd, ids),
        "byzantine": jnp.asarray(system.byzantine)[ids],
        "max_steps": jnp.asarray(system.max_steps)[ids],
    }


def build_cohort_step(
    algorithm: Algorithm,
    parallelism: Parallelism,
    mesh: Mesh | None = None,
    *,
    system: SystemModel | None = None,
    clip_norm: float | None = None,
    keep_updates: bool = False,
    dp: ClientDP | None = None,
    compressor: Compressor | None = None,
) -> Callable[..., CohortSums]:
    """Return ``step(message, data, ids, client_states, seed, rnd, dp_clip=None) -> CohortSums``:
    local
    training of the clients whose rows ``data`` holds (leading axis ``m``; ``ids`` are their
    global client ids, which derive their keys and simulation masks; rows with zero examples
    are padding and weigh nothing). With a ``mesh`` the ``m`` clients (a multiple of its size)
    are split over its devices and the partial sums meet in a ``psum``. A Ray actor runs the
    same step on its shard of hospitals. With client-level ``dp`` each update is clipped to
    ``dp_clip`` (the server state's current clip norm)."""
    if clip_norm is not None and clip_norm <= 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")

    def on_devices(sent, d, keys, packed):
        message, dp_clip = sent
        client_fn = guarded_client_fn(
            algorithm, message, system, clip_norm, dp, dp_clip, compressor
        )
        res = run_cohort(client_fn, d, keys, packed, parallelism, keep_updates=keep_updates)
        usum, wsum = res.update_sum, res.weight_sum
        if mesh is not None:
            usum, wsum = jax.lax.psum((usum, wsum), AXIS)
        return usum, wsum, res.updates, res.weights, res.metrics, res.states

    if mesh is not None:
        spec = P(AXIS)
        on_devices = jax.shard_map(
            on_devices,
            mesh=mesh,
            in_specs=(P(), spec, spec, spec),
            out_specs=(P(), P(), spec, spec, spec, spec),
            check_vma=False,
        )

    def step(message, data: ClientData, ids, client_states, seed, rnd, dp_clip=None):
        if (dp is None) != (dp_clip is None):
            raise ValueError("dp_clip is needed exactly when the step was built with dp")
        keys = jax.vmap(lambda c: rng.client_key(seed, rnd, c))(ids)
        sysc = system_inputs(system, seed, rnd, ids)
        usum, wsum, updates, weights, metrics, states = on_devices(
            (message, dp_clip), data, keys, (client_states, sysc)
        )
        return CohortSums(usum, wsum, weights, metrics, states, updates)

    return step


def secure_sum(updates: PyTree, weights: jax.Array, bound: jax.Array | float) -> PyTree:
    """The fast path of secure aggregation (Bonawitz et al. 2017): each client's ``w_i u_i`` is
    quantized into GF(p) with per-coordinate ``bound``, the field elements are summed mod p
    (what the server learns after unmasking: pairwise masks cancel exactly) and the sum is
    mapped back to floats. Equals the exact protocol's result bit for bit."""
    m = weights.shape[0]

    def leaf(u):
        w = weights.reshape((m,) + (1,) * (u.ndim - 1)).astype(jnp.float32)
        q = quantize(w * u.astype(jnp.float32), bound, m)
        return dequantize(field_sum(q, axis=0), bound, m).astype(u.dtype)

    return jax.tree.map(leaf, updates)


def secagg_bound(dp_clip: jax.Array | None, clip_norm: float | None, max_weight: int) -> Any:
    """Per-coordinate bound of ``w_i u_i`` under SecAgg: the DP clip norm (weights are 1), or
    the update clip norm times the largest possible weight (a client's example capacity)."""
    if dp_clip is not None:
        return dp_clip
    if clip_norm is None:
        raise ValueError("secure aggregation needs bounded updates: set clip_norm or client DP")
    return clip_norm * max_weight


def server_step(
    algorithm: Algorithm,
    aggregator: Aggregator,
    state: ServerState,
    sums: CohortSums,
    *,
    dp: ClientDP | None = None,
    key: jax.Array | None = None,
    secagg_bound: jax.Array | float | None = None,
) -> tuple[ServerState, dict[str, jax.Array]]:
    """Aggregate a whole cohort's sums (streamed mean, or the robust rule over the kept
    updates) and apply the algorithm's server update. With ``secagg_bound`` the sum is the
    secure-aggregation field sum of the kept updates; with ``dp`` the mean is DP-FedAvg's noisy
    fixed-denominator mean (noise from ``key``). Returns the new state and the server's
    per-round scalars."""
    stats: dict[str, jax.Array] = {}
    if secagg_bound is not None or dp is not None:
        if not aggregator.linear:
            raise ValueError(
                f"DP and secure aggregation need a linear aggregator, not {aggregator.name}"
            )
        if secagg_bound is not None:
            total = secure_sum(sums.updates, sums.weights, secagg_bound)
        else:
            total = sums.update_sum
        if dp is not None:
            present = sums.weights > 0
            unclipped = jnp.sum(present & ~sums.metrics["clipped"]).astype(jnp.float32)
            update, pstate, stats = private_mean(total, unclipped, state.privacy_state, key, dp)
            state = state.replace(privacy_state=pstate)
        else:
            update = finalize_mean(total, sums.weight_sum)
    elif aggregator.linear:
        update = finalize_mean(sums.update_sum, sums.weight_sum)
    else:
        update = aggregator.aggregate(sums.updates, sums.weights)
    participants = jnp.sum(sums.weights > 0).astype(jnp.float32)
    return algorithm.server_update(state, update, participants), stats


def build_round(
    algorithm: Algorithm,
    num_clients: int,
    cohort_size: int,
    parallelism: Parallelism,
    aggregator: Aggregator = weighted_mean,
    mesh: Mesh | None = None,
    *,
    system: SystemModel | None = None,
    clip_norm: float | None = None,
    return_updates: bool = False,
    gathered: bool = False,
    dp: ClientDP | None = None,
    secagg: bool = False,
    compressor: Compressor | None = None,
) -> Callable[[ServerState, ClientData, PyTree, jax.Array], tuple[ServerState, PyTree, RoundInfo]]:
    """Return a pure ``round_fn(state, data, client_states, seed) -> (state, client_states, info)``.

    ``data`` holds every registered hospital (leading axis ``num_clients``) or, with
    ``gathered``, only the round's cohort (leading axis ``cohort_size``, the rows of
    ``sample_cohort(seed, state.round, ...)`` in that order, gathered by the caller from host
    memory: device memory then grows with the cohort, not with the registered hospitals).
    ``client_states`` is every client's persistent state (``None`` for stateless algorithms).
    With a ``mesh`` (one axis named ``clients``) the cohort is split over its devices, each runs
    ``parallelism`` on its share, and partial sums meet in a ``psum``. ``system`` simulates
    Byzantine hospitals, stragglers, dropouts and late joiners; ``clip_norm`` bounds each
    update's L2 norm. ``dp`` makes the round DP-FedAvg (clip per client, Gaussian noise on the
    sum, fixed denominator; the state's ``privacy_state`` is a ``DPState``); ``secagg`` sums
    the updates as secure aggregation does (quantized into a finite field). Jit it once; it
    never recompiles across rounds.
    """
    if not 1 <= cohort_size <= num_clients:
        raise ValueError(f"cohort size must be in [1, {num_clients}], got {cohort_size}")
    if system is not None and len(system.byzantine) != num_clients:
        raise ValueError(
            f"system model describes {len(system.byzantine)} hospitals, expected {num_clients}"
        )
    n_dev = 1 if mesh is None else int(mesh.devices.size)
    padded = -(-cohort_size // n_dev) * n_dev
    keep = return_updates or not aggregator.linear or secagg
    if secagg and dp is None and clip_norm is None:
        raise ValueError("secure aggregation needs bounded updates: set clip_norm or client DP")
    step = build_cohort_step(
        algorithm,
        parallelism,
        mesh,
        system=system,
        clip_norm=clip_norm,
        keep_updates=keep,
        dp=dp,
        compressor=compressor,
    )

    def round_fn(state: ServerState, data: ClientData, client_states: PyTree, seed: jax.Array):
        cohort = sample_cohort(seed, state.round, num_clients, cohort_size)
        # pad the cohort to a multiple of the device count with zero-example copies of client 0
        idx = jnp.concatenate([cohort, jnp.full((padded - cohort_size,), cohort[0])])
        real = jnp.arange(padded) < cohort_size
        if gathered:
            if data.y.shape[0] != cohort_size:
                raise ValueError(
                    f"gathered data holds {data.y.shape[0]} clients, expected {cohort_size}"
                )
            rows = jnp.where(real, jnp.arange(padded), 0)  # padding: copies of row 0
            d = data if padded == cohort_size else jax.tree.map(lambda a: a[rows], data)
        elif padded == num_clients and cohort_size == num_clients:
            d = data
        else:
            d = jax.tree.map(lambda a: a[idx], data)
        d = d.replace(num_examples=jnp.where(real, d.num_examples, 0))
        states = None if client_states is None else jax.tree.map(lambda a: a[idx], client_states)
        dp_clip = None if dp is None else state.privacy_state.clip_norm
        if n_dev > 1:  # deal clients to devices so each trains about as many examples
            order = balanced_layout(d.num_examples, n_dev)
            d, ids, states = jax.tree.map(lambda a: a[order], (d, idx, states))
            sums = step(algorithm.broadcast(state), d, ids, states, seed, state.round, dp_clip)
            back = jnp.argsort(order)
            per_client = (sums.weights, sums.metrics, sums.states, sums.updates)
            weights, metrics, states, updates = jax.tree.map(lambda a: a[back], per_client)
            sums = sums._replace(weights=weights, metrics=metrics, states=states, updates=updates)
        else:
            sums = step(algorithm.broadcast(state), d, idx, states, seed, state.round, dp_clip)
        cut = lambda t: jax.tree.map(lambda a: a[:cohort_size], t)  # noqa: E731
        sums = sums._replace(
            weights=cut(sums.weights),
            metrics=cut(sums.metrics),
            states=cut(sums.states),
            updates=cut(sums.updates) if keep else None,
        )
        bound = secagg_bound(dp_clip, clip_norm, d.capacity) if secagg else None
        key = None if dp is None else rng.round_key(seed, rng.DP_NOISE, state.round)
        new_state, server = server_step(
            algorithm, aggregator, state, sums, dp=dp, key=key, secagg_bound=bound
        )
        if client_states is not None:
            client_states = jax.tree.map(
                lambda a, s: a.at[cohort].set(s), client_states, sums.states
            )
        info = RoundInfo(
            cohort, sums.weights, sums.metrics, sums.updates if return_updates else None, server
        )
        return new_state, client_states, info

    return round_fn


def client_mesh(num_devices: int | None = None) -> Mesh | None:
    """A 1-D mesh named ``clients`` over the first ``num_devices`` local devices (all by default);
    ``None`` when only one device would be used."""
    devices = jax.devices()
    n = len(devices) if num_devices is None else num_devices
    if not 1 <= n <= len(devices):
        raise ValueError(f"asked for {n} devices, {len(devices)} available")
    return None if n == 1 else Mesh(np.array(devices[:n]), (AXIS,))


def replicate(tree: PyTree, mesh: Mesh | None) -> PyTree:
    """Place ``tree`` whole on every device of ``mesh`` (no-op without a mesh), so a round's
    inputs keep one sharding from the first call on and the round compiles once."""
    if mesh is None:
        return tree
    return jax.device_put(tree, NamedSharding(mesh, P()))
