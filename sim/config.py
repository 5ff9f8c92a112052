"""Run configuration: one frozen dataclass, loadable from YAML/JSON, validated with clear errors."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from medichain_jax.compression import CODECS
from medichain_jax.data import lidc_annotations, nih
from medichain_jax.engine.parallel import STRATEGIES
from medichain_jax.fl.aggregators import AGGREGATORS
from medichain_jax.fl.attacks import ATTACKS
from medichain_jax.fl.contribution import UTILITIES
from medichain_jax.fl.registry import ALGORITHMS, SERVER_ALIASES
from medichain_jax.fl.server_opt import SERVER_OPTIMIZERS
from medichain_jax.metrics import TASKS
from medichain_jax.models import FLAT_MODELS, MODELS, NORMS
from medichain_jax.privacy.accounting import ACCOUNTANTS

DATASETS = ("phantom", "lidc-annotations", "nih", "lidc")
# per dataset: its partitions (the first is the default) and its default model
DATASET_PARTITIONS = {
    "phantom": (),
    "lidc-annotations": lidc_annotations.PARTITIONS,
    "nih": nih.PARTITIONS,
    "lidc": ("vendor", "thickness", "iid", "quantity", "dirichlet"),
}
DEFAULT_MODEL = {"phantom": "cnn", "lidc-annotations": "mlp", "nih": "cnn", "lidc": "cnn"}
# fields added after runs were published: left out of the run-id digest at these defaults
_OPTIONAL = {
    "data_dir": None,
    "cache_dir": None,
    "partition": None,
    "vendor_map": None,
    "task": "classification",
    "dp_clip": None,
    "dp_noise": None,
    "dp_adaptive_clip": False,
    "dp_target_quantile": 0.5,
    "dp_clip_lr": 0.2,
    "dp_count_noise": None,
    "dp_record_level": False,
    "delta": None,
    "target_epsilon": None,
    "accountant": "rdp",
    "secagg": "off",
    "secagg_threshold": None,
    "compression": "none",
    "topk_fraction": 0.01,
}
SECAGG_MODES = ("off", "fast", "exact")
__all__ = ["AGGREGATORS", "ALGORITHMS", "ATTACKS", "DATASETS", "SERVER_OPTIMIZERS", "RunConfig"]


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything that defines a simulation run (``config.json`` reproduces it)."""

    dataset: str = "phantom"
    data_dir: str | None = None
    cache_dir: str | None = None
    partition: str | None = None
    vendor_map: str | None = None
    task: str = "classification"
    hospitals: int = 20
    rounds: int = 50
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.0
    server_lr: float | None = None
    server_optimizer: str | None = None
    server_momentum: float = 0.9
    client_fraction: float = 1.0
    seed: int = 0
    non_iid: bool = False
    alpha: float = 0.5
    scanner_shift: float | None = None
    train_per_hospital: int = 256
    test_per_hospital: int = 64
    image_size: int = 64
    model: str | None = None  # None: the dataset's default (DEFAULT_MODEL)
    norm: str = "group"
    algorithm: str = "fedavg"
    mu: float = 0.01
    ditto_lambda: float = 0.1
    finetune_epochs: int = 1
    aggregator: str = "mean"
    trim_beta: float = 0.2
    krum_f: int | None = None
    multi_krum_m: int | None = None
    clip_norm: float | None = None
    byzantine: int = 0
    attack: str = "sign_flip"
    attack_scale: float | None = None
    stragglers: float = 0.0
    dropout: float = 0.0
    late_join: int = 0
    join_round: int = 0
    noisy_hospitals: int = 0
    label_noise: float = 0.0
    contribution: bool = False
    contribution_every: int = 5
    shapley_permutations: int = 8
    contribution_utility: str = "loss"
    client_parallelism: str = "auto"
    chunk: int = 4
    devices: int | None = None
    baselines: bool = False
    eval_every: int = 1
    checkpoint_every: int = 5
    # privacy: client-level DP-FedAvg (or record-level DP-SGD), accounting, secure aggregation
    dp_clip: float | None = None
    dp_noise: float | None = None
    dp_adaptive_clip: bool = False
    dp_target_quantile: float = 0.5
    dp_clip_lr: float = 0.2
    dp_count_noise: float | None = None
    dp_record_level: bool = False
    delta: float | None = None
    target_epsilon: float | None = None
    accountant: str = "rdp"
    secagg: str = "off"
    secagg_threshold: int | None = None
    # update compression (a lossy transfer of each hospital's update)
    compression: str = "none"
    topk_fraction: float = 0.01

    def __post_init__(self):
        if self.dataset in DEFAULT_MODEL and self.model is None:
            default = "segnet" if self.task == "segmentation" else DEFAULT_MODEL[self.dataset]
            object.__setattr__(self, "model", default)
        if self.partition is None and DATASET_PARTITIONS.get(self.dataset):
            default = DATASET_PARTITIONS[self.dataset][0]
            if self.dataset == "lidc-annotations" and self.vendor_map is None:
                default = "thickness"
            object.__setattr__(self, "partition", default)
        _check(self)

    @property
    def cohort_size(self) -> int:
        """Hospitals sampled per round: ``max(1, round(client_fraction * hospitals))``."""
        return max(1, min(self.hospitals, round(self.client_fraction * self.hospitals)))

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-serializable)."""
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """Short stable hash of every field."""
        values = {
            k: v for k, v in self.to_dict().items() if not (k in _OPTIONAL and v == _OPTIONAL[k])
        }
        blob = json.dumps(values, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:8]

    def run_id(self) -> str:
        """Deterministic run name: the same config always maps to the same results folder."""
        skew = self.partition or ("noniid" if self.non_iid else "iid")
        return (
            f"{self.dataset}-{self.algorithm}-h{self.hospitals}-{skew}-s{self.seed}-{self.digest()}"
        )

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> RunConfig:
        """Build from a dict; unknown keys and wrong types raise ``ConfigError`` naming the key."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        clean: dict[str, Any] = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in fields:
                raise ConfigError(
                    f"{source}: unknown key {key!r} (known: {', '.join(sorted(fields))})"
                )
            clean[name] = _coerce(name, fields[name].type, value, source)
        return cls(**clean)

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        """Read a YAML (or JSON) file."""
        return cls.from_dict(cls.read_values(path), source=str(path))

    @staticmethod
    def read_values(path: str | Path) -> dict[str, Any]:
        """The raw key -> value mapping of a YAML (or JSON) config file."""
        path = Path(path)
        try:
            values = yaml.safe_load(path.read_text())
        except OSError as err:
            raise ConfigError(f"cannot read config file {path}: {err.strerror}") from err
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys to values")
        return values


def _coerce(name: str, type_name: str, value: Any, source: str) -> Any:
    want = str(type_name)
    if value is None and "None" in want:
        return None
    try:
        if want.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if want.startswith("float"):
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if want.startswith("bool"):
            if not isinstance(value, bool):
                raise TypeError
            return value
        if want.startswith("str"):
            if not isinstance(value, str):
                raise TypeError
            return value
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{source}: {name} must be {want}, got {value!r}") from err
    return value


def _check(c: RunConfig) -> None:
    def need(ok: bool, field: str, msg: str):
        if not ok:
            raise ConfigError(f"{field} {msg}, got {getattr(c, field)!r}")

    need(c.dataset in DATASETS, "dataset", f"must be one of {DATASETS}")
    need(c.hospitals >= 1, "hospitals", "must be >= 1")
    need(c.rounds >= 1, "rounds", "must be >= 1")
    need(c.local_epochs >= 1, "local_epochs", "must be >= 1")
    need(c.batch_size >= 1, "batch_size", "must be >= 1")
    need(c.lr > 0, "lr", "must be > 0")
    need(0 <= c.momentum < 1, "momentum", "must be in [0, 1)")
    need(c.server_lr is None or c.server_lr > 0, "server_lr", "must be > 0")
    need(
        c.server_optimizer is None or c.server_optimizer in SERVER_OPTIMIZERS,
        "server_optimizer",
        f"must be one of {SERVER_OPTIMIZERS}",
    )
    alias = SERVER_ALIASES.get(c.algorithm)
    need(
        alias is None or c.server_optimizer in (None, alias),
        "server_optimizer",
        f"is fixed to {alias!r} by algorithm {c.algorithm!r}",
    )
    need(0 <= c.server_momentum < 1, "server_momentum", "must be in [0, 1)")
    need(0 < c.client_fraction <= 1, "client_fraction", "must be in (0, 1]")
    need(c.seed >= 0, "seed", "must be >= 0")
    need(c.alpha > 0, "alpha", "must be > 0")
    need(c.scanner_shift is None or c.scanner_shift >= 0, "scanner_shift", "must be >= 0")
    need(c.train_per_hospital >= 8, "train_per_hospital", "must be >= 8")
    need(c.test_per_hospital >= 8, "test_per_hospital", "must be >= 8 (4 of each class)")
    need(c.image_size >= 8 and c.image_size % 8 == 0, "image_size", "must be a multiple of 8")
    need(c.model in MODELS, "model", f"must be one of {MODELS}")
    partitions = DATASET_PARTITIONS[c.dataset]
    need(
        c.partition is None if not partitions else c.partition in partitions,
        "partition",
        f"must be one of {partitions} for dataset {c.dataset!r}"
        if partitions
        else f"does not apply to dataset {c.dataset!r}",
    )
    need(c.task in TASKS, "task", f"must be one of {TASKS}")
    need(
        c.task == "classification" or c.dataset == "lidc",
        "task",
        "segmentation needs dataset 'lidc' (nodule masks)",
    )
    need(
        (c.model == "segnet") == (c.task == "segmentation"),
        "model",
        "must be 'segnet' exactly when task is segmentation",
    )
    if c.dataset == "lidc-annotations":
        need(c.model in FLAT_MODELS, "model", f"must be one of {FLAT_MODELS} (tabular features)")
        need(
            c.partition != "vendor" or c.vendor_map is not None,
            "vendor_map",
            "must name a SeriesInstanceUID,Manufacturer CSV for partition 'vendor'",
        )
    need(
        c.vendor_map is None or c.dataset == "lidc-annotations",
        "vendor_map",
        "applies to dataset 'lidc-annotations' only (lidc reads Manufacturer from DICOM)",
    )
    need(
        c.data_dir is not None or c.dataset in ("phantom", "lidc-annotations"),
        "data_dir",
        f"is needed for dataset {c.dataset!r} (raw or prepared data folder)",
    )
    if c.dataset == "lidc-annotations" and c.partition == "vendor":
        need(c.hospitals == 4, "hospitals", "must be 4 for partition 'vendor' (one per vendor)")
    need(c.norm in NORMS, "norm", f"must be one of {NORMS}")
    need(c.algorithm in ALGORITHMS, "algorithm", f"must be one of {ALGORITHMS}")
    need(c.aggregator in AGGREGATORS, "aggregator", f"must be one of {AGGREGATORS}")
    need(c.mu >= 0, "mu", "must be >= 0")
    need(c.ditto_lambda >= 0, "ditto_lambda", "must be >= 0")
    need(c.finetune_epochs >= 1, "finetune_epochs", "must be >= 1")
    need(0 <= c.trim_beta < 0.5, "trim_beta", "must be in [0, 0.5)")
    need(c.krum_f is None or c.krum_f >= 0, "krum_f", "must be >= 0")
    need(c.multi_krum_m is None or c.multi_krum_m >= 1, "multi_krum_m", "must be >= 1")
    need(c.clip_norm is None or c.clip_norm > 0, "clip_norm", "must be > 0")
    need(0 <= c.byzantine <= c.hospitals, "byzantine", "must be in [0, hospitals]")
    need(c.attack in ATTACKS, "attack", f"must be one of {ATTACKS}")
    need(
        c.attack_scale is None or 0 <= c.attack_scale < float("inf"),
        "attack_scale",
        "must be a finite number >= 0",
    )
    need(0 <= c.stragglers <= 1, "stragglers", "must be a fraction in [0, 1]")
    need(0 <= c.dropout < 1, "dropout", "must be a probability in [0, 1)")
    need(0 <= c.late_join <= c.hospitals, "late_join", "must be in [0, hospitals]")
    need(0 <= c.join_round < c.rounds, "join_round", "must be in [0, rounds)")
    need(0 <= c.noisy_hospitals <= c.hospitals, "noisy_hospitals", "must be in [0, hospitals]")
    need(0 <= c.label_noise <= 1, "label_noise", "must be a probability in [0, 1]")
    need(c.contribution_every >= 1, "contribution_every", "must be >= 1")
    need(c.shapley_permutations >= 1, "shapley_permutations", "must be >= 1")
    need(c.contribution_utility in UTILITIES, "contribution_utility", f"must be one of {UTILITIES}")
    need(c.client_parallelism in STRATEGIES, "client_parallelism", f"must be one of {STRATEGIES}")
    need(c.chunk >= 1, "chunk", "must be >= 1")
    need(c.devices is None or c.devices >= 1, "devices", "must be >= 1")
    need(c.eval_every >= 1, "eval_every", "must be >= 1")
    need(c.checkpoint_every >= 1, "checkpoint_every", "must be >= 1")
    _check_privacy(c, need)
    need(c.compression in CODECS, "compression", f"must be one of {CODECS}")
    need(0 < c.topk_fraction <= 1, "topk_fraction", "must be in (0, 1]")
    need(
        c.compression == "none" or (c.dp_clip is None and c.secagg == "off"),
        "compression",
        "cannot be combined with DP or secure aggregation yet (it changes the update's norm "
        "and its field encoding)",
    )


def _check_privacy(c: RunConfig, need) -> None:
    dp = c.dp_clip is not None
    need(c.dp_clip is None or c.dp_clip > 0, "dp_clip", "must be > 0")
    for field in ("dp_noise", "target_epsilon", "delta", "dp_count_noise"):
        need(getattr(c, field) is None or dp, field, "needs dp_clip (--dp-clip C)")
    for field in ("dp_adaptive_clip", "dp_record_level"):
        need(not getattr(c, field) or dp, field, "needs dp_clip (--dp-clip C)")
    need(
        not dp or c.dp_noise is not None or c.target_epsilon is not None,
        "dp_noise",
        "must be set (--dp-noise Z), or --target-epsilon given to calibrate it",
    )
    need(c.dp_noise is None or c.dp_noise >= 0, "dp_noise", "must be >= 0")
    need(c.target_epsilon is None or c.target_epsilon > 0, "target_epsilon", "must be > 0")
    need(c.delta is None or 0 < c.delta < 1, "delta", "must be in (0, 1)")
    need(0 < c.dp_target_quantile < 1, "dp_target_quantile", "must be in (0, 1)")
    need(c.dp_clip_lr > 0, "dp_clip_lr", "must be > 0")
    need(c.dp_count_noise is None or c.dp_count_noise > 0, "dp_count_noise", "must be > 0")
    need(
        not (c.dp_adaptive_clip and c.dp_record_level),
        "dp_adaptive_clip",
        "applies to client-level DP, not with dp_record_level",
    )
    need(
        not c.dp_record_level or c.norm != "batch",
        "norm",
        "cannot be 'batch' with record-level DP (per-example gradients)",
    )
    sigma_b = c.dp_count_noise if c.dp_count_noise is not None else c.cohort_size / 20
    need(
        not c.dp_adaptive_clip or c.dp_noise is None or 2 * sigma_b > c.dp_noise,
        "dp_adaptive_clip",
        f"needs count noise sigma_b={sigma_b:g} (--dp-count-noise, default cohort / 20) above "
        "dp_noise / 2: adaptive clipping takes its noise from the same budget",
    )
    need(c.accountant in ACCOUNTANTS, "accountant", f"must be one of {ACCOUNTANTS}")
    need(c.secagg in SECAGG_MODES, "secagg", f"must be one of {SECAGG_MODES}")
    if (dp and not c.dp_record_level) or c.secagg != "off":
        need(
            c.aggregator == "mean",
            "aggregator",
            "must be 'mean' with client-level DP or secure aggregation (a noisy / masked sum)",
        )
    need(
        c.secagg == "off" or (dp and not c.dp_record_level) or c.clip_norm is not None,
        "secagg",
        "needs bounded updates: add --clip-norm C or client-level --dp-clip C",
    )
    need(
        c.secagg_threshold is None or c.cohort_size // 2 < c.secagg_threshold <= c.cohort_size,
        "secagg_threshold",
        f"must be in ({c.cohort_size // 2}, {c.cohort_size}]: more than half the cohort",
    )
    need(c.secagg == "off" or c.cohort_size >= 2, "secagg", "needs a cohort of >= 2 hospitals")
