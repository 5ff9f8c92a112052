"""``python -m sim --dataset {lidc-annotations,nih,lidc}`` end to end, and the config rules of
real datasets."""

import json

import numpy as np
import pytest

from medichain_jax.data import nih
from sim.cli import main
from sim.config import ConfigError, RunConfig
from sim.real_data import lidc_federation, nih_federation, vendor_index
from tests.lidc_fixture import make_lidc_tree
from tests.nih_fixture import make_nih_tree
from tests.test_lidc_db import SHARED_MAP, needs_map


def run_cli(args, out):
    assert main([*args, "--out", str(out), "--no-progress"]) == 0
    return json.loads((out / "summary.json").read_text())


def test_config_rules_for_real_datasets():
    assert RunConfig(dataset="lidc-annotations").model == "mlp"
    assert RunConfig(dataset="lidc-annotations").partition == "thickness"
    assert RunConfig(dataset="nih", data_dir="x").partition == "patient"
    assert RunConfig(dataset="lidc", data_dir="x", task="segmentation").model == "segnet"
    # fields added for real data do not change existing run ids
    assert RunConfig().run_id() == RunConfig(data_dir=None, partition=None).run_id()
    bad = [
        ({"dataset": "nih"}, "data_dir"),
        ({"dataset": "phantom", "partition": "vendor"}, "partition"),
        ({"dataset": "nih", "data_dir": "x", "partition": "thickness"}, "partition"),
        ({"dataset": "lidc-annotations", "partition": "vendor"}, "vendor_map"),
        ({"dataset": "lidc-annotations", "model": "cnn"}, "model"),
        ({"dataset": "nih", "data_dir": "x", "vendor_map": "m.csv"}, "vendor_map"),
        ({"dataset": "nih", "data_dir": "x", "task": "segmentation"}, "task"),
        ({"dataset": "lidc", "data_dir": "x", "model": "segnet"}, "model"),
        (
            {"dataset": "lidc-annotations", "partition": "vendor", "vendor_map": "m.csv"},
            "hospitals",
        ),
    ]
    for values, field in bad:
        with pytest.raises(ConfigError, match=field):
            RunConfig(**values)


def test_vendor_names_from_dicom_manufacturer():
    names = np.array(["GE MEDICAL SYSTEMS", "Philips Medical Systems", "SIEMENS", "toshiba", ""])
    np.testing.assert_array_equal(vendor_index(names), [0, 1, 2, 3, 4])


def test_lidc_annotations_runs_offline_with_a_synthetic_partition(tmp_path):
    s = run_cli(
        ["--dataset", "lidc-annotations", "--hospitals", "3", "--partition", "thickness"]
        + ["--rounds", "8"],
        tmp_path / "run",
    )
    assert len(s["hospitals"]) == 3 and s["dataset"]["scans"] == 1018
    assert sum(h["scans"] for h in s["hospitals"]) == 1018
    assert s["dataset"]["patients_in_two_hospitals"] == []
    assert s["federated"]["pooled_test"] > 0.8  # geometry predicts malignancy


@needs_map
def test_lidc_annotations_vendor_partition_from_the_shared_map(tmp_path):
    s = run_cli(
        ["--dataset", "lidc-annotations", "--hospitals", "4", "--partition", "vendor"]
        + ["--vendor-map", str(SHARED_MAP), "--rounds", "20"],
        tmp_path / "run",
    )
    assert [h["vendor"] for h in s["hospitals"]] == [
        "GE MEDICAL SYSTEMS",
        "Philips",
        "SIEMENS",
        "TOSHIBA",
    ]
    assert [h["scans"] for h in s["hospitals"]] == [670, 74, 205, 69]
    assert s["federated"]["mean"] > 0.8 and s["federated"]["pooled_test"] > 0.8


def test_nih_prepares_once_and_trains_multilabel(tmp_path, capsys):
    tree = make_nih_tree(tmp_path / "raw", patients=40, images_per_patient=3, header="Patient Sex")
    cache = tmp_path / "cache"
    args = ["--dataset", "nih", "--data-dir", str(tree["root"]), "--cache-dir", str(cache)]
    args += ["--hospitals", "3", "--rounds", "2", "--image-size", "32"]
    s = run_cli(args, tmp_path / "run")
    assert "nih: cache built" in capsys.readouterr().err
    per_label = s["federated"]["per_label"]
    assert list(per_label) == list(nih.FINDINGS)
    assert sum(h["images"] for h in s["hospitals"]) == 120 - 2  # 1 missing, 1 corrupted
    assert s["dataset"]["missing_images"] == 1 and s["dataset"]["bad_files"] == 1
    run_cli(args, tmp_path / "run2")
    assert "nih: cache reused" in capsys.readouterr().err
    # every patient in exactly one hospital, for every partition
    for kind in nih.PARTITIONS:
        config = RunConfig(
            dataset="nih", data_dir=str(cache), partition=kind, hospitals=3, image_size=32
        )
        fed = nih_federation(config, progress=False)
        assert sum(d["patients"] for d in fed.details) == 40


def test_lidc_patches_train_by_vendor(tmp_path):
    make_lidc_tree(tmp_path / "raw")
    args = ["--dataset", "lidc", "--data-dir", str(tmp_path / "raw"), "--hospitals", "2"]
    args += ["--cache-dir", str(tmp_path / "cache"), "--rounds", "2", "--image-size", "16"]
    s = run_cli(args, tmp_path / "run")
    assert [h["vendor"] for h in s["hospitals"]] == ["GE MEDICAL SYSTEMS", "SIEMENS"]
    assert sum(h["nodules"] for h in s["hospitals"]) == 40
    assert s["dataset"]["bad_files"] == 1 and s["dataset"]["non_ct_series"] == 1
    config = RunConfig(
        dataset="lidc", data_dir=str(tmp_path / "cache"), partition="thickness", hospitals=2
    )
    fed = lidc_federation(config, progress=False)
    assert fed.vendors == ("2.5-2.5 mm slices",) * 2  # the fixture's one slice spacing
    assert [d["patients"] for d in fed.details] == [10, 10]
    # too many hospitals for the vendors present: one clear line
    assert main([*args, "--hospitals", "3", "--out", str(tmp_path / "x")]) == 2
    # nodule segmentation on the same cache: a pixel model, Dice as the headline metric
    seg = ["--task", "segmentation", "--rounds", "30", "--local-epochs", "2", "--lr", "0.1"]
    seg += ["--batch-size", "8", "--eval-every", "30"]
    s = run_cli([*args, *seg], tmp_path / "seg")
    assert s["metric"] == "dice" and s["task"] == "segmentation"
    assert s["federated"]["mean"] > 0.8  # the fixture's nodules are bright squares


def test_missing_data_dir_is_a_clear_error(tmp_path, capsys):
    args = ["--dataset", "nih", "--data-dir", str(tmp_path / "nowhere"), "--rounds", "1"]
    assert main([*args, "--out", str(tmp_path / "run")]) == 2
    assert "does not exist" in capsys.readouterr().err
