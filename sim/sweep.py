"""``python -m sim.sweep experiments/<file>.yaml [--address auto]``: a grid of runs on Ray.

The file names a ``base`` config and a ``grid`` (``{algorithm: [fedavg, fedprox], alpha: [0.1,
0.5], seed: [0, 1, 2]}``); every combination is one run, executed as a Ray task with the
declared ``resources`` (``{num_cpus: 1, num_gpus: 0}``) on a local cluster or, with
``--address``, an existing one. A run whose ``summary.json`` already holds its config's run id
is skipped (the sweep resumes where it stopped); a run whose worker dies is retried by Ray
(``max_retries``, default 2) and continues from its latest checkpoint, which ends bit-identical
to an uninterrupted run. The sweep ends with ``sweep.csv``, ``sweep.md``, ``sweep.json`` and
``sweep.png`` (mean +- std over seeds of every other grid point) in its ``out`` folder.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from sim.config import ConfigError, RunConfig
from sim.devices import worker_env
from sim.results import finished_summary, write_json

DEFAULT_RESOURCES = {"num_cpus": 1, "num_gpus": 0}
ATTEMPTS = "attempts.jsonl"  # one line per start of a run's task: pid, host, time


class SweepError(ValueError):
    """The sweep file is malformed; the message names the file and field."""


def run_name(point: dict[str, Any]) -> str:
    """Folder name of one grid point: ``algorithm-fedavg_alpha-0.1_seed-0``."""
    return "_".join(f"{k}-{v}" for k, v in point.items())


def expand_grid(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, in file order (last key varies fastest)."""
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*grid.values())]


def load_sweep(path: Path) -> dict[str, Any]:
    """Read and validate a sweep file; every run's config is validated before anything runs."""
    try:
        spec = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise SweepError(f"cannot read sweep file {path}: {err}") from err
    if not isinstance(spec, dict):
        raise SweepError(f"{path}: must hold a mapping with 'base' and 'grid'")
    grid = spec.get("grid")
    if not isinstance(grid, dict) or not grid:
        raise SweepError(f"{path}: needs a non-empty 'grid' mapping of key -> list of values")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"{path}: grid.{key} must be a non-empty list")
    base = spec.get("base") or {}
    if not isinstance(base, dict):
        raise SweepError(f"{path}: base must be a mapping of config keys")
    resources = {**DEFAULT_RESOURCES, **(spec.get("resources") or {})}
    for key, value in resources.items():
        if key not in DEFAULT_RESOURCES or not isinstance(value, int | float) or value < 0:
            raise SweepError(f"{path}: resources.{key} must be num_cpus / num_gpus >= 0")
    retries = spec.get("max_retries", 2)
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise SweepError(f"{path}: max_retries must be an integer >= 0, got {retries!r}")
    runs = {}
    for point in expand_grid(grid):
        name = run_name(point)
        try:
            runs[name] = (point, RunConfig.from_dict({**base, **point}, source=f"{path}: {name}"))
        except ConfigError as err:
            raise SweepError(str(err)) from err
    return {
        "name": spec.get("name", path.stem),
        "description": str(spec.get("description", "")).strip(),
        "out": Path(spec.get("out", f"results/sweeps/{path.stem}")),
        "grid": grid,
        "runs": runs,
        "resources": resources,
        "max_retries": retries,
        "command": f"python -m sim.sweep {path.as_posix()}",
    }


def attempts(workdir: Path) -> list[dict[str, Any]]:
    """Every recorded start of the run's task (a retried run has more than one)."""
    path = workdir / ATTEMPTS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def execute_run(config_dict: dict[str, Any], workdir: str, fresh: bool = False) -> dict[str, Any]:
    """Body of one sweep task (runs inside a Ray worker): record the attempt, then run the
    simulation, continuing from its latest checkpoint unless ``fresh`` (``--force``) or the
    folder holds another config."""
    import socket

    from sim.runner import run

    config = RunConfig.from_dict(config_dict)
    path = Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    saved = path / "config.json"
    same = saved.exists() and json.loads(saved.read_text()) == config.to_dict()
    if fresh and not (path / ATTEMPTS).exists():
        same = False  # --force: this sweep's first attempt starts over; its retries resume
    with (path / ATTEMPTS).open("a") as f:
        record = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}
        f.write(json.dumps(record) + "\n")
    return run(config, path, resume=same, progress=False)


def run_sweep(
    spec: dict[str, Any],
    *,
    address: str | None = None,
    num_cpus: int | None = None,
    force: bool = False,
    log=print,
) -> dict[str, Any]:
    """Run every grid point not finished yet as a Ray task; write and return the results."""
    from sim.ray_sim import import_ray

    out: Path = spec["out"]
    out.mkdir(parents=True, exist_ok=True)
    summaries: dict[str, dict[str, Any]] = {}
    failures: dict[str, str] = {}
    todo = []
    for name, (_, config) in spec["runs"].items():
        summary = None if force else finished_summary(out / name, config.run_id())
        if summary is not None:
            log(f"[{name}] done already")
            summaries[name] = summary
        else:
            todo.append(name)
    if todo:
        ray = import_ray()
        started_here = not ray.is_initialized()
        if started_here:
            ray.init(
                address=address,
                num_cpus=num_cpus if address is None else None,
                include_dashboard=False,
                log_to_driver=False,
            )
        res = spec["resources"]
        task = ray.remote(execute_run).options(
            num_cpus=res["num_cpus"],
            num_gpus=res["num_gpus"],
            max_retries=spec["max_retries"],
            runtime_env=worker_env(res["num_cpus"]),  # one XLA device per CPU held
        )
        pending = {}
        for name in todo:
            config = spec["runs"][name][1]
            if force:
                (out / name / "summary.json").unlink(missing_ok=True)
                (out / name / ATTEMPTS).unlink(missing_ok=True)
            pending[task.remote(config.to_dict(), str((out / name).resolve()), force)] = name
        log(f"{len(pending)} runs submitted ({len(spec['runs']) - len(pending)} done already)")
        t0 = time.perf_counter()
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            name = pending.pop(ready[0])
            try:
                summaries[name] = ray.get(ready[0])
                tries = len(attempts(out / name))
                log(
                    f"[{name}] {summaries[name]['federated']['mean']:.4f} "
                    f"({time.perf_counter() - t0:.0f} s, attempt {tries})"
                )
            except ray.exceptions.RayError as err:
                failures[name] = f"{type(err).__name__}: {str(err).splitlines()[0]}"
                log(f"[{name}] FAILED: {failures[name]}")
        if started_here:
            ray.shutdown()
    return write_results(spec, summaries, failures)


def _row(spec: dict[str, Any], name: str, summary: dict[str, Any] | None, error: str | None):
    point = spec["runs"][name][0]
    out: Path = spec["out"]
    row: dict[str, Any] = {"run": name, **point}
    if summary is None:
        return {**row, "status": "failed", "error": error}
    fed = summary["federated"]
    row.update(
        status="done",
        metric=summary["metric"],
        federated_mean=fed["mean"],
        pooled_test=fed["pooled_test"],
        personalized_mean=summary.get("personalized", {}).get("mean"),
        total_s=summary.get("timing", {}).get("total_s"),
        attempts=len(attempts(out / name)),
        run_id=summary["run_id"],
    )
    return row


def aggregate_over_seeds(rows: list[dict[str, Any]], keys: list[str]) -> list[dict[str, Any]]:
    """Mean, std and count of ``federated_mean`` per grid point of the non-seed keys."""
    groups: dict[tuple, list[float]] = {}
    for row in rows:
        if row["status"] == "done":
            groups.setdefault(tuple(row[k] for k in keys), []).append(row["federated_mean"])
    return [
        {
            **dict(zip(keys, point, strict=True)),
            "mean": float(np.mean(v)),
            "std": float(np.std(v)),
            "n": len(v),
        }
        for point, v in groups.items()
    ]


def write_results(
    spec: dict[str, Any], summaries: dict[str, dict], failures: dict[str, str]
) -> dict[str, Any]:
    """Write ``sweep.csv`` / ``sweep.md`` / ``sweep.json`` / ``sweep.png``; return the table."""
    out: Path = spec["out"]
    rows = [_row(spec, n, summaries.get(n), failures.get(n)) for n in spec["runs"]]
    keys = [k for k in spec["grid"] if k != "seed"]
    grouped = aggregate_over_seeds(rows, keys)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with (out / "sweep.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    table = {"name": spec["name"], "command": spec["command"], "runs": rows, "over_seeds": grouped}
    write_json(out / "sweep.json", table)
    (out / "sweep.md").write_text(_markdown(spec, rows, grouped, keys))
    _plot(
        grouped,
        keys,
        out / "sweep.png",
        metric=next((r["metric"] for r in rows if r.get("metric")), "auc"),
    )
    return table


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _cell(row: dict[str, Any], column: str, grid: dict[str, Any]) -> str:
    """Grid values as written in the file, seconds as integers, metrics with 4 decimals."""
    value = row.get(column)
    if column in grid or column == "n":
        return str(value)
    return _fmt(value, 0 if column == "total_s" else 4)


def _markdown(spec, rows, grouped, keys) -> str:
    lines = [f"# {spec['name']}", ""]
    if spec["description"]:
        lines += [spec["description"], ""]
    lines += [f"Reproduce: `{spec['command']}`", ""]
    cols = [*spec["grid"], "federated_mean", "pooled_test", "attempts", "total_s", "status"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(r, c, spec["grid"]) for c in cols) + " |" for r in rows]
    if "seed" in spec["grid"] and grouped:
        cols = [*keys, "mean", "std", "n"]
        lines += [
            "",
            "Mean over seeds:",
            "",
            "| " + " | ".join(cols) + " |",
            "|" + "---|" * len(cols),
        ]
        lines += [
            "| " + " | ".join(_cell(g, c, spec["grid"]) for c in cols) + " |" for g in grouped
        ]
    return "\n".join(lines) + "\n"


def _plot(grouped: list[dict[str, Any]], keys: list[str], path: Path, metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(grouped) + 2), 4))
    if grouped:
        labels = [", ".join(f"{k}={g[k]}" for k in keys) or "all" for g in grouped]
        x = np.arange(len(grouped))
        bars = ax.bar(x, [g["mean"] for g in grouped], yerr=[g["std"] for g in grouped], capsize=3)
        ax.bar_label(bars, labels=[f"{g['mean']:.3f}" for g in grouped], fontsize=7)
        ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
        lo = min(g["mean"] - g["std"] for g in grouped)
        ax.set_ylim(max(0.0, lo - 0.05), 1.0)
    ax.set_ylabel(f"mean per-hospital {metric.upper()} (mean +- std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m sim.sweep``."""
    p = argparse.ArgumentParser(prog="python -m sim.sweep", description=__doc__.split("\n")[0])
    p.add_argument("sweep", type=Path, help="experiments/<name>.yaml with base + grid")
    p.add_argument("--address", help="Ray cluster to join ('auto': the one started on this node)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray cluster (default: all)")
    p.add_argument("--force", action="store_true", help="rerun runs that already finished")
    args = p.parse_args(argv)
    try:
        spec = load_sweep(args.sweep)
    except SweepError as err:
        p.error(str(err))
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    try:
        table = run_sweep(
            spec, address=args.address, num_cpus=args.num_cpus, force=args.force, log=log
        )
    except ConfigError as err:
        p.error(str(err))
    print((spec["out"] / "sweep.md").read_text())
    failed = [r["run"] for r in table["runs"] if r["status"] != "done"]
    if failed:
        print(f"{len(failed)} runs failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
