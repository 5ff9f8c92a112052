"""LIDC patch preprocessing against hand-computed values."""

import numpy as np
import pytest

from medichain_jax.data.lidc_patches import (
    AIR_HU,
    LUNG_WINDOW,
    extract_patch,
    malignancy_label,
    resample_isotropic,
)
from medichain_jax.data.phantom import window


def test_resample_linear_ramp_is_exact():
    z, y, x = np.meshgrid(np.arange(5), np.arange(4), np.arange(6), indexing="ij")
    spacing = (2.5, 0.7, 0.7)
    hu = (10.0 * z * spacing[0] + 3.0 * y * spacing[1] - 2.0 * x * spacing[2]).astype(np.float32)
    out, mm = resample_isotropic(hu, spacing, 1.0)
    assert mm == 1.0 and out.shape == (11, 3, 4)  # extents 10, 2.1, 3.5 mm
    zz, yy, xx = np.meshgrid(np.arange(11), np.arange(3), np.arange(4), indexing="ij")
    np.testing.assert_allclose(out, 10.0 * zz + 3.0 * yy - 2.0 * xx, atol=1e-4)
    with pytest.raises(ValueError, match="must be > 0"):
        resample_isotropic(hu, (0.0, 1.0, 1.0))


def test_window_maps_lung_window():
    hu = np.array([-1350.0, -600.0, 150.0, 500.0])
    np.testing.assert_allclose(window(hu, *LUNG_WINDOW), [0, 0.5, 1, 1])


def test_patches_2d_and_25d_with_air_padding():
    vol = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    p = extract_patch(vol, (2, 3, 3), 4, "2d")
    assert p.shape == (4, 4, 1)
    np.testing.assert_array_equal(p[..., 0], vol[2, 1:5, 1:5])
    q = extract_patch(vol, (2, 3, 3), 4, "2.5d")
    assert q.shape == (4, 4, 3)
    np.testing.assert_array_equal(q[..., 0], vol[2, 1:5, 1:5])
    np.testing.assert_array_equal(q[..., 1], vol[0:4, 3, 1:5])  # coronal (z, x); z 0..3
    np.testing.assert_array_equal(q[..., 2], vol[0:4, 1:5, 3])  # sagittal (z, y)
    edge = extract_patch(vol, (0, 0, 0), 4, "2d")[..., 0]
    assert (edge[:2] == AIR_HU).all() and (edge[:, :2] == AIR_HU).all()
    np.testing.assert_array_equal(edge[2:, 2:], vol[0, :2, :2])
    with pytest.raises(ValueError, match="2.5d"):
        extract_patch(vol, (0, 0, 0), 4, "3d")


@pytest.mark.parametrize(
    "ratings, want",
    [([4, 5, 5], 1), ([1, 2], 0), ([3, 3, 4], None), ([2, 3], None), ([4, 3, 4, 5], 1), ([], None)],
)
def test_malignancy_label_median_rule(ratings, want):
    assert malignancy_label(ratings) == want


def test_malignancy_thresholds_configurable():
    assert malignancy_label([3, 3], benign_max=3.0, malignant_min=4.0) == 0
    with pytest.raises(ValueError, match="below"):
        malignancy_label([3], benign_max=4.0, malignant_min=4.0)
