"""``python -m sim.bench scaling``: round time and peak memory as the federation and the cohort
grow (10, 100, 1,000 hospitals; cohorts of 10 to 200 of 1,000; 10,000 registered hospitals).

Every point runs in its own process (so its peak RSS is its own) through ``sim.runner.build``
and ``sim.runner.play_round``, exactly as ``python -m sim`` does: with client sampling only
the cohort's rows reach the compiled round, so its buffers follow the cohort, not the
federation. Writes ``results/bench/scaling.json`` and ``scaling.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sim.results import write_json

# (hospitals, cohort sizes, train images per hospital, test images per hospital, non-IID)
FEDERATION_POINTS = [(10, [10], 256, 64, True), (100, [100], 256, 64, True)]
LARGE_POINT = (1000, [10, 50, 100, 200], 256, 64, True)
REGISTERED_POINT = (10000, [100], 50, 8, False)


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measure_point(
    hospitals: int, cohorts: list[int], train: int, test: int, non_iid: bool, rounds: int
) -> dict[str, Any]:
    """Build the federation once, then time ``rounds`` rounds (after a compile round) for each
    cohort size, in increasing order; peak RSS is read after each."""
    from sim.devices import use_host_cores

    use_host_cores()
    import jax
    import jax.numpy as jnp

    from medichain_jax import rng
    from medichain_jax.fl.algorithm import initial_client_states
    from sim.config import RunConfig
    from sim.runner import build, compile_round, play_round, training_parts

    t0 = time.perf_counter()
    out: dict[str, Any] = {"hospitals": hospitals, "train_per_hospital": train, "non_iid": non_iid}
    for i, m in enumerate(sorted(cohorts)):
        cfg = RunConfig(
            hospitals=hospitals,
            client_fraction=m / hospitals,
            train_per_hospital=train,
            test_per_hospital=test,
            non_iid=non_iid,
        )
        if i == 0:
            exp = build(cfg)
            fed = exp.federation
            out["build_s"] = time.perf_counter() - t0
            out["rss_after_data_gib"] = _rss_gib()
            out["federation_gib"] = (fed.train.x.nbytes + fed.test.x.nbytes) / 2**30
            out["capacity"] = fed.train.capacity
        else:  # the same federation, the round compiled for this cohort size
            mesh, round_fn, sample_fn = compile_round(cfg, training_parts(cfg, exp.federation))
            exp = dataclasses.replace(
                exp, config=cfg, mesh=mesh, round_fn=round_fn, sample_fn=sample_fn
            )
        assert cfg.cohort_size == m
        init = exp.model.init(rng.stream(cfg.seed, rng.INIT))
        state = exp.algorithm.init(init)
        cstates = initial_client_states(exp.algorithm, init, hospitals)
        seed = jnp.uint32(cfg.seed)
        times = []
        for _ in range(rounds + 1):
            t = time.perf_counter()
            state, cstates, _ = play_round(exp, state, cstates, seed)
            jax.block_until_ready(state)
            times.append(time.perf_counter() - t)
        out.setdefault("cohorts", []).append(
            {
                "cohort": m,
                "first_round_s": times[0],
                "round_s": statistics.median(times[1:]),
                "round_s_all": times[1:],
                "clients_per_s": m / statistics.median(times[1:]),
                "peak_rss_gib": _rss_gib(),
                "strategy": exp.parallelism.kind,
                "devices": 1 if exp.mesh is None else int(exp.mesh.devices.size),
            }
        )
    out["total_s"] = time.perf_counter() - t0
    return out


def _plot(points: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for p in points:
        xs = [c["cohort"] for c in p["cohorts"]]
        label = f"{p['hospitals']} hospitals x {p['train_per_hospital']} images"
        ax1.plot(xs, [c["round_s"] for c in p["cohorts"]], "o-", label=label)
        ax2.plot(xs, [c["peak_rss_gib"] for c in p["cohorts"]], "o-", label=label)
    ax1.set(xscale="log", yscale="log", xlabel="cohort (hospitals per round)")
    ax1.set(ylabel="round seconds (median)")
    ax2.set(xscale="log", xlabel="cohort (hospitals per round)", ylabel="peak RSS (GiB)")
    ax1.legend(fontsize=7)
    ax1.grid(alpha=0.3)
    ax2.grid(alpha=0.3)
    fig.suptitle("MediChain scaling (one process, CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Measure every point in its own subprocess; write the JSON and the plot."""
    p = argparse.ArgumentParser(prog="python -m sim.bench scaling", description=__doc__)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per point (after compile)")
    p.add_argument("--skip-large", action="store_true", help="only 10 and 100 hospitals")
    p.add_argument("--out", type=Path, default=Path("results/bench/scaling.json"))
    p.add_argument("--point", help=argparse.SUPPRESS)  # internal: one point, JSON to stdout
    args = p.parse_args(argv)
    if args.point:
        n, cohorts, train, test, non_iid = json.loads(args.point)
        print(json.dumps(measure_point(n, cohorts, train, test, non_iid, args.rounds)))
        return 0
    points = list(FEDERATION_POINTS)
    if not args.skip_large:
        points += [LARGE_POINT, REGISTERED_POINT]
    results = []
    for point in points:
        print(f"measuring {point[0]} hospitals, cohorts {point[1]} ...", file=sys.stderr)
        cmd = [sys.executable, "-m", "sim.bench_scaling", "--point", json.dumps(point)]
        cmd += ["--rounds", str(args.rounds)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            print(res.stderr[-3000:], file=sys.stderr)
            return 1
        results.append(json.loads(res.stdout.strip().splitlines()[-1]))
        for c in results[-1]["cohorts"]:
            print(
                f"  cohort {c['cohort']:>4}: {c['round_s']:.2f} s/round, "
                f"{c['clients_per_s']:.1f} clients/s, peak RSS {c['peak_rss_gib']:.2f} GiB",
                file=sys.stderr,
            )
    import jax

    payload = {
        "points": results,
        "rounds": args.rounds,
        "note": "one process per point; rounds exclude evaluation; RSS includes the federation "
        "held in host memory (federation_gib) and the compiled round's buffers",
        "machine": {
            "backend": jax.default_backend(),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "jax": jax.__version__,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, payload)
    _plot(results, args.out.with_suffix(".png"))
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
