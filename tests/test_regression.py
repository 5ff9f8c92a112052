"""The regression guard: the committed reference still holds, and the guard trips on a broken
change; the speed check compares ratios with a committed benchmark."""

import json

import pytest

from sim.bench import check_ratios
from sim.regression import CASES, check, compare


def test_a_fast_subset_matches_the_committed_reference():
    problems, numbers = check(["fedavg-noniid", "topk"])
    assert problems == []
    assert all(n["auc"] > 0.6 for n in numbers.values())  # the cases do learn


def test_the_guard_trips_on_a_broken_learning_rate():
    problems, numbers = check(["fedavg-iid"], overrides={"lr": 1e-4})
    assert numbers["fedavg-iid"]["auc"] < 0.6
    assert any("dropped below the reference" in p for p in problems)
    assert any("same seed, different numbers" in p for p in problems)


def test_compare_by_hand():
    ref = {"auc": 0.70, "train_loss": 0.5}
    assert compare("x", {"auc": 0.70, "train_loss": 0.5}, ref, 0.02) == []
    drift = compare("x", {"auc": 0.7005, "train_loss": 0.50001}, ref, 0.02)
    assert drift == []  # float noise, not a change
    better = compare("x", {"auc": 0.75, "train_loss": 0.45}, ref, 0.02)
    assert len(better) == 1 and "different numbers" in better[0]  # a change even if better
    worse = compare("x", {"auc": 0.67, "train_loss": 0.6}, ref, 0.02)
    assert len(worse) == 2


@pytest.mark.slow
def test_every_case_matches_the_committed_reference():
    problems, numbers = check()
    assert problems == [] and set(numbers) == set(CASES)


def test_bench_check_compares_ratios(tmp_path, capsys):
    ref = tmp_path / "engine.json"
    ref.write_text(json.dumps({"ratios": {"engine_vs_loop": 2.0, "engine_vs_pooled": 1.0}}))
    ok = {"ratios": {"engine_vs_loop": 1.7, "engine_vs_pooled": 1.1}}
    assert check_ratios(ok, ref, 0.3) == 0
    slow = {"ratios": {"engine_vs_loop": 1.3, "engine_vs_pooled": 1.1}}
    assert check_ratios(slow, ref, 0.3) == 1
    assert "FAIL" in capsys.readouterr().out
    assert check_ratios(ok, tmp_path / "missing.json", 0.3) == 2
