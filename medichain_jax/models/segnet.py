"""A small fully convolutional network for nodule segmentation: one logit per pixel."""

from __future__ import annotations

import jax
from flax import nnx

from medichain_jax.models.cnn import _Norm
from medichain_jax.models.layers import Im2ColConv, depth_to_space, space_to_depth


class SegNet(nnx.Module):
    """Space-to-depth 2x2, three 3x3 convolutions (norm, relu) at half resolution, then
    depth-to-space back to full resolution: ``[B, H, W, C]`` -> ``[B, H * W]`` pixel logits
    (an FCN in the spirit of Long et al. 2015, sized for 2 CPU cores)."""

    def __init__(
        self, in_channels: int = 1, width: int = 16, norm: str = "group", *, rngs: nnx.Rngs
    ):
        self.conv1 = Im2ColConv(4 * in_channels, width, rngs=rngs)
        self.norm1 = _Norm(norm, width, rngs=rngs)
        self.conv2 = Im2ColConv(width, width, rngs=rngs)
        self.norm2 = _Norm(norm, width, rngs=rngs)
        self.conv3 = Im2ColConv(width, 4, rngs=rngs)

    def __call__(self, x: jax.Array, train: bool = False, mask: jax.Array | None = None):
        h = space_to_depth(x)
        h = jax.nn.relu(self.norm1(self.conv1(h), train, mask))
        h = jax.nn.relu(self.norm2(self.conv2(h), train, mask))
        return depth_to_space(self.conv3(h)).reshape(x.shape[0], -1)
