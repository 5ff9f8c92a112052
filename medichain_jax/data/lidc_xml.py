"""LIDC-IDRI reader annotations (the XML files next to each series; namespace
``http://www.nih.gov``): reading sessions, nodules with their 9 characteristics and contours,
small (< 3 mm) nodules, non-nodules; per-reader masks on a loaded volume, nodules matched across
readers, and consensus masks (union, at least k readers).

Contour convention (ours, stated so it can be checked): an ROI's edge map lists the pixels on
the nodule's outline (x = column, y = row); an inclusion ROI covers its outline and every pixel
whose centre lies inside the polygon; an exclusion ROI removes the pixels strictly inside its
polygon and keeps its outline, which is the nodule's inner edge.
"""

from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import numpy as np

NS = "{http://www.nih.gov}"
CHARACTERISTICS = (
    "subtlety",
    "internalStructure",
    "calcification",
    "sphericity",
    "margin",
    "lobulation",
    "spiculation",
    "texture",
    "malignancy",
)


class LidcXmlError(ValueError):
    """A malformed annotation file; the message names the file and the element."""


@dataclasses.dataclass(frozen=True)
class Roi:
    """One contour on one slice."""

    z: float
    sop_uid: str
    inclusion: bool
    points: np.ndarray  # [k, 2] integer (x, y) = (column, row)


@dataclasses.dataclass(frozen=True)
class NoduleRead:
    """One reader's marking of one nodule."""

    reader: str
    nodule_id: str
    characteristics: dict[str, int]  # empty for nodules under 3 mm
    rois: tuple[Roi, ...]

    @property
    def small(self) -> bool:
        """A nodule under 3 mm: no characteristics, marked by its centre point only."""
        return not self.characteristics and all(len(r.points) == 1 for r in self.rois)


@dataclasses.dataclass(frozen=True)
class NonNodule:
    """A reader's mark of a non-nodule lesion (>= 3 mm): one point."""

    reader: str
    non_nodule_id: str
    z: float
    sop_uid: str
    point: tuple[int, int]  # (x, y)


@dataclasses.dataclass(frozen=True)
class LidcAnnotations:
    """Everything one XML file says about one series."""

    path: str
    series_uid: str | None
    nodules: tuple[NoduleRead, ...]
    non_nodules: tuple[NonNodule, ...]
    readers: tuple[str, ...]


def _text(el: ET.Element, tag: str, where: str, path: str, required: bool = True) -> str | None:
    child = el.find(NS + tag)
    if child is None or child.text is None or not child.text.strip():
        if required:
            raise LidcXmlError(f"{path}: {where} has no <{tag}>")
        return None
    return child.text.strip()


def _number(text: str | None, tag: str, where: str, path: str) -> float:
    try:
        return float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise LidcXmlError(f"{path}: {where} <{tag}> is not a number: {text!r}") from None


def _points(el: ET.Element, where: str, path: str) -> np.ndarray:
    pts = []
    for edge in el:
        if edge.tag not in (NS + "edgeMap", NS + "locus"):
            continue
        x = _number(_text(edge, "xCoord", where, path), "xCoord", where, path)
        y = _number(_text(edge, "yCoord", where, path), "yCoord", where, path)
        pts.append((int(round(x)), int(round(y))))
    if not pts:
        raise LidcXmlError(f"{path}: {where} has no edge map points")
    return np.asarray(pts, np.int64)


def parse_lidc_xml(path: str | Path) -> LidcAnnotations:
    """Read one LIDC XML file; raises :class:`LidcXmlError` naming the file and element."""
    path = str(path)
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as err:
        raise LidcXmlError(f"{path}: cannot parse XML: {err}") from err
    header = root.find(NS + "ResponseHeader")
    series_uid = None
    if header is not None:
        series_uid = _text(header, "SeriesInstanceUid", "ResponseHeader", path, required=False)
    nodules, non_nodules, readers = [], [], []
    sessions = root.findall(NS + "readingSession")
    if not sessions and root.tag != NS + "LidcReadMessage":
        raise LidcXmlError(f"{path}: not an LIDC read message (root <{root.tag}>)")
    for s, session in enumerate(sessions):
        reader = (
            _text(session, "servicingRadiologistID", "readingSession", path, required=False)
            or f"session-{s}"
        )
        readers.append(reader)
        for n, nod in enumerate(session.findall(NS + "unblindedReadNodule")):
            nid = _text(nod, "noduleID", "unblindedReadNodule", path, required=False) or str(n)
            where = f"reader {reader} nodule {nid}"
            chars = {}
            block = nod.find(NS + "characteristics")
            if block is not None:
                for name in CHARACTERISTICS:
                    value = _text(block, name, where, path, required=False)
                    if value is not None:
                        chars[name] = int(_number(value, name, where, path))
            rois = []
            for roi in nod.findall(NS + "roi"):
                z = _number(
                    _text(roi, "imageZposition", where, path), "imageZposition", where, path
                )
                sop = _text(roi, "imageSOP_UID", where, path, required=False) or ""
                inc = (_text(roi, "inclusion", where, path, required=False) or "TRUE").upper()
                rois.append(Roi(z, sop, inc == "TRUE", _points(roi, where, path)))
            if not rois:
                raise LidcXmlError(f"{path}: {where} has no <roi>")
            nodules.append(NoduleRead(reader, nid, chars, tuple(rois)))
        for nn in session.findall(NS + "nonNodule"):
            nid = _text(nn, "nonNoduleID", "nonNodule", path, required=False) or ""
            where = f"reader {reader} nonNodule {nid}"
            z = _number(_text(nn, "imageZposition", where, path), "imageZposition", where, path)
            sop = _text(nn, "imageSOP_UID", where, path, required=False) or ""
            (x, y), *_ = _points(nn, where, path).tolist()
            non_nodules.append(NonNodule(reader, nid, z, sop, (x, y)))
    return LidcAnnotations(path, series_uid, tuple(nodules), tuple(non_nodules), tuple(readers))


def find_annotations(root: str | Path) -> tuple[dict[str, list[str]], list[tuple[str, str]]]:
    """Every LIDC XML file under ``root`` by the SeriesInstanceUid of its header, and the
    ``(path, reason)`` of XML files that are not usable LIDC read messages."""
    found: dict[str, list[str]] = {}
    bad: list[tuple[str, str]] = []
    for path in sorted(Path(root).rglob("*.xml")):
        try:
            ann = parse_lidc_xml(path)
        except LidcXmlError as err:
            bad.append((str(path), str(err)))
            continue
        if ann.series_uid is None:
            bad.append((str(path), "no SeriesInstanceUid in ResponseHeader"))
            continue
        found.setdefault(ann.series_uid, []).append(str(path))
    return found, bad


def _inside(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Pixels whose centre is strictly inside the closed polygon (even-odd rule)."""
    h, w = shape
    mask = np.zeros(shape, bool)
    if len(points) < 3:
        return mask
    x0, y0 = np.maximum(points.min(0), 0)
    x1, y1 = np.minimum(points.max(0), [w - 1, h - 1])
    if x0 > x1 or y0 > y1:
        return mask
    ys, xs = np.mgrid[y0 : y1 + 1, x0 : x1 + 1].astype(float)
    px, py = points[:, 0].astype(float), points[:, 1].astype(float)
    qx, qy = np.roll(px, -1), np.roll(py, -1)
    inside = np.zeros(ys.shape, bool)
    for ax, ay, bx, by in zip(px, py, qx, qy, strict=True):
        crosses = (ay > ys) != (by > ys)
        with np.errstate(divide="ignore", invalid="ignore"):
            xcross = ax + (ys - ay) * (bx - ax) / (by - ay)
        inside ^= crosses & (xs < xcross)
    mask[y0 : y1 + 1, x0 : x1 + 1] = inside
    return mask


def _outline(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(shape, bool)
    keep = (points[:, 0] >= 0) & (points[:, 0] < shape[1]) & (points[:, 1] >= 0)
    keep &= points[:, 1] < shape[0]
    mask[points[keep, 1], points[keep, 0]] = True
    return mask


def slice_index(
    roi: Roi, sop_uids: Sequence[str], positions: np.ndarray, tolerance_mm: float | None = None
) -> int | None:
    """The volume slice of ``roi``: by imageSOP_UID, else the nearest z within ``tolerance_mm``
    (default half the median slice step); ``None`` when neither matches."""
    if roi.sop_uid and roi.sop_uid in sop_uids:
        return list(sop_uids).index(roi.sop_uid)
    positions = np.asarray(positions, float)
    if len(positions) == 0:
        return None
    if tolerance_mm is None:
        steps = np.diff(positions)
        tolerance_mm = 0.5 * float(np.median(steps)) if len(steps) else 0.5
    i = int(np.argmin(np.abs(positions - roi.z)))
    return i if abs(positions[i] - roi.z) <= tolerance_mm else None


def nodule_mask(
    nodule: NoduleRead,
    sop_uids: Sequence[str],
    positions: np.ndarray,
    shape: tuple[int, int],
) -> tuple[np.ndarray, list[Roi]]:
    """``[slices, rows, cols]`` bool mask of one reader's nodule, and the ROIs that matched no
    slice (reported, not dropped silently)."""
    mask = np.zeros((len(positions), *shape), bool)
    exclude = np.zeros_like(mask)
    unmapped = []
    for roi in nodule.rois:
        i = slice_index(roi, sop_uids, positions)
        if i is None:
            unmapped.append(roi)
            continue
        if roi.inclusion:
            mask[i] |= _inside(roi.points, shape) | _outline(roi.points, shape)
        else:
            exclude[i] |= _inside(roi.points, shape) & ~_outline(roi.points, shape)
    return mask & ~exclude, unmapped


def points_mm(nodule: NoduleRead, spacing_xy: tuple[float, float]) -> np.ndarray:
    """``[k, 3]`` inclusion-contour points of a nodule in mm: (x * col spacing, y * row
    spacing, z)."""
    rois = [r for r in nodule.rois if r.inclusion] or list(nodule.rois)
    pts = np.concatenate([r.points for r in rois]).astype(float)
    zs = np.concatenate([np.full(len(r.points), r.z) for r in rois])
    row_mm, col_mm = spacing_xy
    return np.stack([pts[:, 0] * col_mm, pts[:, 1] * row_mm, zs], axis=1)


def match_nodules(
    nodules: Sequence[NoduleRead], spacing_xy: tuple[float, float], tolerance_mm: float = 3.0
) -> list[list[NoduleRead]]:
    """Group readers' marks of the same nodule: single linkage on the smallest distance between
    their contour points (at most ``tolerance_mm``), never two marks of one reader in a group
    (the closest pairs are joined first)."""
    pts = [points_mm(n, spacing_xy) for n in nodules]

    def gap(i: int, j: int) -> float:
        diff = pts[i][:, None, :] - pts[j][None, :, :]
        return float(np.sqrt((diff**2).sum(-1)).min())

    pairs = sorted(
        (gap(i, j), i, j) for i in range(len(nodules)) for j in range(i + 1, len(nodules))
    )
    group = list(range(len(nodules)))
    members = {i: {i} for i in group}
    for dist, i, j in pairs:
        if dist > tolerance_mm:
            break
        gi, gj = group[i], group[j]
        if gi == gj:
            continue
        if {nodules[k].reader for k in members[gi]} & {nodules[k].reader for k in members[gj]}:
            continue
        for k in members[gj]:
            group[k] = gi
        members[gi] |= members.pop(gj)
    return [[nodules[k] for k in sorted(m)] for _, m in sorted(members.items())]


def consensus_mask(masks: Sequence[np.ndarray], at_least: int = 1) -> np.ndarray:
    """Pixels marked by at least ``at_least`` readers (1 = union)."""
    if not masks:
        raise ValueError("consensus of no masks")
    if not 1 <= at_least <= len(masks):
        raise ValueError(f"at_least must be in [1, {len(masks)}], got {at_least}")
    return np.sum(np.stack(masks), axis=0) >= at_least
