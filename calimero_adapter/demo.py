"""``python -m calimero_adapter.demo --hospitals 3 --rounds 3 --out DIR``: the real mode end to end.

Starts emulated merod nodes (``calimero_adapter.emulator``; not real Calimero nodes) unless
``--nodes URL,...`` and ``--context`` name real ones (then the first node is the coordinator's,
one more per hospital), runs the coordinator and one site runner per hospital as separate
processes over loopback HTTP on phantom data, then trains the same config with the simulation
engine in this process and writes ``DIR/summary.json`` with ``max_abs_diff_vs_simulation``
(final global params), the coordinator's summary and each hospital's audit log counts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from calimero_adapter.site import Audit, load_key
from medichain_jax.codec import decode_tree
from medichain_jax.engine.round import build_round
from medichain_jax.privacy.envelope import public_key_hex
from sim.config import RunConfig
from sim.parts import with_residuals
from sim.results import write_json

# what may leave a hospital: manifests (registration, updates, metrics of the final model, the
# secure-aggregation messages: public keys, encrypted shares, reveals) and update blobs
ALLOWED_PAYLOADS = {
    ("manifest", "registration"),
    ("manifest", "update"),
    ("manifest", "eval"),
    ("manifest", "secagg-keys"),
    ("manifest", "secagg-shares"),
    ("manifest", "secagg-reveal"),
    ("blob", "update"),
}


def demo_config(hospitals: int, rounds: int, seed: int = 0, secagg: bool = False) -> RunConfig:
    """A small non-IID phantom federation that trains in seconds per round on 2 cores (with
    ``secagg``: updates clipped to norm 2 and securely aggregated)."""
    extra = {"secagg": "fast", "clip_norm": 2.0} if secagg else {}
    return RunConfig(
        **extra,
        hospitals=hospitals,
        rounds=rounds,
        seed=seed,
        non_iid=True,
        train_per_hospital=64,
        test_per_hospital=16,
        image_size=32,
        batch_size=16,
        client_parallelism="map",
        devices=1,
    )


def simulate(config: RunConfig) -> Any:
    """The simulation engine's final global params for ``config`` (one device, as configured)."""
    from calimero_adapter.training import load_participant

    p = load_participant(config)
    round_fn = jax.jit(
        build_round(
            p.parts.algorithm,
            config.hospitals,
            config.cohort_size,
            p.parts.parallelism,
            p.parts.aggregator,
            clip_norm=config.clip_norm,
            dp=None if p.parts.privacy is None else p.parts.privacy.client_dp,
            secagg=config.secagg != "off",
            compressor=p.parts.compressor,
        )
    )
    state = p.initial_state()
    clients = None
    train = jax.device_put(p.federation.train)
    seed = jnp.asarray(config.seed, jnp.uint32)
    from medichain_jax.fl.algorithm import initial_client_states

    clients = initial_client_states(p.parts.algorithm, p.init_vars, config.hospitals)
    if p.parts.compressor is not None:  # error feedback: a residual per hospital, as the runner
        from calimero_adapter.training import update_template

        clients = with_residuals(p.parts.compressor, clients, update_template(p), config.hospitals)
    for _ in range(config.rounds):
        state, clients, _ = round_fn(state, train, clients, seed)
    return jax.tree.map(np.asarray, state.params)


def max_abs_diff(a: Any, b: Any) -> float:
    """Largest absolute difference over all leaves."""
    diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)
    return max(jax.tree.leaves(diffs), default=0.0)


def audit_report(workdir: Path) -> dict[str, Any]:
    """What left one hospital, by (kind, what), and whether it was only manifests and updates."""
    rows = Audit(workdir / "audit.jsonl").read()
    counts: dict[str, int] = {}
    for r in rows:
        counts[f"{r['kind']}:{r['what']}"] = counts.get(f"{r['kind']}:{r['what']}", 0) + 1
    only = all((r["kind"], r["what"]) in ALLOWED_PAYLOADS for r in rows)
    return {
        "payloads": counts,
        "bytes": sum(r["size"] for r in rows),
        "only_manifests_and_updates": only,
    }


def spawn(args: list[str], log: Path) -> subprocess.Popen:
    """A participant process (``python -m ...``) with its output in ``log``."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    f = log.open("w")
    return subprocess.Popen(
        [sys.executable, "-m", *args], stdout=f, stderr=subprocess.STDOUT, env=env
    )


def run_demo(
    hospitals: int,
    rounds: int,
    out: Path,
    *,
    nodes: list[str] | None = None,
    context: str | None = None,
    seed: int = 0,
    secagg: bool = False,
    timeout_s: float = 900.0,
) -> dict[str, Any]:
    """Run the demo; returns (and writes) ``out/summary.json``."""
    out.mkdir(parents=True, exist_ok=True)
    config = demo_config(hospitals, rounds, seed, secagg)
    cfg_path = out / "config.json"
    write_json(cfg_path, config.to_dict())
    network = None
    if nodes is None:
        from calimero_adapter.emulator import EmulatedNetwork

        network = EmulatedNetwork(auth=False, seed=seed)
        emulated = [network.add_node(f"node{i}") for i in range(hospitals + 1)]
        context = network.create_context()
        nodes = [n.url for n in emulated]
    if context is None or len(nodes) < hospitals + 1:
        raise ValueError(f"need a context and {hospitals + 1} node URLs, got {len(nodes)}")
    sites = [f"hospital-{i}" for i in range(hospitals)]
    key_file = out / "coordinator" / "coordinator.key"
    coordinator_key = public_key_hex(load_key(key_file))
    t0 = time.perf_counter()
    procs = {
        "coordinator": spawn(
            [
                "calimero_adapter.coordinate",
                "--node", nodes[0], "--context", context, "--config", str(cfg_path),
                "--sites", ",".join(sites), "--out", str(out / "coordinator"),
                "--key-file", str(key_file), "--deadline", "120",
            ],
            out / "coordinator.log",
        )
    }  # fmt: skip
    for i, site in enumerate(sites):
        procs[site] = spawn(
            [
                "calimero_adapter.site",
                "--node", nodes[i + 1], "--context", context, "--config", str(cfg_path),
                "--site", site, "--hospital", str(i), "--coordinator-key", coordinator_key,
                "--workdir", str(out / "sites" / site),
            ],
            out / f"{site}.log",
        )  # fmt: skip
    codes: dict[str, int | None] = {}
    try:
        deadline = time.monotonic() + timeout_s
        for name, proc in procs.items():
            try:
                codes[name] = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[name] = None
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
        if network is not None:
            network.close()
    seconds = time.perf_counter() - t0
    summary: dict[str, Any] = {
        "mode": "emulated merod nodes" if network is not None else "live nodes",
        "nodes": nodes,
        "context_id": context,
        "hospitals": hospitals,
        "rounds": rounds,
        "secure_aggregation": secagg,
        "exit_codes": codes,
        "seconds": seconds,
    }
    coord = out / "coordinator"
    if all(c == 0 for c in codes.values()) and (coord / "global_params.bin").exists():
        sim_params = simulate(config)
        real = decode_tree((coord / "global_params.bin").read_bytes(), sim_params)
        summary["max_abs_diff_vs_simulation"] = max_abs_diff(real, sim_params)
        summary["coordinator"] = json.loads((coord / "summary.json").read_text())
    else:
        summary["max_abs_diff_vs_simulation"] = None
        summary["error"] = "a participant failed: see the logs in " + str(out)
    summary["audit"] = {s: audit_report(out / "sites" / s) for s in sites}
    write_json(out / "summary.json", summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m calimero_adapter.demo``."""
    p = argparse.ArgumentParser(
        prog="python -m calimero_adapter.demo", description=__doc__.split("\n")[0]
    )
    p.add_argument("--hospitals", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--nodes", help="real node URLs, comma-separated: coordinator's first")
    p.add_argument("--context", help="the context id on the real nodes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--secagg", action="store_true", help="secure aggregation of the updates")
    args = p.parse_args(argv)
    if args.hospitals < 2 or args.rounds < 1:
        p.error("need --hospitals >= 2 and --rounds >= 1")
    nodes = args.nodes.split(",") if args.nodes else None
    if nodes is not None and not args.context:
        p.error("--nodes needs --context")
    s = run_demo(
        args.hospitals,
        args.rounds,
        args.out,
        nodes=nodes,
        context=args.context,
        seed=args.seed,
        secagg=args.secagg,
    )
    print(
        json.dumps(
            {k: s[k] for k in ("mode", "exit_codes", "max_abs_diff_vs_simulation", "seconds")}
        )
    )
    return 0 if s["max_abs_diff_vs_simulation"] is not None else 1


if __name__ == "__main__":
    sys.exit(main())
