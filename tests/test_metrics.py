import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from medichain_jax.metrics import dice_per_row, roc_auc, summarize


def auc_bruteforce(scores, labels):
    pos = [s for s, y in zip(scores, labels, strict=True) if y == 1]
    neg = [s for s, y in zip(scores, labels, strict=True) if y == 0]
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p, q in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auc_hand_computed():
    # positives 0.9, 0.4; negatives 0.5, 0.1 -> pairs won: (0.9>0.5, 0.9>0.1, 0.4>0.1) = 3 of 4
    s = jnp.array([0.9, 0.5, 0.4, 0.1])
    y = jnp.array([1, 0, 1, 0])
    assert float(roc_auc(s, y, jnp.ones(4, bool))) == 0.75


def test_auc_matches_bruteforce_with_ties_and_mask():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = rng.integers(5, 60)
        s = rng.integers(0, 6, n).astype(np.float32)  # many ties
        y = rng.integers(0, 2, n)
        mask = rng.random(n) < 0.8
        if len(set(y[mask])) < 2:
            continue
        want = auc_bruteforce(s[mask], y[mask])
        got = float(roc_auc(jnp.asarray(s), jnp.asarray(y), jnp.asarray(mask)))
        assert abs(got - want) < 1e-6


def test_auc_is_nan_with_one_class():
    assert np.isnan(float(roc_auc(jnp.arange(4.0), jnp.ones(4), jnp.ones(4, bool))))


def test_summarize_ignores_padding():
    logits = jnp.array([[2.0], [-1.0], [0.5], [9.0]])
    labels = jnp.array([[1.0], [0.0], [0.0], [0.0]])
    mask = jnp.array([True, True, True, False])
    out = summarize(logits, labels, mask)
    bce = lambda z, t: np.log1p(np.exp(-z)) if t else np.log1p(np.exp(z))  # noqa: E731
    want = (bce(2.0, 1) + bce(-1.0, 0) + bce(0.5, 0)) / 3
    np.testing.assert_allclose(out["loss"], want, rtol=1e-6)
    np.testing.assert_allclose(out["accuracy"], 2 / 3, rtol=1e-6)
    assert float(out["auc"]) == 1.0


def test_segmentation_metrics_by_hand():
    # row 0: predicted {0, 1}, true {1, 2} -> 2*1/(2+2) = 0.5; row 1: both empty -> 1; row 2: pad
    logits = jnp.array([[1.0, 2.0, -1.0, -1.0], [-1.0, -1.0, -1.0, -1.0], [5.0, 5.0, 5.0, 5.0]])
    labels = jnp.array([[0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    np.testing.assert_allclose(dice_per_row(logits, labels)[:2], [0.5, 1.0])
    out = summarize(logits, labels, jnp.array([True, True, False]), task="segmentation")
    assert float(out["dice"]) == pytest.approx(0.75)
    assert float(out["accuracy"]) == pytest.approx((2 / 4 + 1) / 2)
    # pixel AUC over the 8 real pixels: positives scores {2, -1}, negatives {1, -1, -1 x4}
    # pairs won: 2 beats all 6; -1 ties 5 (0.5 each), loses to 1 -> (6 + 2.5) / 12
    assert float(out["auc"]) == pytest.approx(8.5 / 12)
    assert "auc_per_label" not in out
