"""The update codec: deterministic bytes, exact round trip, clear rejections."""

import jax
import numpy as np
import pytest

from medichain_jax.codec import CodecError, decode_tree, encode_tree, tree_digest
from medichain_jax.models import get_model


def test_round_trip_is_exact_and_deterministic():
    variables = get_model("cnn", image_size=16, norm="batch").init(jax.random.key(0))
    blob = encode_tree(variables)
    back = decode_tree(blob, variables)
    jax.tree.map(np.testing.assert_array_equal, back, variables)
    assert jax.tree.structure(back) == jax.tree.structure(variables)
    assert encode_tree(back) == blob
    assert tree_digest(variables) == tree_digest(back)
    other = get_model("cnn", image_size=16, norm="batch").init(jax.random.key(1))
    assert tree_digest(other) != tree_digest(variables)


def test_mixed_dtypes_and_scalars():
    tree = {
        "a": np.arange(5, dtype=np.uint32),
        "b": np.float32(2.5),
        "c": [np.ones((2, 3), np.int64)],
    }
    back = decode_tree(encode_tree(tree), tree)
    assert back["a"].dtype == np.uint32 and back["c"][0].dtype == np.int64
    assert float(back["b"]) == 2.5


def test_rejections_name_the_problem():
    tree = {"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32)}
    blob = encode_tree(tree)
    with pytest.raises(CodecError, match="bad magic"):
        decode_tree(b"XXXX" + blob[4:], tree)
    with pytest.raises(
        CodecError, match=r"leaf \['w'\].*float32\[3, 2\] != expected float32\[2, 3\]"
    ):
        decode_tree(blob, {"w": np.zeros((2, 3), np.float32), "b": np.zeros(2, np.float32)})
    with pytest.raises(CodecError, match="truncated"):
        decode_tree(blob[:-4], tree)
    with pytest.raises(CodecError, match="trailing"):
        decode_tree(blob + b"\0", tree)
    with pytest.raises(CodecError, match="expected"):
        decode_tree(blob, {"w": np.zeros((3, 2), np.float32)})
