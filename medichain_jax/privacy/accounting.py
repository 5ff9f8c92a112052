"""Privacy accounting with Google's ``dp-accounting`` (host side, pure given its inputs).

A client-level DP-FedAvg round is the sampled Gaussian mechanism: a cohort of ``m`` of ``N``
hospitals (sampling rate ``q = m / N``, accounted as Poisson sampling, as in McMahan et al. 2018
and TensorFlow Federated) and Gaussian noise of multiplier ``z`` on the clipped sum. Record-level
DP-SGD inside one hospital is the same mechanism per minibatch step with ``q = batch / n``
(shuffled batches accounted as Poisson sampling, as Opacus and TF Privacy do). ``T`` rounds
compose. Accountants: Renyi DP (Mironov 2017; Mironov, Talwar & Zhang 2019) or privacy loss
distributions (Koskela et al. 2020; Doroshenko et al. 2022).
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import dp_accounting
from dp_accounting import pld, rdp

ACCOUNTANTS = ("rdp", "pld")


def sampled_gaussian_event(
    noise_multiplier: float, sampling_rate: float, steps: int
) -> dp_accounting.DpEvent:
    """``steps`` compositions of the Gaussian mechanism under Poisson sampling at ``q``."""
    event: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sampling_rate < 1:
        event = dp_accounting.PoissonSampledDpEvent(sampling_rate, event)
    return dp_accounting.SelfComposedDpEvent(event, steps)


def make_accountant(kind: str) -> dp_accounting.PrivacyAccountant:
    """A fresh ``rdp`` or ``pld`` accountant."""
    if kind == "rdp":
        return rdp.RdpAccountant()
    if kind == "pld":
        return pld.PLDAccountant()
    raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {kind!r}")


def epsilon(
    noise_multiplier: float, sampling_rate: float, steps: int, delta: float, kind: str = "rdp"
) -> float:
    """Epsilon at ``delta`` after ``steps`` sampled Gaussian steps (inf without noise)."""
    if steps <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    accountant = make_accountant(kind)
    accountant.compose(sampled_gaussian_event(noise_multiplier, sampling_rate, steps))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(accountant.get_epsilon(delta))


def calibrate_noise(
    target_epsilon: float, sampling_rate: float, steps: int, delta: float, kind: str = "rdp"
) -> float:
    """The smallest noise multiplier whose ``steps`` sampled Gaussian steps stay within
    ``target_epsilon`` at ``delta`` (dp-accounting's ``calibrate_dp_mechanism``)."""
    if not target_epsilon > 0:
        raise ValueError(f"target epsilon must be > 0, got {target_epsilon}")
    return float(
        dp_accounting.calibrate_dp_mechanism(
            lambda: make_accountant(kind),
            lambda z: sampled_gaussian_event(z, sampling_rate, steps),
            target_epsilon,
            delta,
            # from z = 0.3 up: far below it a PLD's support (epsilon / 1e-4 points) explodes
            bracket_interval=dp_accounting.LowerEndpointAndGuess(0.3, 1.0),
        )
    )


@dataclasses.dataclass(frozen=True)
class ClientLevelBudget:
    """Client-level DP-FedAvg accounting for one run: ``epsilon_after(rounds)``."""

    noise_multiplier: float
    sampling_rate: float
    delta: float
    accountant: str = "rdp"

    def epsilon_after(self, rounds: int) -> float:
        """Epsilon spent by ``rounds`` DP rounds."""
        return epsilon(
            self.noise_multiplier, self.sampling_rate, rounds, self.delta, self.accountant
        )


@dataclasses.dataclass(frozen=True)
class RecordLevelBudget:
    """Record-level DP-SGD accounting, one hospital at a time: a hospital with ``n`` records
    that took part in ``k`` rounds ran ``k * epochs * ceil(n / batch)`` steps at ``q = batch/n``.
    ``epsilon_after`` reports the worst hospital's epsilon."""

    noise_multiplier: float
    batch_size: int
    epochs: int
    delta: float
    accountant: str = "rdp"

    def hospital_epsilon(self, num_examples: int, participations: int) -> float:
        """Epsilon of one hospital's records after ``participations`` rounds."""
        if num_examples <= 0 or participations <= 0:
            return 0.0
        q = min(1.0, self.batch_size / num_examples)
        steps = participations * self.epochs * math.ceil(num_examples / self.batch_size)
        return epsilon(self.noise_multiplier, q, steps, self.delta, self.accountant)

    def epsilon_after(self, num_examples: list[int], participations: list[int]) -> float:
        """The largest epsilon over hospitals (each its own records and participations)."""
        cache: dict[tuple[int, int], float] = {}
        worst = 0.0
        for n, k in zip(num_examples, participations, strict=True):
            if (n, k) not in cache:
                cache[(n, k)] = self.hospital_epsilon(n, k)
            worst = max(worst, cache[(n, k)])
        return worst
