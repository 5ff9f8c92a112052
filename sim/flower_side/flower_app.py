"""Flower side of ``python -m sim.bench_flower``: the same small CNN and local SGD as MediChain's
default ``cnn`` model, as a Flower 1.42 ``ServerApp`` / ``ClientApp`` pair with PyTorch clients.

Runs only in the Flower venv (flwr, ray 2.55 and torch are not core dependencies). This module
must be importable by name in Ray's worker processes, so the ``ClientApp`` and the per-actor
data / model caches are pickled by reference; ``run_flower.py`` next to it is the entry point.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from torch import nn

PARTITION_ID = "partition-id"  # Flower's node_config key of a simulated node's partition


class SmallCNN(nn.Module):
    """MediChain's ``SmallCNN`` (medichain_jax/models/cnn.py) in PyTorch: space-to-depth 2x2 stem,
    then (conv3x3 SAME -> GroupNorm(4 groups, eps 1e-6) -> ReLU -> 2x2 max-pool) twice with 8 and
    16 channels, a 32-unit hidden dense layer and one logit. Same parameter count (34,345 at
    64x64)."""

    def __init__(
        self,
        in_channels: int = 1,
        num_outputs: int = 1,
        channels: tuple[int, int] = (8, 16),
        hidden: int = 32,
        image_size: int = 64,
    ):
        super().__init__()
        c1, c2 = channels
        self.net = nn.Sequential(
            nn.PixelUnshuffle(2),
            nn.Conv2d(4 * in_channels, c1, 3, padding=1),
            nn.GroupNorm(min(4, c1), c1, eps=1e-6),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.GroupNorm(min(4, c2), c2, eps=1e-6),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear((image_size // 8) ** 2 * c2, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_outputs),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` images -> ``[B, num_outputs]`` logits."""
        return self.net(x)


def num_params(model: nn.Module) -> int:
    """Trainable parameter count."""
    return sum(p.numel() for p in model.parameters())


def local_train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float,
    seed: int,
) -> tuple[float, int]:
    """Minibatch SGD with BCE-with-logits, reshuffled every epoch, last batch partial (as
    MediChain's ``local_train``); returns the mean minibatch loss and the steps taken."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    loss_fn = nn.BCEWithLogitsLoss()
    gen = torch.Generator().manual_seed(seed)
    model.train()
    total, steps = 0.0, 0
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=gen)
        for start in range(0, x.shape[0], batch_size):
            idx = order[start : start + batch_size]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            total += float(loss.detach())
            steps += 1
    return total / max(steps, 1), steps


# per Ray actor (one process, reused for many clients): the workload's arrays and one model
_DATA: dict[str, tuple[torch.Tensor, torch.Tensor, np.ndarray]] = {}
_MODEL: dict[int, SmallCNN] = {}


def workload_arrays(path: str) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """The exported workload (``x [N, cap, H, W, C]`` NHWC, ``y [N, cap, K]``, ``num_examples
    [N]``) as NCHW torch tensors, loaded once per process."""
    if path not in _DATA:
        with np.load(path) as f:
            x, y, n = f["x"], f["y"], f["num_examples"]
        x = np.ascontiguousarray(x.transpose(0, 1, 4, 2, 3))
        _DATA[path] = (torch.from_numpy(x), torch.from_numpy(np.ascontiguousarray(y)), n)
    return _DATA[path]


def model_for(image_size: int) -> SmallCNN:
    """One model instance per process, reloaded with the global weights by every client."""
    if image_size not in _MODEL:
        _MODEL[image_size] = SmallCNN(image_size=image_size)
    return _MODEL[image_size]


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """One hospital's round: load the global model, train locally, send weights back."""
    cfg = msg.content["config"]
    torch.set_num_threads(int(cfg["threads"]))
    pid = int(context.node_config[PARTITION_ID])
    x_all, y_all, sizes = workload_arrays(str(cfg["data"]))
    n = int(sizes[pid])
    model = model_for(int(x_all.shape[-1]))
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    t0 = time.perf_counter()
    loss, steps = local_train(
        model,
        x_all[pid, :n],
        y_all[pid, :n],
        epochs=int(cfg["epochs"]),
        batch_size=int(cfg["batch-size"]),
        lr=float(cfg["lr"]),
        momentum=float(cfg["momentum"]),
        seed=int(cfg["server-round"]) * 1_000_003 + pid,
    )
    metrics = {
        "train-loss": loss,
        "train-s": time.perf_counter() - t0,
        "steps": steps,
        "num-examples": n,
    }
    content = RecordDict(
        {"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord(metrics)}
    )
    return Message(content=content, reply_to=msg)


class TimedFedAvg(FedAvg):
    """Flower's FedAvg (example-weighted) that records each round's wall time, from the start of
    ``configure_train`` (node sampling) to the end of ``aggregate_train``, and the clients'
    own training seconds (the rest is the framework: messages, Ray, (de)serialization)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.round_s: list[float] = []
        self.client_train_s: list[float] = []
        self.cohorts: list[int] = []
        self.steps: list[int] = []
        self._t0 = 0.0

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ):
        """Start the round's clock, then sample nodes as FedAvg does."""
        self._t0 = time.perf_counter()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies):
        """Aggregate as FedAvg does, then stop the round's clock."""
        replies = list(replies)
        out = super().aggregate_train(server_round, replies)
        self.round_s.append(time.perf_counter() - self._t0)
        metrics = [r.content["metrics"] for r in replies if r.has_content()]
        self.cohorts.append(len(metrics))
        self.client_train_s.append(sum(float(m["train-s"]) for m in metrics))
        self.steps.append(sum(int(m["steps"]) for m in metrics))
        return out


def make_server_app(
    strategy: TimedFedAvg, rounds: int, train_config: dict[str, int | float | str]
) -> ServerApp:
    """A ServerApp that runs ``strategy`` for ``rounds`` rounds from a fresh model."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        model = SmallCNN(image_size=int(train_config["image-size"]))
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(model.state_dict()),
            num_rounds=rounds,
            train_config=ConfigRecord(train_config),
        )

    return app
