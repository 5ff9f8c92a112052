"""Result files of a run: config.json, metrics.jsonl (one line per round), summary.json."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np


def to_jsonable(value: Any) -> Any:
    """numpy / jax scalars and arrays -> plain Python; NaN -> None (valid JSON)."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, str):
        return to_jsonable(np.asarray(value).tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: Path, payload: Any) -> None:
    """Write JSON atomically (write to a temp file, then rename)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(to_jsonable(payload), indent=2) + "\n")
    tmp.replace(path)


class MetricsLog:
    """Append-only ``metrics.jsonl``; ``truncate(k)`` drops rounds after ``k`` when resuming."""

    def __init__(self, path: Path):
        self.path = path

    def read(self) -> list[dict[str, Any]]:
        """All lines written so far."""
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate(self, last_round: int) -> list[dict[str, Any]]:
        """Keep rounds ``<= last_round``; return them."""
        keep = [r for r in self.read() if r["round"] <= last_round]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))
        return keep

    def append(self, record: dict[str, Any]) -> None:
        """Add one round's line."""
        with self.path.open("a") as fh:
            fh.write(json.dumps(to_jsonable(record)) + "\n")


def finished_summary(workdir: Path, run_id: str) -> dict[str, Any] | None:
    """The run's ``summary.json`` when it finished with this very config (run id), else None:
    how ``sim.compare`` and ``sim.sweep`` skip finished runs."""
    done = Path(workdir) / "summary.json"
    if not done.exists():
        return None
    summary = json.loads(done.read_text())
    return summary if summary.get("run_id") == run_id else None
