"""Tests for the CT phantom generator and the phantom federation builder."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medichain_jax.data.federation import Federation, make_phantom_federation, pad_and_stack
from medichain_jax.data.partition import label_skew_rates, quantity_skew_sizes
from medichain_jax.data.phantom import (
    REFERENCE_PROFILE,
    VENDORS,
    ScannerProfile,
    clean_patches,
    hospital_profiles,
    latent_params,
    render_patches,
    window,
)

N_TEST_IMG = 64
KEY = jax.random.PRNGKey(42)
LABELS = np.arange(N_TEST_IMG) % 2
NEUTRAL = ScannerProfile(hu_scale=1.0, hu_shift=0.0, noise_std=0.0, blur_sigma=0.0, contrast_hu=0.0)


def _corners(x: np.ndarray, c: int = 6) -> np.ndarray:
    """Pixels of the four c x c corners (air, far from the body)."""
    return np.concatenate(
        [x[:, :c, :c], x[:, :c, -c:], x[:, -c:, :c], x[:, -c:, -c:]], axis=1
    ).reshape(-1)


def _auc(y: np.ndarray, s: np.ndarray) -> float:
    """Rank AUC (ties averaged)."""
    order = np.argsort(s, kind="stable")
    ranks = np.empty(s.size)
    ranks[order] = np.arange(1, s.size + 1)
    for v in np.unique(s):
        tie = s == v
        ranks[tie] = ranks[tie].mean()
    pos = y == 1
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@pytest.fixture(scope="module")
def fed() -> Federation:
    return make_phantom_federation(0, 6, True, alpha=0.5, mean_train=48, test_size=16)


# --------------------------------------------------------------------------- scanner profiles


@pytest.mark.parametrize(
    "prof",
    [
        ScannerProfile(
            hu_scale=1.04, hu_shift=-25.0, noise_std=30.0, blur_sigma=0.8, contrast_hu=0
        ),
        ScannerProfile(
            hu_scale=0.95, hu_shift=20.0, noise_std=10.0, blur_sigma=1.4, contrast_hu=150
        ),
    ],
)
def test_air_background_statistics(prof: ScannerProfile) -> None:
    """Air far from the body has mean hu_scale*(-1000)+hu_shift and std noise_std."""
    x = np.asarray(render_patches(KEY, LABELS, prof))
    assert x.shape == (N_TEST_IMG, 64, 64) and x.dtype == np.float32
    air = _corners(x)
    assert abs(air.mean() - (prof.hu_scale * -1000.0 + prof.hu_shift)) < 3.0
    assert abs(air.std() / prof.noise_std - 1.0) < 0.10


def test_affine_intensity_and_zero_blur() -> None:
    """Without noise, scale/shift act affinely, and sigma 0 means no blur at all."""
    clean = np.asarray(clean_patches(KEY, LABELS[:16]))
    neutral = np.asarray(render_patches(KEY, LABELS[:16], NEUTRAL))
    np.testing.assert_allclose(neutral, clean, atol=1e-3)
    shifted = np.asarray(
        render_patches(KEY, LABELS[:16], NEUTRAL._replace(hu_scale=1.05, hu_shift=-20.0))
    )
    np.testing.assert_allclose(shifted, 1.05 * neutral - 20.0, atol=1e-2)


def test_blur_reduces_high_frequency_energy() -> None:
    """A larger blur_sigma lowers the energy of pixel differences (noise-free)."""

    def hf(prof: ScannerProfile) -> float:
        x = np.asarray(render_patches(KEY, LABELS[:32], prof))
        return float(np.mean(np.diff(x, axis=1) ** 2) + np.mean(np.diff(x, axis=2) ** 2))

    e0, e1, e2 = (hf(NEUTRAL._replace(blur_sigma=s)) for s in (0.0, 0.7, 1.5))
    assert e1 < 0.7 * e0 and e2 < 0.7 * e1


def test_contrast_brightens_vessels_not_air() -> None:
    """Contrast raises the mean of the body but leaves air alone."""
    plain = np.asarray(render_patches(KEY, LABELS[:32], NEUTRAL))
    contrast = np.asarray(render_patches(KEY, LABELS[:32], NEUTRAL._replace(contrast_hu=200.0)))
    assert contrast.mean() > plain.mean() + 5.0
    np.testing.assert_allclose(_corners(contrast), _corners(plain), atol=1e-3)


def test_hospital_profiles() -> None:
    """Vendors round-robin; vendors differ; shift 0 = reference; shift scales the deviation."""
    key = jax.random.PRNGKey(7)
    p1, vid = hospital_profiles(key, 8, 1.0)
    np.testing.assert_array_equal(vid, np.arange(8) % 4)
    for f in p1:
        assert f.shape == (8,) and f.dtype == jnp.float32
    for i in range(4):
        for j in range(i + 1, 4):
            diff = [abs(float(f[i]) - float(f[j])) for f in p1]
            assert diff[1] > 5.0 or diff[2] > 3.0  # shift or noise differ by vendor
    p0, _ = hospital_profiles(key, 8, 0.0)
    for f, ref in zip(p0, REFERENCE_PROFILE, strict=True):
        np.testing.assert_array_equal(np.asarray(f), np.full(8, ref, np.float32))
    p2, _ = hospital_profiles(key, 8, 2.0)
    dev1 = np.asarray(p1.hu_shift) - REFERENCE_PROFILE.hu_shift
    dev2 = np.asarray(p2.hu_shift) - REFERENCE_PROFILE.hu_shift
    np.testing.assert_allclose(dev2, 2.0 * dev1, rtol=1e-4, atol=1e-4)
    assert np.all(np.asarray(p2.noise_std) >= 0) and np.all(np.asarray(p2.blur_sigma) >= 0)


# --------------------------------------------------------------------------- rendering


def test_render_image_independent_of_batch_and_jittable() -> None:
    """Image i depends only on fold_in(key, i); rendering works under jit with a traced profile."""
    a = np.asarray(render_patches(KEY, LABELS[:5], REFERENCE_PROFILE))
    b = np.asarray(render_patches(KEY, LABELS[:40], REFERENCE_PROFILE))
    np.testing.assert_allclose(a, b[:5], atol=1e-3)
    prof = ScannerProfile(*(jnp.float32(v) for v in REFERENCE_PROFILE))
    c = jax.jit(lambda p: render_patches(KEY, jnp.asarray(LABELS[:5]), p))(prof)
    np.testing.assert_allclose(np.asarray(c), a, atol=1e-3)
    assert not np.allclose(a, np.asarray(render_patches(KEY + 1, LABELS[:5], REFERENCE_PROFILE)))


def test_window() -> None:
    """Lung window maps [-1000, 400] HU linearly onto [0, 1] and clips outside."""
    w = np.asarray(window(jnp.array([-2000.0, -1000.0, -300.0, 400.0, 3000.0])))
    np.testing.assert_allclose(w, [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)
    assert w.dtype == np.float32


def test_label_is_encoded_in_image() -> None:
    """Malignant nodules are larger: dense area near the centre and latent radius."""
    labels = np.repeat([0, 1], 128)
    key = jax.random.PRNGKey(3)
    clean = np.asarray(clean_patches(key, labels))
    yy, xx = np.mgrid[:64, :64]
    centre = (yy - 31.5) ** 2 + (xx - 31.5) ** 2 < 12**2
    area = ((clean > -400) & centre).sum(axis=(1, 2))
    assert area[labels == 1].mean() > 1.3 * area[labels == 0].mean()
    assert _auc(labels, area.astype(float)) > 0.6
    lat = latent_params(key, labels)
    r0 = np.asarray(lat["nod_r0"])
    assert r0[labels == 1].mean() > 1.15 * r0[labels == 0].mean()
    spic = np.asarray(lat["spic_amp"]) > 0
    assert spic[labels == 1].mean() > spic[labels == 0].mean() + 0.3


def _hand_features(hu: np.ndarray) -> np.ndarray:
    """Counts of dense / calcified / ground-glass / edge pixels in the central 32 x 32."""
    c = hu[:, 16:48, 16:48]
    gy, gx = np.gradient(c, axis=(1, 2))
    grad = np.sqrt(gx**2 + gy**2)
    f = np.stack(
        [
            np.log1p((c > -400).sum((1, 2))),
            (c > 200).sum((1, 2)),
            ((c > -650) & (c < -250)).sum((1, 2)),
            np.log1p((grad > 150).sum((1, 2))),
        ],
        axis=1,
    ).astype(np.float64)
    return f


def _logistic_fit(x: np.ndarray, y: np.ndarray, steps: int = 500) -> np.ndarray:
    """Plain gradient-descent logistic regression with a bias column."""
    x = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)
    w = np.zeros(x.shape[1])
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-x @ w))
        w -= 0.5 * x.T @ (p - y) / y.size
    return w


def test_linear_probe_learnable_but_not_trivial() -> None:
    """A linear probe on hand features beats chance clearly but does not separate the classes."""
    n = 1024
    labels = np.random.default_rng(0).integers(0, 2, n)
    hu = np.asarray(render_patches(jax.random.PRNGKey(11), labels, REFERENCE_PROFILE))
    f = _hand_features(hu)
    mu, sd = f[: n // 2].mean(0), f[: n // 2].std(0) + 1e-6
    f = (f - mu) / sd
    w = _logistic_fit(f[: n // 2], labels[: n // 2])
    score = np.concatenate([f[n // 2 :], np.ones((n - n // 2, 1))], axis=1) @ w
    auc = _auc(labels[n // 2 :], score)
    assert 0.65 < auc < 0.99, auc


# --------------------------------------------------------------------------- federation


def test_federation_deterministic(fed: Federation) -> None:
    """Same seed -> bitwise identical; another seed -> different."""
    again = make_phantom_federation(0, 6, True, alpha=0.5, mean_train=48, test_size=16)
    leaves = jax.tree.leaves((fed.train, fed.test, fed.profiles))
    leaves_again = jax.tree.leaves((again.train, again.test, again.profiles))
    for a, b in zip(leaves, leaves_again, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(fed.train_sizes, again.train_sizes)
    other = make_phantom_federation(1, 6, True, alpha=0.5, mean_train=48, test_size=16)
    assert not np.array_equal(np.asarray(other.test.x), np.asarray(fed.test.x))


def test_federation_layout_and_padding(fed: Federation) -> None:
    """Shapes, dtypes, num_examples, zero padding, windowed range, vendors."""
    n_max = int(fed.train_sizes.max())
    assert fed.train.x.shape == (6, n_max, 64, 64, 1) and fed.train.x.dtype == jnp.float32
    assert fed.train.y.shape == (6, n_max, 1) and fed.test.x.shape == (6, 16, 64, 64, 1)
    assert fed.train.num_examples.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(fed.train.num_examples), fed.train_sizes)
    np.testing.assert_array_equal(np.asarray(fed.test.num_examples), fed.test_sizes)
    x, y = np.asarray(fed.train.x), np.asarray(fed.train.y)
    assert x.min() >= 0.0 and x.max() <= 1.0
    for h, n in enumerate(fed.train_sizes):
        assert np.all(x[h, n:] == 0) and np.all(y[h, n:] == 0)
        assert np.all(x[h, :n].reshape(n, -1).max(axis=1) > 0.5)
    assert fed.vendors == tuple(VENDORS[i % 4] for i in range(6))
    assert fed.num_hospitals == 6 and "noniid" in fed.name


def test_federation_labels_follow_configured_rates(fed: Federation) -> None:
    """Label counts equal round(rate * n); test sets hold >= 4 of each class."""
    rng = np.random.default_rng(0)
    rates = label_skew_rates(rng, 6, 0.5)
    sizes = quantity_skew_sizes(rng, 6, 48)
    np.testing.assert_array_equal(fed.train_sizes, sizes)
    assert len(set(sizes.tolist())) > 1
    y_tr, y_te = np.asarray(fed.train.y)[..., 0], np.asarray(fed.test.y)[..., 0]
    np.testing.assert_array_equal(y_tr.sum(1), np.rint(rates * sizes))
    np.testing.assert_allclose(fed.train_pos_rate, y_tr.sum(1) / sizes)
    assert np.all(y_te.sum(1) >= 4) and np.all((16 - y_te.sum(1)) >= 4)
    np.testing.assert_allclose(fed.test_pos_rate, y_te.sum(1) / 16)
    assert set(np.unique(y_tr).tolist()) <= {0.0, 1.0}


def test_federation_matches_render_patches(fed: Federation) -> None:
    """Hospital h's images are render_patches with its profile, windowed."""
    h = 3
    n = int(fed.test_sizes[h])
    prof = ScannerProfile(*(f[h] for f in fed.profiles))
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(0), 2), h)
    ref = window(render_patches(key, np.asarray(fed.test.y)[h, :n, 0].astype(int), prof))
    np.testing.assert_allclose(np.asarray(fed.test.x)[h, :n, ..., 0], np.asarray(ref), atol=1e-5)


def test_iid_federation() -> None:
    """IID: equal sizes, balanced labels, identical reference scanners."""
    kw = dict(mean_train=12, test_size=8, image_size=32)
    f = make_phantom_federation(5, 4, False, **kw)
    np.testing.assert_array_equal(f.train_sizes, [12] * 4)
    np.testing.assert_array_equal(np.asarray(f.train.y).sum((1, 2)), [6] * 4)
    assert f.train.x.shape == (4, 12, 32, 32, 1) and "iid" in f.name
    for fld, ref in zip(f.profiles, REFERENCE_PROFILE, strict=True):
        np.testing.assert_array_equal(np.asarray(fld), np.full(4, ref, np.float32))
    shifted = make_phantom_federation(5, 4, False, scanner_shift=1.0, **kw)
    assert len(set(np.asarray(shifted.profiles.hu_shift).tolist())) == 4
    assert not np.array_equal(np.asarray(shifted.train.x), np.asarray(f.train.x))


def test_pad_and_stack() -> None:
    """Host arrays of different lengths become one zero-padded ClientData."""
    xs = [np.ones((3, 4, 4)), np.full((1, 4, 4), 2.0), np.zeros((0, 4, 4))]
    ys = [np.ones(3), np.zeros(1), np.zeros(0)]
    cd = pad_and_stack(xs, ys, capacity=5)
    assert cd.x.shape == (3, 5, 4, 4, 1) and cd.y.shape == (3, 5, 1)
    np.testing.assert_array_equal(np.asarray(cd.num_examples), [3, 1, 0])
    np.testing.assert_array_equal(np.asarray(cd.mask()).sum(1), [3, 1, 0])
    assert float(cd.x[1, 0, 0, 0, 0]) == 2.0 and float(jnp.abs(cd.x[1, 1:]).sum()) == 0.0
    with pytest.raises(ValueError):
        pad_and_stack(xs, ys, capacity=2)
