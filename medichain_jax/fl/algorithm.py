"""The shape every federated algorithm takes: a named tuple of pure functions (optax style)."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax

from medichain_jax.models import Variables
from medichain_jax.types import ClientData, ClientOutput, PyTree, ServerState


class Algorithm(NamedTuple):
    """``init(variables) -> ServerState``;
    ``client_update(global_vars, data, key, client_state) -> ClientOutput`` (one hospital);
    ``server_update(state, aggregated_update) -> ServerState``."""

    name: str
    init: Callable[[Variables], ServerState]
    client_update: Callable[[Variables, ClientData, jax.Array, PyTree], ClientOutput]
    server_update: Callable[[ServerState, PyTree], ServerState]
