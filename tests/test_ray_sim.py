"""``python -m sim --ray``: hospitals sharded over Ray actors give the single-process result."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sim.config import RunConfig
from sim.ray_sim import padded_share, shard_bounds
from sim.runner import RayOptions, run
from tests.test_runner import TINY as RUNNER_TINY

TINY = {**RUNNER_TINY, "hospitals": 4, "rounds": 3, "checkpoint_every": 5, "devices": 1}


def test_shard_bounds_and_padding():
    assert shard_bounds(10, 3).tolist() == [0, 3, 7, 10]
    assert shard_bounds(4, 4).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="cannot split 2 hospitals over 3 actors"):
        shard_bounds(2, 3)
    assert [padded_share(c, 3, 7) for c in (0, 1, 3, 4, 7)] == [3, 3, 3, 6, 7]


def rounds(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "extra",
    [
        {},  # full cohort, FedAvg
        # sampling, per-client state, and a robust rule (the stacked updates travel)
        {"algorithm": "scaffold", "client_fraction": 0.75, "aggregator": "median"},
    ],
    ids=["fedavg", "scaffold-median-sampled"],
)
def test_two_actors_equal_the_single_process_run(tmp_path, ray_cluster, extra):
    cfg = RunConfig(**TINY, **extra)
    single = run(cfg, tmp_path / "single", progress=False, plots=False)
    multi = run(
        cfg, tmp_path / "ray", progress=False, plots=False, ray_cluster=RayOptions(actors=2)
    )
    actors = multi["executor"]["actors"]
    assert multi["executor"]["kind"] == "ray" and len(actors) == 2
    assert [a["hospitals"] for a in actors] == [[0, 2], [2, 4]]
    assert len({a["pid"] for a in actors}) == 2
    a, b = rounds(tmp_path / "single"), rounds(tmp_path / "ray")
    for ra, rb in zip(a, b, strict=True):
        assert ra["cohort"] == rb["cohort"] and ra["client_steps"] == rb["client_steps"]
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-5)
        np.testing.assert_allclose(
            rb["per_hospital"]["loss"], ra["per_hospital"]["loss"], rtol=1e-4, atol=1e-6
        )
    assert multi["federated"]["mean"] == pytest.approx(single["federated"]["mean"], abs=1e-6)
    assert multi["run_id"] == single["run_id"]
