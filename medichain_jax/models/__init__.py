"""Model registry: name -> functional flax model."""

from __future__ import annotations

import functools

from medichain_jax.models.cnn import NORMS, SmallCNN
from medichain_jax.models.functional import FunctionalModel, Variables

MODELS = ("cnn", "cnn-wide")


def get_model(
    name: str = "cnn",
    *,
    in_channels: int = 1,
    num_outputs: int = 1,
    image_size: int = 64,
    norm: str = "group",
) -> FunctionalModel:
    """Build a registered model by name (``cnn``: 8/16 channels; ``cnn-wide``: 16/32)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {MODELS}")
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose from {NORMS}")
    channels = (8, 16) if name == "cnn" else (16, 32)
    hidden = 32 if name == "cnn" else 64
    build = functools.partial(
        SmallCNN,
        in_channels=in_channels,
        num_outputs=num_outputs,
        channels=channels,
        hidden=hidden,
        image_size=image_size,
        norm=norm,
    )
    return FunctionalModel(name=f"{name}-{norm}", build=build)


__all__ = ["MODELS", "NORMS", "FunctionalModel", "Variables", "get_model"]
