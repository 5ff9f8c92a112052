import itertools

import jax.numpy as jnp
import numpy as np

from medichain_jax.metrics import roc_auc, summarize


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
