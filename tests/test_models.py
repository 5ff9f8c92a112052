import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medichain_jax.models import get_model
from medichain_jax.models.layers import depth_to_space, im2col, max_pool_2x2, space_to_depth


@pytest.mark.parametrize("cin,cout", [(1, 4), (4, 8)])
def test_im2col_conv_equals_lax_conv(cin, cout):
    x = jax.random.normal(jax.random.key(0), (3, 12, 12, cin))
    w = jax.random.normal(jax.random.key(1), (3, 3, cin, cout))
    ref = jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), precision="highest"
    )
    got = jnp.matmul(im2col(x, 3), w.reshape(-1, cout), precision="highest")
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_max_pool_equals_reduce_window():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    ref = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    np.testing.assert_array_equal(max_pool_2x2(x), ref)


def test_space_to_depth_is_a_permutation():
    x = jnp.arange(2 * 4 * 4 * 1, dtype=jnp.float32).reshape(2, 4, 4, 1)
    y = space_to_depth(x)
    assert y.shape == (2, 2, 2, 4)
    np.testing.assert_array_equal(y[0, 0, 0], [0, 1, 4, 5])
    np.testing.assert_array_equal(np.sort(np.asarray(y).ravel()), np.asarray(x).ravel())


@pytest.mark.parametrize(
    "name,norm", [("cnn", "none"), ("cnn", "group"), ("cnn", "batch"), ("cnn-wide", "group")]
)
def test_model_functional_and_padding_blind(name, norm):
    m = get_model(name, image_size=16, norm=norm)
    v = m.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (6, 16, 16, 1))
    mask = jnp.arange(6) < 4
    a, va = m.apply(v, x, train=True, mask=mask)
    b, vb = m.apply(v, x.at[4:].set(1e3), train=True, mask=mask)
    assert a.shape == (6, 1)
    np.testing.assert_allclose(a[:4], b[:4], rtol=1e-6)
    jax.tree.map(np.testing.assert_allclose, va, vb)
    if norm == "batch":
        assert jax.tree.leaves(va["stats"]) and not all(
            np.allclose(p, q)
            for p, q in zip(jax.tree.leaves(va["stats"]), jax.tree.leaves(v["stats"]), strict=True)
        )


def test_unknown_model_and_norm_are_rejected():
    with pytest.raises(ValueError, match="unknown model"):
        get_model("resnet")
    with pytest.raises(ValueError, match="unknown norm"):
        get_model("cnn", norm="instance")


def test_group_norm_matches_flax():
    from flax import nnx

    from medichain_jax.models.layers import GroupNorm

    x = jax.random.normal(jax.random.key(0), (3, 6, 6, 8)) * 5 + 2
    ours = GroupNorm(8, 4, rngs=nnx.Rngs(0))
    ref = nnx.GroupNorm(8, num_groups=4, rngs=nnx.Rngs(0))
    ours.scale[...] = ref.scale[...] = jnp.linspace(0.5, 2, 8)
    ours.bias[...] = ref.bias[...] = jnp.linspace(-1, 1, 8)
    np.testing.assert_allclose(ours(x), ref(x), rtol=1e-4, atol=1e-4)


def test_depth_to_space_inverts_space_to_depth_and_segnet_gives_pixel_logits():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 6, 3)), jnp.float32)
    np.testing.assert_array_equal(depth_to_space(space_to_depth(x)), x)
    model = get_model("segnet", in_channels=1)
    variables = model.init(jax.random.PRNGKey(0))
    logits, _ = model.apply(variables, jnp.zeros((3, 16, 16, 1)))
    assert logits.shape == (3, 16 * 16)
