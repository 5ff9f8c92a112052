"""``python -m sim.bench``: the engine's compiled round vs a Python loop over clients vs pooled
training of the same SGD steps, side by side in one process (interleaved repetitions, medians).
``python -m sim.bench scaling`` and ``python -m sim.bench flower`` run the other benchmarks.

Writes ``results/bench/engine.json``: round times per strategy, throughput ratios (>1 = engine
faster), achieved GFLOP/s and peak RSS.
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from medichain_jax import rng
from medichain_jax.engine.parallel import Parallelism, resolve
from medichain_jax.engine.round import build_round, replicate
from medichain_jax.fl.aggregators import weighted_mean
from medichain_jax.fl.baselines import pool_clients
from medichain_jax.fl.client import batch_loss, local_train
from sim.config import RunConfig
from sim.devices import use_host_cores
from sim.results import write_json
from sim.runner import build


def _timed(fn) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def step_flops(exp, data) -> float:
    """FLOPs of one minibatch forward + backward, from XLA's cost analysis."""
    bsz = exp.hparams.batch_size
    x, y = data.x[0, :bsz], data.y[0, :bsz]
    params = exp.model.init(jax.random.key(0))

    def step(v):
        return jax.grad(
            lambda p: batch_loss(exp.hparams, p, v["stats"], x, y, jnp.ones(bsz, bool))[0]
        )(v["params"])

    cost = jax.jit(step).lower(params).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", 0.0)) if cost else 0.0


SUITES = {"scaling": "sim.bench_scaling", "flower": "sim.bench_flower"}


def check_ratios(result: dict, reference: Path, tolerance: float) -> int:
    """Compare fresh speed ratios with a committed benchmark file; 1 if one dropped by more
    than ``tolerance`` (relative), else 0. Ratios are side-by-side measurements in one run, so
    they carry over between machines far better than absolute times."""
    import json

    if not reference.exists():
        print(f"error: no committed benchmark at {reference} to check against", file=sys.stderr)
        return 2
    ref = json.loads(reference.read_text())["ratios"]
    failed = 0
    print(f"{'ratio':<18}{'committed':>10}{'now':>8}{'floor':>8}  result")
    for name, old in ref.items():
        now = result["ratios"][name]
        floor = old * (1 - tolerance)
        ok = now >= floor
        failed += not ok
        print(f"{name:<18}{old:>10.2f}{now:>8.2f}{floor:>8.2f}  {'PASS' if ok else 'FAIL'}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """Run the engine benchmark and write its JSON (``scaling`` / ``flower``: the other
    benchmarks, ``python -m sim.bench scaling --help``)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SUITES:
        import importlib

        return importlib.import_module(SUITES[argv[0]]).main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m sim.bench", description=__doc__)
    p.add_argument("--hospitals", type=int, default=20)
    p.add_argument("--train-per-hospital", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--reps", type=int, default=5, help="timed repetitions of each contender")
    p.add_argument(
        "--strategies",
        default="map,vmap,chunked",
        help="engine strategies to time besides auto (comma-separated)",
    )
    p.add_argument("--out", type=Path, default=Path("results/bench/engine.json"))
    p.add_argument(
        "--check",
        action="store_true",
        help="compare the speed ratios with the committed --out file instead of writing it; "
        "exit 1 if one fell by more than --tolerance",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=0.3,
        help="--check: allowed relative drop of a ratio (default 0.3: these machines are noisy)",
    )
    args = p.parse_args(argv)
    use_host_cores()  # before jax starts: one XLA CPU device per core
    if args.hospitals < 1 or args.reps < 1:
        p.error("--hospitals and --reps must be >= 1")

    # the default workload: IID phantom (every hospital exactly N images), 64x64, batch 32
    cfg = RunConfig(
        hospitals=args.hospitals,
        train_per_hospital=args.train_per_hospital,
        batch_size=args.batch_size,
        non_iid=False,
    )
    exp = build(cfg)
    # single-device contenders read one copy; the mesh contender reuses build()'s replicated one
    data = jax.device_put(exp.federation.train, jax.devices()[0])
    state = exp.algorithm.init(exp.model.init(rng.stream(0, rng.INIT)))
    seed = jnp.uint32(0)
    n_clients = cfg.hospitals

    contenders = {}
    auto = resolve("auto")
    mesh = exp.mesh  # all local devices (one per core on CPU), as `python -m sim` uses
    kinds = [("auto", auto, mesh)] + [
        (f"{k}_1device", Parallelism(k, cfg.chunk), None) for k in args.strategies.split(",") if k
    ]
    for name, par, msh in kinds:
        rf = jax.jit(build_round(exp.algorithm, n_clients, n_clients, par, mesh=msh))
        st = replicate(state, msh)
        dt = data if msh is None else exp.federation.train
        compiled = rf.lower(st, dt, None, seed).compile()
        contenders[f"engine_{name}"] = lambda c=compiled, st=st, dt=dt: c(st, dt, None, seed)

    # Flower-style: a plain Python loop over clients of a jitted per-client epoch, then the mean
    client = jax.jit(lambda v, d, k: exp.algorithm.client_update(v, d, k, None))
    server = jax.jit(lambda s, u, w: exp.algorithm.server_update(s, weighted_mean.aggregate(u, w)))
    per_client = [jax.tree.map(lambda a, i=i: a[i], data) for i in range(n_clients)]

    def loop():
        outs = [
            client(state.params, per_client[i], rng.client_key(0, 0, i)) for i in range(n_clients)
        ]
        ups = jax.tree.map(lambda *u: jnp.stack(u), *[o.update for o in outs])
        return server(state, ups, jnp.stack([o.weight for o in outs]))

    contenders["python_loop"] = loop

    # centralized training of the same number of SGD steps (one epoch over the pooled data)
    pooled = jax.tree.map(jnp.asarray, pool_clients(data))
    pooled_fn = (
        jax.jit(lambda v, d, k: local_train(v, d, k, exp.hparams))
        .lower(state.params, pooled, jax.random.key(0))
        .compile()
    )
    contenders["pooled"] = lambda: pooled_fn(state.params, pooled, jax.random.key(0))

    for fn in contenders.values():  # warm-up (compilation, caches)
        jax.block_until_ready(fn())
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for rep in range(args.reps):
        for name, fn in contenders.items():  # interleaved so machine noise hits all alike
            times[name].append(_timed(fn))
        print(
            f"rep {rep + 1}/{args.reps}: "
            + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()),
            file=sys.stderr,
        )
    med = {k: statistics.median(v) for k, v in times.items()}

    # XLA counts a scan body once, so FLOPs = (one compiled SGD step) x (steps per round)
    steps_per_round = int(n_clients * -(-args.train_per_hospital // cfg.batch_size))
    flops = step_flops(exp, data) * steps_per_round
    result = {
        "workload": {
            "hospitals": n_clients,
            "images_per_hospital": args.train_per_hospital,
            "image": [cfg.image_size, cfg.image_size],
            "batch_size": cfg.batch_size,
            "local_epochs": cfg.local_epochs,
            "model": exp.model.name,
            "sgd_steps_per_round": steps_per_round,
        },
        "auto_strategy": {
            "kind": auto.kind,
            "chunk": auto.chunk,
            "devices": 1 if mesh is None else int(mesh.devices.size),
        },
        "round_s": med,
        "round_s_all": times,
        "ratios": {
            "engine_vs_loop": med["python_loop"] / med["engine_auto"],
            "engine_vs_pooled": med["pooled"] / med["engine_auto"],
        },
        "paired_ratios": {
            name: {
                "median": statistics.median(r),
                "min": min(r),
                "max": max(r),
            }
            for name, r in {
                "engine_vs_loop": [
                    a / b for a, b in zip(times["python_loop"], times["engine_auto"], strict=True)
                ],
                "engine_vs_pooled": [
                    a / b for a, b in zip(times["pooled"], times["engine_auto"], strict=True)
                ],
            }.items()
        },
        "gflops": flops / med["engine_auto"] / 1e9,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "machine": {
            "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()],
            "cpu_count": __import__("os").cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "jax": jax.__version__,
        },
        "reps": args.reps,
    }
    if args.check:
        return check_ratios(result, args.out, args.tolerance)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)
    print(f"\n{'contender':<18}{'round s (median)':>18}{'engine_auto speedup':>22}")
    for name, t in med.items():
        print(f"{name:<18}{t:>18.3f}{t / med['engine_auto']:>22.2f}")
    r = result["ratios"]
    pr = result["paired_ratios"]
    for name, target in (("engine_vs_loop", 1.0), ("engine_vs_pooled", 0.85)):
        print(
            f"{name:<17}{r[name]:.2f}  (target >= {target}; per-rep pairs "
            f"{pr[name]['min']:.2f}..{pr[name]['max']:.2f}, median {pr[name]['median']:.2f})"
        )
    print(f"{result['gflops']:.1f} GFLOP/s, peak RSS {result['peak_rss_mb']:.0f} MiB -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
