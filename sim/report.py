"""``python -m sim.report PATH``: one self-contained HTML page of a run, sweep or comparison folder.

The page holds its plots as base64 PNGs (also written to ``PATH/report/``), the tables (per
hospital for a run, per run for a sweep or comparison), the command that produced the results,
the run id and the config. It reads whatever the folder holds so far, so the simulator can call
``write_report(workdir, live=True)`` every few rounds (the page then reloads itself) and once
more at the end; rounds without evaluation, a missing ``summary.json`` and older runs without
epsilon, personalization or baselines give fewer plots and tables, never an error.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import html
import json
import math
import shlex
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from sim.report_data import (
    IMAGES_DIR,
    ReportError,
    RunData,
    _dict,
    _floats,
    _num,
    _read_json,
    detect_kind,
    load_group,
    load_run,
)
from sim.report_data import RUN_FILES as RUN_FILES
from sim.report_data import cumulative_bytes as cumulative_bytes
from sim.report_data import fairness_series as fairness_series
from sim.report_plots import DPI as DPI
from sim.report_plots import PNG_SIGNATURE as PNG_SIGNATURE
from sim.report_plots import (
    _label,
    _png,
    plot_group_bytes,
    plot_group_curves,
    plot_group_epsilon,
    plot_group_fairness,
    plot_group_final,
    plot_run_bytes,
    plot_run_curves,
    plot_run_epsilon,
    plot_run_fairness,
    plot_run_hospitals,
)

REFRESH_S = 30  # reload period of a live page


# ----------------------------------------------------------------------------- HTML


def _e(value: Any) -> str:
    """HTML-escaped text."""
    return html.escape(str(value), quote=True)


def _fmt(value: Any, digits: int = 4) -> str:
    """A number for a table cell; missing/NaN -> an en dash."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else "–"
    return str(value)


def _fmt_bytes(value: int | None) -> str:
    """Bytes in B/kB/MB/GB."""
    if value is None:
        return "–"
    size = float(value)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return str(value)


def _fmt_value(value: Any) -> str:
    """A config/privacy value as compact text (long lists summarized)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and len(value) > 8:
        nums = _floats(value)
        if np.isfinite(nums).all():
            return f"{len(value)} values, min {nums.min():.4g}, max {nums.max():.4g}"
        return json.dumps(value[:8])[:-1] + f", ... ({len(value)} values)]"
    return json.dumps(value)


def _eps(run: RunData) -> str:
    """Epsilon (delta) cell."""
    if run.epsilon is None:
        return "– (no DP)"
    return _fmt(run.epsilon, 3) + (f" (δ {run.delta:g})" if run.delta else "")


def _table(
    header: Iterable[str], rows: Iterable[Iterable[str]], row_attrs: Iterable[str] | None = None
) -> str:
    """A table of already escaped cells."""
    head = "".join(f"<th>{h}</th>" for h in header)
    attrs = list(row_attrs) if row_attrs is not None else None
    body = []
    for k, row in enumerate(rows):
        attr = f" {attrs[k]}" if attrs else ""
        body.append(f"<tr{attr}>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _kv_table(items: Iterable[tuple[str, Any]], cls: str = "kv") -> str:
    """Two-column key/value table; every key and value escaped."""
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(_fmt_value(v))}</td></tr>" for k, v in items)
    return f'<table class="{cls}"><tbody>{rows}</tbody></table>'


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.5em auto;
max-width:1200px;padding:0 1em;color:#222;background:#fff}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
.meta{color:#555;font-size:.9em}pre{background:#f4f4f4;padding:.6em;overflow-x:auto;white-space:pre-wrap}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top}
thead th{background:#eef2f7}tr.worst td{background:#fde8e8}tr.failed td{color:#a00}
table.kv th{background:#f7f7f7;font-weight:normal;color:#444}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.85em;color:#555}.warn{color:#a00}.live{color:#06a;font-weight:bold}
"""


@dataclass
class _Page:
    """What goes into the HTML page."""

    title: str
    kind: str
    command: str
    live: bool
    refresh_s: int
    status: str
    sections: list[str] = field(default_factory=list)
    figures: list[tuple[str, str, bytes]] = field(default_factory=list)  # slug, caption, png
    notes: list[str] = field(default_factory=list)


def _figures(
    page: _Page, images: Path, plots: list[tuple[str, str, Callable[[], Figure | None]]]
) -> None:
    """Draw each plot (a failure becomes a note on the page), write its PNG, keep its bytes."""
    for slug, caption, draw in plots:
        try:
            fig = draw()
            if fig is None:
                continue
            png = _png(fig)
        except Exception as err:  # a report must never stop the run it describes
            page.notes.append(f"could not draw {slug}: {type(err).__name__}: {err}")
            continue
        images.mkdir(parents=True, exist_ok=True)
        _write_bytes(images / f"{slug}.png", png)
        page.figures.append((slug, caption, png))


def _write_bytes(path: Path, data: bytes) -> None:
    """Write atomically (a live page may be read while it is rewritten)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _render(page: _Page) -> str:
    """The HTML text of the page."""
    refresh = f'<meta http-equiv="refresh" content="{int(page.refresh_s)}">\n' if page.live else ""
    now = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    live = (
        f' · <span class="live">live: reloads every {int(page.refresh_s)} s</span>'
        if page.live
        else ""
    )
    notes = "".join(f'<p class="warn">{_e(n)}</p>' for n in page.notes)
    figures = "".join(
        f'<figure id="fig-{_e(slug)}"><img alt="{_e(caption)}" src="data:image/png;base64,'
        f'{base64.b64encode(png).decode("ascii")}"><figcaption>{_e(caption)}</figcaption></figure>'
        for slug, caption, png in page.figures
    )
    plots = f"<h2>Plots</h2>{figures}" if figures else "<h2>Plots</h2><p>No data to plot yet.</p>"
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'{refresh}<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>MediChain report: {_e(page.title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f"<h1>{_e(page.title)}</h1>\n"
        f'<p class="meta">{_e(page.kind)} · {_e(page.status)} · generated {_e(now)}{live}</p>\n'
        f'{notes}<h2>Command</h2>\n<pre id="command"><code>{_e(page.command)}</code></pre>\n'
        + "".join(page.sections[:1])
        + plots
        + "".join(page.sections[1:])
        + "\n</body>\n</html>\n"
    )


def _run_command(path: Path) -> str:
    """The command that reproduces a single run into the same folder."""
    return f"python -m sim --config {shlex.quote(str(path / 'config.json'))} --out {shlex.quote(str(path))}"


def _summary_rows(run: RunData) -> list[tuple[str, Any]]:
    """Headline numbers of a run as key/value pairs (already formatted)."""
    summary = _dict(run.summary)
    worst, value = run.worst
    per = run.final_per_hospital()
    label = _label(run.metric)
    rows: list[tuple[str, Any]] = [
        ("run id", run.run_id or "–"),
        ("status", run.status),
        ("dataset", _dict(summary.get("dataset")).get("name") or run.config.get("dataset", "–")),
        (
            "algorithm / aggregator",
            f"{summary.get('algorithm', run.config.get('algorithm', '–'))} / "
            f"{summary.get('aggregator', run.config.get('aggregator', '–'))}",
        ),
        ("rounds", f"{run.rounds_done} of {run.rounds_total or '?'}"),
        ("evaluated rounds", len(run.evaluated)),
        (f"federated {label} (mean over hospitals)", _fmt(run.mean)),
        (f"federated {label} (pooled test)", _fmt(run.pooled)),
        (f"worst hospital {label}", "–" if worst is None else f"{_fmt(value)} (hospital {worst})"),
        (
            f"best - worst {label}",
            _fmt(float(np.nanmax(per) - np.nanmin(per))) if np.isfinite(per).any() else "–",
        ),
    ]
    if "personalized" in summary:
        rows.append(
            (f"personalized {label} (mean)", _fmt(_num(_dict(summary["personalized"]).get("mean"))))
        )
    rows += [
        ("epsilon", _eps(run)),
        ("bytes sent (up + down)", _fmt_bytes(run.bytes_total)),
        ("seconds", _fmt(run.seconds, 1)),
    ]
    timing = _dict(summary.get("timing"))
    if timing.get("median_round_s") is not None:
        rows.append(("median round (s)", _fmt(_num(timing["median_round_s"]), 3)))
    return rows


def _hospital_table(run: RunData) -> str:
    """One row per hospital: name, sizes, final metric and loss, baselines when present."""
    n = run.hospital_count
    if n == 0:
        return "<p>No hospital data yet.</p>"
    summary = _dict(run.summary)
    hospitals = [_dict(h) for h in summary.get("hospitals") or []]
    label = _label(run.metric)
    columns: dict[str, np.ndarray] = {f"federated {label}": run.final_per_hospital()}
    loss = run.final_per_hospital("loss")
    if len(loss):
        columns["federated loss"] = loss
    for name in ("personalized", "local", "pooled"):
        values = _floats(_dict(summary.get(name)).get("per_hospital"))
        if len(values):
            columns[f"{name} {label}"] = values
    worst, _ = run.worst
    header = ["hospital", "name", "train size", "test size", *(_e(c) for c in columns)]
    rows, attrs = [], []
    for i in range(n):
        h = hospitals[i] if i < len(hospitals) else {}
        cells = [
            str(i),
            _e(h.get("vendor", "–")),
            _e(h.get("train_size", "–")),
            _e(h.get("test_size", "–")),
        ]
        cells += [_fmt(float(v[i])) if i < len(v) else "–" for v in columns.values()]
        rows.append(cells)
        attrs.append(f'class="hospital{" worst" if i == worst else ""}" id="hospital-{i}"')
    return _table(header, rows, attrs)


def _run_page(path: Path, command: str | None, live: bool, refresh_s: int, images: Path) -> _Page:
    """Page of a single run."""
    run = load_run(path)
    parent = _dict(_read_json(path.parent / "comparison.json")) or _dict(
        _read_json(path.parent / "sweep.json")
    )
    page = _Page(
        title=f"Run {run.run_id or path.name}",
        kind="run",
        command=command or _run_command(path),
        live=live,
        refresh_s=refresh_s,
        status=run.status,
    )
    part_of = ""
    if isinstance(parent.get("command"), str) and not command:
        part_of = f"<p>Part of <code>{_e(parent['command'])}</code> (folder {_e(path.parent)}).</p>"
    page.sections.append(f"<h2>Summary</h2>{part_of}{_kv_table(_summary_rows(run))}")
    label = _label(run.metric)
    _figures(
        page,
        images,
        [
            (
                "learning_curves",
                f"Learning curves: {label} and loss per round, global and per hospital",
                lambda: plot_run_curves(run),
            ),
            ("per_hospital", f"Final model {label} per hospital", lambda: plot_run_hospitals(run)),
            (
                "fairness",
                f"Worst / mean / best hospital {label} per evaluated round, and the gap",
                lambda: plot_run_fairness(run),
            ),
            (
                "epsilon_auc",
                f"Privacy: epsilon per round and {label} vs epsilon",
                lambda: plot_run_epsilon(run),
            ),
            ("bytes_auc", f"{label} vs cumulative bytes sent", lambda: plot_run_bytes(run)),
        ],
    )
    page.sections.append(f"<h2>Per hospital</h2>{_hospital_table(run)}")
    summary = _dict(run.summary)
    privacy = _dict(summary.get("privacy"))
    if privacy and privacy.get("mechanism") != "none":
        page.sections.append(f"<h2>Privacy</h2>{_kv_table(privacy.items())}")
    baselines = [
        (n, _dict(summary.get(n))) for n in ("federated", "personalized", "local", "pooled")
    ]
    baselines = [(n, b) for n, b in baselines if b]
    if len(baselines) > 1:
        rows = [
            [
                _e(n),
                _fmt(_num(b.get("mean"))),
                _fmt(_num(b.get("pooled_test"))),
                _fmt(b.get("epochs")),
                _fmt(_num(b.get("seconds")), 1),
            ]
            for n, b in baselines
        ]
        header = ["model", f"mean {label}", f"pooled-test {label}", "epochs", "seconds"]
        page.sections.append(f"<h2>Baselines</h2>{_table(header, rows)}")
    config = _kv_table(run.config.items()) if run.config else "<p>No config.json.</p>"
    page.sections.append(
        f"<h2>Configuration</h2><p>Run id: <code>{_e(run.run_id or '–')}</code></p>{config}"
    )
    return page


def config_differences(runs: list[RunData]) -> tuple[list[str], dict[str, Any]]:
    """Config keys whose values differ between runs, and the values all runs share."""
    configs = [r.config for r in runs if r.config]
    keys = list(dict.fromkeys(k for c in configs for k in c))
    differ, shared = [], {}
    for key in keys:
        values = {json.dumps(c.get(key), sort_keys=True) for c in configs}
        if len(values) > 1:
            differ.append(key)
        else:
            shared[key] = configs[0].get(key)
    return differ, shared


def _group_page(
    path: Path, kind: str, command: str | None, live: bool, refresh_s: int, images: Path
) -> _Page:
    """Page of a sweep, a comparison or a folder of runs."""
    index, runs = load_group(path, kind)
    if not runs:
        raise ReportError(f"{path}: the {kind} lists no runs")
    name = index.get("name") if isinstance(index.get("name"), str) else path.name
    if not command and isinstance(index.get("command"), str):
        command = index["command"]
    if not command:
        command = "\n".join(_run_command(path / r.name) for r in runs if r.path is not None)
    done = sum(r.finished for r in runs)
    status = f"{done} of {len(runs)} runs finished" + (
        "" if kind != "runs" else f", no {path.name} index yet"
    )
    page = _Page(
        title=f"{kind.capitalize()} {name}",
        kind=kind,
        command=command,
        live=live,
        refresh_s=refresh_s,
        status=status,
    )
    label = _label(runs[0].metric)
    differ, shared = config_differences(runs)
    rows, attrs = [], []
    for run in runs:
        worst, value = run.worst
        diffs = (
            ", ".join(f"{k}={_fmt_value(run.config.get(k))}" for k in differ)
            if run.config
            else "(no config.json)"
        )
        rows.append(
            [
                f"<b>{_e(run.name)}</b><br><small>{_e(run.run_id or '')}</small>",
                _e(diffs),
                _e(run.status),
                _fmt(run.mean),
                "–" if worst is None else f"{_fmt(value)} (h{worst})",
                _e(_eps(run)),
                _fmt_bytes(run.bytes_total),
                _fmt(run.seconds, 1),
            ]
        )
        attrs.append(f'class="run{" failed" if run.failed else ""}"')
    header = [
        "run",
        "config differences",
        "status",
        f"{label} (mean)",
        f"worst hospital {label}",
        "epsilon",
        "bytes",
        "seconds",
    ]
    page.sections.append(f"<h2>Runs</h2>{_table(header, rows, attrs)}")
    _figures(
        page,
        images,
        [
            (
                "learning_curves",
                f"Learning curves: mean {label} and test loss per round, one line per run",
                lambda: plot_group_curves(runs),
            ),
            (
                "final_auc",
                f"Final mean {label} per run (triangles: worst hospital)",
                lambda: plot_group_final(runs),
            ),
            (
                "fairness",
                f"Worst-hospital {label} and best - worst gap per round",
                lambda: plot_group_fairness(runs),
            ),
            (
                "epsilon_auc",
                f"{label} vs epsilon: final per run and per evaluated round",
                lambda: plot_group_epsilon(runs),
            ),
            (
                "bytes_auc",
                f"{label} vs cumulative bytes sent, one line per run",
                lambda: plot_group_bytes(runs),
            ),
        ],
    )
    claims = [_dict(c) for c in index.get("claims") or []]
    if claims:
        crow = [
            [
                _e(f"{c.get('left')} {c.get('op')} {c.get('right')}"),
                _fmt(_num(c.get("left_value"))),
                _fmt(_num(c.get("right_value"))),
                "PASS" if c.get("passed") else "<b>FAIL</b>",
            ]
            for c in claims
        ]
        page.sections.append(f"<h2>Claims</h2>{_table(['claim', 'left', 'right', 'result'], crow)}")
    grouped = [_dict(g) for g in index.get("over_seeds") or []]
    if grouped:
        keys = list(dict.fromkeys(k for g in grouped for k in g))
        grow = [[_e(_fmt(g.get(k))) for k in keys] for g in grouped]
        page.sections.append(f"<h2>Mean over seeds</h2>{_table([_e(k) for k in keys], grow)}")
    page.sections.append(
        f"<h2>Shared configuration</h2>{_kv_table(shared.items())}" if shared else ""
    )
    return page


def _write(
    path: Path,
    *,
    out: Path | None,
    command: str | None,
    live: bool | None,
    images_dir: Path | None,
    refresh_s: int,
) -> Path:
    """write_report with ``live=None`` meaning: refresh while any run is unfinished."""
    path = Path(path)
    kind = detect_kind(path)
    images = Path(images_dir) if images_dir is not None else path / IMAGES_DIR
    if live is None:
        if kind == "run":
            live = load_run(path).in_progress
        else:
            live = kind == "runs" or any(r.in_progress for r in load_group(path, kind)[1])
    if kind == "run":
        page = _run_page(path, command, live, refresh_s, images)
    else:
        page = _group_page(path, kind, command, live, refresh_s, images)
    target = Path(out) if out is not None else path / "report.html"
    target.parent.mkdir(parents=True, exist_ok=True)
    _write_bytes(target, _render(page).encode("utf-8"))
    return target


def write_report(
    path: Path,
    *,
    out: Path | None = None,
    command: str | None = None,
    live: bool = False,
    images_dir: Path | None = None,
    refresh_s: int = REFRESH_S,
) -> Path:
    """Write ``PATH/report.html`` (or ``out``) and its PNGs (``PATH/report/`` or ``images_dir``)."""
    return _write(
        path, out=out, command=command, live=live, images_dir=images_dir, refresh_s=refresh_s
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m sim.report``."""
    p = argparse.ArgumentParser(
        prog="python -m sim.report",
        description="Self-contained HTML report of a run, sweep or comparison results folder.",
    )
    p.add_argument("path", type=Path, help="run, sweep or comparison folder")
    p.add_argument("--out", type=Path, help="HTML file to write (default PATH/report.html)")
    p.add_argument("--command", help="the command that produced the results (shown verbatim)")
    p.add_argument("--images-dir", type=Path, help="folder of the PNGs (default PATH/report/)")
    p.add_argument(
        "--refresh", type=int, default=REFRESH_S, help="reload period of a live page (s)"
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--live", action="store_true", default=None, help="add the reload tag")
    g.add_argument("--no-live", dest="live", action="store_false", help="never add the reload tag")
    p.set_defaults(live=None)  # neither flag: live while a run is unfinished
    args = p.parse_args(argv)
    try:
        target = _write(
            args.path,
            out=args.out,
            command=args.command,
            live=args.live,
            images_dir=args.images_dir,
            refresh_s=args.refresh,
        )
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
