"""PNG plots of a results folder: learning curves, per-hospital bars, FLamby-style baselines."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sim.results import MetricsLog  # noqa: E402


def plot_run(workdir: str | Path) -> list[Path]:
    """Write ``plots/*.png`` for a finished run; returns the files written."""
    workdir = Path(workdir)
    out = workdir / "plots"
    out.mkdir(exist_ok=True)
    records = [r for r in MetricsLog(workdir / "metrics.jsonl").read() if "global" in r]
    summary = json.loads((workdir / "summary.json").read_text())
    written = [_learning_curves(records, out / "learning_curves.png")]
    written.append(_per_hospital(summary, out / "per_hospital_auc.png"))
    if "local" in summary and "pooled" in summary:
        written.append(_baselines(summary, out / "baselines.png"))
    if summary.get("privacy", {}).get("delta") is not None:
        every = MetricsLog(workdir / "metrics.jsonl").read()
        written.append(_privacy(every, summary["privacy"], out / "privacy.png"))
    return written


def _privacy(records: list[dict], privacy: dict, path: Path) -> Path:
    """Epsilon spent per round against the target and, for client-level DP, the clip norm and
    the fraction of clipped updates."""
    rounds = [r["round"] for r in records]
    client_rounds = [r["round"] for r in records if "clip_norm" in r.get("privacy", {})]
    client = [r["privacy"] for r in records if "clip_norm" in r.get("privacy", {})]
    fig, axes = plt.subplots(1, 2 if client else 1, figsize=(11 if client else 5.5, 4))
    axes = np.atleast_1d(axes)
    ax = axes[0]
    eps = [np.inf if r["epsilon"] is None else r["epsilon"] for r in records]
    ax.plot(rounds, eps, marker=".", label=f"epsilon ({privacy['accountant']})")
    if privacy.get("target_epsilon") is not None:
        ax.axhline(privacy["target_epsilon"], color="tab:red", ls="--", label="target")
    ax.set(
        xlabel="round",
        ylabel=f"epsilon at delta {privacy['delta']:g}",
        title=f"Privacy spent (z = {privacy['noise_multiplier']:.3g})",
    )
    ax.legend()
    ax.grid(alpha=0.3)
    if client:
        ax = axes[1]
        ax.plot(client_rounds, [c["clip_norm"] for c in client], label="clip norm C")
        ax.plot(
            client_rounds, [c["median_update_norm"] for c in client], label="median update norm"
        )
        ax.set(xlabel="round", ylabel="L2 norm", title="Clipping")
        ax.legend(loc="upper left")
        ax.grid(alpha=0.3)
        frac = ax.twinx()
        frac.plot(client_rounds, [c["clipped_fraction"] for c in client], color="gray", ls=":")
        frac.set_ylabel("fraction of updates clipped (dotted)")
        frac.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _learning_curves(records: list[dict], path: Path) -> Path:
    rounds = [r["round"] for r in records]
    per = np.array([r["per_hospital"]["auc"] for r in records], dtype=float)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    for i, col in enumerate(per.T):
        ax.plot(
            rounds,
            col,
            color="tab:blue",
            alpha=0.15,
            lw=0.8,
            label="each hospital" if i == 0 else None,
        )
    ax.plot(
        rounds,
        [r["global"]["auc"] for r in records],
        color="tab:blue",
        lw=2.2,
        label="mean over hospitals",
    )
    ax.plot(
        rounds,
        [r["global"]["pooled"]["auc"] for r in records],
        color="black",
        lw=1.5,
        ls="--",
        label="all test data pooled",
    )
    ax.set(xlabel="round", ylabel="test ROC AUC", title="Global model AUC")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    ax = axes[1]
    ax.plot(rounds, [r["train_loss"] for r in records], label="train (clients, weighted)")
    ax.plot(rounds, [r["global"]["loss"] for r in records], label="test (mean over hospitals)")
    ax.set(xlabel="round", ylabel="BCE loss", title="Loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _per_hospital(summary: dict, path: Path) -> Path:
    auc = np.array(summary["federated"]["per_hospital"], dtype=float)
    vendors = [h["vendor"] for h in summary["hospitals"]]
    palette = {v: f"C{i}" for i, v in enumerate(dict.fromkeys(vendors))}
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(auc) + 2), 4))
    ax.bar(np.arange(len(auc)), auc, color=[palette[v] for v in vendors])
    for v, c in palette.items():
        ax.bar([0], [0], color=c, label=v)
    ax.axhline(np.nanmean(auc), color="black", ls="--", lw=1, label=f"mean {np.nanmean(auc):.3f}")
    ylabel, ylim = _axis_label(summary)
    ax.set(
        xlabel="hospital",
        ylabel=ylabel,
        title="Federated model, per hospital",
        ylim=ylim,
        xticks=np.arange(len(auc)),
        xticklabels=_tick_labels(summary),
    )
    ax.legend(ncol=5, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _axis_label(summary: dict) -> tuple[str, tuple[float, float]]:
    """Y label and limits of the run's headline metric."""
    if summary.get("metric") == "dice":
        return "test Dice", (0.0, 1.0)
    return "test ROC AUC", (0.3, 1.0)


def _tick_labels(summary: dict) -> list[str]:
    """Hospital names when they are distinct (real sites), else their ids."""
    names = [h["vendor"] for h in summary["hospitals"]]
    if len(set(names)) == len(names) and not names[0].startswith("hospital"):
        return [name.split()[0] for name in names]
    return [str(i) for i in range(len(names))]


def _baselines(summary: dict, path: Path) -> Path:
    names = ("local", "federated", "pooled")
    n = len(summary["federated"]["per_hospital"])
    fig, ax = plt.subplots(figsize=(max(7, 0.6 * n + 2), 4))
    width = 0.27
    for i, name in enumerate(names):
        vals = np.array(summary[name]["per_hospital"], dtype=float)
        ax.bar(
            np.arange(n) + (i - 1) * width,
            vals,
            width,
            label=f"{name} (mean {np.nanmean(vals):.3f})",
        )
    ylabel, ylim = _axis_label(summary)
    ax.set(
        xlabel="hospital",
        ylabel=ylabel,
        ylim=ylim,
        xticks=np.arange(n),
        xticklabels=_tick_labels(summary),
        title="Local-only vs federated vs pooled (FLamby protocol), per hospital",
    )
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
