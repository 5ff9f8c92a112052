"""``sim.prepare``: the cache is built, reused when valid, rebuilt when a file is corrupted or
the source changed, read back exactly through the grain data source; bad inputs are reported."""

import json
from pathlib import Path

import numpy as np
import pytest

from medichain_jax.data.prepared import (
    MANIFEST,
    PreparedDataError,
    PreparedSource,
    load_arrays,
)
from sim.prepare import main as prepare_main
from sim.prepare import prepare
from tests.lidc_fixture import make_lidc_tree
from tests.nih_fixture import make_nih_tree


@pytest.fixture(scope="module")
def nih_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("nih")
    return make_nih_tree(root, patients=30, images_per_patient=3, corrupt=2, missing=1)


def test_nih_prepare_reuses_and_rebuilds_a_corrupted_cache(nih_tree, tmp_path, capsys):
    out = tmp_path / "cache"
    first = prepare("nih", nih_tree["root"], out, image_size=32, progress=False)
    assert first["status"] == "built"
    report = first["report"]
    assert report["rows"] == 90 and report["images"] == 87
    assert report["missing_images"] == nih_tree["missing"]
    assert sorted(Path(b["path"]).name for b in report["bad_files"]) == nih_tree["corrupt"]
    assert all("cannot read" in b["reason"] for b in report["bad_files"])

    again = prepare("nih", nih_tree["root"], out, image_size=32, progress=False)
    assert again["status"] == "reused"
    assert again["files"] == first["files"]

    # flip one byte (same size): the SHA-256 catches it and the cache is rebuilt
    path = out / "image.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(PreparedDataError, match="image.npy: SHA-256 mismatch"):
        PreparedSource(out)
    rebuilt = prepare("nih", nih_tree["root"], out, image_size=32, progress=False)
    assert rebuilt["status"] == "rebuilt" and "image.npy: SHA-256 mismatch" in rebuilt["reason"]
    assert rebuilt["files"] == first["files"]  # deterministic: the same bytes again

    def again_reason():
        return prepare("nih", nih_tree["root"], out, image_size=32, progress=False)["reason"]

    (out / "labels.npy").unlink()
    assert "labels.npy: missing" in again_reason()
    (out / MANIFEST).write_text("{not json")
    assert again_reason().startswith(f"{out / MANIFEST}: unreadable manifest")
    # other settings -> a rebuild, not a silent reuse
    assert prepare("nih", nih_tree["root"], out, image_size=16, progress=False)["status"] == (
        "rebuilt"
    )
    # the command line says what happened
    args = ["nih", "--data-dir", str(nih_tree["root"]), "--out", str(out), "--no-progress"]
    assert prepare_main([*args, "--image-size", "16"]) == 0
    assert "cache reused (hashes verified)" in capsys.readouterr().out
    assert prepare_main(["nih", "--data-dir", str(tmp_path / "none"), "--out", str(out)]) == 2


def test_grain_source_reads_back_the_arrays(nih_tree, tmp_path):
    out = tmp_path / "cache"
    prepare("nih", nih_tree["root"], out, image_size=16, progress=False)
    source = PreparedSource(out)
    assert len(source) == 87
    record = source[3]
    assert record["image"].shape == (16, 16) and record["labels"].shape == (14,)
    arrays = load_arrays(source, batch_size=10)  # several grain batches, one partial
    for name in json.loads((out / MANIFEST).read_text())["files"]:
        np.testing.assert_array_equal(arrays[Path(name).stem], np.load(out / name))
    # no patient on both sides of the official split
    test = arrays["test"]
    assert not set(arrays["patient"][test]) & set(arrays["patient"][~test])
    with pytest.raises(PreparedDataError, match="no manifest.json"):
        PreparedSource(tmp_path)


@pytest.fixture(scope="module")
def lidc_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("lidc")
    return root, make_lidc_tree(root)


def test_lidc_prepare_patches_labels_and_bad_files(lidc_tree, tmp_path):
    root, truth = lidc_tree
    out = tmp_path / "cache"
    m = prepare("lidc", root, out, image_size=16, progress=False)
    r = m["report"]
    assert r["series_found"] == 20 and r["nodules"] == 40
    assert list(r["non_ct_series"].values()) == ["CR"]
    assert [b["path"] for b in r["bad_files"]] == [truth["truncated"]]
    a = load_arrays(PreparedSource(out))
    assert a["patch"].shape == (40, 16, 16, 1) and a["mask"].shape == (40, 16, 16)
    # per series: the large nodule (ratings 4, 5) is malignant, the small one (1, 2) benign
    assert sorted(a["label"].tolist()) == [0] * 20 + [1] * 20
    big = a["mask"][a["label"] == 1].sum((1, 2))
    small = a["mask"][a["label"] == 0].sum((1, 2))
    assert (big > small).all()
    assert set(a["manufacturer"]) == {"GE MEDICAL SYSTEMS", "SIEMENS"}
    assert prepare("lidc", root, out, image_size=16, progress=False)["status"] == "reused"
    m = prepare("lidc", root, out, image_size=16, mode="2.5d", progress=False)
    assert m["status"] == "rebuilt"
    assert PreparedSource(out).columns["patch"].shape == (40, 16, 16, 3)
