"""Command-line flags of ``python -m sim``; bad flags end with a one-line message, not a traceback."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medichain_jax.engine.parallel import STRATEGIES
from medichain_jax.models import MODELS, NORMS
from sim.config import ALGORITHMS, DATASETS, SERVER_OPTIMIZERS, ConfigError, RunConfig
from sim.devices import use_host_cores


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
    p.add_argument("--server-lr", type=_float, help=f"server learning rate (default {d.server_lr})")
    p.add_argument(
        "--server-optimizer",
        choices=SERVER_OPTIMIZERS,
        help="optax server optimizer (default sgd = FedAvg)",
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
    p.add_argument("--algorithm", choices=ALGORITHMS, help="federated algorithm (default fedavg)")
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
    return p


RUN_ONLY = ("config", "out", "resume", "stop_after", "no_progress")


def parse(argv: list[str] | None = None) -> tuple[RunConfig, argparse.Namespace]:
    """Parse flags into a validated RunConfig plus the run-only options."""
    parser = build_parser()
    args = parser.parse_args(argv)
    values = vars(args)
    try:
        config = RunConfig.load(values["config"]) if "config" in values else RunConfig()
        overrides = {k: v for k, v in values.items() if k not in RUN_ONLY}
        merged = {**config.to_dict(), **overrides}
        config = RunConfig.from_dict(merged, source="flags")
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
    summary = run(
        config,
        out,
        resume=getattr(args, "resume", False),
        stop_after=getattr(args, "stop_after", None),
        progress=not getattr(args, "no_progress", False),
    )
    if "stopped_after" in summary:
        print(f"stopped after round {summary['stopped_after']}; continue with --resume --out {out}")
        return 0
    fed = summary["federated"]
    print(
        f"federated: mean per-hospital AUC {fed['mean']:.4f}, pooled-test AUC {fed['pooled_test']:.4f}"
    )
    for name in ("local", "pooled"):
        if name in summary:
            print(f"{name + ':':10} mean per-hospital AUC {summary[name]['mean']:.4f}")
    print(f"results: {out}/ (config.json, metrics.jsonl, summary.json, plots/, checkpoints/)")
    return 0
