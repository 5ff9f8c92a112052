"""NIH ChestX-ray14 PNGs: exact pixel values per mode, resizing, finding files in both download
layouts, duplicates / corrupted / missing files reported, and the fixture tree's metadata."""

import shutil

import numpy as np
import pytest
from PIL import Image

from medichain_jax.data import nih
from medichain_jax.data.nih_images import find_images, load_image, load_images
from tests.nih_fixture import make_nih_tree


def save(path, array):
    Image.fromarray(array).save(path)
    return path


def test_constant_and_gradient_exact_8_and_16_bit(tmp_path):
    const = save(tmp_path / "c.png", np.full((32, 32), 200, np.uint8))
    for size in (32, 16, 48):  # as is, BOX down, BILINEAR up
        np.testing.assert_allclose(load_image(const, size), 200 / 255, rtol=0, atol=1e-6)
    assert (load_image(const, 32) == np.float32(200) / np.float32(255)).all()
    grad8 = np.tile(np.arange(32, dtype=np.uint8) * 8, (32, 1))
    got = load_image(save(tmp_path / "g8.png", grad8), 32)
    assert got.dtype == np.float32 and np.array_equal(got, grad8.astype(np.float32) / 255)
    pairs = grad8.astype(np.float64).reshape(32, 16, 2).mean(-1)[::2] / 255  # 2x2 area means
    np.testing.assert_allclose(load_image(tmp_path / "g8.png", 16), pairs, atol=1e-6)
    grad16 = np.tile(np.arange(32, dtype=np.uint16) * 2114, (32, 1))  # 0 .. 65534
    path16 = save(tmp_path / "g16.png", grad16)
    assert Image.open(path16).mode == "I;16"
    got = load_image(path16, 32)
    assert np.array_equal(got, grad16.astype(np.float32) / np.float32(65535))
    assert got.max() > 0.99  # scaled by 65535, not clipped at 255


def test_color_modes_become_gray(tmp_path):
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = 100, np.arange(20, dtype=np.uint8)[None] * 10
    assert (load_image(save(tmp_path / "a.png", rgba), 20) == np.float32(100) / 255).all()
    Image.new("RGB", (20, 20), (255, 0, 0)).save(tmp_path / "red.png")
    assert load_image(tmp_path / "red.png", 20)[0, 0] == np.float32(76) / 255  # ITU-R 601 luma
    Image.new("LA", (20, 20), (30, 7)).save(tmp_path / "la.png")
    assert (load_image(tmp_path / "la.png", 20) == np.float32(30) / 255).all()


def test_resize_shapes_and_unreadable_files(tmp_path):
    rng = np.random.default_rng(0)
    wide = save(tmp_path / "w.png", rng.integers(0, 256, (40, 64), dtype=np.uint8))
    small = save(tmp_path / "s.png", rng.integers(0, 256, (30, 20), dtype=np.uint8))
    for path, size in ((wide, 24), (wide, 40), (small, 48), (small, 8)):
        img = load_image(path, size)
        assert img.shape == (size, size) and img.dtype == np.float32
        assert img.min() >= 0 and img.max() <= 1
    (tmp_path / "text.png").write_text("not a png")
    (tmp_path / "cut.png").write_bytes(wide.read_bytes()[:200])
    for name in ("text.png", "cut.png"):
        with pytest.raises(ValueError, match=name):
            load_image(tmp_path / name, 16)


@pytest.mark.parametrize("header", nih.SEX_COLUMNS)
def test_fixture_metadata_both_headers(tmp_path, header):
    tree = make_nih_tree(tmp_path, header=header)
    meta = nih.read_entries(tree["csv"])
    assert len(meta) == 18 and meta.skipped == [] and meta.image.tolist() == tree["names"]
    assert set(meta.sex.tolist()) == {"M", "F"} and set(meta.view.tolist()) <= {"PA", "AP"}
    test = nih.official_split(meta, tree["test_list"])
    for p in np.unique(meta.patient):
        assert len(set(test[meta.patient == p].tolist())) == 1
    assert 0 < test.sum() < len(meta)


def test_find_images_both_dirs_duplicates_and_flat_layout(tmp_path):
    tree = make_nih_tree(tmp_path / "nih")
    index = find_images(tree["root"])
    assert index.paths == tree["files"] and index.duplicates == []
    assert {p.parts[-3] for p in index.paths.values()} == {"images_001", "images_002"}
    first = sorted(tree["files"].values())[0]
    shutil.copy(first, tree["image_dirs"][1] / first.name)
    index = find_images(tree["root"])
    assert index.paths[first.name] == first  # images_001 sorts first and wins
    assert [d.path for d in index.duplicates] == [str(tree["image_dirs"][1] / first.name)]
    assert str(first) in index.duplicates[0].reason
    flat = tmp_path / "flat" / "images"
    flat.mkdir(parents=True)
    shutil.copy(first, flat / first.name)
    (tmp_path / "flat" / "stray.png").write_bytes(b"")  # not under images*: ignored
    assert find_images(tmp_path / "flat").paths == {first.name: flat / first.name}
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        find_images(tmp_path / "nothing_here")


def test_load_images_reports_corrupt_and_missing(tmp_path):
    tree = make_nih_tree(tmp_path, corrupt=2, missing=2)
    meta = nih.read_entries(tree["csv"])
    got = load_images(meta.image, find_images(tmp_path), 32)
    assert got.missing == tree["missing"]
    assert [b.path for b in got.bad] == [str(tree["files"][n]) for n in tree["corrupt"]]
    assert all(
        n in b.reason and "cannot read" in b.reason
        for n, b in zip(tree["corrupt"], got.bad, strict=True)
    )
    good = [i for i, n in enumerate(tree["names"]) if n not in tree["missing"] + tree["corrupt"]]
    assert got.kept.tolist() == good and got.images.shape == (14, 32, 32)
    assert got.images.dtype == np.float32 and got.images.min() >= 0 and got.images.max() <= 1
    assert {tree["modes"][tree["names"][i]] for i in good} == {"L", "RGBA", "I;16"}
    assert got.summary() == "loaded 14 of 18 images; 2 missing, 2 unreadable"
    # the label shows in the pixels: images with a finding are brighter on average
    finding = meta.labels[got.kept].sum(1) > 0
    bright = got.images.mean((1, 2))
    assert bright[finding].mean() > bright[~finding].mean() + 0.02


@pytest.mark.parametrize("kind", nih.PARTITIONS)
def test_partitions_keep_patients_whole_on_fixture(tmp_path, kind):
    meta = nih.read_entries(make_nih_tree(tmp_path, patients=9)["csv"])
    hosp, names = nih.partition(meta, kind, num_hospitals=3, alpha=0.5, seed=0)
    if kind == "pixel_spacing":  # the default min_images pools all 27 images into "other"
        assert names == ["other"]
        hosp, names = nih.partition_by_pixel_spacing(meta, min_images=2)
        assert len(names) == 3
    assert hosp.shape == (len(meta),) and hosp.min() >= 0 and hosp.max() < len(names)
    pairs = np.unique(np.stack([meta.patient, hosp], 1), axis=0)
    assert np.unique(pairs[:, 0]).shape[0] == pairs.shape[0] == 9  # each patient in one
