"""What one hospital's training and the server need, built from a run config: the dataset
split into hospitals, the model, local-training hyperparameters, algorithm, aggregator, simulated
system, client parallelism and privacy plan. Shared by the simulator, Ray actors and the real
mode's site runner and coordinator (which must train exactly as the simulation does)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from medichain_jax import rng
from medichain_jax.compression import Compressor, get_compressor
from medichain_jax.data.federation import Federation, make_phantom_federation, with_label_noise
from medichain_jax.data.lidc_annotations import annotation_federation
from medichain_jax.data.lidc_db import read_database, read_vendor_map
from medichain_jax.engine.parallel import Parallelism, resolve
from medichain_jax.engine.system import SystemModel, make_system
from medichain_jax.fl.aggregators import get_aggregator
from medichain_jax.fl.algorithm import Algorithm
from medichain_jax.fl.client import TrainHParams
from medichain_jax.fl.registry import AlgorithmOptions, get_algorithm
from medichain_jax.models import FunctionalModel, get_model
from sim.config import ConfigError, RunConfig
from sim.privacy import PrivacyPlan, plan_privacy


def load_dataset(config: RunConfig) -> Federation:
    """The dataset named by the config, split into hospitals."""
    if config.dataset == "phantom":
        return make_phantom_federation(
            seed=config.seed,
            num_hospitals=config.hospitals,
            non_iid=config.non_iid,
            alpha=config.alpha,
            mean_train=config.train_per_hospital,
            test_size=config.test_per_hospital,
            image_size=config.image_size,
            scanner_shift=config.scanner_shift,
        )
    if config.dataset == "lidc-annotations":
        table = read_database(config.data_dir)
        vendor_map = read_vendor_map(config.vendor_map, table.scans) if config.vendor_map else None
        return annotation_federation(
            table,
            config.partition,
            config.hospitals,
            alpha=config.alpha,
            seed=config.seed,
            vendor_map=vendor_map,
        )
    from sim.real_data import prepared_federation  # image datasets: cached preprocessing

    return prepared_federation(config)


def build_federation(config: RunConfig) -> tuple[Federation, np.ndarray]:
    """The dataset named by the config, split into hospitals, with label noise added to
    ``noisy_hospitals`` of them; returns it and the noisy-hospital mask."""
    fed = load_dataset(config)
    if fed.num_hospitals != config.hospitals:
        raise ConfigError(
            f"hospitals: partition {config.partition!r} gives {fed.num_hospitals} hospitals on "
            f"this data ({', '.join(fed.vendors)}), got --hospitals {config.hospitals}"
        )
    noisy = np.zeros(config.hospitals, bool)
    if config.noisy_hospitals and config.label_noise > 0:
        key = rng.stream(config.seed, rng.LABEL_NOISE)
        order = np.asarray(jax.random.permutation(jax.random.fold_in(key, 0), config.hospitals))
        noisy[order[: config.noisy_hospitals]] = True
        train, _ = with_label_noise(
            fed.train, noisy, config.label_noise, jax.random.fold_in(key, 1)
        )
        fed = dataclasses.replace(fed, train=train)
    return fed, noisy


def build_system(config: RunConfig, fed: Federation) -> SystemModel | None:
    """The simulated Byzantine / straggler / dropout / late-join behaviour, or None."""
    if not (config.byzantine or config.stragglers or config.dropout or config.late_join):
        return None
    planned = config.local_epochs * -(-np.asarray(fed.train_sizes) // config.batch_size)
    return make_system(
        config.seed,
        planned,
        byzantine=config.byzantine,
        attack=config.attack,
        attack_scale=config.attack_scale,
        stragglers=config.stragglers,
        dropout=config.dropout,
        late_join=config.late_join,
        join_round=config.join_round,
    )


def algorithm_options(config: RunConfig) -> AlgorithmOptions:
    """The config's algorithm knobs."""
    return AlgorithmOptions(
        server_optimizer=config.server_optimizer,
        server_lr=config.server_lr,
        server_momentum=config.server_momentum,
        mu=config.mu,
        ditto_lambda=config.ditto_lambda,
        finetune_epochs=config.finetune_epochs,
    )


@dataclasses.dataclass
class TrainingParts:
    """The pure pieces one hospital's training and the server need, built from a config."""

    model: FunctionalModel
    hparams: TrainHParams
    algorithm: Algorithm
    aggregator: Any
    system: SystemModel | None
    parallelism: Parallelism
    privacy: PrivacyPlan | None = None
    compressor: Compressor | None = None


def training_parts(config: RunConfig, fed: Federation) -> TrainingParts:
    """Model, local-training hyperparameters, algorithm, aggregator, simulated system and
    client parallelism of ``config`` on ``fed`` (the same in every process of a run)."""
    model = get_model(
        config.model,
        in_channels=fed.train.x.shape[-1],
        num_outputs=fed.train.y.shape[-1],
        image_size=fed.train.x.shape[2] if fed.train.x.ndim == 5 else config.image_size,
        norm=config.norm,
        in_features=int(np.prod(fed.train.x.shape[2:])),
    )
    privacy = plan_privacy(config, np.asarray(fed.train_sizes))
    record = privacy is not None and privacy.mode == "record"
    hp = TrainHParams(
        model=model,
        epochs=config.local_epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        momentum=config.momentum,
        record_clip=privacy.clip if record else None,
        record_noise=privacy.noise_multiplier if record else 0.0,
    )
    algorithm = get_algorithm(
        config.algorithm, hp, num_clients=config.hospitals, options=algorithm_options(config)
    )
    aggregator = get_aggregator(
        config.aggregator,
        trim_beta=config.trim_beta,
        krum_f=config.krum_f if config.krum_f is not None else max(1, config.byzantine),
        multi_krum_m=config.multi_krum_m,
    )
    system = build_system(config, fed)
    parallelism = resolve(config.client_parallelism, chunk=config.chunk)
    compressor = None
    if config.compression != "none":
        compressor = get_compressor(config.compression, config.topk_fraction)
    return TrainingParts(model, hp, algorithm, aggregator, system, parallelism, privacy, compressor)


def update_like(algorithm: Algorithm, state: Any, data_one: Any, client_state_one: Any) -> Any:
    """Zeros shaped like one hospital's update (what travels up), from the algorithm."""
    out = jax.eval_shape(
        lambda: algorithm.client_update(
            algorithm.broadcast(state), data_one, jax.random.key(0), client_state_one, None
        )
    )
    return jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), out.update)


def with_residuals(compressor: Any, client_states: Any, like: Any, num_clients: int) -> Any:
    """Every hospital's client state, with an error-feedback residual (zeros shaped like the
    update) beside the algorithm's own state when ``compressor`` keeps one."""
    if compressor is None or not compressor.stateful:
        return client_states
    residual = jax.tree.map(
        lambda a: jax.numpy.zeros((num_clients, *a.shape), a.dtype), compressor.init(like)
    )
    return {"algo": client_states, "residual": residual}
