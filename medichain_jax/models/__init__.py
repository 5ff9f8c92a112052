"""Model registry: name -> functional flax model."""

from __future__ import annotations

import functools

from medichain_jax.models.cnn import NORMS, SmallCNN
from medichain_jax.models.functional import FunctionalModel, Variables
from medichain_jax.models.linear import Linear
from medichain_jax.models.mlp import MLP
from medichain_jax.models.segnet import SegNet

MODELS = ("cnn", "cnn-wide", "linear", "mlp", "segnet")
# models over flat feature vectors (any input shape); the others need square images
FLAT_MODELS = ("linear", "mlp")


def get_model(
    name: str = "cnn",
    *,
    in_channels: int = 1,
    num_outputs: int = 1,
    image_size: int = 64,
    norm: str = "group",
    in_features: int | None = None,
) -> FunctionalModel:
    """Build a registered model by name (``cnn``: 8/16 channels; ``cnn-wide``: 16/32;
    ``linear``: logistic regression on the flattened input, with a bias, no normalization;
    ``mlp``: two hidden layers of 32; ``segnet``: a pixel-logit FCN). ``in_features`` (flat models) defaults to an image's
    ``image_size**2 * in_channels``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {MODELS}")
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose from {NORMS}")
    flat = image_size * image_size * in_channels if in_features is None else in_features
    if name == "linear":
        build = functools.partial(Linear, flat, num_outputs, use_bias=True)
        return FunctionalModel(name="linear", build=build)
    if name == "mlp":
        return FunctionalModel(name="mlp", build=functools.partial(MLP, flat, num_outputs))
    if name == "segnet":
        build = functools.partial(SegNet, in_channels=in_channels, norm=norm)
        return FunctionalModel(name=f"segnet-{norm}", build=build)
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


__all__ = ["FLAT_MODELS", "MODELS", "NORMS", "FunctionalModel", "Variables", "get_model"]
