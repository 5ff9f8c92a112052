"""Host side of a run's privacy: the DP plan (noise given or calibrated), per-round accounting
with its checkpointed state, the epsilon budget stop, and the exact secure-aggregation check."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from typing import Any

import jax
import numpy as np
from absl import logging as absl_logging

from medichain_jax.privacy.accounting import (
    ClientLevelBudget,
    RecordLevelBudget,
    calibrate_noise,
)
from medichain_jax.privacy.dp import ClientDP
from medichain_jax.privacy.field import PRIME, field_sum, quantize
from medichain_jax.privacy.secagg import SecAggAbort, emulate_round
from sim.config import ConfigError, RunConfig

# dp-accounting's RDP code logs a warning for every order it drops (harmless, and many per call)
absl_logging.set_verbosity(absl_logging.ERROR)

MECHANISMS = {
    "client": "client-level DP-FedAvg (McMahan et al. 2018): per-hospital update clipping, "
    "Gaussian noise on the sum, fixed denominator",
    "record": "record-level DP-SGD inside each hospital (Abadi et al. 2016): per-example "
    "gradient clipping, Gaussian noise per step",
}


@dataclasses.dataclass(frozen=True)
class PrivacyPlan:
    """What a DP run does and how it is accounted (from its config and hospital sizes)."""

    mode: str  # "client" or "record"
    clip: float
    noise_multiplier: float
    noise_source: str  # "given" or a sentence saying how it was calibrated
    delta: float
    accountant: str
    sampling_rate: float
    target_epsilon: float | None
    stop_on_budget: bool
    client_dp: ClientDP | None
    record_budget: RecordLevelBudget | None
    client_budget: ClientLevelBudget | None


def default_delta(config: RunConfig, train_sizes: np.ndarray) -> float:
    """``min(1e-5, 1/N)``: N hospitals (client-level) or the smallest hospital's records."""
    n = config.hospitals if not config.dp_record_level else int(np.min(train_sizes))
    return min(1e-5, 1.0 / max(n, 1))


def plan_privacy(config: RunConfig, train_sizes: np.ndarray) -> PrivacyPlan | None:
    """The run's DP plan, or None without DP. With ``target_epsilon`` and no ``dp_noise`` the
    noise multiplier is calibrated so that all ``rounds`` spend exactly the target (record
    level: the hospital needing the most noise, assuming it takes part in every round)."""
    if config.dp_clip is None:
        return None
    delta = config.delta if config.delta is not None else default_delta(config, train_sizes)
    q = config.cohort_size / config.hospitals
    record = config.dp_record_level
    z = config.dp_noise
    source = "given (--dp-noise)"
    if z is None:
        target = float(config.target_epsilon)
        if record:
            sizes = sorted({int(n) for n in train_sizes if n > 0})
            z = max(
                calibrate_noise(
                    target,
                    min(1.0, config.batch_size / n),
                    config.rounds * config.local_epochs * math.ceil(n / config.batch_size),
                    delta,
                    config.accountant,
                )
                for n in sizes
            )
        else:
            z = calibrate_noise(target, q, config.rounds, delta, config.accountant)
        source = f"calibrated so that {config.rounds} rounds spend epsilon {target:g}"
    client_dp = None
    client_budget = record_budget = None
    if record:
        record_budget = RecordLevelBudget(
            z, config.batch_size, config.local_epochs, delta, config.accountant
        )
    else:
        try:
            client_dp = ClientDP(
                clip_norm=config.dp_clip,
                noise_multiplier=z,
                expected_clients=config.cohort_size,
                adaptive=config.dp_adaptive_clip,
                target_quantile=config.dp_target_quantile,
                clip_lr=config.dp_clip_lr,
                count_stddev=config.dp_count_noise,
            )
        except ValueError as err:
            raise ConfigError(f"dp: {err}") from err
        client_budget = ClientLevelBudget(z, q, delta, config.accountant)
    return PrivacyPlan(
        mode="record" if record else "client",
        clip=config.dp_clip,
        noise_multiplier=z,
        noise_source=source,
        delta=delta,
        accountant=config.accountant,
        sampling_rate=q,
        target_epsilon=config.target_epsilon,
        stop_on_budget=config.target_epsilon is not None and config.dp_noise is not None,
        client_dp=client_dp,
        record_budget=record_budget,
        client_budget=client_budget,
    )


class PrivacyLedger:
    """Per-round accounting of a DP run. Its state (DP rounds composed, each hospital's
    participations) goes into every checkpoint, so a resumed run reports the same epsilons."""

    def __init__(self, plan: PrivacyPlan, train_sizes: np.ndarray):
        self.plan = plan
        self.sizes = [int(n) for n in train_sizes]
        self.rounds = 0
        self.participations = np.zeros(len(self.sizes), np.int32)
        self._cache: dict[Any, float] = {}

    def state(self) -> dict[str, np.ndarray]:
        """The checkpointed state."""
        return {
            "rounds": np.asarray(self.rounds, np.int32),
            "participations": self.participations.copy(),
        }

    def restore(self, saved: dict[str, Any]) -> None:
        """Continue from a checkpointed :meth:`state`."""
        self.rounds = int(np.asarray(saved["rounds"]))
        self.participations = np.asarray(saved["participations"], np.int32).copy()

    def epsilon(self, rounds: int | None = None, participations: np.ndarray | None = None):
        """Epsilon spent (client level: after ``rounds``; record level: worst hospital)."""
        plan = self.plan
        if plan.client_budget is not None:
            r = self.rounds if rounds is None else rounds
            if r not in self._cache:
                self._cache[r] = plan.client_budget.epsilon_after(r)
            return self._cache[r]
        parts = self.participations if participations is None else participations
        return plan.record_budget.epsilon_after(self.sizes, parts.tolist())

    def next_epsilon(self) -> float:
        """Epsilon after one more round (record level: as if every hospital took part)."""
        if self.plan.client_budget is not None:
            return self.epsilon(self.rounds + 1)
        return self.epsilon(participations=self.participations + 1)

    def budget_stop(self) -> str | None:
        """Why the next round may not run (``--target-epsilon`` with ``--dp-noise``), or None."""
        if not self.plan.stop_on_budget:
            return None
        nxt = self.next_epsilon()
        if nxt > self.plan.target_epsilon:
            return (
                f"stopped before round {self.rounds + 1}: it would spend epsilon {nxt:.3f} > "
                f"target {self.plan.target_epsilon:g} (delta {self.plan.delta:g})"
            )
        return None

    def record_round(self, cohort: np.ndarray, active: np.ndarray) -> None:
        """Account one round: the cohort's active hospitals took part."""
        self.rounds += 1
        np.add.at(self.participations, cohort[active], 1)

    def hospital_epsilons(self) -> list[float]:
        """Record level: each hospital's epsilon so far."""
        b = self.plan.record_budget
        return [
            b.hospital_epsilon(n, int(k))
            for n, k in zip(self.sizes, self.participations, strict=True)
        ]


def round_privacy(info: Any, present: np.ndarray) -> dict[str, float]:
    """A round's DP figures for metrics.jsonl: the server's (client level: clip norm, noise
    stddev, clipped share and median norm of the updates) or the share of per-example
    gradients the present hospitals clipped (record level)."""
    out = {k: float(np.asarray(v)) for k, v in (info.server or {}).items()}
    if "clipped_fraction" in info.metrics:  # record level, per hospital
        share = np.asarray(info.metrics["clipped_fraction"])
        out["clipped_fraction"] = float(share[present].mean()) if present.any() else 0.0
    if "clipped" in info.metrics:
        clipped = np.asarray(info.metrics["clipped"])
        norms = np.asarray(info.metrics["update_norm"])
        n = max(int(present.sum()), 1)
        out["clipped_fraction"] = float(clipped[present].sum() / n)
        out["median_update_norm"] = float(np.median(norms[present])) if present.any() else 0.0
    return out


def privacy_summary(
    plan: PrivacyPlan | None,
    ledger: PrivacyLedger | None,
    history: list[dict[str, Any]],
    stop_reason: str | None,
) -> dict[str, Any]:
    """The run's privacy report for summary.json."""
    if plan is None:
        return {"mechanism": "none", "epsilon": None, "delta": None}
    rounds = [r["privacy"] for r in history if "privacy" in r]
    out: dict[str, Any] = {
        "mechanism": MECHANISMS[plan.mode],
        "epsilon": ledger.epsilon(),
        "delta": plan.delta,
        "accountant": plan.accountant,
        "noise_multiplier": plan.noise_multiplier,
        "noise_multiplier_source": plan.noise_source,
        "clip_norm": plan.clip,
        "sampling_rate": plan.sampling_rate,
        "rounds_accounted": ledger.rounds,
        "target_epsilon": plan.target_epsilon,
        "budget": (
            "stop before exceeding the target"
            if plan.stop_on_budget
            else "noise calibrated to the target"
            if plan.target_epsilon is not None
            else None
        ),
        "stopped_early": stop_reason,
    }
    if plan.client_dp is not None:
        dp = plan.client_dp
        out["update_noise_multiplier"] = dp.update_noise_multiplier
        out["adaptive_clip"] = dp.adaptive
        if dp.adaptive:
            out["target_quantile"] = dp.target_quantile
            out["count_noise_stddev"] = dp.sigma_b
        if rounds:
            out["final_clip_norm"] = rounds[-1]["next_clip_norm"]
            out["clipped_fraction"] = float(np.mean([r["clipped_fraction"] for r in rounds]))
    else:
        out["per_hospital_epsilon"] = ledger.hospital_epsilons()
        if rounds:
            out["clipped_fraction"] = float(np.mean([r["clipped_fraction"] for r in rounds]))
    return out


class SecAggCheck:
    """Secure aggregation around the compiled round. The round itself sums the updates in the
    field (the fast path); here every round checks that enough hospitals survived (below the
    threshold the round aborts, as the protocol would), and in ``exact`` mode the whole masked
    protocol (X25519 pairwise masks, Shamir shares of seeds, dropout recovery) runs on the
    host over the same quantized updates: its unmasked sum must equal the plain field sum."""

    def __init__(self, config: RunConfig, fed: Any):
        self.mode = config.secagg
        self.cohort = config.cohort_size
        self.threshold = config.secagg_threshold or self.cohort // 2 + 1
        self.clip_norm = config.clip_norm
        self.capacity = int(np.asarray(fed.train.x).shape[1])
        self.seed = config.seed

    def bound(self, dp_state: Any) -> float:
        """Per-coordinate bound of ``w_i u_i`` this round (as the engine's ``secagg_bound``)."""
        if dp_state is not None:
            return float(np.asarray(dp_state.clip_norm))
        return float(self.clip_norm * self.capacity)

    def check(self, rnd: int, info: Any, dp_state: Any) -> dict[str, Any]:
        """Threshold check (and, in exact mode, the protocol) for round ``rnd`` (0-based)."""
        weights = np.asarray(info.weights, np.float32)
        present = weights > 0
        survivors = int(present.sum())
        if survivors < self.threshold:
            raise SecAggAbort(
                f"round {rnd + 1}: {survivors} of {self.cohort} hospitals survived, below the "
                f"secure-aggregation threshold {self.threshold}: the round aborts (its sum "
                "cannot be unmasked)"
            )
        out: dict[str, Any] = {"survivors": survivors, "threshold": self.threshold}
        if self.mode != "exact":
            return out
        bound = self.bound(dp_state)
        m = weights.shape[0]
        rows = [
            quantize(
                weights.reshape((m,) + (1,) * (u.ndim - 1)) * np.asarray(u, np.float32), bound, m
            ).reshape(m, -1)
            for u in jax.tree.leaves(info.updates)
        ]
        x = np.concatenate(rows, axis=1)
        seed = hashlib.sha256(f"medichain-secagg/{self.seed}/{rnd}".encode()).digest()
        t0 = time.perf_counter()
        res = emulate_round(
            x, self.threshold, set((np.flatnonzero(~present) + 1).tolist()), rnd, seed
        )
        seconds = time.perf_counter() - t0
        plain = field_sum(x[present], axis=0)
        if not np.array_equal(res.sum, plain):
            bad = int(np.sum(res.sum != plain))
            raise SecAggAbort(
                f"round {rnd + 1}: the unmasked sum differs from the plain sum in {bad} coordinates"
            )
        sent = [res.bytes_sent_per_client[i] for i in res.survivors]
        out.update(
            verified=True,
            protocol_s=seconds,
            coordinates=int(x.shape[1]),
            bytes_up_per_client=int(np.median(sent)),
            plain_bytes_up_per_client=int(4 * x.shape[1]),
            server_bytes_sent=int(res.server_bytes_sent),
            dropped=[int(i) - 1 for i in res.dropped],
        )
        return out

    def summary(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        """The run's secure-aggregation report."""
        rounds = [r["secagg"] for r in history if "secagg" in r]
        out: dict[str, Any] = {
            "mode": self.mode,
            "protocol": "Bonawitz et al. 2017: X25519 pairwise masks, Shamir t-of-n recovery",
            "field": f"GF({PRIME})",
            "threshold": self.threshold,
            "min_survivors": min((r["survivors"] for r in rounds), default=None),
        }
        exact = [r for r in rounds if r.get("verified")]
        if exact:
            out.update(
                rounds_verified=len(exact),
                median_protocol_s=float(np.median([r["protocol_s"] for r in exact])),
                bytes_up_per_client=int(np.median([r["bytes_up_per_client"] for r in exact])),
                plain_bytes_up_per_client=exact[0]["plain_bytes_up_per_client"],
            )
        return out
