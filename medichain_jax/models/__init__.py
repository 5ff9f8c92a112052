"""Model registry: name -> functional flax model."""

from __future__ import annotations

import functools

from medichain_jax.models.cnn import NORMS, SmallCNN
from medichain_jax.models.functional import FunctionalModel, Variables
from medichain_jax.models.linear import Linear

MODELS = ("cnn", "cnn-wide", "linear")


def get_model(
    name: str = "cnn",
    *,
    in_channels: int = 1,
    num_outputs: int = 1,
    image_size: int = 64,
    norm: str = "group",
) -> FunctionalModel:
    """Build a registered model by name (``cnn``: 8/16 channels; ``cnn-wide``: 16/32;
    ``linear``: logistic regression on the pixels, with a bias, no normalization)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {MODELS}")
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose from {NORMS}")
    if name == "linear":
        build = functools.partial(
            Linear, image_size * image_size * in_channels, num_outputs, use_bias=True
        )
        return FunctionalModel(name="linear", build=build)
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
