"""Reading results folders for ``sim.report``: runs, sweeps and comparisons as read so far.

``load_run`` and ``load_group`` tolerate missing and half-written files (a run may still be
running); ``fairness_series`` and ``cumulative_bytes`` turn a run's rounds into plot series.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

RUN_FILES = ("config.json", "metrics.jsonl", "summary.json")
IMAGES_DIR = "report"  # PNGs go to PATH/report/ unless images_dir says otherwise


class ReportError(ValueError):
    """The path is not a results folder; the message names it."""


# ----------------------------------------------------------------------------- reading


def _read_json(path: Path) -> Any:
    """Parsed JSON of a file, or None when it is absent or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rounds of ``metrics.jsonl`` in order; a line still being written is skipped."""
    try:
        text = path.read_text()
    except OSError:
        return []
    by_round: dict[int, dict[str, Any]] = {}
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("round"), int):
            by_round[record["round"]] = record
    return [by_round[k] for k in sorted(by_round)]


def _num(value: Any) -> float:
    """A JSON number as float; anything else (null, text, list) as NaN."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    return float(value)


def _floats(values: Any) -> np.ndarray:
    """A JSON list of numbers as a float array (non-numbers -> NaN); a non-list -> empty."""
    if not isinstance(values, list):
        return np.zeros(0)
    return np.array([_num(v) for v in values], dtype=float)


def _matrix(rows: list[Any]) -> np.ndarray:
    """Ragged per-round lists as a (rounds, hospitals) array padded with NaN."""
    arrays = [_floats(r) for r in rows]
    width = max((len(a) for a in arrays), default=0)
    out = np.full((len(arrays), width), np.nan)
    for i, a in enumerate(arrays):
        out[i, : len(a)] = a
    return out


def _dict(value: Any) -> dict[str, Any]:
    """The value if it is a JSON object, else an empty dict."""
    return value if isinstance(value, dict) else {}


def _config_run_id(config: dict[str, Any]) -> str | None:
    """The run id the simulator derives from this config, or None for a foreign/older one."""
    if not config:
        return None
    try:
        from sim.config import RunConfig

        return RunConfig.from_dict(config).run_id()
    except Exception:  # an unknown key or value: no id rather than no report
        return None


@dataclass
class RunData:
    """One run folder as read so far (it may still be running)."""

    name: str
    path: Path | None
    config: dict[str, Any] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] | None = None
    listed: dict[str, Any] = field(default_factory=dict)  # its row in sweep/comparison json

    @property
    def finished(self) -> bool:
        """summary.json was written."""
        return self.summary is not None

    @property
    def failed(self) -> bool:
        """The sweep marked it failed and it has no summary."""
        return not self.finished and self.listed.get("status") == "failed"

    @property
    def in_progress(self) -> bool:
        """Neither finished nor failed."""
        return not self.finished and not self.failed

    @property
    def metric(self) -> str:
        """Headline metric key: ``auc``, or ``dice`` for segmentation."""
        for source in (_dict(self.summary), self.listed):
            if isinstance(source.get("metric"), str) and source["metric"]:
                return source["metric"]
        return "dice" if self.config.get("task") == "segmentation" else "auc"

    @property
    def evaluated(self) -> list[dict[str, Any]]:
        """Rounds that carry a global evaluation."""
        return [r for r in self.records if isinstance(r.get("global"), dict)]

    @property
    def federated(self) -> dict[str, Any]:
        """summary.json's ``federated`` block (empty while running)."""
        return _dict(_dict(self.summary).get("federated"))

    def final_per_hospital(self, what: str | None = None) -> np.ndarray:
        """Per-hospital metric (or ``what``, e.g. loss) of the latest model."""
        key = what or self.metric
        if what is None and isinstance(self.federated.get("per_hospital"), list):
            return _floats(self.federated["per_hospital"])
        ev = self.evaluated
        return _floats(_dict(ev[-1].get("per_hospital")).get(key)) if ev else np.zeros(0)

    @property
    def mean(self) -> float:
        """Mean per-hospital metric of the latest model."""
        if "mean" in self.federated:
            return _num(self.federated["mean"])
        if self.evaluated:
            return _num(self.evaluated[-1]["global"].get(self.metric))
        return _num(self.listed.get("federated_auc", self.listed.get("federated_mean")))

    @property
    def pooled(self) -> float:
        """Metric on all test data pooled."""
        if "pooled_test" in self.federated:
            return _num(self.federated["pooled_test"])
        if self.evaluated:
            return _num(_dict(self.evaluated[-1]["global"].get("pooled")).get(self.metric))
        return _num(self.listed.get("pooled_test_auc", self.listed.get("pooled_test")))

    @property
    def worst(self) -> tuple[int | None, float]:
        """(hospital, value) of the lowest per-hospital metric."""
        per = self.final_per_hospital()
        if not np.isfinite(per).any():
            return None, math.nan
        i = int(np.nanargmin(per))
        return i, float(per[i])

    @property
    def epsilon(self) -> float | None:
        """Privacy spent so far (None without DP)."""
        privacy = _dict(_dict(self.summary).get("privacy"))
        if privacy.get("epsilon") is not None:
            return _num(privacy["epsilon"])
        spent = [r["epsilon"] for r in self.records if r.get("epsilon") is not None]
        if spent:
            return _num(spent[-1])
        return None if self.listed.get("epsilon") is None else _num(self.listed["epsilon"])

    @property
    def delta(self) -> float | None:
        """The delta of ``epsilon``."""
        privacy = _dict(_dict(self.summary).get("privacy"))
        if privacy.get("delta") is not None:
            return _num(privacy["delta"])
        spent = [r["delta"] for r in self.records if r.get("delta") is not None]
        return _num(spent[-1]) if spent else None

    @property
    def bytes_total(self) -> int | None:
        """Bytes up + down over all rounds so far."""
        summary = _dict(self.summary)
        if isinstance(summary.get("bytes_total"), int):
            return summary["bytes_total"]
        if not self.records:
            return None
        return int(sum(_bytes(r) for r in self.records))

    @property
    def seconds(self) -> float | None:
        """Wall time of the run (or of its rounds so far)."""
        timing = _dict(_dict(self.summary).get("timing"))
        if timing.get("total_s") is not None:
            return _num(timing["total_s"])
        if self.listed.get("total_s") is not None:
            return _num(self.listed["total_s"])
        if not self.records:
            return None
        return float(sum(np.nan_to_num(_num(r.get("seconds"))) for r in self.records))

    @property
    def rounds_done(self) -> int:
        """Last round written."""
        return self.records[-1]["round"] if self.records else 0

    @property
    def rounds_total(self) -> int | None:
        """Rounds the config asks for."""
        for value in (self.config.get("rounds"), _dict(self.summary).get("rounds")):
            if isinstance(value, int):
                return value
        return None

    @property
    def run_id(self) -> str | None:
        """The run id: from summary.json, the sweep table, or derived from config.json."""
        for value in (_dict(self.summary).get("run_id"), self.listed.get("run_id")):
            if isinstance(value, str) and value:
                return value
        return _config_run_id(self.config)

    @property
    def status(self) -> str:
        """finished / failed / in progress, in words."""
        if self.finished:
            return "finished"
        if self.failed:
            return f"failed: {self.listed.get('error') or 'no summary'}"
        if not self.records:
            return "not started"
        total = self.rounds_total
        return f"in progress: round {self.rounds_done}" + (f" of {total}" if total else "")

    @property
    def hospital_count(self) -> int:
        """Number of hospitals, from whatever file knows it."""
        counts = [len(_dict(self.summary).get("hospitals") or []), len(self.final_per_hospital())]
        if isinstance(self.config.get("hospitals"), int):
            counts.append(self.config["hospitals"])
        return max(counts)


def _bytes(record: dict[str, Any]) -> float:
    """Bytes up + down of one round."""
    return float(
        np.nan_to_num(_num(record.get("bytes_up"))) + np.nan_to_num(_num(record.get("bytes_down")))
    )


def load_run(path: Path, name: str | None = None, listed: dict[str, Any] | None = None) -> RunData:
    """Read a run folder (tolerating missing files)."""
    return RunData(
        name=name or path.name,
        path=path,
        config=_dict(_read_json(path / "config.json")),
        records=_read_metrics(path / "metrics.jsonl"),
        summary=_read_json(path / "summary.json") if (path / "summary.json").exists() else None,
        listed=listed or {},
    )


def _is_run_dir(path: Path) -> bool:
    """The folder holds at least one of a run's files."""
    return any((path / f).is_file() for f in RUN_FILES)


def _run_dirs(path: Path) -> list[Path]:
    """Subfolders that are runs."""
    return sorted(
        d for d in path.iterdir() if d.is_dir() and d.name != IMAGES_DIR and _is_run_dir(d)
    )


def detect_kind(path: Path) -> str:
    """``run``, ``sweep``, ``comparison`` or ``runs`` (a sweep/comparison still running)."""
    if not path.is_dir():
        raise ReportError(f"{path}: no such folder")
    if (path / "comparison.json").is_file():
        return "comparison"
    if (path / "sweep.json").is_file():
        return "sweep"
    if _is_run_dir(path):
        return "run"
    if _run_dirs(path):
        return "runs"
    raise ReportError(
        f"{path}: not a results folder (no config.json, metrics.jsonl or summary.json of a run, "
        "no sweep.json of a sweep, no comparison.json of a comparison, no run subfolders)"
    )


def _child(path: Path, name: str) -> Path | None:
    """``path / name`` when name is a plain folder name, else None."""
    if not name or name in (".", "..") or Path(name).name != name:
        return None
    return path / name


def load_group(path: Path, kind: str) -> tuple[dict[str, Any], list[RunData]]:
    """The sweep/comparison index (or {}) and its runs, listed ones first in their order."""
    index = _dict(_read_json(path / f"{kind}.json")) if kind in ("sweep", "comparison") else {}
    listed: dict[str, dict[str, Any]] = {}
    runs = index.get("runs")
    if isinstance(runs, dict):
        listed = {str(k): _dict(v) for k, v in runs.items()}
    elif isinstance(runs, list):
        listed = {
            r["run"]: r for r in runs if isinstance(r, dict) and isinstance(r.get("run"), str)
        }
    names = list(listed) + [d.name for d in _run_dirs(path) if d.name not in listed]
    out = []
    for name in names:
        folder = _child(path, name)
        if folder is not None and folder.is_dir():
            out.append(load_run(folder, name, listed.get(name)))
        else:
            out.append(RunData(name=name, path=None, listed=listed.get(name, {})))
    return index, out


# ----------------------------------------------------------------------------- series


def fairness_series(run: RunData) -> dict[str, np.ndarray]:
    """Per evaluated round: min, mean, max per-hospital metric and the gap max - min."""
    ev = run.evaluated
    per = _matrix([_dict(r.get("per_hospital")).get(run.metric) for r in ev])
    rounds = np.array([r["round"] for r in ev], dtype=int)
    if per.size == 0:  # no evaluated round, or rounds without per-hospital values
        lo = mid = hi = np.full(len(ev), np.nan)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a round with no finite value
            lo, mid, hi = np.nanmin(per, 1), np.nanmean(per, 1), np.nanmax(per, 1)
    return {"round": rounds, "min": lo, "mean": mid, "max": hi, "gap": hi - lo}


def cumulative_bytes(run: RunData) -> dict[int, float]:
    """Round -> bytes up + down sent up to and including it."""
    total, out = 0.0, {}
    for r in run.records:
        total += _bytes(r)
        out[r["round"]] = total
    return out
