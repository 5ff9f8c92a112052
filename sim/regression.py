"""``python -m sim.regression [--update]``: the learning regression guard.

Re-runs a fast subset of the studies (small phantom federations: FedAvg IID and non-IID,
FedProx, sampled SCAFFOLD, record-level DP, top-k compression) and compares each with the
committed reference metrics in ``results/reference/regression.json``:

* learning: the mean per-hospital AUC may not drop by more than ``--tolerance`` (0.02);
* determinism: the same seed on CPU must give the same numbers (AUC within 1e-3, final train
  loss within 1e-4: float noise between CPUs, not a change of behaviour).

Exit 0 when every case passes, 1 otherwise (one line per failed check). ``--update`` rewrites
the reference after an intended change (say why in the commit). ``python -m sim.bench
--check`` is the speed counterpart.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from sim.config import RunConfig
from sim.results import write_json

REFERENCE = Path("results/reference/regression.json")
BASE: dict[str, Any] = dict(
    hospitals=4,
    rounds=20,
    train_per_hospital=96,
    test_per_hospital=32,
    image_size=16,
    batch_size=16,
    lr=0.1,
    eval_every=20,
    checkpoint_every=20,
    devices=1,  # the same numbers whatever the machine's core count
)
CASES: dict[str, dict[str, Any]] = {
    "fedavg-iid": {},
    "fedavg-noniid": {"non_iid": True},
    "fedprox-noniid": {"non_iid": True, "algorithm": "fedprox", "mu": 0.1},
    "scaffold-sampled": {"non_iid": True, "algorithm": "scaffold", "client_fraction": 0.5},
    "dp-record": {"dp_clip": 1.0, "dp_noise": 0.8, "dp_record_level": True},
    "topk": {"compression": "topk", "topk_fraction": 0.1},
}
AUC_SAME, LOSS_SAME = 1e-3, 1e-4


def run_case(name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train one case (plus ``overrides``) in a temporary folder; its headline numbers."""
    from sim.runner import run

    config = RunConfig(**{**BASE, **CASES[name], **(overrides or {})})
    with tempfile.TemporaryDirectory() as tmp:
        s = run(config, Path(tmp) / name, progress=False, plots=False)
        last = json.loads((Path(tmp) / name / "metrics.jsonl").read_text().splitlines()[-1])
    return {
        "auc": s["federated"]["mean"],
        "pooled_auc": s["federated"]["pooled_test"],
        "train_loss": last["train_loss"],
        "epsilon": s["privacy"]["epsilon"],
        "run_id": config.run_id(),
    }


def compare(name: str, now: dict[str, Any], ref: dict[str, Any], tolerance: float) -> list[str]:
    """The failed checks of one case (empty when it passes)."""
    problems = []
    if now["auc"] < ref["auc"] - tolerance:
        problems.append(
            f"{name}: AUC {now['auc']:.4f} dropped below the reference {ref['auc']:.4f} - "
            f"{tolerance:g}"
        )
    if abs(now["auc"] - ref["auc"]) > AUC_SAME or abs(now["train_loss"] - ref["train_loss"]) > (
        LOSS_SAME
    ):
        problems.append(
            f"{name}: same seed, different numbers: AUC {now['auc']:.6f} vs {ref['auc']:.6f}, "
            f"train loss {now['train_loss']:.6f} vs {ref['train_loss']:.6f}"
        )
    return problems


def check(
    cases: list[str] | None = None,
    *,
    reference: Path = REFERENCE,
    tolerance: float = 0.02,
    overrides: dict[str, Any] | None = None,
) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """Run ``cases`` (default all) and compare with ``reference``; (failures, numbers)."""
    ref = json.loads(reference.read_text())["cases"]
    names = cases or list(CASES)
    problems: list[str] = []
    numbers = {}
    for name in names:
        if name not in ref:
            problems.append(f"{name}: no reference in {reference} (run with --update)")
            continue
        numbers[name] = run_case(name, overrides)
        problems += compare(name, numbers[name], ref[name], tolerance)
    return problems, numbers


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m sim.regression``."""
    p = argparse.ArgumentParser(prog="python -m sim.regression", description=__doc__)
    p.add_argument("--cases", help=f"comma-separated subset of {', '.join(CASES)}")
    p.add_argument("--tolerance", type=float, default=0.02, help="allowed AUC drop")
    p.add_argument("--reference", type=Path, default=REFERENCE)
    p.add_argument("--update", action="store_true", help="rewrite the reference")
    args = p.parse_args(argv)
    names = args.cases.split(",") if args.cases else list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        p.error(f"unknown cases {unknown}; known: {', '.join(CASES)}")
    if args.update:
        numbers = {n: run_case(n) for n in names}
        write_json(args.reference, {"base": BASE, "cases": numbers})
        print(f"wrote {args.reference}: {json.dumps(numbers, indent=1)}")
        return 0
    problems, numbers = check(names, reference=args.reference, tolerance=args.tolerance)
    for name, n in numbers.items():
        print(f"{name:<18} AUC {n['auc']:.4f}  train loss {n['train_loss']:.4f}")
    for line in problems:
        print(f"FAIL {line}")
    print("regression guard: " + ("FAILED" if problems else "passed"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
