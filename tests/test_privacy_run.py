"""DP runs end to end: epsilon on every metrics line (as dp-accounting computes it), the privacy
report, the budget stop and calibration, record-level DP-SGD, resume, and the flags."""

import json
import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp

from sim.cli import parse
from sim.config import ConfigError, RunConfig
from sim.runner import run

TINY = dict(
    hospitals=4,
    rounds=4,
    train_per_hospital=24,
    test_per_hospital=8,
    image_size=16,
    batch_size=8,
    checkpoint_every=1,
)


def lines(path):
    return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]


def rdp_epsilon(z, q, steps, delta):
    """dp-accounting's own answer, built here independently of medichain's accounting module."""
    event = dp_accounting.GaussianDpEvent(z)
    if q < 1:
        event = dp_accounting.PoissonSampledDpEvent(q, event)
    acc = rdp.RdpAccountant()
    acc.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return acc.get_epsilon(delta)


def without_timing(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def test_client_level_dp_run_reports_epsilon_each_round_and_resumes_exactly(tmp_path):
    cfg = RunConfig(
        **TINY,
        client_fraction=0.5,
        dp_clip=0.3,
        dp_noise=1.2,
        dp_adaptive_clip=True,
        dp_count_noise=1.0,
    )
    full = run(cfg, tmp_path / "full", progress=False, plots=False)
    recs = lines(tmp_path / "full")
    for r in recs:
        assert r["delta"] == 1e-5
        assert r["epsilon"] == pytest.approx(rdp_epsilon(1.2, 0.5, r["round"], 1e-5), rel=1e-9)
        assert 0 <= r["privacy"]["clipped_fraction"] <= 1
    clips = [r["privacy"]["clip_norm"] for r in recs]
    assert clips[0] == pytest.approx(0.3) and len(set(clips)) > 1  # adaptive: it moved
    p = full["privacy"]
    assert p["epsilon"] == recs[-1]["epsilon"] and p["rounds_accounted"] == 4
    assert p["noise_multiplier"] == 1.2 and p["sampling_rate"] == 0.5
    assert p["update_noise_multiplier"] == pytest.approx(1 / math.sqrt(1.2**-2 - 0.25))
    assert p["final_clip_norm"] == recs[-1]["privacy"]["next_clip_norm"]

    assert run(cfg, tmp_path / "part", stop_after=2, progress=False, plots=False) == {
        "stopped_after": 2
    }
    resumed = run(cfg, tmp_path / "part", resume=True, progress=False, plots=False)
    assert without_timing(lines(tmp_path / "part")) == without_timing(recs)
    assert resumed["privacy"] == full["privacy"]
    assert resumed["federated"] == full["federated"]


def test_target_epsilon_with_noise_stops_before_the_budget(tmp_path):
    z, target = 2.0, 4.2
    per_round = [rdp_epsilon(z, 1.0, r, 1e-5) for r in range(1, 5)]
    allowed = sum(e <= target for e in per_round)
    assert 0 < allowed < 4  # the budget ends mid-run
    cfg = RunConfig(**TINY, dp_clip=0.5, dp_noise=z, target_epsilon=target)
    s = run(cfg, tmp_path, progress=False, plots=False)
    recs = lines(tmp_path)
    assert len(recs) == allowed and s["rounds_trained"] == allowed
    assert all(r["epsilon"] <= target for r in recs)
    assert s["privacy"]["budget"] == "stop before exceeding the target"
    assert f"stopped before round {allowed + 1}" in s["privacy"]["stopped_early"]
    assert "global" in recs[-1]  # the last trained round was evaluated


def test_target_epsilon_without_noise_calibrates_it(tmp_path):
    cfg = RunConfig(**TINY, dp_clip=0.5, target_epsilon=5.0, accountant="pld")
    s = run(cfg, tmp_path, progress=False, plots=False)
    p = s["privacy"]
    assert p["noise_multiplier_source"].startswith("calibrated")
    assert p["epsilon"] <= 5.0 and p["epsilon"] == pytest.approx(5.0, rel=0.03)
    assert s["rounds_trained"] == 4 and p["stopped_early"] is None


def test_record_level_dp_run_accounts_each_hospital(tmp_path):
    cfg = RunConfig(
        **{**TINY, "rounds": 2},
        non_iid=True,
        client_fraction=0.75,
        dp_clip=1.0,
        dp_noise=1.1,
        dp_record_level=True,
    )
    s = run(cfg, tmp_path, progress=False, plots=False)
    sizes = [h["train_size"] for h in s["hospitals"]]
    taken = np.zeros(4, int)
    for r in lines(tmp_path):
        for h, steps in zip(r["cohort"], r["client_steps"], strict=True):
            taken[h] += steps > 0
        want = max(
            rdp_epsilon(1.1, min(1, 8 / n), int(k) * math.ceil(n / 8), r["delta"]) if k else 0.0
            for n, k in zip(sizes, taken, strict=True)
        )
        assert r["epsilon"] == pytest.approx(want, rel=1e-9)
        assert r["delta"] == min(1e-5, 1 / min(sizes))
    assert s["privacy"]["per_hospital_epsilon"][int(np.argmin(taken))] <= s["privacy"]["epsilon"]
    assert s["privacy"]["mechanism"].startswith("record-level DP-SGD")


def test_runs_without_dp_say_so(tmp_path):
    s = run(RunConfig(**{**TINY, "rounds": 1}), tmp_path, progress=False, plots=False)
    assert s["privacy"] == {"mechanism": "none", "epsilon": None, "delta": None}
    assert lines(tmp_path)[0]["epsilon"] is None


@pytest.mark.parametrize(
    ("flags", "field"),
    [
        (["--dp-noise", "1"], "dp_noise"),
        (["--dp-clip", "1"], "dp_noise"),
        (["--dp-clip", "0", "--dp-noise", "1"], "dp_clip"),
        (["--dp-clip", "1", "--dp-noise", "1", "--aggregator", "median"], "aggregator"),
        (["--dp-clip", "1", "--dp-noise", "1", "--delta", "2"], "delta"),
        (["--target-epsilon", "3"], "target_epsilon"),
        (["--dp-clip", "1", "--dp-noise", "1", "--dp-record-level", "--norm", "batch"], "norm"),
        (["--secagg"], "secagg"),
        (["--secagg", "exact", "--aggregator", "krum", "--clip-norm", "1"], "aggregator"),
        (["--dp-clip", "1", "--dp-noise", "1", "--ray"], "--ray"),
    ],
)
def test_bad_privacy_flags_exit_2_naming_the_field(flags, field, capsys):
    with pytest.raises(SystemExit) as exc:
        parse(flags)
    assert exc.value.code == 2
    assert field in capsys.readouterr().err


def test_privacy_flags_reach_the_config():
    cfg, _ = parse(
        [
            "--dp-clip",
            "0.5",
            "--target-epsilon",
            "8",
            "--delta",
            "1e-6",
            "--secagg",
            "--accountant",
            "pld",
        ]
    )
    assert (cfg.dp_clip, cfg.target_epsilon, cfg.delta, cfg.secagg, cfg.accountant) == (
        0.5,
        8.0,
        1e-6,
        "fast",
        "pld",
    )
    # published run ids stay the same: privacy fields at their defaults are left out
    assert RunConfig().run_id() == RunConfig(secagg="off", dp_clip=None).run_id()
    with pytest.raises(ConfigError, match="adaptive"):
        RunConfig(dp_clip=1.0, dp_noise=2.0, dp_adaptive_clip=True, hospitals=4)
