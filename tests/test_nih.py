"""NIH ChestX-ray14 metadata: both header spellings, bad rows reported, patient-level splits and
partitions (fixture CSVs, and the real 112,120-row file from ../shared/data when present)."""

import gzip
import time
from pathlib import Path

import numpy as np
import pytest

from medichain_jax.data.nih import (
    FINDINGS,
    NihMetadataError,
    hash_split,
    label_table,
    official_split,
    partition,
    read_entries,
)

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "Data_Entry_2017_v2020.csv.gz"

ROWS = [
    ("00000001_000.png", "Cardiomegaly", 0, 1, 57, "M", "PA", 0.143),
    ("00000001_001.png", "Cardiomegaly|Emphysema", 1, 1, 58, "M", "PA", 0.143),
    ("00000002_000.png", "No Finding", 0, 2, 81, "M", "PA", 0.168),
    ("00000003_000.png", "Hernia", 0, 3, 74, "F", "PA", 0.168),
    ("00000003_001.png", "Hernia|Effusion", 1, 3, 75, "F", "AP", 0.139),
    ("00000004_000.png", "Mass|Nodule", 0, 4, 82, "M", "AP", 0.168),
    ("00000005_000.png", "No Finding", 0, 5, 69, "F", "PA", 0.143),
    ("00000006_000.png", "Pleural_Thickening|Infiltration", 0, 6, 40, "F", "PA", 0.139),
]


def write_csv(path: Path, sex_column: str, extra_rows=()):
    header = (
        f"Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,{sex_column},"
        "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
    )
    lines = [header]
    for img, labels, fu, pid, age, sex, view, sp in ROWS:
        lines.append(f"{img},{labels},{fu},{pid},{age},{sex},{view},2048,2500,{sp},{sp}")
    lines += list(extra_rows)
    text = "\n".join(lines) + "\n"
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


@pytest.mark.parametrize(
    "name, sex_column",
    [("Data_Entry_2017.csv", "Patient Gender"), ("Data_Entry_2017_v2020.csv.gz", "Patient Sex")],
)
def test_both_header_spellings_and_multi_hot(tmp_path, name, sex_column):
    meta = read_entries(write_csv(tmp_path / name, sex_column))
    assert len(meta) == 8 and meta.skipped == []
    assert meta.labels.shape == (8, 14)
    row = meta.labels[1]
    assert {FINDINGS[i] for i in np.flatnonzero(row)} == {"Cardiomegaly", "Emphysema"}
    assert meta.labels[2].sum() == 0  # No Finding
    assert meta.sex.tolist()[:3] == ["M", "M", "M"] and meta.view[4] == "AP"
    np.testing.assert_allclose(meta.pixel_spacing[[0, 2, 4]], [0.143, 0.168, 0.139])


def test_bad_rows_are_skipped_and_reported(tmp_path):
    path = write_csv(
        tmp_path / "d.csv",
        "Patient Gender",
        ["x.png,Tumour,0,7,50,M,PA,1,1,0.1,0.1", "y.png,Mass,0,abc,50,M,PA,1,1,0.1,0.1", "z.png"],
    )
    meta = read_entries(path)
    assert len(meta) == 8
    got = [(s.line, s.reason) for s in meta.skipped]
    assert got[0] == (10, "unknown finding 'Tumour'")
    assert got[1][0] == 11 and "abc" in got[1][1]
    assert got[2][0] == 12 and "fields" in got[2][1]
    assert all(s.path == str(path) for s in meta.skipped)
    (tmp_path / "h.csv").write_text("Image Index,Finding Labels\n")
    with pytest.raises(NihMetadataError, match=r"h\.csv: missing column"):
        read_entries(tmp_path / "h.csv")
    with pytest.raises(NihMetadataError, match="does not exist"):
        read_entries(tmp_path / "nope.csv")


def test_splits_are_patient_level(tmp_path):
    meta = read_entries(write_csv(tmp_path / "d.csv", "Patient Gender"))
    test = hash_split(meta, 0.5)
    assert np.array_equal(test, hash_split(meta, 0.5))  # deterministic
    for p in np.unique(meta.patient):
        assert len(set(test[meta.patient == p])) == 1
    (tmp_path / "test_list.txt").write_text("00000003_000.png\n00000005_000.png\n")
    np.testing.assert_array_equal(
        np.flatnonzero(official_split(meta, tmp_path / "test_list.txt")), [3, 6]
    )


def assert_patient_disjoint(meta, hosp):
    for p in np.unique(meta.patient):
        assert len(set(hosp[meta.patient == p].tolist())) == 1, f"patient {p} in two hospitals"


@pytest.mark.parametrize("kind", ["patient", "dirichlet", "pixel_spacing"])
def test_partitions_keep_patients_whole(tmp_path, kind):
    meta = read_entries(write_csv(tmp_path / "d.csv", "Patient Gender"))
    hosp, names = partition(meta, kind, num_hospitals=3, alpha=0.5, seed=1)
    assert hosp.shape == (8,) and hosp.min() >= 0 and hosp.max() < len(names)
    assert_patient_disjoint(meta, hosp)
    table = label_table(meta, hosp)
    assert table["images"].sum() == 8 and table["findings"].sum() == meta.labels.sum()


def test_pixel_spacing_patient_goes_to_its_majority_group(tmp_path):
    meta = read_entries(write_csv(tmp_path / "d.csv", "Patient Gender"))
    from medichain_jax.data.nih import partition_by_pixel_spacing

    hosp, names = partition_by_pixel_spacing(meta, min_images=1)
    assert names == ["0.143 mm", "0.168 mm", "0.139 mm"]  # largest first (3, 3, 2 images)
    # patient 3: one image at 0.168, one at 0.139 -> tie -> the larger group, 0.168
    assert set(hosp[meta.patient == 3].tolist()) == {1}


@pytest.mark.skipif(not REAL.exists(), reason=f"real NIH metadata not found at {REAL}")
def test_real_metadata_every_partitioner(capsys):
    t0 = time.perf_counter()
    meta = read_entries(REAL)
    assert len(meta) == 112_120 and meta.skipped == []
    assert np.unique(meta.patient).shape[0] == 30_805
    for kind in ("patient", "dirichlet", "pixel_spacing"):
        t1 = time.perf_counter()
        hosp, names = partition(meta, kind, num_hospitals=5, alpha=0.5, seed=0)
        pat = np.unique(np.stack([meta.patient, hosp], 1), axis=0)
        assert np.unique(pat[:, 0]).shape[0] == pat.shape[0]  # each patient in one hospital
        table = label_table(meta, hosp)
        assert table["images"].sum() == 112_120
        print(f"{kind}: {time.perf_counter() - t1:.2f} s")
        for h, name in enumerate(names):
            rates = " ".join(
                f"{f}={c / table['images'][h]:.3f}"
                for f, c in zip(FINDINGS, table["findings"][h], strict=True)
            )
            print(
                f"  {name}: {table['images'][h]} images, {table['patients'][h]} patients, {rates}"
            )
    spacing_hosp, names = partition(meta, "pixel_spacing")
    assert names[:5] == ["0.143 mm", "0.168 mm", "0.139 mm", "0.171 mm", "0.194 mm"]
    print(f"read + 3 partitions: {time.perf_counter() - t0:.2f} s")
