"""MediChain: pure JAX federated learning for medical imaging."""

from medichain_jax.types import ClientData, ClientOutput, ServerState

__all__ = ["ClientData", "ClientOutput", "ServerState"]
__version__ = "0.4.0"
