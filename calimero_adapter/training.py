"""What a real-mode participant computes, built exactly as the simulator builds it: the same
config, data loaders, model, algorithm and one hospital's client step (the simulator's
``guarded_client_fn`` around ``local_train``), and the server step."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from medichain_jax import rng
from medichain_jax.engine.parallel import run_cohort
from medichain_jax.engine.round import (
    COMPRESS_TAG,
    CohortSums,
    guarded_client_fn,
    sample_cohort,
    server_step,
)
from medichain_jax.fl.aggregators import weighted_sum
from medichain_jax.fl.algorithm import initial_client_states
from medichain_jax.metrics import evaluate
from medichain_jax.privacy.dp import init_dp_state
from medichain_jax.types import ClientData, ClientOutput
from sim.config import RunConfig
from sim.parts import TrainingParts, build_federation, training_parts, update_like


@dataclasses.dataclass
class Participant:
    """Config-derived pieces shared by site runners and the coordinator."""

    config: RunConfig
    parts: TrainingParts
    federation: Any  # the hospitals' data as the loaders give it (a site keeps only its own)
    init_vars: Any
    compiled: dict[str, Any] = dataclasses.field(default_factory=dict)  # jitted steps, reused

    @property
    def run_id(self) -> str:
        """The run's id (as in simulation)."""
        return self.config.run_id()

    def initial_state(self) -> Any:
        """The round-0 server state (DP state included), as the simulator starts."""
        state = self.parts.algorithm.init(self.init_vars)
        plan = self.parts.privacy
        if plan is not None and plan.client_dp is not None:
            state = state.replace(privacy_state=init_dp_state(plan.client_dp))
        return state

    def message_template(self) -> Any:
        """The shape of the server -> site message (what the base-model blob decodes into)."""
        return jax.tree.map(np.asarray, self.parts.algorithm.broadcast(self.initial_state()))

    def client_state_template(self) -> Any:
        """One hospital's persistent client state at round 0 (None if stateless)."""
        states = initial_client_states(self.parts.algorithm, self.init_vars, 1)
        return None if states is None else jax.tree.map(lambda a: np.asarray(a[0]), states)

    def hospital_data(self, hospital: int, split: str = "train") -> ClientData:
        """One hospital's rows (padded as in the simulation)."""
        data = getattr(self.federation, split)
        return jax.tree.map(lambda a: jnp.asarray(np.asarray(a)[hospital]), data)

    def cohort(self, rnd: int) -> list[int]:
        """Hospital indices sampled for round ``rnd`` (from (seed, round) alone)."""
        c = self.config
        ids = sample_cohort(jnp.asarray(c.seed, jnp.uint32), rnd, c.hospitals, c.cohort_size)
        return [int(i) for i in np.asarray(ids)]


def load_participant(config: RunConfig) -> Participant:
    """Data, model and algorithm of ``config``, as the simulator builds them."""
    fed, _ = build_federation(config)
    parts = training_parts(config, fed)
    init_vars = parts.model.init(rng.stream(config.seed, rng.INIT))
    return Participant(config, parts, fed, init_vars)


def client_step(p: Participant):
    """Jitted ``(message, data, seed, rnd, hospital, client_state, dp_clip) -> ClientOutput``:
    the simulator's per-hospital work inside a round (attack-free, always active)."""
    if "client_step" in p.compiled:
        return p.compiled["client_step"]
    plan = p.parts.privacy
    dp = None if plan is None else plan.client_dp
    sysc = {
        "active": jnp.asarray(True),
        "byzantine": jnp.asarray(False),
        "max_steps": jnp.asarray(0, jnp.int32),
    }

    def step(message, data, seed, rnd, hospital, state, dp_clip):
        fn = guarded_client_fn(p.parts.algorithm, message, None, p.config.clip_norm, dp, dp_clip)
        return fn(data, rng.client_key(seed, rnd, hospital), (state, sysc))

    p.compiled["client_step"] = jax.jit(step)
    return p.compiled["client_step"]


def server_update(p: Participant):
    """Jitted ``(state, updates [m, ...], weights [m], metrics, seed) -> (state, scalars)``:
    the simulator's server step on the cohort's stacked updates (cohort order; absent
    hospitals weigh 0)."""
    if "server_update" in p.compiled:
        return p.compiled["server_update"]
    plan = p.parts.privacy
    dp = None if plan is None else plan.client_dp

    par = p.parts.parallelism
    m = p.config.cohort_size
    same_order = par.kind in ("map", "vmap") or m % par.chunk_size(m) == 0

    def step(state, updates, weights, metrics, seed):
        if same_order:  # add the updates up in the simulator's order (its run_cohort)
            res = run_cohort(
                lambda d, _k, _s: ClientOutput(d[0], d[1], d[2], None),
                (updates, weights, metrics),
                jnp.zeros((weights.shape[0], 2), jnp.uint32),
                None,
                par,
            )
            total = res.update_sum
        else:
            total = weighted_sum(updates, weights)
        sums = CohortSums(
            update_sum=total,
            weight_sum=weights.sum(),
            weights=weights,
            metrics=metrics,
            states=None,
            updates=updates,
        )
        key = None if dp is None else rng.round_key(seed, rng.DP_NOISE, state.round)
        return server_step(p.parts.algorithm, p.parts.aggregator, state, sums, dp=dp, key=key)

    p.compiled["server_update"] = jax.jit(step)
    return p.compiled["server_update"]


def update_template(p: Participant) -> Any:
    """Zeros shaped like one hospital's update (what an update blob decodes into)."""
    if "update_template" not in p.compiled:
        p.compiled["update_template"] = update_like(
            p.parts.algorithm, p.initial_state(), p.hospital_data(0), p.client_state_template()
        )
    return p.compiled["update_template"]


def server_update_from_sum(p: Participant):
    """Jitted ``(state, total, weights [m], metrics, seed) -> (state, scalars)``: the server
    step when the sum of ``w_i u_i`` arrives already added up (secure aggregation)."""
    if "server_update_from_sum" in p.compiled:
        return p.compiled["server_update_from_sum"]
    plan = p.parts.privacy
    dp = None if plan is None else plan.client_dp

    def step(state, total, weights, metrics, seed):
        sums = CohortSums(total, weights.sum(), weights, metrics, None, None)
        key = None if dp is None else rng.round_key(seed, rng.DP_NOISE, state.round)
        return server_step(p.parts.algorithm, p.parts.aggregator, state, sums, dp=dp, key=key)

    p.compiled["server_update_from_sum"] = jax.jit(step)
    return p.compiled["server_update_from_sum"]


def compression_key(seed: Any, rnd: Any, hospital: Any) -> jax.Array:
    """The key the simulator's round gives a hospital's stochastic compression."""
    return jax.random.fold_in(rng.client_key(seed, rnd, hospital), COMPRESS_TAG)


def payload_template(p: Participant) -> Any:
    """Zeros shaped like one compressed update (what a compressed update blob decodes into)."""
    c = p.parts.compressor
    if "payload_template" not in p.compiled:
        like = update_template(p)
        out = jax.eval_shape(
            lambda u, r: c.compress(u, jax.random.key(0), r)[0], like, c.init(like)
        )
        p.compiled["payload_template"] = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), out)
    return p.compiled["payload_template"]


def evaluate_global(p: Participant, variables: Any, hospital: int) -> dict[str, Any]:
    """A hospital's metrics of the global model on its own test rows."""
    test = jax.tree.map(lambda a: np.asarray(a)[hospital : hospital + 1], p.federation.test)
    ev = evaluate(p.parts.model, variables, test, task=p.federation.task)
    per = {k: float(np.asarray(v)[0]) for k, v in ev["per_hospital"].items() if np.ndim(v) == 1}
    return per
