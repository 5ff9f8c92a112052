"""A small LIDC-IDRI-like tree: patients on two scanner vendors, each CT series with a large
nodule rated malignant and a small one rated benign by two readers, plus a CR localizer and a
truncated file (both must be reported, not fatal)."""

from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid

from tests.test_dicom import write_slice
from tests.test_lidc_xml import CHARS, lidc_xml, roi_xml, square

SLICES, SIDE, STEP = 6, 32, 2.5


def _nodule(nid: str, rois: list[str], malignancy: int) -> str:
    return (
        f"<unblindedReadNodule><noduleID>{nid}</noduleID>{CHARS.format(m=malignancy)}"
        f"{''.join(rois)}</unblindedReadNodule>"
    )


def make_lidc_tree(
    root: Path, patients: int = 20, vendors: tuple[str, ...] = ("GE MEDICAL SYSTEMS", "SIEMENS")
) -> dict:
    """Write the tree under ``root``; returns series uids per patient and the bad files."""
    series = {}
    for p in range(patients):
        patient = f"LIDC-IDRI-{p + 1:04d}"
        uid = generate_uid()
        hu = np.full((SLICES, SIDE, SIDE), -800, np.int16)
        hu[1:5, 6:16, 6:16] = 40  # large nodule (10 px square, 4 slices)
        hu[2:4, 22:26, 22:26] = 20  # small nodule
        folder = root / patient / "1.2.3" / uid
        sops = [
            write_slice(
                folder / f"{k:03d}.dcm",
                uid,
                STEP * k,
                hu[k] + 1024,
                patient=patient,
                manufacturer=vendors[(p % 3) % len(vendors)],  # both vendors in the test split
            )
            for k in range(SLICES)
        ]
        big = [roi_xml(STEP * k, sops[k], square(6, 6, 15, 15)) for k in range(1, 5)]
        small = [roi_xml(STEP * k, sops[k], square(22, 22, 25, 25)) for k in range(2, 4)]
        sessions = [
            f"<servicingRadiologistID>r{r}</servicingRadiologistID>"
            + _nodule("big", big, 4 + r % 2)
            + _nodule("small", small, 1 + r % 2)
            for r in range(2)
        ]
        (folder / "069.xml").write_text(lidc_xml(sessions, series_uid=uid))
        series[patient] = uid
    cr = root / "LIDC-IDRI-0001" / "cr" / "1.dcm"
    write_slice(cr, generate_uid(), 0.0, np.zeros((4, 4), np.int16), modality="CR")
    broken = root / "LIDC-IDRI-0002" / "1.2.3" / series["LIDC-IDRI-0002"] / "999.dcm"
    write_slice(broken, series["LIDC-IDRI-0002"], 100.0, np.zeros((SIDE, SIDE), np.int16))
    broken.write_bytes(broken.read_bytes()[:-20])
    return {"series": series, "truncated": str(broken), "cr": str(cr)}
