"""``python -m sim.bench_flower``: seconds per federated round, MediChain's compiled round vs
Flower's simulation engine with PyTorch clients, on the same data, side by side.

A round is: every cohort client trains the same small CNN (MediChain's default ``cnn``: space-to-
depth stem, two conv3x3 + GroupNorm + ReLU + max-pool blocks, 32-unit dense, one logit) for one
local epoch of plain SGD (batch 32, the ``RunConfig`` lr / momentum, BCE-with-logits), then the
server takes the example-weighted mean (FedAvg). No evaluation on either side. Workloads:

* ``A``: the default, ``python -m sim --hospitals 20 --non-iid``: 20 hospitals x ~256 images
  64x64 (quantity and label skew), all 20 train every round;
* ``B``: cross-device shape (as pfl-research benchmarks): 1,000 clients x 50 images (IID),
  a cohort of 50 per round.

The driver exports each workload once (``x [N, cap, 64, 64, 1]`` float32, ``y``,
``num_examples``) to a temporary ``.npz``, then runs the two sides as subprocesses in alternation
(ours, Flower, ours, Flower, ...; ``--reps`` times) so machine drift hits both: ours in this
venv (``sim.runner.build``, the compiled round ``python -m sim`` runs), Flower in its own venv
(``flwr[simulation]==1.42.0`` pins ray 2.55.1 and protobuf < 7, which conflict with the core's),
created on first use. Each side times its rounds from inside the run; the first round of every
run (XLA compilation, Ray start-up) is left out. Writes ``results/bench/flower.json``
(``{"A": {"ours_round_s", "flower_round_s", "speedup"}, "B": ...}``; speedup = Flower's median
round time / ours) and ``flower.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sim.config import RunConfig
from sim.results import write_json

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VENV = ROOT / ".venv-flower"
FLOWER_SCRIPT = ROOT / "sim" / "flower_side" / "run_flower.py"
# torch is pinned to the CPU wheel that lies on this machine's disk (any other spec would pull a
# multi-GB CUDA build); flwr does not depend on torch, so any version works for Flower itself
FLOWER_REQUIREMENTS = ("flwr[simulation]==1.42.0", "torch==2.13.0", "numpy")
# Flower's default client resources (flwr.supercore.constant.DEFAULT_SIMULATION_CONFIG): 2 CPUs
# per ClientApp actor, so on a 2-core machine one actor runs the clients one after another
FLOWER_DEFAULT_CLIENT_CPUS = 2.0
SIDE_TIMEOUT_S = 1800
QUIET_BUSY_SHARE = 0.10  # a side starts once other jobs use less than this share of the CPUs
# no network calls from the Flower side: telemetry and Ray usage stats off
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0"}


@dataclasses.dataclass(frozen=True)
class Workload:
    """One benchmark workload: a phantom federation and the cohort trained per round."""

    name: str
    description: str
    hospitals: int
    train_per_hospital: int
    cohort: int
    non_iid: bool
    test_per_hospital: int = 64
    target: float | None = None  # speedup the issue asks for on a 2-core CPU machine

    def config(self) -> RunConfig:
        """The run configuration both sides train (the defaults besides these fields)."""
        return RunConfig(
            hospitals=self.hospitals,
            train_per_hospital=self.train_per_hospital,
            test_per_hospital=self.test_per_hospital,
            non_iid=self.non_iid,
            client_fraction=self.cohort / self.hospitals,
        )

    def describe(self) -> dict[str, Any]:
        """The workload definition, as written into the JSON."""
        cfg = self.config()
        return {
            "description": self.description,
            "hospitals": self.hospitals,
            "train_per_hospital": self.train_per_hospital,
            "cohort": cfg.cohort_size,
            "non_iid": self.non_iid,
            "image": [cfg.image_size, cfg.image_size],
            "model": cfg.model,
            "norm": cfg.norm,
            "local_epochs": cfg.local_epochs,
            "batch_size": cfg.batch_size,
            "lr": cfg.lr,
            "momentum": cfg.momentum,
            "algorithm": cfg.algorithm,
        }


WORKLOADS = {
    "A": Workload(
        "A",
        "default: 20 hospitals x ~256 images 64x64 (non-IID), all train every round",
        hospitals=20,
        train_per_hospital=256,
        cohort=20,
        non_iid=True,
        target=1.5,
    ),
    "B": Workload(
        "B",
        "cross-device: 1,000 clients x 50 images 64x64 (IID), cohort 50 per round",
        hospitals=1000,
        train_per_hospital=50,
        cohort=50,
        non_iid=False,
        test_per_hospital=8,
        target=10.0,
    ),
    # not a benchmark: a few seconds per side, to check that both sides run
    "smoke": Workload(
        "smoke",
        "smoke check: 4 hospitals x 16 images, cohort 2",
        hospitals=4,
        train_per_hospital=16,
        cohort=2,
        non_iid=False,
        test_per_hospital=8,
    ),
}


# ---------------------------------------------------------------------------------------------
# data exchange: the driver writes each workload once, the Flower side reads it


def data_digest(x: np.ndarray, y: np.ndarray, num_examples: np.ndarray) -> str:
    """Short hash of a workload's training arrays (shapes, dtypes and bytes)."""
    h = hashlib.blake2b(digest_size=12)
    for a in (x, y, num_examples):
        a = np.ascontiguousarray(a)
        h.update(f"{a.shape}{a.dtype}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def export_arrays(path: Path, x: np.ndarray, y: np.ndarray, num_examples: np.ndarray) -> str:
    """Write ``x [N, cap, H, W, C]`` float32 (NHWC), ``y [N, cap, K]`` float32 and
    ``num_examples [N]`` int32 to an uncompressed ``.npz``; returns their digest."""
    x = np.asarray(x, np.float32)
    y = np.asarray(y, np.float32)
    n = np.asarray(num_examples, np.int32)
    if x.ndim != 5 or y.ndim != 3 or n.shape != x.shape[:1] or y.shape[:2] != x.shape[:2]:
        raise ValueError(
            f"want x [N, cap, H, W, C], y [N, cap, K], num_examples [N]; "
            f"got {x.shape}, {y.shape}, {n.shape}"
        )
    np.savez(path, x=x, y=y, num_examples=n, image_size=np.int32(x.shape[2]))
    return data_digest(x, y, n)


def load_exported(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(x, y, num_examples)`` of an exported workload."""
    with np.load(path) as f:
        return f["x"], f["y"], f["num_examples"]


def export_workload(workload: Workload, path: Path) -> dict[str, Any]:
    """Generate the workload's federation (as ``python -m sim`` does) and export its training
    arrays; returns their digest, shape and the seconds it took."""
    from sim.runner import load_dataset  # jax-heavy: only when exporting

    t0 = time.perf_counter()
    fed = load_dataset(workload.config())
    x, y = np.asarray(fed.train.x), np.asarray(fed.train.y)
    digest = export_arrays(path, x, y, np.asarray(fed.train.num_examples))
    return {
        "digest": digest,
        "x_shape": list(x.shape),
        "train_examples": int(np.sum(fed.train_sizes)),
        "export_s": time.perf_counter() - t0,
        "npz_mb": path.stat().st_size / 2**20,
    }


# ---------------------------------------------------------------------------------------------
# our side (runs in a subprocess of this venv: ``--side ours``)


def run_ours(workload: Workload, rounds: int) -> dict[str, Any]:
    """Build the workload's compiled round as ``python -m sim`` does and time ``rounds`` rounds
    (the first includes XLA compilation). Call ``use_host_cores()`` before jax starts."""
    import jax
    import jax.numpy as jnp

    from medichain_jax import rng
    from medichain_jax.engine.round import replicate
    from medichain_jax.fl.algorithm import initial_client_states
    from sim.runner import build, play_round

    cfg = workload.config()
    t0 = time.perf_counter()
    exp = build(cfg)
    build_s = time.perf_counter() - t0
    train = exp.federation.train
    digest = data_digest(np.asarray(train.x), np.asarray(train.y), np.asarray(train.num_examples))
    init = exp.model.init(rng.stream(cfg.seed, rng.INIT))
    state = replicate(exp.algorithm.init(init), exp.mesh)
    client_states = initial_client_states(exp.algorithm, init, cfg.hospitals)
    seed = jnp.asarray(cfg.seed, jnp.uint32)
    sample_fn = exp.sample_fn  # set when rounds stream the cohort's rows
    round_s, steps = [], []
    for _ in range(rounds):
        t = time.perf_counter()
        state, client_states, info = play_round(exp, state, client_states, seed)
        jax.block_until_ready(state)
        round_s.append(time.perf_counter() - t)
        steps.append(int(np.sum(np.asarray(info.metrics["steps"]))))
    return {
        "side": "ours",
        "round_s": round_s,
        "steps": steps,
        "cohorts": [cfg.cohort_size] * rounds,
        "build_s": build_s,
        "data_digest": digest,
        "params": int(sum(np.size(a) for a in jax.tree.leaves(init["params"]))),
        "parallelism": dataclasses.asdict(exp.parallelism),
        "devices": 1 if exp.mesh is None else int(exp.mesh.devices.size),
        "streams_cohort": sample_fn is not None,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "versions": {"jax": jax.__version__, "python": platform.python_version()},
    }


# ---------------------------------------------------------------------------------------------
# contention: CPU time that processes outside the benchmark take while a side runs (Linux /proc)

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def parse_proc_stat(line: str) -> tuple[int, float]:
    """``(ppid, cpu seconds)`` from a ``/proc/<pid>/stat`` line: the process's user + system
    time plus that of its reaped children (so finished Ray workers still count)."""
    fields = line[line.rindex(")") + 2 :].split()  # the command name may hold spaces
    ticks = sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    return int(fields[1]), ticks / _TICK


def process_table() -> dict[int, tuple[int, float]]:
    """Every live process: pid -> (ppid, cpu seconds)."""
    table = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    table[int(entry.name)] = parse_proc_stat(f.read())
            except (OSError, ValueError):
                continue  # exited meanwhile
    return table


def descendants(root: int, table: dict[int, tuple[int, float]]) -> set[int]:
    """``root`` and every process below it."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, ()))
    return found


def machine_cpu() -> tuple[float, float]:
    """``(busy, steal)`` CPU seconds of the whole machine so far (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        t = [int(v) for v in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (t + [0] * 8)[:8]
    return (user + nice + system + irq + softirq) / _TICK, steal / _TICK


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class ForeignCpu:
    """Samples, while a side's process runs, the CPU seconds its process tree takes; at the end
    ``share`` is the CPU the rest of the machine (other jobs) took, as a fraction of all cores
    over the run, and ``steal`` the hypervisor's steal time likewise (None off Linux)."""

    def __init__(self, root: int, interval: float = 0.5):
        self.root, self.interval = root, interval
        self.ours: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.available = os.path.exists("/proc/stat")
        self.share: float | None = None
        self.steal: float | None = None

    def _sample(self) -> None:
        table = process_table()
        for pid in descendants(self.root, table):
            if pid in table:
                self.ours[pid] = table[pid][1]

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> ForeignCpu:
        if self.available:
            self._t0 = time.perf_counter()
            self._busy0, self._steal0 = machine_cpu()
            self._self0 = sum(os.times()[:2])
            self._children0 = _children_cpu()
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.available:
            return
        self._stop.set()
        self._thread.join()
        busy, steal = machine_cpu()
        capacity = (time.perf_counter() - self._t0) * (os.cpu_count() or 1)
        driver = sum(os.times()[:2]) - self._self0
        # the sampled tree misses up to one interval before exit; the rusage of reaped children
        # misses descendants nobody waited for: either one is a lower bound of the tree's CPU
        ours = max(sum(self.ours.values()), _children_cpu() - self._children0)
        foreign = busy - self._busy0 - ours - driver
        self.share = max(0.0, foreign) / capacity
        self.steal = (steal - self._steal0) / capacity


def wait_until_quiet(threshold: float, max_wait_s: float, probe_s: float = 2.0) -> dict[str, float]:
    """Wait (up to ``max_wait_s``) until the machine is less than ``threshold`` busy over
    ``probe_s`` while the benchmark itself is idle; returns the last busy share and the wait."""
    if not os.path.exists("/proc/stat"):
        return {"busy_share": float("nan"), "waited_s": 0.0}
    t0 = time.perf_counter()
    cores = os.cpu_count() or 1
    while True:
        busy0, _ = machine_cpu()
        time.sleep(probe_s)
        share = (machine_cpu()[0] - busy0) / (probe_s * cores)
        waited = time.perf_counter() - t0
        if share < threshold or waited >= max_wait_s:
            return {"busy_share": share, "waited_s": waited}
        print(f"  machine {share:.0%} busy with other jobs: waiting", file=sys.stderr)
        time.sleep(10.0)


# ---------------------------------------------------------------------------------------------
# the Flower venv and the two side processes


def ensure_flower_venv(venv: Path) -> Path:
    """The Flower venv's python; creates the venv and installs Flower + torch if it is missing."""
    python = venv / "bin" / "python"
    if not python.exists():
        if venv.exists() and any(venv.iterdir()):
            raise SystemExit(
                f"{venv} exists but has no bin/python: remove it or pass --flower-venv"
            )
        print(f"creating the Flower venv {venv} ({sys.executable} -m venv)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        print(f"installing {' '.join(FLOWER_REQUIREMENTS)} into it", file=sys.stderr)
        subprocess.run([str(python), "-m", "pip", "install", *FLOWER_REQUIREMENTS], check=True)
    check = subprocess.run(
        [str(python), "-c", "import flwr, ray, torch"], capture_output=True, text=True
    )
    if check.returncode:
        raise SystemExit(
            f"{python} cannot import flwr, ray and torch:\n{check.stderr.strip()}\n"
            f"fix: {python} -m pip install {' '.join(repr(r) for r in FLOWER_REQUIREMENTS)}"
        )
    return python


def parse_side_output(stdout: str) -> dict[str, Any]:
    """The side's result: the last stdout line that is a JSON object with a ``side`` key."""
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                out = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(out, dict) and "side" in out:
                return out
    raise ValueError("no JSON result line in the side's output")


def run_side(cmd: Sequence[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one side as a subprocess and return its JSON result, plus its wall time, the load
    average before it and the CPU share other processes took meanwhile (``foreign_cpu``)."""
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        list(cmd), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    with ForeignCpu(proc.pid) as foreign:
        try:
            stdout, stderr = proc.communicate(timeout=SIDE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
    if proc.returncode:
        tail = "\n".join((stdout + stderr).splitlines()[-40:])
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{tail}")
    out = parse_side_output(stdout)
    out.update(
        wall_s=time.perf_counter() - t0,
        load1_before=load,
        foreign_cpu=foreign.share,
        steal_cpu=foreign.steal,
    )
    return out


def ours_command(workload: Workload, rounds: int) -> list[str]:
    """Command line of our side."""
    return [
        sys.executable,
        "-m",
        "sim.bench_flower",
        "--side",
        "ours",
        "--workloads",
        workload.name,
        "--rounds",
        str(rounds),
    ]


def flower_command(
    python: Path, workload: Workload, data: Path, rounds: int, client_cpus: float
) -> list[str]:
    """Command line of the Flower side (the same local-training settings as ours)."""
    cfg = workload.config()
    return [
        str(python),
        str(FLOWER_SCRIPT),
        "--data",
        str(data),
        "--rounds",
        str(rounds),
        "--cohort",
        str(cfg.cohort_size),
        "--epochs",
        str(cfg.local_epochs),
        "--batch-size",
        str(cfg.batch_size),
        "--lr",
        str(cfg.lr),
        "--momentum",
        str(cfg.momentum),
        "--client-cpus",
        str(client_cpus),
    ]


def flower_env() -> dict[str, str]:
    """The Flower side's environment: ours without PYTHONPATH, no telemetry."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(FLOWER_ENV)
    return env


# ---------------------------------------------------------------------------------------------
# results


def steady_rounds(round_s: Sequence[float]) -> list[float]:
    """Round times without the first round (compilation / Ray start-up)."""
    if len(round_s) < 2:
        raise ValueError("need at least 2 rounds per run (the first one is not timed)")
    return list(round_s[1:])


def summarize_workload(
    workload: Workload, ours: Sequence[dict[str, Any]], flower: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """The JSON block of one workload from each side's runs (one per repetition): medians over
    all runs' rounds after the first, ``speedup = flower / ours``, plus per-run details."""
    if not ours or len(ours) != len(flower):
        raise ValueError("need the same, non-zero number of runs of both sides")
    ours_all = [t for run in ours for t in steady_rounds(run["round_s"])]
    flower_all = [t for run in flower for t in steady_rounds(run["round_s"])]
    ours_med = statistics.median(ours_all)
    flower_med = statistics.median(flower_all)
    speedup = flower_med / ours_med
    per_rep = [
        statistics.median(steady_rounds(f["round_s"]))
        / statistics.median(steady_rounds(o["round_s"]))
        for o, f in zip(ours, flower, strict=True)
    ]
    block: dict[str, Any] = {
        "ours_round_s": ours_med,
        "flower_round_s": flower_med,
        "speedup": speedup,
        "target": workload.target,
        "meets_target": None if workload.target is None else speedup >= workload.target,
        "speedup_per_rep": per_rep,
        "ours_round_s_runs": [run["round_s"] for run in ours],
        "flower_round_s_runs": [run["round_s"] for run in flower],
        "ours_first_round_s": [run["round_s"][0] for run in ours],
        "flower_first_round_s": [run["round_s"][0] for run in flower],
        "ours_build_s": [run.get("build_s") for run in ours],
        "flower_startup_s": [run.get("startup_s") for run in flower],
        "other_jobs_cpu_share": {
            "ours": [run.get("foreign_cpu") for run in ours],
            "flower": [run.get("foreign_cpu") for run in flower],
        },
        "load1_before": {
            "ours": [run.get("load1_before") for run in ours],
            "flower": [run.get("load1_before") for run in flower],
        },
        "workload": workload.describe(),
    }
    if all("client_train_s" in run for run in flower):
        train = [t for run in flower for t in steady_rounds(run["client_train_s"])]
        block["flower_client_train_s"] = statistics.median(train)
        block["flower_framework_share"] = 1.0 - statistics.median(train) / flower_med
    if all("steps" in run for run in ours):
        block["sgd_steps_per_round"] = {
            "ours": ours[0]["steps"][-1],
            "flower": flower[0].get("steps", [None])[-1],
        }
    if "peak_rss_mb" in ours[0]:
        block["ours_peak_rss_mb"] = max(run["peak_rss_mb"] for run in ours)
    return block


def check_same_setup(ours: dict[str, Any], flower: dict[str, Any], digest: str) -> list[str]:
    """Differences between the two sides that would make the comparison unfair (empty: none)."""
    problems = []
    if ours.get("data_digest") != digest:
        problems.append(f"our data {ours.get('data_digest')} != exported {digest}")
    if ours.get("params") != flower.get("params"):
        problems.append(
            f"parameter counts differ: ours {ours.get('params')}, Flower {flower.get('params')}"
        )
    if ours.get("cohorts") != flower.get("cohorts"):
        problems.append(f"cohorts differ: ours {ours.get('cohorts')}, {flower.get('cohorts')}")
    if "steps" in flower and ours.get("steps") != flower["steps"]:
        problems.append(f"SGD steps differ: ours {ours.get('steps')}, Flower {flower['steps']}")
    return problems


def plot(result: dict[str, Any], path: Path) -> None:
    """Bar chart: median round seconds of both sides per workload, speedup on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [k for k in result if k in WORKLOADS]
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        block = result[name]
        values = [block["ours_round_s"], block["flower_round_s"]]
        bars = ax.bar(["MediChain (JAX)", "Flower (PyTorch)"], values, color=["#2a7ab9", "#d9822b"])
        ax.bar_label(bars, labels=[f"{v:.2f} s" for v in values])
        target = f" (target {block['target']:g}x)" if block.get("target") else ""
        ax.set_title(f"{name}: speedup {block['speedup']:.2f}x{target}", fontsize=10)
        ax.set_ylabel("seconds per round (median)")
        ax.set_ylim(0, max(values) * 1.18)
        w = block["workload"]
        ax.set_xlabel(f"{w['hospitals']} clients, cohort {w['cohort']}", fontsize=9)
    cores = result.get("meta", {}).get("machine", {}).get("cpu_count")
    where = f", {cores}-core CPU" if cores else ""
    fig.suptitle(f"Seconds per round: MediChain vs Flower simulation{where}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine_info() -> dict[str, Any]:
    """Where the numbers come from."""
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "load1_start": os.getloadavg()[0],
    }


# ---------------------------------------------------------------------------------------------
# command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        prog="python -m sim.bench_flower",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--flower-venv",
        type=Path,
        default=DEFAULT_VENV,
        help="venv with flwr[simulation] 1.42 and torch (created if missing; default: %(default)s)",
    )
    p.add_argument(
        "--workloads", default="A,B", help="comma-separated: A, B (smoke: a quick check)"
    )
    p.add_argument("--rounds", type=int, default=5, help="rounds per run; the first is not timed")
    p.add_argument(
        "--reps", type=int, default=3, help="runs of each side per workload, alternating"
    )
    p.add_argument(
        "--flower-client-cpus",
        type=float,
        default=FLOWER_DEFAULT_CLIENT_CPUS,
        help="Ray num_cpus per Flower client actor, also its torch threads "
        "(default: Flower's own default, %(default)s)",
    )
    p.add_argument(
        "--max-foreign-cpu",
        type=float,
        default=0.05,
        help="rerun a side when other processes took more than this share of the CPUs during "
        "it (PyTorch's two OpenMP threads slow down up to 10x when a core is taken)",
    )
    p.add_argument("--retries", type=int, default=2, help="reruns of a contended side run")
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=300.0,
        help=f"seconds to wait, before each run, for other jobs to use < {QUIET_BUSY_SHARE:.0%}% "
        "of the CPUs (0: do not wait)",
    )
    p.add_argument("--out", type=Path, default=Path("results/bench/flower.json"))
    p.add_argument("--side", choices=("ours",), help=argparse.SUPPRESS)  # internal: one side
    args = p.parse_args(argv)
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in args.workloads if w not in WORKLOADS]
    if unknown or not args.workloads:
        p.error(f"--workloads: unknown {unknown}; choose from {', '.join(WORKLOADS)}")
    if args.rounds < 2 or args.reps < 1:
        p.error("--rounds must be >= 2 (the first round is not timed) and --reps >= 1")
    if args.flower_client_cpus <= 0:
        p.error("--flower-client-cpus must be > 0")
    if args.retries < 0 or args.quiet_wait < 0 or not 0 < args.max_foreign_cpu <= 1:
        p.error("--retries and --quiet-wait must be >= 0, --max-foreign-cpu in (0, 1]")
    return args


def _one_line(run: dict[str, Any]) -> str:
    steady = statistics.median(steady_rounds(run["round_s"]))
    setup = run.get("build_s", run.get("startup_s"))
    foreign = "?" if run["foreign_cpu"] is None else f"{run['foreign_cpu']:.0%}"
    return (
        f"median round {steady:.3f} s, first round {run['round_s'][0]:.1f} s, setup "
        f"{setup:.1f} s, wall {run['wall_s']:.0f} s, other jobs' CPU {foreign}"
    )


def measured_run(
    cmd: Sequence[str], env: dict[str, str] | None, args: argparse.Namespace, label: str
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One side's run, taken on a quiet machine: waits (``--quiet-wait``) until other jobs
    leave the CPUs, and runs it again (up to ``--retries`` times) when other processes took
    more than ``--max-foreign-cpu`` of the CPU meanwhile; returns the run and the discarded ones."""
    discarded: list[dict[str, Any]] = []
    for attempt in range(args.retries + 1):
        quiet = wait_until_quiet(QUIET_BUSY_SHARE, args.quiet_wait) if args.quiet_wait > 0 else {}
        run = run_side(cmd, env)
        run["quiet_before"] = quiet
        print(label + ": " + _one_line(run), file=sys.stderr)
        foreign = run["foreign_cpu"]
        if foreign is None or foreign <= args.max_foreign_cpu or attempt == args.retries:
            return run, discarded
        print(f"{label}: other jobs took {foreign:.0%} of the CPU: again", file=sys.stderr)
        discarded.append(run)
    raise AssertionError("unreachable")


def bench_workload(
    workload: Workload, python: Path, args: argparse.Namespace, tmp: Path
) -> tuple[dict[str, Any], list[str]]:
    """Export one workload, run both sides ``--reps`` times in alternation, summarize."""
    data = tmp / f"{workload.name}.npz"
    print(f"{workload.name}: exporting {workload.description} ...", file=sys.stderr)
    export = export_workload(workload, data)
    print(
        f"{workload.name}: {export['x_shape']} ({export['npz_mb']:.0f} MiB) in "
        f"{export['export_s']:.1f} s",
        file=sys.stderr,
    )
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "flower": []}
    discarded: dict[str, list[dict[str, Any]]] = {"ours": [], "flower": []}
    problems: list[str] = []
    commands = {
        "ours": (ours_command(workload, args.rounds), None),
        "flower": (
            flower_command(python, workload, data, args.rounds, args.flower_client_cpus),
            flower_env(),
        ),
    }
    for rep in range(1, args.reps + 1):
        for side, (cmd, env) in commands.items():
            run, dropped = measured_run(cmd, env, args, f"{workload.name} {rep}/{args.reps} {side}")
            runs[side].append(run)
            discarded[side] += dropped
        problems += check_same_setup(runs["ours"][-1], runs["flower"][-1], export["digest"])
    data.unlink()
    block = summarize_workload(workload, runs["ours"], runs["flower"])
    block["data"] = export
    block["flower_client_cpus"] = runs["flower"][0]["client_cpus"]
    block["flower_torch_threads"] = runs["flower"][0]["torch_threads"]
    block["contended_runs_discarded"] = {
        side: [{"round_s": r["round_s"], "foreign_cpu": r["foreign_cpu"]} for r in dropped]
        for side, dropped in discarded.items()
    }
    limit = args.max_foreign_cpu
    for side, side_runs in runs.items():
        if any((r["foreign_cpu"] or 0.0) > limit for r in side_runs):
            problems.append(f"{side} ran while other jobs took > {limit:.0%} of the CPU")
    return block, [f"{workload.name}: {p}" for p in dict.fromkeys(problems)]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or, with the internal ``--side ours``, one run of our side)."""
    args = parse_args(argv)
    if args.side == "ours":
        from sim.devices import use_host_cores

        use_host_cores()  # before jax starts, as `python -m sim` does
        print(json.dumps(run_ours(WORKLOADS[args.workloads[0]], args.rounds)), flush=True)
        return 0

    t_start = time.perf_counter()
    # a plain `kill` unwinds like Ctrl-C, so the exported workloads in /tmp are removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    python = ensure_flower_venv(args.flower_venv)
    result: dict[str, Any] = {}
    problems: list[str] = []
    meta: dict[str, Any] = {"machine": machine_info()}
    with tempfile.TemporaryDirectory(prefix="bench-flower-") as tmp:
        for name in args.workloads:
            result[name], found = bench_workload(WORKLOADS[name], python, args, Path(tmp))
            problems += found
    first = result[args.workloads[0]]
    meta.update(
        rounds=args.rounds,
        timed_rounds_per_run=args.rounds - 1,
        reps=args.reps,
        order="per workload: ours, flower, ours, flower, ... (one subprocess each)",
        round_definition="cohort local training (1 epoch SGD) + FedAvg aggregation; no "
        "evaluation; first round of each run excluded; median over all runs",
        flower={
            "api": "flwr.simulation.run_simulation(ServerApp, ClientApp), Ray backend",
            "strategy": "flwr.serverapp.strategy.FedAvg (fraction_evaluate=0)",
            "client_resources": {"num_cpus": first["flower_client_cpus"], "num_gpus": 0.0},
            "actors": max(1, int((os.cpu_count() or 1) // first["flower_client_cpus"])),
            "torch_threads_per_client": first["flower_torch_threads"],
        },
        versions=_versions(python),
        contention={
            "measure": "CPU seconds of processes outside each side's process tree (/proc), "
            "as a share of all cores over the run",
            "max_other_jobs_cpu_share": args.max_foreign_cpu,
            "retries": args.retries,
            "quiet_wait_s": args.quiet_wait,
            "quiet_busy_share": QUIET_BUSY_SHARE,
        },
        problems=problems,
        total_s=time.perf_counter() - t_start,
    )
    meta["machine"]["load1_end"] = os.getloadavg()[0]
    result["meta"] = meta
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)
    png = args.out.with_suffix(".png")
    plot(result, png)
    _print_table(result, args.workloads)
    for p in problems:
        print(f"WARNING: {p}", file=sys.stderr)
    print(f"{meta['total_s']:.0f} s -> {args.out}, {png}")
    return 1 if problems else 0


def _versions(python: Path) -> dict[str, str]:
    import jax

    code = (
        "import json, flwr, ray, torch; "
        "print(json.dumps([flwr.__version__, ray.__version__, torch.__version__]))"
    )
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True)
    flwr_v, ray_v, torch_v = json.loads(out.stdout.strip().splitlines()[-1])
    return {"jax": jax.__version__, "flwr": flwr_v, "ray": ray_v, "torch": torch_v}


def _print_table(result: dict[str, Any], names: list[str]) -> None:
    print(f"\n{'workload':<10}{'ours s/round':>14}{'Flower s/round':>16}{'speedup':>10}  target")
    for name in names:
        b = result[name]
        target = "" if b["target"] is None else f">= {b['target']:g}: "
        verdict = "" if b["meets_target"] is None else ("met" if b["meets_target"] else "NOT met")
        print(
            f"{name:<10}{b['ours_round_s']:>14.3f}{b['flower_round_s']:>16.3f}"
            f"{b['speedup']:>9.2f}x  {target}{verdict}"
        )


if __name__ == "__main__":
    raise SystemExit(main())
