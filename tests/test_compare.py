"""`python -m sim.compare`: experiment files, claims, derived contribution metrics, reuse."""

import json

import numpy as np
import pytest

from sim.compare import ExperimentError, check_claims, derived, load_experiment, run_experiment

TINY = (
    "base: {hospitals: 3, rounds: 1, train_per_hospital: 16, test_per_hospital: 8, "
    "image_size: 16, batch_size: 8}\n"
)


def test_bad_experiment_files_name_the_field(tmp_path):
    f = tmp_path / "e.yaml"
    f.write_text(TINY + "runs: {a: {aggregator: mode}}\n")
    with pytest.raises(ExperimentError, match=r"runs\.a.*aggregator"):
        load_experiment(f)
    f.write_text(TINY)
    with pytest.raises(ExperimentError, match="non-empty 'runs'"):
        load_experiment(f)
    f.write_text(TINY + "runs: {a: {}}\nclaims: [{left: a.x, op: '!=', right: 1}]\n")
    with pytest.raises(ExperimentError, match="claims"):
        load_experiment(f)


def test_claims_and_derived_metrics():
    summary = {
        "federated": {"mean": 0.8},
        "system": {"noisy_hospitals": [2]},
        "contribution": {"shapley": [0.3, 0.2, -0.1, 0.25], "loo": [0.1, 0.0, -0.2, 0.05]},
    }
    d = derived(summary)
    assert d["noisy_max_shapley"] == -0.1 and d["clean_min_shapley"] == 0.2
    assert d["clean_median_loo"] == 0.05
    results = {
        "a": {**summary, "contribution": {**summary["contribution"], **d}},
        "b": {"federated": {"mean": 0.7}},
    }
    spec = {
        "claims": [
            {"left": "b.federated.mean", "op": ">=", "right": "a.federated.mean", "plus": -0.05},
            {
                "left": "a.contribution.noisy_max_shapley",
                "op": "<",
                "right": "a.contribution.clean_min_shapley",
            },
        ]
    }
    claims = check_claims(spec, results)
    assert [c["passed"] for c in claims] == [False, True]
    with pytest.raises(ExperimentError, match="unknown run"):
        check_claims({"claims": [{"left": "z.federated.mean", "op": "<", "right": 1}]}, results)


def test_tiny_experiment_runs_then_reuses_finished_runs(tmp_path, capsys):
    f = tmp_path / "tiny.yaml"
    out = tmp_path / "out"
    f.write_text(
        TINY + f"out: {out}\nruns: {{mean: {{}}, median: {{aggregator: median}}}}\n"
        "claims: [{left: median.federated.mean, op: '>=', right: 0.0}]\n"
    )
    spec = load_experiment(f)
    first = run_experiment(spec, progress=False)
    assert set(first["runs"]) == {"mean", "median"} and first["claims"][0]["passed"]
    for name in ("comparison.json", "comparison.md", "comparison.png"):
        assert (out / name).exists()
    assert (
        f"Reproduce: `python -m sim.compare {f.as_posix()}`" in (out / "comparison.md").read_text()
    )
    assert first["command"] == f"python -m sim.compare {f.as_posix()}"
    capsys.readouterr()
    second = run_experiment(spec, progress=False)
    assert "done already" in capsys.readouterr().err
    assert (
        json.loads(json.dumps(second["runs"]["mean"]["federated_auc"]))
        == first["runs"]["mean"]["federated_auc"]
    )


def test_table_reports_ranks_of_noisy_hospitals():
    from sim.compare import _ranks, _table

    assert _ranks([0.3, 0.2, -0.1, 0.25]) == [1, 3, 4, 2]
    summary = {
        "federated": {"mean": 0.8, "pooled_test": 0.81},
        "timing": {"total_s": 3.0},
        "system": {"noisy_hospitals": [2]},
        "contribution": {
            "shapley": [0.3, 0.2, -0.1, 0.25],
            "loo": [0.1, 0.0, 0.2, 0.05],
            "shapley_median": [0.1, 0.2, 0.05, 0.3],
            "loo_median": [0.0, 0.0, 1.0, -1.0],
        },
    }
    text = _table({"name": "x"}, {"a": summary}, [])
    assert "| a | [2] | 4, 4 of 4 | 1, 1 of 4 |" in text
    d = derived(summary)
    assert d["noisy_max_shapley_median"] == 0.05 and d["clean_min_shapley_median"] == 0.1
    assert d["noisy_max_loo_median"] == 1.0 and d["clean_median_loo_median"] == 0.0


def test_privacy_rows_and_accuracy_vs_epsilon_plot(tmp_path):
    from sim.compare import _privacy_plot, _table

    def summary(auc, privacy):
        return {
            "federated": {"mean": auc, "pooled_test": auc},
            "timing": {"total_s": 1.0},
            "privacy": privacy,
        }

    def dp(eps, final=None):
        return {
            "mechanism": "record-level DP-SGD inside each hospital (Abadi et al. 2016): ...",
            "epsilon": eps,
            "delta": 1e-5,
            "noise_multiplier": 2.5,
            "clip_norm": 1.0,
            "final_clip_norm": final,
        }

    none = {"mechanism": "none", "epsilon": None, "delta": None}
    results = {
        "record-none": summary(0.86, none),
        "record-eps8": summary(0.8, dp(7.99)),
        "record-eps1": summary(0.6, dp(0.998, final=0.25)),
    }
    text = _table({"name": "p"}, results, [])
    assert "| record-none | none | inf | - | - | - | 0.8600 |" in text
    assert (
        "| record-eps8 | record-level DP-SGD inside each hospital | 7.990 | 1e-05 | 2.500 | 1 |"
        in text
    )
    assert "| 1 (0.25) | 0.6000 |" in text
    assert _privacy_plot(results, tmp_path / "privacy.png")
    assert (tmp_path / "privacy.png").stat().st_size > 10_000
    assert not _privacy_plot({"record-none": results["record-none"]}, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def test_flamby_table_per_hospital():
    from sim.compare import _table, flamby_table

    def fed(aucs):
        return {"mean": float(np.mean(aucs)), "per_hospital": aucs, "pooled_test": 0.0}

    base = {
        "federated": fed([0.7, 0.8]),
        "pooled": {"per_hospital": [0.9, 0.85]},
        "local": {"per_hospital": [0.6, 0.65]},
        "hospitals": [{"vendor": "GE"}, {"vendor": "Siemens"}],
        "timing": {"total_s": 1.0},
    }
    ditto = {
        "federated": fed([0.7, 0.7]),
        "personalized": fed([0.75, 0.8]),
        "timing": {"total_s": 1.0},
    }
    results = {"fedavg-baselines": base, "ditto": ditto}
    table = flamby_table(results, "fedavg-baselines")
    assert table["columns"] == {
        "pooled": [0.9, 0.85],
        "local": [0.6, 0.65],
        "ditto": [0.75, 0.8],  # personalized models where the algorithm has them
    }
    text = _table({"name": "t"}, results, [], table=table)
    assert "| 1 (Siemens) | 0.850 | 0.650 | 0.800 |" in text
    assert "| mean | **0.875** | **0.625** | **0.775** |" in text
    with pytest.raises(ExperimentError, match="baselines: true"):
        flamby_table({"ditto": ditto}, "ditto")
