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
from jax.sharding import Mesh
from tqdm.auto import tqdm

from medichain_jax import rng
from medichain_jax.compression import Compressor
from medichain_jax.data.federation import Federation
from medichain_jax.engine.parallel import Parallelism
from medichain_jax.engine.round import build_round, client_mesh, replicate, sample_cohort
from medichain_jax.engine.system import NO_DEADLINE, SystemModel
from medichain_jax.fl.algorithm import Algorithm, initial_client_states
from medichain_jax.fl.baselines import matched_epochs, pool_clients, train_local_only, train_pooled
from medichain_jax.fl.client import TrainHParams
from medichain_jax.fl.contribution import round_contributions
from medichain_jax.metrics import evaluate
from medichain_jax.models import FunctionalModel
from medichain_jax.privacy.dp import init_dp_state
from sim.checkpoint import Checkpoints
from sim.config import ConfigError, RunConfig
from sim.parts import (  # noqa: F401  (re-exported: the runner's public names)
    TrainingParts,
    algorithm_options,
    build_federation,
    build_system,
    load_dataset,
    training_parts,
    update_like,
    with_residuals,
)
from sim.privacy import (
    PrivacyLedger,
    PrivacyPlan,
    SecAggCheck,
    privacy_summary,
    round_privacy,
)
from sim.results import MetricsLog, write_json

OUTPUT_FILES = ("metrics.jsonl", "summary.json", "config.json")


@dataclasses.dataclass(frozen=True)
class RayOptions:
    """Where and how a run's hospitals go onto Ray actors (``python -m sim --ray``): the
    cluster ``address`` (None: start a local one), the number of ``actors`` (each holds one
    contiguous shard of the hospitals; None: one per GPU, else one per CPU) and the CPUs /
    GPUs each actor declares. Execution options: they change no number and no run id."""

    address: str | None = None
    actors: int | None = None
    cpus_per_actor: float | None = None
    gpus_per_actor: float | None = None


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
    system: SystemModel | None = None
    noisy: np.ndarray | None = None
    personal_eval_fn: Callable | None = None
    contribution_fn: Callable | None = None
    validation: Any = None
    sample_fn: Callable | None = None  # (seed, round) -> cohort, when rows are streamed
    privacy: PrivacyPlan | None = None
    compressor: Compressor | None = None


def validation_set(config: RunConfig, fed: Federation, max_rows: int = 256):
    """A fixed sample of the pooled test rows: the utility set of contribution scores."""
    pooled = pool_clients(fed.test)
    n = int(pooled.num_examples)
    perm = np.asarray(jax.random.permutation(rng.stream(config.seed, rng.CONTRIBUTION), n))
    keep = np.sort(perm[: min(n, max_rows)])
    return pooled.replace(
        x=jnp.asarray(pooled.x[keep]), y=jnp.asarray(pooled.y[keep]), num_examples=len(keep)
    )


def streams_cohort(config: RunConfig) -> bool:
    """Whether rounds take only the sampled cohort's rows, gathered from host memory each
    round (client sampling: device memory then grows with the cohort, not the federation)."""
    return config.cohort_size < config.hospitals


def cohort_rows(data: Any, cohort: np.ndarray) -> Any:
    """The cohort's rows of host-resident per-hospital data (numpy fancy indexing)."""
    return jax.tree.map(lambda a: np.asarray(a)[cohort], data)


def compile_round(config: RunConfig, parts: TrainingParts):
    """``(mesh, round_fn, sample_fn)`` of one process: the jitted round over the cohort split on
    a mesh of the local devices and, with client sampling, the jitted ``(seed, round) ->
    cohort`` whose rows ``play_round`` streams in (None otherwise)."""
    mesh = client_mesh(min(config.devices or len(jax.devices()), config.cohort_size))
    round_fn = jax.jit(
        build_round(
            parts.algorithm,
            config.hospitals,
            config.cohort_size,
            parts.parallelism,
            parts.aggregator,
            mesh,
            system=parts.system,
            clip_norm=config.clip_norm,
            return_updates=config.contribution or config.secagg == "exact",
            gathered=streams_cohort(config),
            dp=None if parts.privacy is None else parts.privacy.client_dp,
            secagg=config.secagg != "off",
            compressor=parts.compressor,
        )
    )
    sample_fn = None
    if streams_cohort(config):
        n, m = config.hospitals, config.cohort_size
        sample_fn = jax.jit(lambda seed, rnd: sample_cohort(seed, rnd, n, m))
    return mesh, round_fn, sample_fn


def build(config: RunConfig, ray_cluster: RayOptions | None = None) -> Experiment:
    """Data, model, algorithm and the jitted round / eval functions for ``config``; with
    ``ray_cluster`` the round runs on Ray actors that each hold a shard of the hospitals."""
    fed, noisy = build_federation(config)
    parts = training_parts(config, fed)
    model, hp, algorithm, system = parts.model, parts.hparams, parts.algorithm, parts.system
    if ray_cluster is not None:
        from sim.ray_sim import RayRound

        if parts.privacy is not None or config.secagg != "off" or parts.compressor is not None:
            raise ConfigError(
                "--ray does not run DP, secure aggregation or compression yet: drop --ray"
            )

        mesh, sample_fn = None, None
        round_fn = RayRound(config, parts, ray_cluster)
    else:
        mesh, round_fn, sample_fn = compile_round(config, parts)
        if sample_fn is None:
            # every round reads every hospital: keep one copy on each device
            train = jax.device_put(fed.train) if mesh is None else replicate(fed.train, mesh)
            fed = dataclasses.replace(fed, train=train)
    task = fed.task
    eval_fn = jax.jit(lambda variables, data: evaluate(model, variables, data, task=task))
    personal_eval_fn = None
    if algorithm.personalize is not None:

        def personal_eval(message, train, test, client_states, key):
            keys = jax.vmap(lambda c: jax.random.fold_in(key, c))(jnp.arange(config.hospitals))
            own = jax.lax.map(
                lambda a: algorithm.personalize(message, a[0], a[1], a[2]),
                (train, keys, client_states),
            )
            return evaluate(model, own, test, per_client_vars=True, task=task)

        personal_eval_fn = jax.jit(personal_eval)
    contribution_fn, validation = None, None
    if config.contribution:
        validation = validation_set(config, fed)
        contribution_fn = jax.jit(
            lambda gv, upd, w, val, key: round_contributions(
                model,
                gv,
                jax.vmap(algorithm.model_delta)(upd),
                w,
                val,
                key,
                permutations=config.shapley_permutations,
                utility=config.contribution_utility,
            )
        )
    return Experiment(
        config,
        fed,
        model,
        hp,
        algorithm,
        parts.parallelism,
        mesh,
        round_fn,
        eval_fn,
        system,
        noisy,
        personal_eval_fn,
        contribution_fn,
        validation,
        sample_fn,
        parts.privacy,
        parts.compressor,
    )


def play_round(exp: Experiment, state, client_states, seed: jax.Array):
    """One federated round of ``exp``: the compiled round on every hospital's rows, or, with
    client sampling, on the cohort's rows streamed from host memory."""
    data = exp.federation.train
    if exp.sample_fn is not None:
        data = cohort_rows(data, np.asarray(exp.sample_fn(seed, state.round)))
    state, client_states = replicate((state, client_states), exp.mesh)
    return exp.round_fn(state, data, client_states, seed)


def param_bytes(tree: Any) -> int:
    """Bytes of one model message (all leaves)."""
    return int(sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(tree)))


def _eval_record(ev: dict[str, Any]) -> dict[str, Any]:
    per = {k: np.asarray(v) for k, v in ev["per_hospital"].items()}
    pooled = {k: float(v) for k, v in ev["pooled"].items() if k not in ("n", "auc_per_label")}
    names = ["loss", "accuracy", "auc"] + (["dice"] if "dice" in per else [])
    if "auc_per_label" in per and per["auc_per_label"].shape[-1] > 1:  # AUC of each finding
        pooled["auc_per_label"] = np.asarray(ev["pooled"]["auc_per_label"]).tolist()
        names.append("auc_per_label")
    scores = {k: float(np.nanmean(per[k])) for k in ("auc", "dice") if k in per}
    return {
        "global": {
            "loss": float(np.mean(per["loss"])),
            "accuracy": float(np.mean(per["accuracy"])),
            **scores,
            "pooled": pooled,
        },
        "per_hospital": {k: per[k].tolist() for k in names},
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
    ray_cluster: RayOptions | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Run (or resume) a simulation and write its results folder; returns ``summary.json``'s dict.

    ``stop_after=k`` stops after round k with a checkpoint (a later ``resume=True`` continues
    and ends bit-identical to an uninterrupted run). With ``plots`` the folder also gets
    ``plots/*.png`` and ``report.html`` (refreshed during the run, at most every
    ``REPORT_EVERY_S`` seconds, as a live view; ``command`` is shown in it).
    """
    workdir = Path(workdir)
    t_start = time.perf_counter()
    _prepare_workdir(workdir, resume)
    write_json(workdir / "config.json", config.to_dict())
    exp = build(config, ray_cluster)
    try:
        return _run_rounds(exp, workdir, t_start, resume, stop_after, progress, plots, command)
    finally:
        if hasattr(exp.round_fn, "close"):
            exp.round_fn.close()


def _run_rounds(
    exp: Experiment,
    workdir: Path,
    t_start: float,
    resume: bool,
    stop_after: int | None,
    progress: bool,
    plots: bool,
    command: str | None = None,
) -> dict[str, Any]:
    config = exp.config
    fed = exp.federation
    seed = jnp.asarray(config.seed, jnp.uint32)

    init_vars = exp.model.init(rng.stream(config.seed, rng.INIT))
    state = exp.algorithm.init(init_vars)
    plan = exp.privacy
    ledger = None
    if plan is not None:
        ledger = PrivacyLedger(plan, np.asarray(fed.train_sizes))
        if plan.client_dp is not None:
            state = state.replace(privacy_state=init_dp_state(plan.client_dp))
    secagg = SecAggCheck(config, fed) if config.secagg != "off" else None
    client_states = initial_client_states(exp.algorithm, init_vars, config.hospitals)
    up_bytes = param_bytes(state.params)
    if exp.compressor is not None:
        one = jax.tree.map(lambda a: np.asarray(a)[0], fed.train)
        own = None if client_states is None else jax.tree.map(lambda a: a[0], client_states)
        like = update_like(exp.algorithm, state, one, own)
        up_bytes = exp.compressor.payload_bytes(like)
        client_states = with_residuals(exp.compressor, client_states, like, config.hospitals)
    ckpt = Checkpoints(workdir / "checkpoints")
    log = MetricsLog(workdir / "metrics.jsonl")
    start = 0
    history: list[dict[str, Any]] = []

    def saved_tree():
        tree = {"server": state, "clients": client_states or {}}
        if ledger is not None:
            tree["accountant"] = ledger.state()
        return tree

    if resume and ckpt.latest() is not None:
        start = ckpt.latest()
        saved = ckpt.restore(start, saved_tree())
        state, client_states = saved["server"], saved["clients"] or None
        if ledger is not None:
            ledger.restore(saved["accountant"])
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
    stop_reason = None
    last_report = time.perf_counter()
    for rnd in range(start, last):
        if ledger is not None and (stop_reason := ledger.budget_stop()) is not None:
            if not history:
                raise ConfigError(f"target_epsilon: {stop_reason}; lower --dp-noise's epsilon")
            bar.write(stop_reason)
            break
        t0 = time.perf_counter()
        before = state.params
        dp_before = state.privacy_state
        state, client_states, info = play_round(exp, state, client_states, seed)
        jax.block_until_ready(state)
        round_s = time.perf_counter() - t0
        if compile_s is None:
            compile_s = round_s
        record = _round_record(exp, rnd, info, msg_bytes, round_s, up_bytes)
        for hospital in record["rejected"]:
            bar.write(f"round {rnd + 1}: rejected the update of hospital {hospital} (NaN/Inf)")
        present = np.asarray(info.weights) > 0
        if secagg is not None:
            record["secagg"] = secagg.check(rnd, info, dp_before)
        record["epsilon"], record["delta"] = None, None
        if ledger is not None:
            ledger.record_round(np.asarray(info.cohort), present)
            record["epsilon"], record["delta"] = ledger.epsilon(), plan.delta
            record["privacy"] = round_privacy(info, present)
            if plan.client_dp is not None:
                record["privacy"]["next_clip_norm"] = float(state.privacy_state.clip_norm)
        out_of_budget = ledger is not None and ledger.budget_stop() is not None
        final = rnd + 1 == config.rounds or out_of_budget
        if (rnd + 1) % config.eval_every == 0 or final:
            host_params = jax.device_put(state.params, jax.devices()[0])
            record.update(_eval_record(exp.eval_fn(host_params, fed.test)))
            if exp.personal_eval_fn is not None and (final or not exp.algorithm.personalize_trains):
                key = rng.round_key(config.seed, rng.PERSONAL, rnd)
                own = client_states
                if isinstance(own, dict) and set(own) == {"algo", "residual"}:
                    own = own["algo"]
                ev = exp.personal_eval_fn(
                    exp.algorithm.broadcast(state), fed.train, fed.test, own, key
                )
                record["personalized"] = _eval_record(ev)
        if exp.contribution_fn is not None and (
            (rnd + 1) % config.contribution_every == 0 or final
        ):
            key = rng.round_key(config.seed, rng.CONTRIBUTION, rnd)
            scores = exp.contribution_fn(before, info.updates, info.weights, exp.validation, key)
            cohort = record["cohort"]
            record["contribution"] = {
                name: dict(zip(map(str, cohort), np.asarray(scores[name]).tolist(), strict=True))
                for name in SCORES
            }
        log.append(record)
        history.append(record)
        if plots and not final and time.perf_counter() - last_report > REPORT_EVERY_S:
            _report(workdir, command, live=True)
            last_report = time.perf_counter()
        if (rnd + 1) % config.checkpoint_every == 0 or rnd + 1 == last or final:
            ckpt.save(rnd + 1, saved_tree())
        post = {"loss": f"{record['train_loss']:.3f}"}
        if "global" in record:
            shown = record.get("personalized", record)
            post["auc"] = f"{shown['global']['auc']:.3f}"
            if "dice" in shown["global"]:
                post["dice"] = f"{shown['global']['dice']:.3f}"
        bar.set_postfix(post)
        bar.update(1)
    bar.close()
    ckpt.close()
    if last < config.rounds and stop_reason is None:
        return {"stopped_after": last}

    summary = _summarize(exp, state, history)
    summary["rounds_trained"] = history[-1]["round"]
    summary["compression"] = {
        "codec": config.compression,
        "bytes_up_per_update": up_bytes,
        "ratio_vs_float32": param_bytes(state.params) / up_bytes,
        **({"topk_fraction": config.topk_fraction} if config.compression == "topk" else {}),
    }
    summary["privacy"] = privacy_summary(plan, ledger, history, stop_reason)
    if secagg is not None:
        summary["secagg"] = secagg.summary(history)
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
        _report(workdir, command, live=False)
    return summary


REPORT_EVERY_S = 30.0  # live report.html refresh period during a run (wall clock)


def _report(workdir: Path, command: str | None, live: bool) -> None:
    """Write ``report.html``; a failure is reported, never fatal to the run it describes."""
    from sim.report import ReportError, write_report

    try:
        write_report(workdir, command=command, live=live)
    except (ReportError, OSError, ValueError) as err:
        print(f"report.html not written: {err}", file=sys.stderr)


def _round_record(
    exp: Experiment, rnd: int, info, msg_bytes: int, seconds: float, up_bytes: int
) -> dict:
    weights = np.asarray(info.weights)
    losses = np.asarray(info.metrics["loss"])
    cohort = np.asarray(info.cohort)
    ok = weights > 0
    sent = np.asarray(info.metrics["active"])
    train_loss = float(np.sum(np.where(ok, weights * losses, 0.0)) / max(weights.sum(), 1.0))
    return {
        "round": rnd + 1,
        "train_loss": train_loss,
        "cohort": cohort.tolist(),
        "client_steps": np.asarray(info.metrics["steps"]).astype(int).tolist(),
        "absent": cohort[~sent].tolist(),
        "rejected": cohort[np.asarray(info.metrics["rejected"])].tolist(),
        "bytes_up": up_bytes * int(sent.sum()),
        "bytes_down": msg_bytes * len(cohort),
        "seconds": seconds,
    }


def _hospital_ids(mask: np.ndarray | None) -> list[int]:
    return [] if mask is None else np.flatnonzero(mask).tolist()


def _system_summary(exp: Experiment) -> dict[str, Any]:
    cfg, system = exp.config, exp.system
    out: dict[str, Any] = {"noisy_hospitals": _hospital_ids(exp.noisy)}
    if cfg.noisy_hospitals:
        out["label_noise"] = cfg.label_noise
    if system is not None:
        out.update(
            byzantine=_hospital_ids(system.byzantine),
            attack=system.attack,
            attack_scale=system.attack_scale,
            stragglers={
                str(i): int(system.max_steps[i])
                for i in np.flatnonzero(system.max_steps < NO_DEADLINE)
            },
            late_joiners=_hospital_ids(system.join_round > 0),
            join_round=cfg.join_round,
            dropout=system.dropout,
        )
    return out


SCORES = ("loo", "shapley")
_UTILITY_NAMES = {"auc": "1 - AUC", "loss": "BCE"}


def _contribution_summary(exp: Experiment, history: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-hospital LOO and Shapley scores over the scored rounds: their sum, and their median
    over the rounds the hospital's update was aggregated in (robust to one round's outlier)."""
    n = exp.config.hospitals
    per_round: dict[str, list[list[float]]] = {name: [[] for _ in range(n)] for name in SCORES}
    rounds = []
    for record in history:
        if "contribution" not in record:
            continue
        rounds.append(record["round"])
        missing = set(record.get("absent", [])) | set(record.get("rejected", []))
        for name, per in record["contribution"].items():
            for hospital, value in per.items():
                if int(hospital) not in missing:
                    per_round[name][int(hospital)].append(value)
    out: dict[str, Any] = {
        "utility": f"decrease of validation {_UTILITY_NAMES[exp.config.contribution_utility]} "
        "when the subset's mean update is applied (one-round reconstruction, Song et al. 2019)",
        "validation_rows": int(exp.validation.num_examples),
        "rounds": rounds,
        "permutations": -(-exp.config.shapley_permutations // n) * n,  # stratified: rounded up
    }
    for name, values in per_round.items():
        out[name] = [float(np.sum(v)) for v in values]  # summed over scored rounds
        out[f"{name}_median"] = [float(np.median(v)) if v else 0.0 for v in values]
    out["rounds_scored"] = [len(v) for v in per_round["shapley"]]
    out["shapley_rank"] = np.argsort(-np.asarray(out["shapley_median"]), kind="stable").tolist()
    return out


def _summarize(exp: Experiment, state, history: list[dict[str, Any]]) -> dict[str, Any]:
    cfg, fed = exp.config, exp.federation
    final = history[-1]
    summary = {
        "metric": _metric(fed),
        "task": fed.task,
        "run_id": cfg.run_id(),
        "algorithm": cfg.algorithm,
        "aggregator": cfg.aggregator,
        "rounds": cfg.rounds,
        "backend": jax.default_backend(),
        "client_parallelism": dataclasses.asdict(exp.parallelism),
        "devices": 1 if exp.mesh is None else int(exp.mesh.devices.size),
        "executor": getattr(exp.round_fn, "description", {"kind": "process"}),
        "hospitals": [
            {
                "id": i,
                "vendor": fed.vendors[i],
                "train_size": int(fed.train_sizes[i]),
                "test_size": int(fed.test_sizes[i]),
                "train_pos_rate": float(fed.train_pos_rate[i]),
                **(fed.details[i] if fed.details else {}),
            }
            for i in range(fed.num_hospitals)
        ],
        "dataset": {"name": fed.name, **fed.info},
        "federated": _model_block(final, fed.label_names, _metric(fed)),
        "system": _system_summary(exp),
        "rejected_updates": [
            {"round": r["round"], "hospital": h, "reason": "non-finite update (NaN/Inf)"}
            for r in history
            for h in r["rejected"]
        ],
        "bytes_total": int(sum(r["bytes_up"] + r["bytes_down"] for r in history)),
    }
    if "personalized" in final:
        summary["personalized"] = _model_block(final["personalized"], fed.label_names, _metric(fed))
    if exp.contribution_fn is not None:
        summary["contribution"] = _contribution_summary(exp, history)
    return summary


def _metric(fed: Federation) -> str:
    """The headline metric: AUC, or Dice for segmentation."""
    return "dice" if fed.task == "segmentation" else "auc"


def _model_block(
    rec: dict[str, Any], label_names: tuple[str, ...] = (), metric: str = "auc"
) -> dict[str, Any]:
    block = {
        "mean": rec["global"][metric],
        "per_hospital": rec["per_hospital"][metric],
        "pooled_test": rec["global"]["pooled"][metric],
        "accuracy_mean": rec["global"]["accuracy"],
        "loss_mean": rec["global"]["loss"],
    }
    if metric != "auc":
        block["auc_mean"] = rec["global"]["auc"]  # pixel-level AUC for segmentation
    if "auc_per_label" in rec["global"]["pooled"]:
        per = np.asarray(rec["per_hospital"]["auc_per_label"], np.float64)
        names = label_names or tuple(str(k) for k in range(per.shape[-1]))
        valid = ~np.isnan(per)  # a hospital without a finding's positives has no AUC for it
        mean = np.where(valid, per, 0).sum(0) / np.maximum(valid.sum(0), 1)
        mean = np.where(valid.any(0), mean, np.nan)
        block["per_label"] = {
            name: {"pooled_test": pooled, "mean": float(m)}
            for name, pooled, m in zip(
                names, rec["global"]["pooled"]["auc_per_label"], mean, strict=True
            )
        }
    return block


def _baseline_block(
    ev: dict[str, Any], seconds: float, epochs: int, label_names: tuple[str, ...], metric: str
) -> dict[str, Any]:
    block = _model_block(_eval_record(ev), label_names, metric)
    return {**block, "epochs": epochs, "seconds": seconds}


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
    ev = jax.jit(lambda v, d: evaluate(exp.model, v, d, per_client_vars=True, task=fed.task))(
        local_vars, fed.test
    )
    jax.block_until_ready(ev)
    out["local"] = _baseline_block(
        ev, time.perf_counter() - t0, epochs, fed.label_names, _metric(fed)
    )

    if progress:
        print(f"baselines: pooled ({epochs} epochs on all data)...", file=sys.stderr)
    t0 = time.perf_counter()
    pooled = pool_clients(fed.train)
    pooled_fn = jax.jit(lambda v, d, k: train_pooled(v, d, k, exp.hparams, epochs))
    pooled_vars, _ = pooled_fn(init, pooled, jax.random.fold_in(base_key, cfg.hospitals))
    ev = jax.block_until_ready(exp.eval_fn(pooled_vars, fed.test))
    out["pooled"] = _baseline_block(
        ev, time.perf_counter() - t0, epochs, fed.label_names, _metric(fed)
    )
    return out
