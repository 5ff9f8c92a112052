"""Algorithms by name, as ``--algorithm`` and the Python API select them."""

from __future__ import annotations

import dataclasses

from medichain_jax.fl.algorithm import Algorithm
from medichain_jax.fl.client import TrainHParams
from medichain_jax.fl.fedavg import fedavg, fedprox
from medichain_jax.fl.fednova import fednova
from medichain_jax.fl.personalized import ditto, fedbn, finetune
from medichain_jax.fl.scaffold import scaffold
from medichain_jax.fl.server_opt import server_optimizer

ALGORITHMS = (
    "fedavg",
    "fedprox",
    "scaffold",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "fedavgm",
    "fednova",
    "fedbn",
    "finetune",
    "ditto",
)

# algorithms that are FedAvg with a particular server optimizer
SERVER_ALIASES = {
    "fedadam": "adam",
    "fedyogi": "yogi",
    "fedadagrad": "adagrad",
    "fedavgm": "momentum",
}
# server learning rates when none is given (Reddi et al. 2021 tune FedAdam / FedYogi near 1e-2)
DEFAULT_SERVER_LR = {"sgd": 1.0, "momentum": 1.0, "adam": 0.01, "yogi": 0.01, "adagrad": 0.1}


@dataclasses.dataclass(frozen=True)
class AlgorithmOptions:
    """Algorithm knobs (defaults follow the papers' usual settings)."""

    server_optimizer: str | None = None  # None: the algorithm's own (sgd unless an alias)
    server_lr: float | None = None  # None: DEFAULT_SERVER_LR of the server optimizer
    server_momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    mu: float = 0.01  # FedProx
    ditto_lambda: float = 0.1
    finetune_epochs: int = 1


def resolved_server_optimizer(name: str, opts: AlgorithmOptions) -> tuple[str, float]:
    """The server optimizer name and learning rate an algorithm runs with."""
    alias = SERVER_ALIASES.get(name)
    if alias and opts.server_optimizer not in (None, alias):
        raise ValueError(
            f"algorithm {name!r} fixes the server optimizer to {alias!r}; "
            f"got server_optimizer={opts.server_optimizer!r}"
        )
    kind = alias or opts.server_optimizer or "sgd"
    if kind not in DEFAULT_SERVER_LR:
        raise ValueError(
            f"server optimizer must be one of {tuple(DEFAULT_SERVER_LR)}, got {kind!r}"
        )
    return kind, DEFAULT_SERVER_LR[kind] if opts.server_lr is None else opts.server_lr


def get_algorithm(
    name: str,
    hp: TrainHParams,
    *,
    num_clients: int,
    options: AlgorithmOptions | None = None,
) -> Algorithm:
    """Build a registered algorithm for ``num_clients`` registered hospitals."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; choose from {ALGORITHMS}")
    opts = options or AlgorithmOptions()
    kind, lr = resolved_server_optimizer(name, opts)
    tx = server_optimizer(
        kind, lr, momentum=opts.server_momentum, b1=opts.beta1, b2=opts.beta2, tau=opts.tau
    )
    if name == "fedprox":
        return fedprox(hp, opts.mu, tx)
    if name == "scaffold":
        return scaffold(hp, num_clients, tx)
    if name == "fednova":
        return fednova(hp, tx)
    if name == "fedbn":
        return fedbn(hp, tx)
    if name == "finetune":
        return finetune(hp, opts.finetune_epochs, tx)
    if name == "ditto":
        return ditto(hp, opts.ditto_lambda, tx)
    return fedavg(hp, tx, name=name)
