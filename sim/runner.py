"""The simulation loop: rounds, evaluation, checkpoints, metrics files, baselines and plots.

All side effects (files, clocks, progress bars) live here; every number comes from the pure
``medichain_jax`` functions, compiled once per run.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from tqdm.auto import tqdm

from medichain_jax import rng
from medichain_jax.data.federation import Federation, make_phantom_federation
from medichain_jax.engine.parallel import Parallelism, resolve
from medichain_jax.engine.round import build_round, client_mesh, replicate
from medichain_jax.fl.aggregators import get_aggregator
from medichain_jax.fl.algorithm import Algorithm
from medichain_jax.fl.baselines import matched_epochs, pool_clients, train_local_only, train_pooled
from medichain_jax.fl.client import TrainHParams
from medichain_jax.fl.fedavg import fedavg
from medichain_jax.metrics import evaluate
from medichain_jax.models import FunctionalModel, get_model
from sim.checkpoint import Checkpoints
from sim.config import RunConfig
from sim.results import MetricsLog, write_json

OUTPUT_FILES = ("metrics.jsonl", "summary.json", "config.json")


@dataclasses.dataclass
class Experiment:
    """Everything a run builds from its config (data, model, algorithm, compiled functions)."""

    config: RunConfig
    federation: Federation
    model: FunctionalModel
    hparams: TrainHParams
    algorithm: Algorithm
    parallelism: Parallelism
    mesh: Mesh | None
    round_fn: Callable
    eval_fn: Callable


def server_optimizer(config: RunConfig) -> optax.GradientTransformation:
    """The optax transformation the server applies to the mean update."""
    if config.server_optimizer == "sgd":
        return optax.sgd(config.server_lr)
    if config.server_optimizer == "momentum":
        return optax.sgd(config.server_lr, momentum=0.9)
    return optax.adam(config.server_lr)


def build_federation(config: RunConfig) -> Federation:
    """The dataset named by the config, split into hospitals."""
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


def build(config: RunConfig) -> Experiment:
    """Data, model, algorithm and the jitted round / eval functions for ``config``."""
    fed = build_federation(config)
    model = get_model(
        config.model,
        in_channels=fed.train.x.shape[-1],
        num_outputs=fed.train.y.shape[-1],
        image_size=config.image_size,
        norm=config.norm,
    )
    hp = TrainHParams(
        model=model,
        epochs=config.local_epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        momentum=config.momentum,
    )
    algorithm = fedavg(hp, server_optimizer(config))
    parallelism = resolve(config.client_parallelism, chunk=config.chunk)
    mesh = client_mesh(min(config.devices or len(jax.devices()), config.cohort_size))
    # every device reads the hospitals it is given from its own copy
    fed = dataclasses.replace(fed, train=replicate(fed.train, mesh))
    round_fn = jax.jit(
        build_round(
            algorithm,
            config.hospitals,
            config.cohort_size,
            parallelism,
            get_aggregator(config.aggregator),
            mesh,
        )
    )
    eval_fn = jax.jit(lambda variables, data: evaluate(model, variables, data))
    return Experiment(config, fed, model, hp, algorithm, parallelism, mesh, round_fn, eval_fn)


def param_bytes(tree: Any) -> int:
    """Bytes of one model message (all leaves)."""
    return int(sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(tree)))


def _eval_record(ev: dict[str, Any]) -> dict[str, Any]:
    per = {k: np.asarray(v) for k, v in ev["per_hospital"].items()}
    pooled = {k: float(v) for k, v in ev["pooled"].items() if k != "n"}
    return {
        "global": {
            "loss": float(np.mean(per["loss"])),
            "accuracy": float(np.mean(per["accuracy"])),
            "auc": float(np.nanmean(per["auc"])),
            "pooled": pooled,
        },
        "per_hospital": {k: per[k].tolist() for k in ("loss", "accuracy", "auc")},
    }


def _prepare_workdir(workdir: Path, resume: bool) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    if resume:
        return
    for name in (*OUTPUT_FILES, "plots"):
        path = workdir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    shutil.rmtree(workdir / "checkpoints", ignore_errors=True)


def run(
    config: RunConfig,
    workdir: str | Path,
    *,
    resume: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
    plots: bool = True,
) -> dict[str, Any]:
    """Run (or resume) a simulation and write its results folder; returns ``summary.json``'s dict.

    ``stop_after=k`` stops after round k with a checkpoint (a later ``resume=True`` continues
    and ends bit-identical to an uninterrupted run).
    """
    workdir = Path(workdir)
    t_start = time.perf_counter()
    _prepare_workdir(workdir, resume)
    write_json(workdir / "config.json", config.to_dict())
    exp = build(config)
    fed = exp.federation
    seed = jnp.asarray(config.seed, jnp.uint32)

    state = exp.algorithm.init(exp.model.init(rng.stream(config.seed, rng.INIT)))
    client_states = None
    ckpt = Checkpoints(workdir / "checkpoints")
    log = MetricsLog(workdir / "metrics.jsonl")
    start = 0
    history: list[dict[str, Any]] = []
    if resume and ckpt.latest() is not None:
        start = ckpt.latest()
        state = ckpt.restore(start, state)
        history = log.truncate(start)
    elif resume:
        print(f"no checkpoint in {workdir}/checkpoints; starting from round 0", file=sys.stderr)
        log.truncate(0)
    state = replicate(state, exp.mesh)

    last = config.rounds if stop_after is None else min(config.rounds, stop_after)
    msg_bytes = param_bytes(state.params)
    bar = tqdm(
        total=config.rounds,
        initial=start,
        desc=f"{config.hospitals} hospitals",
        unit="round",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    compile_s = None
    for rnd in range(start, last):
        t0 = time.perf_counter()
        state, client_states, info = exp.round_fn(state, fed.train, client_states, seed)
        jax.block_until_ready(state)
        round_s = time.perf_counter() - t0
        if compile_s is None:
            compile_s = round_s
        weights = np.asarray(info.weights)
        losses = np.asarray(info.metrics["loss"])
        record: dict[str, Any] = {
            "round": rnd + 1,
            "train_loss": float(np.sum(weights * losses) / max(weights.sum(), 1.0)),
            "cohort": np.asarray(info.cohort).tolist(),
            "client_steps": np.asarray(info.metrics["steps"]).astype(int).tolist(),
            "bytes_up": msg_bytes * len(weights),
            "bytes_down": msg_bytes * len(weights),
            "seconds": round_s,
        }
        if (rnd + 1) % config.eval_every == 0 or rnd + 1 == config.rounds:
            ev = exp.eval_fn(jax.device_put(state.params, jax.devices()[0]), fed.test)
            record.update(_eval_record(ev))
        log.append(record)
        history.append(record)
        if (rnd + 1) % config.checkpoint_every == 0 or rnd + 1 == last:
            ckpt.save(rnd + 1, state)
        post = {"loss": f"{record['train_loss']:.3f}"}
        if "global" in record:
            post["auc"] = f"{record['global']['auc']:.3f}"
        bar.set_postfix(post)
        bar.update(1)
    bar.close()
    ckpt.close()
    if last < config.rounds:
        return {"stopped_after": last}

    summary = _summarize(exp, state, history)
    if config.baselines:
        summary.update(_run_baselines(exp, progress))
    summary["timing"] = {
        "total_s": time.perf_counter() - t_start,
        "first_round_s_incl_compile": compile_s,
        "median_round_s": float(np.median([r["seconds"] for r in history[1:] or history])),
    }
    write_json(workdir / "summary.json", summary)
    if plots:
        from sim.plots import plot_run

        plot_run(workdir)
    return summary


def _summarize(exp: Experiment, state, history: list[dict[str, Any]]) -> dict[str, Any]:
    cfg, fed = exp.config, exp.federation
    final = history[-1]
    return {
        "metric": "auc",
        "run_id": cfg.run_id(),
        "rounds": cfg.rounds,
        "backend": jax.default_backend(),
        "client_parallelism": dataclasses.asdict(exp.parallelism),
        "devices": 1 if exp.mesh is None else int(exp.mesh.devices.size),
        "hospitals": [
            {
                "id": i,
                "vendor": fed.vendors[i],
                "train_size": int(fed.train_sizes[i]),
                "test_size": int(fed.test_sizes[i]),
                "train_pos_rate": float(fed.train_pos_rate[i]),
            }
            for i in range(fed.num_hospitals)
        ],
        "federated": {
            "mean": final["global"]["auc"],
            "per_hospital": final["per_hospital"]["auc"],
            "pooled_test": final["global"]["pooled"]["auc"],
            "accuracy_mean": final["global"]["accuracy"],
            "loss_mean": final["global"]["loss"],
        },
        "bytes_total": int(sum(r["bytes_up"] + r["bytes_down"] for r in history)),
    }


def _baseline_block(ev: dict[str, Any], seconds: float, epochs: int) -> dict[str, Any]:
    rec = _eval_record(ev)
    return {
        "mean": rec["global"]["auc"],
        "per_hospital": rec["per_hospital"]["auc"],
        "pooled_test": rec["global"]["pooled"]["auc"],
        "accuracy_mean": rec["global"]["accuracy"],
        "loss_mean": rec["global"]["loss"],
        "epochs": epochs,
        "seconds": seconds,
    }


def _run_baselines(exp: Experiment, progress: bool) -> dict[str, Any]:
    """Pooled and local-only models at matched compute, evaluated on every hospital's test set."""
    cfg, fed = exp.config, exp.federation
    epochs = matched_epochs(cfg.rounds, cfg.local_epochs, cfg.client_fraction)
    init = exp.model.init(rng.stream(cfg.seed, rng.INIT))
    base_key = rng.stream(cfg.seed, rng.BASELINE)
    out: dict[str, Any] = {}

    if progress:
        print(f"baselines: local-only ({epochs} epochs per hospital)...", file=sys.stderr)
    t0 = time.perf_counter()
    keys = jax.vmap(lambda c: jax.random.fold_in(base_key, c))(jnp.arange(cfg.hospitals))
    local_fn = jax.jit(
        lambda v, d, k: train_local_only(v, d, k, exp.hparams, epochs, exp.parallelism)
    )
    local_vars, _ = local_fn(init, fed.train, keys)
    ev = jax.jit(lambda v, d: evaluate(exp.model, v, d, per_client_vars=True))(local_vars, fed.test)
    jax.block_until_ready(ev)
    out["local"] = _baseline_block(ev, time.perf_counter() - t0, epochs)

    if progress:
        print(f"baselines: pooled ({epochs} epochs on all data)...", file=sys.stderr)
    t0 = time.perf_counter()
    pooled = pool_clients(fed.train)
    pooled_fn = jax.jit(lambda v, d, k: train_pooled(v, d, k, exp.hparams, epochs))
    pooled_vars, _ = pooled_fn(init, pooled, jax.random.fold_in(base_key, cfg.hospitals))
    ev = jax.block_until_ready(exp.eval_fn(pooled_vars, fed.test))
    out["pooled"] = _baseline_block(ev, time.perf_counter() - t0, epochs)
    return out
