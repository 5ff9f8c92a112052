"""Run a named comparison (several configs that differ from one base) and check its claims.

``python -m sim.compare experiments/<file>.yaml`` runs every entry of ``runs`` (each a set of
config overrides on ``base``) into ``<out>/<run name>/``, skipping runs whose ``summary.json``
already exists (``--force`` reruns them), then writes ``<out>/comparison.json``,
``comparison.md`` and ``comparison.png`` and prints each claim as PASS or FAIL.

A claim compares two values: ``{left: <run>.<metric>, op: "<" | "<=" | ">" | ">=",
right: <run>.<metric> or a number, plus: <number added to right>}``. Metrics are dotted
paths into ``summary.json`` (``federated.mean``, ``personalized.mean``) or the derived
contribution metrics ``contribution.noisy_max_shapley`` / ``clean_min_shapley`` / ... .
"""

from __future__ import annotations

import argparse
import json
import operator
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from sim.config import ConfigError, RunConfig
from sim.devices import use_host_cores
from sim.results import finished_summary, write_json

RANKED = ("shapley", "loo", "shapley_median", "loo_median")  # contribution scores compared
OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}


class ExperimentError(ValueError):
    """The experiment file is malformed; the message names the file and field."""


def load_experiment(path: Path) -> dict[str, Any]:
    """Read and validate an experiment file (configs are validated before anything runs)."""
    try:
        spec = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ExperimentError(f"cannot read experiment file {path}: {err}") from err
    if not isinstance(spec, dict) or not isinstance(spec.get("runs"), dict) or not spec["runs"]:
        hint = " (a 'grid' file is a sweep: python -m sim.sweep)" if "grid" in (spec or {}) else ""
        raise ExperimentError(f"{path}: needs a non-empty 'runs' mapping{hint}")
    base = spec.get("base") or {}
    spec["configs"] = {}
    for name, overrides in spec["runs"].items():
        try:
            spec["configs"][name] = RunConfig.from_dict(
                {**base, **(overrides or {})}, source=f"{path}: runs.{name}"
            )
        except ConfigError as err:
            msg = str(err)
            if not msg.startswith(str(path)):
                msg = f"{path}: runs.{name}: {msg}"
            raise ExperimentError(msg) from err
    for i, claim in enumerate(spec.get("claims") or []):
        if claim.get("op") not in OPS or "left" not in claim or "right" not in claim:
            raise ExperimentError(f"{path}: claims[{i}] needs left, op in {list(OPS)}, right")
    spec.setdefault("out", f"results/experiments/{path.stem}")
    spec.setdefault("command", f"python -m sim.compare {path.as_posix()}")
    return spec


def derived(summary: dict[str, Any]) -> dict[str, Any]:
    """Contribution metrics that separate noisy / Byzantine hospitals from clean ones."""
    contrib = summary.get("contribution")
    if not contrib:
        return {}
    system = summary.get("system", {})
    suspect = set(system.get("noisy_hospitals", [])) | set(system.get("byzantine", []))
    clean = np.array([i not in suspect for i in range(len(contrib["shapley"]))])
    out = {}
    for name in RANKED:
        scores = np.array(contrib.get(name, []))
        if suspect and clean.any() and len(scores) == len(clean):
            out[f"noisy_max_{name}"] = float(scores[~clean].max())
            out[f"clean_min_{name}"] = float(scores[clean].min())
            out[f"clean_median_{name}"] = float(np.median(scores[clean]))
    return out


def flamby_table(results: dict[str, dict], baselines: str) -> dict[str, Any]:
    """FLamby's benchmark table: per hospital, the AUC of pooled training, local-only training
    (both from run ``baselines``, made with ``--baselines``) and of every run (its personalized
    models where it has them, else the global model)."""
    if baselines not in results or "local" not in results[baselines]:
        raise ExperimentError(f"flamby_table: run {baselines!r} must exist and use baselines: true")
    base = results[baselines]
    columns = {"pooled": base["pooled"]["per_hospital"], "local": base["local"]["per_hospital"]}
    for name, s in results.items():
        if name != baselines:
            columns[name] = s.get("personalized", s["federated"])["per_hospital"]
    vendors = [h.get("vendor", "") for h in base.get("hospitals", [])]
    return {"hospitals": vendors, "columns": columns}


def bytes_to_target(workdir: Path, target: float) -> dict[str, Any]:
    """Communication cost of reaching ``target`` mean per-hospital AUC: the first evaluated
    round at or above it and the bytes (up + down) sent until then (None if never reached)."""
    sent = 0
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        sent += r["bytes_up"] + r["bytes_down"]
        if r.get("global", {}).get("auc", -1.0) >= target:
            return {"round": r["round"], "bytes": sent}
    return {"round": None, "bytes": None}


def _with_derived(summary: dict[str, Any]) -> dict[str, Any]:
    """``summary`` with the derived contribution metrics merged into its ``contribution``."""
    return {**summary, "contribution": {**summary.get("contribution", {}), **derived(summary)}}


def metric(results: dict[str, dict], ref: Any) -> float:
    """Resolve ``<run>.<dotted.path>`` (or a number) against the finished runs."""
    if isinstance(ref, int | float):
        return float(ref)
    run, _, path = str(ref).partition(".")
    if run not in results:
        raise ExperimentError(f"claim refers to unknown run {run!r}")
    value: Any = results[run]
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ExperimentError(f"run {run!r} has no metric {path!r}")
        value = value[part]
    return float(value)


def check_claims(spec: dict[str, Any], results: dict[str, dict]) -> list[dict[str, Any]]:
    """Evaluate every claim; returns them with their values and ``passed``."""
    checked = []
    for claim in spec.get("claims") or []:
        left = metric(results, claim["left"])
        right = metric(results, claim["right"]) + float(claim.get("plus", 0.0))
        checked.append(
            {
                **claim,
                "left_value": left,
                "right_value": right,
                "passed": bool(OPS[claim["op"]](left, right)),
            }
        )
    return checked


def _ranks(scores: list[float]) -> list[int]:
    """1-based rank of each score, highest first."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    ranks = np.empty(len(order), int)
    ranks[order] = np.arange(1, len(order) + 1)
    return ranks.tolist()


def _table(
    spec: dict[str, Any],
    results: dict[str, dict],
    claims: list[dict],
    cost: dict[str, dict] | None = None,
    table: dict[str, Any] | None = None,
) -> str:
    lines = [f"# {spec.get('name', 'comparison')}", "", spec.get("description", "").strip(), ""]
    if spec.get("command"):
        lines += [f"Reproduce: `{spec['command']}`", ""]
    lines += [
        "| run | federated AUC | personalized AUC | pooled-test AUC | rejected | time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in results.items():
        pers = s.get("personalized", {}).get("mean")
        lines.append(
            f"| {name} | {s['federated']['mean']:.4f} | "
            f"{'-' if pers is None else f'{pers:.4f}'} | {s['federated']['pooled_test']:.4f} | "
            f"{len(s.get('rejected_updates', []))} | {s['timing']['total_s']:.0f} |"
        )
    private = {n: s for n, s in results.items() if "privacy" in s}
    if any(s["privacy"].get("delta") is not None for s in private.values()):
        lines += [
            "",
            "| run | DP | epsilon | delta | noise multiplier | clip norm (final) | AUC |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, s in private.items():
            p = s["privacy"]
            if p.get("delta") is None:
                lines.append(f"| {name} | none | inf | - | - | - | {s['federated']['mean']:.4f} |")
                continue
            clip = f"{p['clip_norm']:g}"
            if p.get("final_clip_norm") is not None:
                clip += f" ({p['final_clip_norm']:.3g})"
            lines.append(
                f"| {name} | {p['mechanism'].split(' (')[0]} | {p['epsilon']:.3f} | "
                f"{p['delta']:g} | {p['noise_multiplier']:.3f} | {clip} | "
                f"{s['federated']['mean']:.4f} |"
            )
    if table:
        cols = list(table["columns"])
        lines += ["", "| hospital | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for i, vendor in enumerate(table["hospitals"]):
            cells = " | ".join(f"{table['columns'][c][i]:.3f}" for c in cols)
            lines.append(f"| {i} ({vendor}) | {cells} |")
        means = " | ".join(f"**{np.mean(table['columns'][c]):.3f}**" for c in cols)
        lines.append(f"| mean | {means} |")
    if cost:
        lines += [
            "",
            f"| run | round reaching AUC {spec['target_auc']} | MB sent until then (up + down) |",
            "|---|---|---|",
        ]
        for name, c in cost.items():
            mb = "not reached" if c["bytes"] is None else f"{c['bytes'] / 1e6:.1f}"
            lines.append(f"| {name} | {c['round'] or '-'} | {mb} |")
    contrib = {n: s for n, s in results.items() if s.get("contribution")}
    if contrib:
        lines += [
            "",
            "| run | noisy / Byzantine hospitals | Shapley rank: median, sum | LOO rank: median, sum |",
            "|---|---|---|---|",
        ]
        for name, s in contrib.items():
            system = s.get("system", {})
            suspect = sorted(
                set(system.get("noisy_hospitals", [])) | set(system.get("byzantine", []))
            )
            m = len(s["contribution"]["shapley"])
            ranks = {k: _ranks(v) for k, v in s["contribution"].items() if k in RANKED}
            cells = [
                "; ".join(
                    f"{ranks[k + '_median'][i] if k + '_median' in ranks else '-'}, "
                    f"{ranks[k][i]} of {m}"
                    for i in suspect
                )
                for k in ("shapley", "loo")
            ]
            lines.append(f"| {name} | {suspect} | {cells[0]} | {cells[1]} |")
    if claims:
        lines += ["", "| claim | left | right | result |", "|---|---|---|---|"]
        for c in claims:
            rhs = f"{c['right']}" + (f" {c['plus']:+g}" if c.get("plus") else "")
            lines.append(
                f"| {c['left']} {c['op']} {rhs} | {c['left_value']:.4f} | "
                f"{c['right_value']:.4f} | {'PASS' if c['passed'] else 'FAIL'} |"
            )
    return "\n".join(lines) + "\n"


def _plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fed = [results[n]["federated"]["mean"] for n in names]
    pers = [results[n].get("personalized", {}).get("mean", np.nan) for n in names]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names)), 4))
    x = np.arange(len(names))
    has_pers = not np.all(np.isnan(pers))
    width = 0.4 if has_pers else 0.6
    bars = [(ax.bar(x - (0.2 if has_pers else 0.0), fed, width, label="global model"), fed)]
    if has_pers:
        bars.append((ax.bar(x + 0.2, pers, width, label="personalized"), pers))
    for b, vals in bars:
        ax.bar_label(b, labels=[f"{v:.3f}" if np.isfinite(v) else "" for v in vals], fontsize=7)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("mean per-hospital AUC")
    ax.set_ylim(0.4, 1.0)
    if has_pers:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _privacy_plot(results: dict[str, dict], path: Path) -> bool:
    """AUC against epsilon, one line per DP mechanism (with its no-DP runs drawn at the right
    end, epsilon = inf); False (nothing written) when no run used DP."""
    dp = {n: s for n, s in results.items() if s.get("privacy", {}).get("delta") is not None}
    if not dp:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families: dict[str, list[tuple[float, float]]] = {}
    for s in dp.values():
        kind = s["privacy"]["mechanism"].split(" (")[0]
        families.setdefault(kind, []).append((s["privacy"]["epsilon"], s["federated"]["mean"]))
    finite = [e for pts in families.values() for e, _ in pts]
    inf_x = max(finite) * 3
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, (kind, pts) in enumerate(sorted(families.items())):
        color = f"C{i}"
        prefix = kind.split("-")[0]  # runs named <prefix>-... share the family's no-DP baseline
        base = [
            s["federated"]["mean"]
            for n, s in results.items()
            if n not in dp and n.startswith(prefix)
        ]
        pts = sorted(pts) + [(inf_x, b) for b in base[:1]]
        ax.plot([e for e, _ in pts], [a for _, a in pts], marker="o", color=color, label=kind)
        for e, a in pts:
            ax.annotate(f"{a:.3f}", (e, a), textcoords="offset points", xytext=(0, 6), fontsize=7)
    ax.set_xscale("log")
    ticks = sorted({round(e, 2) for e in finite})
    ax.set_xticks([*ticks, inf_x], [*(f"{t:g}" for t in ticks), "inf (no DP)"])
    ax.set(
        xlabel="epsilon (log scale)", ylabel="mean per-hospital AUC", title="Accuracy vs privacy"
    )
    ax.set_ylim(0.4, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run_experiment(spec: dict[str, Any], *, force: bool = False, progress: bool = True) -> dict:
    """Run (or reuse) every run of ``spec``; write and return the comparison."""
    from sim.runner import run

    out = Path(spec["out"])
    results: dict[str, dict] = {}
    for name, config in spec["configs"].items():
        workdir = out / name
        summary = None if force else finished_summary(workdir, config.run_id())
        if summary is not None:
            print(f"[{name}] done already ({workdir / 'summary.json'})", file=sys.stderr)
            results[name] = _with_derived(summary)
            continue
        print(f"[{name}] running {config.run_id()} -> {workdir}", file=sys.stderr)
        t0 = time.perf_counter()
        summary = run(config, workdir, progress=progress)
        print(f"[{name}] {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        results[name] = _with_derived(summary)
    claims = check_claims(spec, results)
    per_hospital = flamby_table(results, spec["flamby_table"]) if spec.get("flamby_table") else None
    cost = None
    if spec.get("target_auc") is not None:
        cost = {name: bytes_to_target(out / name, float(spec["target_auc"])) for name in results}
    table = {
        name: {
            "federated_auc": s["federated"]["mean"],
            "personalized_auc": s.get("personalized", {}).get("mean"),
            "pooled_test_auc": s["federated"]["pooled_test"],
            "rejected_updates": len(s.get("rejected_updates", [])),
            "epsilon": s.get("privacy", {}).get("epsilon"),
            "delta": s.get("privacy", {}).get("delta"),
            "total_s": s["timing"]["total_s"],
            "config": f"{name}/config.json",
            **{f"contribution.{k}": v for k, v in derived(s).items()},
        }
        for name, s in results.items()
    }
    comparison = {
        "name": spec.get("name"),
        "command": spec.get("command"),
        "runs": table,
        "claims": claims,
        **({"target_auc": spec["target_auc"], "cost_to_target": cost} if cost else {}),
        **({"per_hospital_auc": per_hospital} if per_hospital else {}),
    }
    write_json(out / "comparison.json", comparison)
    (out / "comparison.md").write_text(_table(spec, results, claims, cost, per_hospital))
    _plot(results, out / "comparison.png")
    _privacy_plot(results, out / "privacy.png")
    return comparison


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m sim.compare``."""
    use_host_cores()
    p = argparse.ArgumentParser(prog="python -m sim.compare", description=__doc__.split("\n")[0])
    p.add_argument("experiment", type=Path, help="experiments/<name>.yaml")
    p.add_argument("--force", action="store_true", help="rerun runs that already finished")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    try:
        spec = load_experiment(args.experiment)
        spec["command"] = f"python -m sim.compare {args.experiment}"
        comparison = run_experiment(spec, force=args.force, progress=not args.no_progress)
    except ExperimentError as err:
        p.error(str(err))
    print((Path(spec["out"]) / "comparison.md").read_text())
    failed = [c for c in comparison["claims"] if not c["passed"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
