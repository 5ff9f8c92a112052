"""The matplotlib figures of ``sim.report``: one ``plot_*`` function per plot, pyplot-free.

Each returns a Figure (Agg canvas), or None when the run(s) hold nothing to draw yet.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sim.report_data import (
    RunData,
    _dict,
    _floats,
    _matrix,
    _num,
    cumulative_bytes,
    fairness_series,
)

DPI = 100
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _label(metric: str) -> str:
    """Axis name of a metric key."""
    return {"auc": "ROC AUC", "dice": "Dice"}.get(metric, metric)


def _style(i: int) -> dict[str, Any]:
    """Colour and line style of the i-th run."""
    return {"color": f"C{i % 10}", "ls": ("-", "--", ":", "-.")[(i // 10) % 4]}


def _figure(width: float, height: float, panels: int = 1) -> tuple[Figure, list[Axes]]:
    """A pyplot-free figure (Agg canvas) and its axes side by side."""
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    return fig, list(axes)


def _empty(ax: Axes, text: str) -> None:
    """Say on an axes why it is empty."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")


def _finish(ax: Axes, legend: bool = True, **kwargs: Any) -> None:
    """Labels, grid and (when there are labelled artists) a legend."""
    ax.set(**kwargs)
    ax.grid(alpha=0.3)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def _png(fig: Figure) -> bytes:
    """The figure as PNG bytes."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def plot_run_curves(run: RunData) -> Figure | None:
    """Metric and loss vs round: every hospital, their mean, the pooled test set, train loss."""
    if not run.records:
        return None
    fig, (ax, lx) = _figure(11, 4, 2)
    ev, metric = run.evaluated, run.metric
    rounds = [r["round"] for r in ev]
    per = _matrix([_dict(r.get("per_hospital")).get(metric) for r in ev])
    losses = _matrix([_dict(r.get("per_hospital")).get("loss") for r in ev])
    alpha = float(np.clip(3.0 / max(per.shape[1], 1), 0.05, 0.5))
    marker = "o" if len(rounds) < 30 else None
    for i, col in enumerate(per.T):
        ax.plot(
            rounds,
            col,
            color="tab:blue",
            alpha=alpha,
            lw=0.7,
            label="each hospital" if i == 0 else None,
        )
    if ev:
        ax.plot(
            rounds,
            [_num(r["global"].get(metric)) for r in ev],
            color="tab:blue",
            lw=2.2,
            marker=marker,
            label="mean over hospitals",
        )
        pooled = [_num(_dict(r["global"].get("pooled")).get(metric)) for r in ev]
        if np.isfinite(pooled).any():
            ax.plot(rounds, pooled, color="black", ls="--", lw=1.4, label="all test data pooled")
        pers = [
            (r["round"], _num(_dict(_dict(r.get("personalized")).get("global")).get(metric)))
            for r in ev
            if isinstance(r.get("personalized"), dict)
        ]
        if pers:
            ax.plot(
                *zip(*pers, strict=True),
                color="tab:green",
                lw=1.8,
                marker="s",
                label="personalized (mean)",
            )
    else:
        _empty(ax, "no evaluated round yet")
    _finish(
        ax, xlabel="round", ylabel=f"test {_label(metric)}", title=f"Global model {_label(metric)}"
    )
    for i, col in enumerate(losses.T):
        lx.plot(
            rounds,
            col,
            color="tab:orange",
            alpha=alpha,
            lw=0.7,
            label="test, each hospital" if i == 0 else None,
        )
    lx.plot(
        [r["round"] for r in run.records],
        [_num(r.get("train_loss")) for r in run.records],
        color="tab:purple",
        lw=1.6,
        label="train (clients, weighted)",
    )
    if ev:
        lx.plot(
            rounds,
            [_num(r["global"].get("loss")) for r in ev],
            color="tab:orange",
            lw=2.2,
            marker=marker,
            label="test (mean over hospitals)",
        )
    _finish(lx, xlabel="round", ylabel="loss", title="Loss")
    return fig


def _hospital_names(run: RunData, n: int) -> list[str]:
    """Tick labels: ids, with the site/vendor name when it names one hospital only."""
    hospitals = _dict(run.summary).get("hospitals") or []
    names = [str(_dict(h).get("vendor", "")) for h in hospitals]
    if len(names) == n and len(set(names)) == n and all(names):
        return [f"{i} {name.split()[0]}" for i, name in enumerate(names)]
    return [str(i) for i in range(n)]


def plot_run_hospitals(run: RunData) -> Figure | None:
    """Bars per hospital of the final model (and personalized / local / pooled baselines)."""
    series = {"federated": run.final_per_hospital()}
    summary = _dict(run.summary)
    for name in ("personalized", "local", "pooled"):
        values = _floats(_dict(summary.get(name)).get("per_hospital"))
        if len(values):
            series[name] = values
    n = max(len(v) for v in series.values())
    if n == 0 or not any(np.isfinite(v).any() for v in series.values()):
        return None
    fig, (ax,) = _figure(min(16.0, max(7.0, 0.12 * n * len(series) + 3)), 4.2)
    width = 0.8 / len(series)
    for k, (name, values) in enumerate(series.items()):
        x = np.arange(len(values)) + (k - (len(series) - 1) / 2) * width
        ax.bar(x, values, width, color=f"C{k}", label=f"{name} (mean {np.nanmean(values):.3f})")
    worst, value = run.worst
    if worst is not None:
        ax.axhline(
            value, color="tab:red", ls=":", lw=1, label=f"worst: hospital {worst} ({value:.3f})"
        )
    if n <= 40:
        ax.set_xticks(
            np.arange(n), _hospital_names(run, n), rotation=45 if n > 12 else 0, fontsize=7
        )
    finite = np.concatenate([v[np.isfinite(v)] for v in series.values()])
    low = (
        min(0.0, float(finite.min()))
        if run.metric == "dice"
        else min(0.3, float(finite.min()) - 0.05)
    )
    _finish(
        ax,
        xlabel="hospital",
        ylabel=f"test {_label(run.metric)}",
        ylim=(low, 1.0),
        title=("Final" if run.finished else "Latest evaluated")
        + f" model per hospital ({run.status})",
    )
    return fig


def plot_run_fairness(run: RunData) -> Figure | None:
    """Worst / mean / best hospital per round, and the gap between best and worst."""
    f = fairness_series(run)
    if not len(f["round"]) or not np.isfinite(f["min"]).any():
        return None
    fig, (ax, gx) = _figure(11, 4, 2)
    ax.fill_between(f["round"], f["min"], f["max"], color="tab:blue", alpha=0.15, label="range")
    ax.plot(f["round"], f["max"], color="tab:green", marker=".", label="best hospital")
    ax.plot(f["round"], f["mean"], color="tab:blue", lw=2, marker=".", label="mean")
    ax.plot(f["round"], f["min"], color="tab:red", marker=".", label="worst hospital")
    _finish(
        ax,
        xlabel="round",
        ylabel=f"per-hospital {_label(run.metric)}",
        title="Worst-hospital fairness",
    )
    gx.plot(f["round"], f["gap"], color="black", marker=".")
    _finish(gx, legend=False, xlabel="round", ylabel="best - worst", title="Gap between hospitals")
    return fig


def plot_run_epsilon(run: RunData) -> Figure | None:
    """Epsilon spent per round, and the metric against epsilon at evaluated rounds."""
    spent = [
        (r["round"], _num(r.get("epsilon"))) for r in run.records if r.get("epsilon") is not None
    ]
    if not spent:
        return None
    fig, (ex, ax) = _figure(11, 4, 2)
    ex.plot(*zip(*spent, strict=True), marker=".", color="tab:purple", label="epsilon spent")
    target = _dict(_dict(run.summary).get("privacy")).get(
        "target_epsilon", run.config.get("target_epsilon")
    )
    if isinstance(target, int | float):
        ex.axhline(target, color="tab:red", ls="--", label=f"target {target:g}")
    delta = run.delta
    _finish(
        ex,
        xlabel="round",
        ylabel="epsilon" + (f" at delta {delta:g}" if delta else ""),
        title="Privacy spent",
    )
    pts = [
        (_num(r["epsilon"]), _num(r["global"].get(run.metric)), r["round"])
        for r in run.evaluated
        if r.get("epsilon") is not None
    ]
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color="tab:blue")
        for e, a, rnd in pts[-12:]:
            ax.annotate(f"r{rnd}", (e, a), textcoords="offset points", xytext=(3, 4), fontsize=7)
    else:
        _empty(ax, "no evaluated round with an epsilon yet")
    _finish(
        ax,
        legend=False,
        xlabel="epsilon spent",
        ylabel=f"test {_label(run.metric)} (mean)",
        title=f"{_label(run.metric)} vs epsilon",
    )
    return fig


def _bytes_points(run: RunData) -> tuple[list[float], list[float]]:
    """(cumulative MB, metric) at the evaluated rounds."""
    cum = cumulative_bytes(run)
    ev = run.evaluated
    return [cum[r["round"]] / 1e6 for r in ev], [_num(r["global"].get(run.metric)) for r in ev]


def plot_run_bytes(run: RunData) -> Figure | None:
    """Metric against the bytes sent so far."""
    mb, metric = _bytes_points(run)
    if not mb:
        return None
    fig, (ax,) = _figure(6.5, 4)
    ax.plot(mb, metric, marker="o", color="tab:blue")
    _finish(
        ax,
        legend=False,
        xlabel="cumulative MB sent (up + down)",
        ylabel=f"test {_label(run.metric)} (mean)",
        title=f"{_label(run.metric)} vs communication",
    )
    return fig


def plot_group_curves(runs: list[RunData]) -> Figure | None:
    """One line per run: mean metric and test loss vs round."""
    if not any(r.records for r in runs):
        return None
    fig, (ax, lx) = _figure(12, 4.5, 2)
    for i, run in enumerate(runs):
        ev = run.evaluated
        rounds = [r["round"] for r in ev]
        ax.plot(
            rounds, [_num(r["global"].get(run.metric)) for r in ev], label=run.name, **_style(i)
        )
        if ev:
            lx.plot(
                rounds, [_num(r["global"].get("loss")) for r in ev], label=run.name, **_style(i)
            )
        else:
            lx.plot(
                [r["round"] for r in run.records],
                [_num(r.get("train_loss")) for r in run.records],
                label=f"{run.name} (train)",
                **_style(i),
            )
    metric = _label(runs[0].metric)
    _finish(
        ax, xlabel="round", ylabel=f"test {metric} (mean over hospitals)", title=f"{metric} per run"
    )
    _finish(lx, xlabel="round", ylabel="test loss (mean over hospitals)", title="Loss per run")
    return fig


def plot_group_final(runs: list[RunData]) -> Figure | None:
    """Bars of each run's final mean metric, with its worst hospital."""
    means = np.array([r.mean for r in runs])
    if not np.isfinite(means).any():
        return None
    fig, (ax,) = _figure(max(6.0, min(16.0, 0.9 * len(runs) + 2)), 4.5)
    x = np.arange(len(runs))
    bars = ax.bar(x, means, 0.6, color=[_style(i)["color"] for i in range(len(runs))], label="mean")
    ax.bar_label(bars, labels=[f"{m:.3f}" if np.isfinite(m) else "" for m in means], fontsize=7)
    worst = np.array([r.worst[1] for r in runs])
    if np.isfinite(worst).any():
        ax.scatter(x, worst, color="black", marker="v", zorder=3, label="worst hospital")
    ax.set_xticks(x, [r.name for r in runs], rotation=30, ha="right", fontsize=8)
    finite = np.concatenate([means[np.isfinite(means)], worst[np.isfinite(worst)]])
    _finish(
        ax,
        ylabel=f"final {_label(runs[0].metric)}",
        ylim=(min(0.4, float(finite.min()) - 0.05), 1.0),
        title="Final model per run",
    )
    return fig


def plot_group_fairness(runs: list[RunData]) -> Figure | None:
    """Worst hospital and best - worst gap per round, one line per run."""
    series = [(i, run, fairness_series(run)) for i, run in enumerate(runs)]
    if not any(np.isfinite(f["min"]).any() for _, _, f in series):
        return None
    fig, (ax, gx) = _figure(12, 4.5, 2)
    for i, run, f in series:
        ax.plot(f["round"], f["min"], label=run.name, **_style(i))
        gx.plot(f["round"], f["gap"], label=run.name, **_style(i))
    metric = _label(runs[0].metric)
    _finish(ax, xlabel="round", ylabel=f"worst hospital {metric}", title="Worst-hospital fairness")
    _finish(gx, xlabel="round", ylabel="best - worst", title="Gap between hospitals")
    return fig


def plot_group_epsilon(runs: list[RunData]) -> Figure | None:
    """Final metric vs epsilon per run (no-DP runs at the right, 'inf'), and their trajectories."""
    dp = [(i, r) for i, r in enumerate(runs) if r.epsilon is not None and math.isfinite(r.epsilon)]
    if not dp:
        return None
    fig, (ax, tx) = _figure(12, 4.5, 2)
    finite = [r.epsilon for _, r in dp]
    inf_x = max(finite) * 3 if max(finite) > 0 else 1.0
    for i, run in enumerate(runs):
        x = run.epsilon if run.epsilon is not None and math.isfinite(run.epsilon) else inf_x
        if not math.isfinite(run.mean):
            continue
        ax.scatter([x], [run.mean], color=_style(i)["color"], zorder=3)
        ax.annotate(run.name, (x, run.mean), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ticks = sorted({float(f"{e:.3g}") for e in finite if e > 0})
    ax.set_xticks([*ticks, inf_x], [*(f"{t:g}" for t in ticks), "inf (no DP)"])
    ax.minorticks_off()
    _finish(
        ax,
        legend=False,
        xlabel="epsilon (log scale)",
        ylabel=f"final {_label(runs[0].metric)} (mean)",
        title=f"{_label(runs[0].metric)} vs privacy, per run",
    )
    for i, run in dp:
        pts = [
            (_num(r["epsilon"]), _num(r["global"].get(run.metric)))
            for r in run.evaluated
            if r.get("epsilon") is not None
        ]
        if pts:
            tx.plot(*zip(*pts, strict=True), marker=".", label=run.name, **_style(i))
    _finish(
        tx,
        xlabel="epsilon spent so far",
        ylabel=f"test {_label(runs[0].metric)} (mean)",
        title="Per evaluated round",
    )
    return fig


def plot_group_bytes(runs: list[RunData]) -> Figure | None:
    """Metric vs cumulative bytes, one line per run."""
    points = [(i, run, _bytes_points(run)) for i, run in enumerate(runs)]
    if not any(mb for _, _, (mb, _) in points):
        return None
    fig, (ax,) = _figure(8, 4.5)
    for i, run, (mb, metric) in points:
        ax.plot(mb, metric, marker=".", label=run.name, **_style(i))
    positive = [m for _, _, (mb, _) in points for m in mb if m > 0]
    if positive and max(positive) > 100 * min(positive):  # runs of very different sizes
        ax.set_xscale("log")
    _finish(
        ax,
        xlabel="cumulative MB sent (up + down)",
        ylabel=f"test {_label(runs[0].metric)} (mean)",
        title=f"{_label(runs[0].metric)} vs communication",
    )
    return fig
