"""Entry point of the Flower side of ``python -m sim.bench_flower``, run by the Flower venv's
python (``.venv-flower/bin/python sim/flower_side/run_flower.py --data W.npz ...``).

Runs Flower's simulation engine (``flwr.simulation.run_simulation``: a ServerApp thread and a
Ray actor pool running the ClientApp) on an exported workload and prints one JSON line with the
per-round wall times measured inside the run (Ray and simulation start-up excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import flower_app
import flwr
import numpy as np
import ray
import torch
from flwr.simulation import run_simulation


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (the driver passes every one)."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", required=True, help="workload .npz (x NHWC, y, num_examples)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--cohort", type=int, required=True, help="clients trained per round")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument(
        "--client-cpus",
        type=float,
        default=2.0,
        help="Ray CPUs per client actor (Flower's default: 2); torch threads = this",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the simulation and print its timings as one JSON line."""
    args = parse_args(argv)
    with np.load(args.data) as f:
        sizes = f["num_examples"]
        image_size = int(f["image_size"])
    num_clients = len(sizes)
    threads = max(1, int(args.client_cpus))
    torch.set_num_threads(threads)  # the ServerApp thread's torch (initial weights only)
    strategy = flower_app.TimedFedAvg(
        fraction_train=args.cohort / num_clients,
        fraction_evaluate=0.0,  # no federated evaluation (off on both sides)
        min_train_nodes=args.cohort,
        min_evaluate_nodes=0,
        min_available_nodes=num_clients,
    )
    train_config = {
        "data": os.path.abspath(args.data),
        "epochs": args.epochs,
        "batch-size": args.batch_size,
        "lr": args.lr,
        "momentum": args.momentum,
        "threads": threads,
        "image-size": image_size,
    }
    backend_config = {
        "client_resources": {"num_cpus": args.client_cpus, "num_gpus": 0.0},
        "init_args": {"num_cpus": os.cpu_count() or 1},
    }
    t0 = time.perf_counter()
    run_simulation(
        server_app=flower_app.make_server_app(strategy, args.rounds, train_config),
        client_app=flower_app.client_app,
        num_supernodes=num_clients,
        backend_config=backend_config,
    )
    total_s = time.perf_counter() - t0
    result = {
        "side": "flower",
        "round_s": strategy.round_s,
        "client_train_s": strategy.client_train_s,
        "cohorts": strategy.cohorts,
        "steps": strategy.steps,
        "total_s": total_s,
        "startup_s": total_s - sum(strategy.round_s),
        "num_clients": num_clients,
        "params": flower_app.num_params(flower_app.SmallCNN(image_size=image_size)),
        "client_cpus": args.client_cpus,
        "torch_threads": threads,
        "versions": {
            "flwr": flwr.__version__,
            "ray": ray.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
