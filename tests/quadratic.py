"""A federated quadratic problem with a known optimum, solvable by hand in numpy.

Hospital i holds ``f_i(w) = 0.5 ||w - b_i||^2`` as a linear regression: D rows
``x_k = sqrt(D) e_k`` with targets ``sqrt(D) b_i[k]``, so one full-batch step of local SGD is
exactly ``w <- w - lr (w - b_i)``. The optimum of the federated objective (equal weights)
is the mean of the ``b_i``.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from medichain_jax.fl.client import TrainHParams, masked_mse
from medichain_jax.models.functional import FunctionalModel
from medichain_jax.models.linear import Linear
from medichain_jax.types import ClientData

D = 4
OPTIMUM = np.array([1.0, -2.0, 0.5, 3.0], np.float32)


def targets(num_clients: int = 8, spread: float = 0.02, seed: int = 0) -> np.ndarray:
    """``b_i = OPTIMUM +/- delta_i`` in pairs, so the mean and the coordinate-wise median are
    both exactly ``OPTIMUM``."""
    rng = np.random.default_rng(seed)
    half = rng.uniform(-spread, spread, size=(num_clients // 2, D)).astype(np.float32)
    deltas = np.concatenate([half, -half])
    if num_clients % 2:
        deltas = np.concatenate([deltas, np.zeros((1, D), np.float32)])
    return OPTIMUM + deltas


def clients(b: np.ndarray) -> ClientData:
    """The hospitals' regression data for targets ``b`` ``[m, D]``."""
    m = len(b)
    x = np.zeros((m, D, D, 1, 1), np.float32)
    for k in range(D):
        x[:, k, k] = np.sqrt(D)
    y = (np.sqrt(D) * b)[:, :, None].astype(np.float32)
    return ClientData(jnp.asarray(x), jnp.asarray(y), jnp.full((m,), D, jnp.int32))


MODEL = FunctionalModel("quadratic", functools.partial(Linear, D, 1, use_bias=False))


def hparams(epochs: int = 2, lr: float = 0.3, **kw) -> TrainHParams:
    """Full-batch local gradient descent on the quadratic."""
    return TrainHParams(model=MODEL, epochs=epochs, batch_size=D, lr=lr, loss=masked_mse, **kw)


def init_vars(w0: np.ndarray | None = None):
    """Model variables with kernel ``w0`` (zeros by default)."""
    w = np.zeros(D, np.float32) if w0 is None else np.asarray(w0, np.float32)
    return {"params": {"kernel": jnp.asarray(w[:, None])}, "stats": {}}


def weights_of(variables) -> np.ndarray:
    """The kernel as a flat numpy vector."""
    return np.asarray(variables["params"]["kernel"])[:, 0]


def local_gd(
    w: np.ndarray, b: np.ndarray, steps: int, lr: float, prox=0.0, anchor=None, offset=0.0
):
    """numpy reference of local training: ``steps`` of ``w -= lr (grad f_i + prox + offset)``."""
    anchor = w.copy() if anchor is None else anchor
    for _ in range(steps):
        w = w - lr * ((w - b) + prox * (w - anchor) + offset)
    return w
