"""The Flower benchmark's own logic: workload definitions, data export, result assembly.

The end-to-end check needs the Flower venv (``python -m sim.bench_flower`` creates it) and is
``-m slow``.
"""

import json
import subprocess
import sys

import numpy as np
import pytest

from sim import bench_flower as bf


def _run(round_s, **extra):
    return {"round_s": list(round_s), **extra}


def test_workloads_are_the_issue_s():
    a, b = bf.WORKLOADS["A"].config(), bf.WORKLOADS["B"].config()
    assert (a.hospitals, a.train_per_hospital, a.cohort_size, a.non_iid) == (20, 256, 20, True)
    assert (b.hospitals, b.train_per_hospital, b.cohort_size, b.non_iid) == (1000, 50, 50, False)
    for cfg in (a, b):  # the same CNN and local training as `python -m sim`
        assert (cfg.model, cfg.local_epochs, cfg.batch_size, cfg.image_size) == ("cnn", 1, 32, 64)
        assert cfg.algorithm == "fedavg" and cfg.aggregator == "mean"
    assert (bf.WORKLOADS["A"].target, bf.WORKLOADS["B"].target) == (1.5, 10.0)


def test_flower_command_trains_like_ours():
    wl = bf.WORKLOADS["B"]
    cmd = bf.flower_command(bf.DEFAULT_VENV / "bin/python", wl, bf.ROOT / "B.npz", 4, 2.0)
    opts = dict(zip(cmd[2::2], cmd[3::2], strict=True))
    cfg = wl.config()
    assert opts["--cohort"] == "50" and opts["--rounds"] == "4"
    assert float(opts["--lr"]) == cfg.lr and float(opts["--momentum"]) == cfg.momentum
    assert int(opts["--batch-size"]) == cfg.batch_size and int(opts["--epochs"]) == 1
    assert cmd[1] == str(bf.FLOWER_SCRIPT) and bf.FLOWER_SCRIPT.exists()
    assert "PYTHONPATH" not in bf.flower_env()
    assert bf.flower_env()["FLWR_TELEMETRY_ENABLED"] == "0"


def test_export_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((3, 5, 8, 8, 1), dtype=np.float32)
    y = (rng.random((3, 5, 1)) > 0.5).astype(np.float32)
    n = np.array([5, 2, 4], np.int32)
    path = tmp_path / "w.npz"
    digest = bf.export_arrays(path, x, y, n)
    x2, y2, n2 = bf.load_exported(path)
    np.testing.assert_array_equal(x2, x)
    np.testing.assert_array_equal(y2, y)
    np.testing.assert_array_equal(n2, n)
    assert (x2.dtype, y2.dtype, n2.dtype) == (np.float32, np.float32, np.int32)
    with np.load(path) as f:
        assert int(f["image_size"]) == 8
    assert digest == bf.data_digest(x2, y2, n2)
    assert digest != bf.data_digest(x2, y2, np.array([5, 2, 3], np.int32))
    with pytest.raises(ValueError, match="want x"):
        bf.export_arrays(path, x[0], y[0], n)  # NHWC without the client axis


def test_summary_drops_first_round_and_divides_flower_by_ours():
    wl = bf.WORKLOADS["A"]
    ours = [_run([9.0, 1.0, 2.0, 3.0], steps=[166] * 4), _run([9.0, 2.0, 2.0, 2.0], steps=[166])]
    flower = [
        _run([30.0, 5.0, 6.0, 7.0], client_train_s=[20.0, 4.0, 4.0, 4.0], steps=[166]),
        _run([30.0, 6.0, 6.0, 6.0], client_train_s=[20.0, 3.0, 3.0, 3.0], steps=[166]),
    ]
    block = bf.summarize_workload(wl, ours, flower)
    assert block["ours_round_s"] == 2.0 and block["flower_round_s"] == 6.0
    assert block["speedup"] == 3.0 and block["meets_target"] is True
    assert block["speedup_per_rep"] == [3.0, 3.0]
    assert block["ours_first_round_s"] == [9.0, 9.0]
    assert block["flower_client_train_s"] == 3.5
    assert block["flower_framework_share"] == pytest.approx(1 - 3.5 / 6.0)
    assert block["sgd_steps_per_round"] == {"ours": 166, "flower": 166}
    assert block["workload"]["cohort"] == 20
    slow = bf.summarize_workload(wl, ours, [_run([1.0, 2.5, 2.5]), _run([1.0, 2.5])])
    assert slow["speedup"] == 1.25 and slow["meets_target"] is False
    json.dumps(block)  # plain JSON
    with pytest.raises(ValueError, match="at least 2 rounds"):
        bf.summarize_workload(wl, [_run([1.0])], [_run([1.0])])
    with pytest.raises(ValueError, match="same, non-zero"):
        bf.summarize_workload(wl, ours, flower[:1])


def test_setup_check_flags_unfair_comparisons():
    ours = {"data_digest": "d", "params": 34345, "cohorts": [20, 20], "steps": [166, 166]}
    flower = {"params": 34345, "cohorts": [20, 20], "steps": [166, 166]}
    assert bf.check_same_setup(ours, flower, "d") == []
    assert len(bf.check_same_setup(ours, {**flower, "params": 1}, "e")) == 2
    assert "steps" in bf.check_same_setup(ours, {**flower, "steps": [166, 80]}, "d")[0]


def test_side_output_is_the_last_json_line():
    out = 'INFO: round 1\n{"not": "a result"}\n{"side": "flower", "round_s": [1, 2]}\nbye\n'
    assert bf.parse_side_output(out) == {"side": "flower", "round_s": [1, 2]}
    with pytest.raises(ValueError, match="no JSON result"):
        bf.parse_side_output("INFO only\n{broken\n")


def test_proc_parsing_and_process_tree():
    line = "42 (ray::Worker (a) b) S 7 42 1 0 -1 4194304 10 0 0 0 250 50 30 20 20 0 1 0 5"
    ppid, cpu = bf.parse_proc_stat(line)
    assert ppid == 7 and cpu == pytest.approx(350 / bf._TICK)  # utime+stime+cutime+cstime
    table = {1: (0, 0.0), 7: (1, 1.0), 42: (7, 2.0), 43: (42, 3.0), 50: (1, 9.0)}
    assert bf.descendants(7, table) == {7, 42, 43}
    assert bf.descendants(43, table) == {43}


def test_foreign_cpu_excludes_the_measured_process_tree():
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; t = time.time()\nwhile time.time() - t < 1.0: pass"]
    )
    with bf.ForeignCpu(proc.pid, interval=0.1) as foreign:
        proc.wait()
    if not foreign.available:
        pytest.skip("no /proc")
    assert sum(foreign.ours.values()) > 0.5  # the busy child counts as ours, not another job's
    assert 0.0 <= foreign.share <= 1.0 and foreign.steal >= 0.0


def test_arguments_are_checked(capsys):
    with pytest.raises(SystemExit):
        bf.parse_args(["--help"])
    assert "--flower-venv" in capsys.readouterr().out
    args = bf.parse_args(["--workloads", "B, A", "--rounds", "3"])
    assert args.workloads == ["B", "A"] and args.reps == 3
    assert args.flower_client_cpus == 2.0 and args.flower_venv == bf.DEFAULT_VENV
    for bad in (
        ["--workloads", "C"],
        ["--rounds", "1"],
        ["--reps", "0"],
        ["--max-foreign-cpu", "0"],
        ["--retries", "-1"],
    ):
        with pytest.raises(SystemExit):
            bf.parse_args(bad)


def test_plot_writes_a_png(tmp_path):
    wl = bf.WORKLOADS["B"]
    block = bf.summarize_workload(wl, [_run([5.0, 0.5, 0.5])], [_run([9.0, 6.0, 6.0])])
    path = tmp_path / "flower.png"
    bf.plot({"B": block, "meta": {}}, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _flower_venv_ready() -> bool:
    python = bf.DEFAULT_VENV / "bin" / "python"
    if not python.exists():
        return False
    check = subprocess.run([str(python), "-c", "import flwr, ray, torch"], capture_output=True)
    return check.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(
    not _flower_venv_ready(),
    reason=f"no Flower venv at {bf.DEFAULT_VENV} (python -m sim.bench_flower creates it)",
)
def test_both_sides_run_end_to_end(tmp_path):
    out = tmp_path / "flower.json"
    argv = ["--workloads", "smoke", "--rounds", "2", "--reps", "1", "--out", str(out)]
    # a test measures nothing: no waiting for a quiet machine, no reruns of contended runs
    assert bf.main([*argv, "--quiet-wait", "0", "--retries", "0", "--max-foreign-cpu", "1"]) == 0
    result = json.loads(out.read_text())
    block = result["smoke"]
    assert block["ours_round_s"] > 0 and block["flower_round_s"] > 0
    assert block["speedup"] == pytest.approx(block["flower_round_s"] / block["ours_round_s"])
    assert block["sgd_steps_per_round"]["ours"] == block["sgd_steps_per_round"]["flower"] == 2
    assert result["meta"]["problems"] == []
    assert result["meta"]["versions"]["flwr"] == "1.42.0"
    assert out.with_suffix(".png").exists()
