"""``python -m sim.sweep``: grid expansion, validation, and a 4-run sweep on a local 2-CPU Ray
cluster that survives a killed worker and resumes."""

from __future__ import annotations

import csv
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from sim.sweep import SweepError, attempts, expand_grid, load_sweep, run_name, run_sweep

BASE = {
    "hospitals": 3,
    "rounds": 4,
    "train_per_hospital": 24,
    "test_per_hospital": 8,
    "image_size": 16,
    "batch_size": 8,
    "non_iid": True,
    "checkpoint_every": 1,
}


def write_sweep(tmp_path: Path, grid: dict, **extra) -> Path:
    path = tmp_path / "tiny.yaml"
    spec = {"name": "tiny", "out": str(tmp_path / "out"), "base": BASE, "grid": grid, **extra}
    path.write_text(json.dumps(spec))  # JSON is YAML
    return path


def test_every_committed_experiment_file_loads():
    from sim.compare import load_experiment

    root = Path(__file__).resolve().parent.parent / "experiments"
    files = sorted(root.glob("*.yaml"))
    assert any("grid" in f.read_text() for f in files)
    for f in files:
        spec = load_sweep(f) if "\ngrid:" in f.read_text() else load_experiment(f)
        assert spec["out"], f


def test_grid_expansion_and_names():
    grid = {"algorithm": ["fedavg", "fedprox"], "alpha": [0.1, 0.5], "seed": [0]}
    points = expand_grid(grid)
    assert len(points) == 4
    assert points[1] == {"algorithm": "fedavg", "alpha": 0.5, "seed": 0}
    assert run_name(points[2]) == "algorithm-fedprox_alpha-0.1_seed-0"


@pytest.mark.parametrize(
    ("grid", "extra", "message"),
    [
        ({}, {}, "non-empty 'grid'"),
        ({"alpha": []}, {}, "grid.alpha must be a non-empty list"),
        ({"alpah": [0.1]}, {}, "unknown key 'alpah'"),
        ({"alpha": [-1.0]}, {}, "alpha"),
        ({"seed": [0]}, {"resources": {"num_tpus": 1}}, "resources.num_tpus"),
        ({"seed": [0]}, {"max_retries": -1}, "max_retries"),
    ],
)
def test_bad_sweep_files_name_the_field(tmp_path, grid, extra, message):
    with pytest.raises(SweepError, match=message):
        load_sweep(write_sweep(tmp_path, grid, **extra))


def kill_first_worker(workdir: Path, killed: list[int]) -> None:
    """Wait for the run's first attempt to start (and finish a round), then SIGKILL it (a busy
    machine may take minutes to get there: the other runs of the sweep share its 2 CPUs)."""
    deadline = time.time() + 600
    while time.time() < deadline:
        tries = attempts(workdir)
        if tries and (workdir / "metrics.jsonl").exists():
            os.kill(tries[0]["pid"], signal.SIGKILL)
            killed.append(tries[0]["pid"])
            return
        time.sleep(0.05)


def test_sweep_on_local_ray_cluster_retries_a_killed_worker_and_resumes(tmp_path, ray_cluster):
    path = write_sweep(tmp_path, {"algorithm": ["fedavg", "fedprox"], "seed": [0, 1]})
    spec = load_sweep(path)
    victim = spec["out"] / "algorithm-fedprox_seed-0"
    killed: list[int] = []
    killer = threading.Thread(target=kill_first_worker, args=(victim, killed))
    killer.start()
    table = run_sweep(spec, log=lambda _: None)
    killer.join()

    assert killed, "the test never saw the victim run start"
    rows = {r["run"]: r for r in table["runs"]}
    assert len(rows) == 4 and all(r["status"] == "done" for r in rows.values())
    assert rows[victim.name]["attempts"] == 2  # Ray retried the run after its worker died
    assert len({r["run_id"] for r in rows.values()}) == 4
    # the retried run resumed from its checkpoint and ends where an uninterrupted run ends
    from sim.runner import run

    _, config = spec["runs"][victim.name]
    clean = run(config, tmp_path / "clean", progress=False, plots=False)
    # (this process shards over 3 fake devices, the worker ran on one: float sums differ in order)
    assert rows[victim.name]["federated_mean"] == pytest.approx(
        clean["federated"]["mean"], abs=1e-5
    )
    metrics = [json.loads(x) for x in (victim / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [1, 2, 3, 4]

    with (spec["out"] / "sweep.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 4
    assert "Mean over seeds" in (spec["out"] / "sweep.md").read_text()
    assert (spec["out"] / "sweep.png").stat().st_size > 1000

    # resuming: finished runs are skipped, a deleted result is the only one rerun
    (spec["out"] / "algorithm-fedavg_seed-1" / "summary.json").unlink()
    seen: list[str] = []
    again = run_sweep(load_sweep(path), log=seen.append)
    assert sum(m.endswith("] done already") for m in seen) == 3
    assert "1 runs submitted (3 done already)" in seen
    assert [r["federated_mean"] for r in again["runs"]] == [
        r["federated_mean"] for r in table["runs"]
    ]


def test_force_starts_a_finished_run_over_and_a_retry_resumes(tmp_path):
    """The task body without Ray: a retry (attempts logged) continues from the checkpoint, so a
    finished run is only summarized again; ``fresh`` (``--force``) trains it again."""
    from sim.config import RunConfig
    from sim.sweep import execute_run

    cfg = RunConfig(**{**BASE, "rounds": 2}).to_dict()
    first = execute_run(cfg, str(tmp_path))
    seconds = [json.loads(x)["seconds"] for x in (tmp_path / "metrics.jsonl").open()]
    again = execute_run(cfg, str(tmp_path))  # like a Ray retry: resumes at round 2 of 2
    assert again["federated"] == first["federated"]
    assert [json.loads(x)["seconds"] for x in (tmp_path / "metrics.jsonl").open()] == seconds
    (tmp_path / "attempts.jsonl").unlink()  # what run_sweep(force=True) does before submitting
    forced = execute_run(cfg, str(tmp_path), fresh=True)
    assert forced["federated"] == first["federated"]  # same seed, same numbers
    assert [json.loads(x)["seconds"] for x in (tmp_path / "metrics.jsonl").open()] != seconds
    assert len(attempts(tmp_path)) == 1
