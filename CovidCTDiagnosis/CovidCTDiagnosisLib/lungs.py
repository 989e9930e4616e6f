"""Lung extraction, slice by slice, in Hounsfield units: the lung inside the pleura, lesions included.

Air-like lung is precise by threshold, but ground-glass opacity, consolidation and juxta-pleural
lesions are as dense as the chest wall and the heart: a threshold cuts out exactly the disease.
So per axial slice the lung network (`lung_net`, trained on lungs with painted lesions) gives a
lung probability; the candidates are the air regions the network calls lung plus what the
network calls lung (lesions). Small pockets and the trachea are dropped; across slices the
lungs' 3-D components are kept and right told from left; per slice and side the mask is closed,
bites at the pleura and holes are filled, and soft tissue medial to the aerated lung (the heart,
the mediastinum) is dropped, ground glass kept. Dense "lung" reaching the air around the body is
the body wall, unless it is a lesion whose outline leaked to the skin (`_drop_body_wall`). Voxels
without data (`volume_io.has_data`: padding outside the reconstruction circle) are never air.

`extract_aerated_lungs` is the threshold-only method (air regions not connected to the image
border): the labels the lung network was trained from, on healthy lungs.

Arrays are LPS-oriented (`geometry.orient_to_lps`): `[k, j, i]`, `i = 0` at the patient's right.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import cv2
import numpy as np

from .cpu_threads import cpu_threads
from .errors import NoLungsError
from .lung_net import LUNG_PROBABILITY_THRESHOLD, lung_probability, lung_probability_hu, to_slice_size
from .volume_io import has_data

AIR_THRESHOLD_HU = -600.0  # lung parenchyma and air lie below
GROUND_GLASS_MAX_HU = -300.0  # ground glass lies below; consolidation and soft tissue (heart, vessels, fat) at and above
SOFT_TISSUE_RIM_MM = 1.5  # partial-volume pixels this close to soft tissue count as soft tissue
PSEUDO_HU_SCALE = 3.0  # 8-bit windowed images: pseudo-HU = 3 * pixel - 1000 (as the DRENet authors)
PSEUDO_HU_OFFSET = -1000.0
MIN_REGION_AREA_MM2 = 100.0  # air pockets smaller than this on a slice are ignored
AIRWAY_MAX_AREA_MM2 = 700.0  # trachea and main bronchi: smaller than this ...
AIRWAY_MAX_OFFSET_MM = 30.0  # ... and this close to the body's centre column
CLOSING_RADIUS_MM = 7.5  # the authors' disk of 10 px at 0.75 mm
MIN_DEFECT_DEPTH_MM = 2.0  # shallower bites are left to the closing
MAX_DEFECT_DEPTH_MM = 30.0  # deeper concavities are anatomy (heart, hilum, diaphragm dome)
MIN_DEFECT_INWARD_COS = 0.3  # a pleural bite opens away from the body centre
GAS_MEAN_HU = -910.0  # 3-D components darker on average are stomach or bowel gas (lung is about -850)
LUNG_MIN_FRACTION = 0.15  # further 3-D components are lung if this large relative to the largest
JOINED_MIN_SIDE_FRACTION = 0.2  # a component this much on each side of the midline holds both lungs
JUNCTION_SEARCH_MM = 40.0  # the cut between joined lungs is sought this far around the midline
MIN_LUNG_VOLUME_ML = 20.0
FOV_MIN_SLICES = 3  # lungs at the image or field-of-view edge on this many slices: the field of view clips them
MAX_REGIONS_PER_SLICE = 255  # candidates per slice beyond the largest 255 are ignored
DENSE_LUNG_PROBABILITY = 0.5  # a non-air pixel is lung (a lesion) where the lung network is this sure
OUTSIDE_MIN_SIDES = 3  # air touching this many sides of the image surrounds the body: never lung
CHEST_WALL_MIN_MM = 5.0  # dense lung lies at least this deep under the skin (skin and subcutis)
LEAK_MAX_CONTACT = 0.05  # a lesion's outline that leaked to the skin touches at most this share of the body's outline
LEAK_MIN_MEAN_PROBABILITY = 0.85  # ... and the lung network is this sure of it (P001's bands >= 0.91, phantom wall <= 0.81)
NOMINAL_FOV_MM = 350.0  # 2-D images have no spacing: assume this field of view across the width
RIGHT, LEFT = 1, 2
_JOINED = 3  # a candidate of a component that holds both lungs, cut per slice
MM3_PER_ML = 1000.0


@dataclass
class Lungs:
    """Lung labels on the LPS-oriented grid: 0 none, 1 right lung, 2 left lung."""

    labels: np.ndarray  # uint8 [k, j, i]
    spacing_ijk: tuple[float, float, float]
    area_mm2: np.ndarray  # lung area of each axial slice
    notes: list[str] = field(default_factory=list)  # what the extraction had to assume (field of view)

    @property
    def mask(self) -> np.ndarray:
        return self.labels > 0

    def volume_ml(self, label: int | None = None) -> float:
        """Volume of one lung (RIGHT or LEFT) or, with None, of both."""
        voxels = np.count_nonzero(self.labels if label is None else self.labels == label)
        return float(voxels * np.prod(self.spacing_ijk) / MM3_PER_ML)


def _lookup(table: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """`table[labels]` for a label image: by OpenCV's 8-bit LUT where the table has at most 256
    entries of 8 bits (several times faster than numpy's gather on a 512 x 512 slice)."""
    if len(table) <= 256 and table.dtype.itemsize == 1:
        lut = np.zeros(256, np.uint8)
        lut[:len(table)] = table.view(np.uint8)
        source = labels if labels.dtype == np.uint8 else labels.astype(np.uint8)
        return cv2.LUT(source, lut).view(table.dtype)
    return np.take(table, labels)


def _close(mask: np.ndarray, radius_px: float) -> np.ndarray:
    """Morphological closing (uint8 0/1) with a disk, by two distance transforms (fast for large
    disks; the 5x5 distance mask is within about 2% of Euclidean). The mask needs a margin of
    radius_px + 1 free pixels at its border."""
    dilated = (cv2.distanceTransform(1 - mask, cv2.DIST_L2, cv2.DIST_MASK_5) <= radius_px).astype(np.uint8)
    return (cv2.distanceTransform(dilated, cv2.DIST_L2, cv2.DIST_MASK_5) > radius_px).astype(np.uint8)


@dataclass
class _SliceRegions:
    """The lung candidates of one axial slice: air regions inside the body, not small, not airways."""

    labels: np.ndarray  # uint8 [j, i]: 0 none, n the n-th largest candidate
    areas: np.ndarray  # pixels of each candidate (index 0 unused)
    right: np.ndarray  # pixels of each candidate on the patient's right of the body's centre column
    hu_sums: np.ndarray  # sum of each candidate's HU
    centre: np.ndarray  # the body's centre (column, row); its column is the midline when one is given
    at_edge: np.ndarray  # pixels of each candidate on the image border or next to no-data (field of view)


def _region_means(values: np.ndarray, labels: np.ndarray, stats: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """Mean of `values` over each of `regions` (labels of `cv2.connectedComponentsWithStats`), summed
    within their joint bounding box only; the other labels' entries are not their means."""
    means = np.zeros(len(stats))
    if len(regions):
        x0, y0 = stats[regions, :2].min(0)
        x1, y1 = (stats[regions, :2] + stats[regions, 2:4]).max(0)
        box = np.s_[y0:y1, x0:x1]
        means = np.bincount(labels[box].ravel(), values[box].ravel(), len(stats)) / np.maximum(stats[:, cv2.CC_STAT_AREA], 1)
    return means


def _components_in_box(mask: np.ndarray):
    """`cv2.connectedComponentsWithStats(mask, connectivity=8)` computed within the bounding box of
    the mask's pixels (stats and centroids in the whole image's pixels); label 0's stats are those of
    the box's background."""
    x0, y0, w, h = cv2.boundingRect(mask)
    if not w:
        x0, y0, w, h = 0, 0, 1, 1
    count, box_labels, stats, centroids = cv2.connectedComponentsWithStats(mask[y0:y0 + h, x0:x0 + w], connectivity=8)
    stats[:, :2] += (x0, y0)
    labels = np.zeros(mask.shape, box_labels.dtype)
    labels[y0:y0 + h, x0:x0 + w] = box_labels
    return count, labels, stats, centroids + (x0, y0)


def _air_regions(
    hu_slice: np.ndarray, spacing_ij: Sequence[float], prob: np.ndarray | None = None, midline_col: float | None = None,
    in_volume: bool = False,
) -> _SliceRegions:
    """The lung candidates of one slice; right and left of the body's centre, or of `midline_col`.

    prob None: air regions not connected to the image border. prob given (the lung network's
    probability, same shape): air regions the network mostly calls lung, plus every pixel it
    calls lung; the image border is not used (tight crops and clipped fields of view).
    """
    valid = has_data(hu_slice)
    air = ((hu_slice < AIR_THRESHOLD_HU) & valid).astype(np.uint8)
    count, labels, stats, centroids = cv2.connectedComponentsWithStats(air, connectivity=8)
    sides_touched = np.zeros(count, dtype=np.int64)  # image sides each air region reaches
    for edge in (labels[0], labels[-1], labels[:, 0], labels[:, -1]):
        sides_touched += np.bincount(edge, minlength=count) > 0
    outside = sides_touched > 0
    outside[0] = True  # label 0 is everything not air
    # the body's (and table's) centre: all pixels minus the outside air, from the stats
    height, width = air.shape
    outside_area = stats[1:, cv2.CC_STAT_AREA][outside[1:]]
    body_area = air.size - outside_area.sum()
    image_centre = np.array([width - 1, height - 1]) / 2
    if body_area:
        centre = (air.size * image_centre - outside_area @ centroids[1:][outside[1:]]) / body_area
    else:
        centre = image_centre
    if midline_col is not None:
        centre = np.array([midline_col, centre[1]])
    edge_zone = cv2.dilate((~valid).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    edge_zone[[0, -1], :] = edge_zone[:, [0, -1]] = True
    if prob is not None:
        lungish = prob >= DENSE_LUNG_PROBABILITY
        # air around the body reaches 3 image sides (a lung cut by a tight crop, 1 or 2); slice images
        # may be cropped to the lungs on 3 sides, so only volumes use it
        surrounding = (sides_touched >= OUTSIDE_MIN_SIDES) & in_volume
        surrounding[0] = False
        mean_prob = _region_means(prob, labels, stats, np.flatnonzero(~surrounding[1:]) + 1)
        dense = (lungish & valid & (labels == 0)).astype(np.uint8)
        if surrounding.any() and cv2.countNonZero(dense):
            _drop_body_wall(dense, _lookup(surrounding.view(np.uint8), labels), prob, spacing_ij)
        # per air region: 0 not lung (no region, or the air around the body), 1 lung where the network
        # calls the pixel lung, 2 lung (the network calls the region lung on average)
        air_lung = np.zeros(count, dtype=np.uint8)
        air_lung[1:] = ~surrounding[1:]
        air_lung += air_lung.astype(bool) & (mean_prob >= LUNG_PROBABILITY_THRESHOLD)
        air_kind = _lookup(air_lung, labels)
        candidate = (air_kind == 2) | ((air_kind == 1) & lungish) | (dense > 0)
        count, labels, stats, centroids = _components_in_box(candidate.view(np.uint8))
        outside = np.zeros(count, dtype=bool)
        outside[0] = True
    area_mm2 = stats[:, cv2.CC_STAT_AREA] * spacing_ij[0] * spacing_ij[1]
    airway = (area_mm2 < AIRWAY_MAX_AREA_MM2) & (
        np.abs(centroids[:, 0] - centre[0]) * spacing_ij[0] < AIRWAY_MAX_OFFSET_MM
    )
    kept = np.flatnonzero(~outside & (area_mm2 >= MIN_REGION_AREA_MM2) & ~airway)
    kept = kept[np.argsort(-area_mm2[kept], kind="stable")][:MAX_REGIONS_PER_SLICE]
    lut = np.zeros(count, dtype=np.uint8)
    lut[kept] = np.arange(1, len(kept) + 1)
    split = int(round(centre[0]))
    right = np.zeros(len(kept) + 1, dtype=np.int64)
    hu_sums = np.zeros(len(kept) + 1)
    at_edge = np.zeros(len(kept) + 1, dtype=np.int64)
    for n, label in enumerate(kept, start=1):
        x, y, w, h = stats[label, :4]
        member = labels[y:y + h, x:x + w] == label
        hu_sums[n] = hu_slice[y:y + h, x:x + w][member].sum(dtype=np.float64)
        right[n] = np.count_nonzero(member[:, : max(split - x, 0)])
        at_edge[n] = np.count_nonzero(member & edge_zone[y:y + h, x:x + w])
    areas = np.r_[0, stats[kept, cv2.CC_STAT_AREA]]
    return _SliceRegions(_lookup(lut, labels), areas, right, hu_sums, centre, at_edge)


def _drop_body_wall(dense: np.ndarray, outside_air: np.ndarray, prob: np.ndarray, spacing_ij: Sequence[float]) -> None:
    """Clear, in place, what of the dense "lung" (uint8 0/1; the lung network's probability `prob`)
    reaches the air around the body (`outside_air`, uint8 0/1): dense lung lies inside the chest wall.

    Such a component is the body wall taken for lung, cleared whole, unless it is a lesion whose
    outline leaked to the skin: the network's outline of a large dense lesion (a dependent
    consolidation band) can run on through the chest wall. A leak touches the body's outline
    along a short stretch (at most LEAK_MAX_CONTACT of it) and the network is sure of the
    component (mean probability at least LEAK_MIN_MEAN_PROBABILITY; on the body wall it is
    unsure, on a band sure): then only its pixels within CHEST_WALL_MIN_MM of the air are cleared.
    """
    count, components, stats, _ = cv2.connectedComponentsWithStats(dense, connectivity=8)
    outline = cv2.dilate(outside_air, np.ones((5, 5), np.uint8)) - outside_air  # the body's skin, 2 px wide
    contact = np.bincount(components[outline > 0], minlength=count)
    contact[0] = 0
    touching = contact > 0
    if not touching.any():
        return
    mean_prob = _region_means(prob, components, stats, np.flatnonzero(touching))
    leaks = touching & (contact <= LEAK_MAX_CONTACT * cv2.countNonZero(outline)) & (mean_prob >= LEAK_MIN_MEAN_PROBABILITY)
    dense[_lookup(touching & ~leaks, components)] = 0
    if leaks.any():  # within the leaks' box and a margin that holds any air within CHEST_WALL_MIN_MM
        margin = int(np.ceil(CHEST_WALL_MIN_MM / min(spacing_ij))) + 1
        x, y, w, h = cv2.boundingRect(_lookup(leaks.view(np.uint8), components))
        box = np.s_[max(y - margin, 0):y + h + margin, max(x - margin, 0):x + w + margin]
        depth_mm = cv2.distanceTransform(1 - outside_air[box], cv2.DIST_L2, cv2.DIST_MASK_5) * min(spacing_ij)
        dense[box][depth_mm < CHEST_WALL_MIN_MM] = 0


def _components_3d(slices: list[_SliceRegions]) -> tuple[np.ndarray, np.ndarray]:
    """3-D connectivity of the per-slice candidates: candidates overlapping on neighbouring slices
    are one component. Returns the offset of each slice's candidates in the global numbering and
    each global candidate's component (a representative global number)."""
    offsets = np.cumsum([0] + [len(s.areas) for s in slices])
    parent = np.arange(offsets[-1])

    def root(node: int) -> int:
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for k in range(len(slices) - 1):
        below, above = slices[k].labels, slices[k + 1].labels
        overlap = (below > 0) & (above > 0)
        if not overlap.any():
            continue
        pairs = np.flatnonzero(np.bincount(below[overlap].astype(np.int32) * 256 + above[overlap], minlength=1))
        for a, b in zip(offsets[k] + pairs // 256, offsets[k + 1] + pairs % 256):
            parent[root(int(a))] = root(int(b))
    return offsets, np.array([root(n) for n in range(offsets[-1])])


def _side_tables(slices: list[_SliceRegions]) -> list[np.ndarray]:
    """For each slice, a lookup from candidate number to RIGHT, LEFT, _JOINED or 0 (not lung).

    The lungs are the largest 3-D component that is not gas and those not much smaller; each lies
    on one side of the body's midline, or holds both lungs (joined at a junction).
    """
    offsets, component = _components_3d(slices)
    areas = np.concatenate([s.areas for s in slices])
    volume = np.bincount(component, weights=areas, minlength=len(areas))
    right = np.bincount(component, weights=np.concatenate([s.right for s in slices]), minlength=len(areas))
    hu_sum = np.bincount(component, weights=np.concatenate([s.hu_sums for s in slices]), minlength=len(areas))
    mean_hu = np.divide(hu_sum, volume, out=np.full(len(areas), -np.inf), where=volume > 0)
    lung_like = np.where(mean_hu >= GAS_MEAN_HU, volume, 0)
    lungs = np.flatnonzero((lung_like > 0) & (lung_like >= LUNG_MIN_FRACTION * lung_like.max()))
    side = np.zeros(len(areas), dtype=np.uint8)
    for lung in lungs:
        right_fraction = right[lung] / volume[lung]
        if JOINED_MIN_SIDE_FRACTION <= right_fraction <= 1 - JOINED_MIN_SIDE_FRACTION:
            side[component == lung] = _JOINED
        else:
            side[component == lung] = RIGHT if right_fraction > 0.5 else LEFT
    return [side[offsets[k]:offsets[k + 1]] for k in range(len(slices))]


def _cut_joined(sides: np.ndarray, centre_col: float, spacing_i: float) -> None:
    """Split _JOINED pixels in place into RIGHT and LEFT at the thinnest column near the midline
    (of equally thin ones, the nearest to it)."""
    joined = sides == _JOINED
    counts = np.count_nonzero(joined, axis=0)
    search_px = round(JUNCTION_SEARCH_MM / spacing_i)
    lo = int(np.clip(centre_col - search_px, 0, len(counts) - 1))
    hi = int(np.clip(centre_col + search_px, lo + 1, len(counts)))
    thinnest = lo + np.flatnonzero(counts[lo:hi] == counts[lo:hi].min())
    cut = int(thinnest[np.argmin(np.abs(thinnest - centre_col))])
    sides[:, :cut][joined[:, :cut]] = RIGHT
    sides[:, cut:][joined[:, cut:]] = LEFT


def _fill_pleural_bites(contour: np.ndarray, centre: np.ndarray, spacing_mm: float) -> list[np.ndarray]:
    """Polygons closing the contour's concavities that look like lesions at the pleura.

    A bite qualifies when it is neither too shallow nor too deep and opens away from the body
    centre (its deepest point lies towards the centre): the chest wall side, not the heart,
    hilum or diaphragm side.
    """
    if len(contour) < 4:
        return []
    hull = cv2.convexHull(contour, returnPoints=False)
    try:
        defects = cv2.convexityDefects(contour, np.sort(hull, axis=0))
    except cv2.error:  # self-intersecting contours: no reliable defects
        return []
    if defects is None:
        return []
    points = contour[:, 0, :].astype(float)
    polygons = []
    defects = defects.reshape(-1, 4)
    depth_mm = defects[:, 3] / 256.0 * spacing_mm
    for start, end, far, _ in defects[(depth_mm >= MIN_DEFECT_DEPTH_MM) & (depth_mm <= MAX_DEFECT_DEPTH_MM)]:
        mouth = (points[start] + points[end]) / 2
        inward = points[far] - mouth
        to_centre = centre - mouth
        norms = np.linalg.norm(inward) * np.linalg.norm(to_centre)
        if norms == 0 or inward @ to_centre / norms < MIN_DEFECT_INWARD_COS:
            continue
        span = np.arange(start, end + 1) if start <= end else np.r_[start:len(points), 0:end + 1]
        polygons.append(contour[span])
    return polygons


def _refine_side(mask: np.ndarray, centre: np.ndarray, spacing_ij: Sequence[float]) -> np.ndarray:
    """One lung on one slice (uint8 0/1), closed, with pleural bites and holes filled."""
    radius_px = max(1, round(CLOSING_RADIUS_MM / min(spacing_ij)))
    x, y, w, h = cv2.boundingRect(mask)
    margin = radius_px + 1  # the result stays inside the mask's bounding box; the margin is for the closing
    crop = cv2.copyMakeBorder(mask[y:y + h, x:x + w], margin, margin, margin, margin, cv2.BORDER_CONSTANT, 0)
    crop = _close(crop, radius_px)
    contours, _ = cv2.findContours(crop, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    crop_centre = centre - np.array([x - margin, y - margin])
    filled = np.zeros_like(crop)
    for contour in contours:
        bites = _fill_pleural_bites(contour, crop_centre, float(np.mean(spacing_ij)))
        cv2.drawContours(filled, [contour, *bites], -1, 1, thickness=cv2.FILLED)
    out = np.zeros_like(mask)
    out[y:y + h, x:x + w] = filled[margin:margin + h, margin:margin + w]
    return out


def _refine_slice(sides: np.ndarray, centre: np.ndarray, spacing_ij: Sequence[float]) -> np.ndarray:
    """Final RIGHT/LEFT labels of one slice from its candidates' sides."""
    labels = np.zeros_like(sides)
    for side in (RIGHT, LEFT):
        side_mask = (sides == side).astype(np.uint8)
        if side_mask.any():
            refined = _refine_side(side_mask, centre, spacing_ij)
            labels[(refined > 0) & (labels == 0)] = side
    return labels


def extract_lungs(hu_kji: np.ndarray, spacing_ijk: Sequence[float], midline_col: float | None = None) -> Lungs:
    """Right and left lung, lesions included, of an LPS-oriented CT volume in HU.

    hu_kji: (K, J, I) HU on the LPS-oriented grid (`geometry.orient_to_lps`); spacing_ijk in mm.
    midline_col: the column i where the patient's LPS x is 0, if known. Where the field of view
    clips the lungs (they touch the image border or padding on FOV_MIN_SLICES slices or more)
    the body's centre is not the patient's midline: right and left are then told by LPS x
    (left of x = 0 is the patient's right, x < 0), and `Lungs.notes` says so.
    Raises NoLungsError when nothing lung-like is found.
    """
    prob = lung_probability_hu(hu_kji, float(spacing_ijk[2]))
    return _extract(hu_kji, spacing_ijk, prob, midline_col)


def extract_aerated_lungs(hu_kji: np.ndarray, spacing_ijk: Sequence[float]) -> Lungs:
    """The threshold-only lungs (air-like lung inside the body): right on healthy lungs, short of
    dense lesions. The lung network's training labels; `extract_lungs` for analysis."""
    return _extract(hu_kji, spacing_ijk, None, None)


def _regions_and_sides(hu_kji, spacing_ij, prob, midline_col, pool) -> tuple[list[_SliceRegions], list[np.ndarray]]:
    slices = list(pool.map(
        lambda k: _air_regions(hu_kji[k], spacing_ij, None if prob is None else to_slice_size(prob[k], hu_kji.shape[1:]),
                               midline_col, in_volume=True),
        range(len(hu_kji))
    ))
    return slices, _side_tables(slices)


def _extract(hu_kji: np.ndarray, spacing_ijk: Sequence[float], prob: np.ndarray | None, midline_col: float | None) -> Lungs:
    spacing_ij = (float(spacing_ijk[0]), float(spacing_ijk[1]))
    labels = np.zeros(hu_kji.shape, dtype=np.uint8)
    notes = []
    # slices are independent and OpenCV/numpy release the GIL: spread them over the cores
    with ThreadPoolExecutor(max_workers=cpu_threads()) as pool:
        slices, tables = _regions_and_sides(hu_kji, spacing_ij, prob, None, pool)
        clipped = sum(bool((s.at_edge * (t > 0)).any()) for s, t in zip(slices, tables))
        if clipped >= FOV_MIN_SLICES:
            if midline_col is not None:
                slices, tables = _regions_and_sides(hu_kji, spacing_ij, prob, midline_col, pool)
            notes.append(
                f"field of view: the lungs reach the edge of the image or of the reconstructed field of view on "
                f"{clipped} slices; lung outside it is missing"
                + ("; right and left told by patient coordinates (LPS x)" if midline_col is not None else "")
            )

        def label_slice(k: int, regions: _SliceRegions, table: np.ndarray) -> None:
            if not table.any():
                return
            sides = _lookup(table, regions.labels)
            if table.max() == _JOINED:
                _cut_joined(sides, regions.centre[0], spacing_ij[0])
            labels[k] = _refine_slice(sides, regions.centre, spacing_ij)
            if prob is not None:
                _clear_mediastinum(labels[k], hu_kji[k], regions.centre[0], spacing_ij)

        list(pool.map(label_slice, range(len(slices)), slices, tables))
    lungs = Lungs(
        labels=labels,
        spacing_ijk=tuple(float(s) for s in spacing_ijk),
        area_mm2=np.array([cv2.countNonZero(s) for s in labels], dtype=float) * spacing_ij[0] * spacing_ij[1],
        notes=notes,
    )
    if lungs.volume_ml() < MIN_LUNG_VOLUME_ML:
        raise NoLungsError(
            f"no lungs found: {lungs.volume_ml():.0f} ml of lung inside the body, "
            f"at least {MIN_LUNG_VOLUME_ML:.0f} ml needed; is this a chest CT?"
        )
    return lungs


def _clear_mediastinum(labels: np.ndarray, hu_slice: np.ndarray, midline_col: float, spacing_ij: Sequence[float]) -> None:
    """Drop, in place, lung pixels as dense as soft tissue (>= GROUND_GLASS_MAX_HU, or within
    SOFT_TISSUE_RIM_MM of such a pixel) medial to the aerated lung of their row.

    The heart and mediastinum lie between the lungs' medial borders; the lung network can take
    them for a lesion where the lung wraps around them. Ground glass is kept wherever it lies (the
    medial lung of a diffusely diseased slice, with aerated lung only laterally), as is dense
    lung lateral to, in front of or behind the aerated lung (consolidation at the chest wall,
    dependent bands with no aerated lung on their rows). Per row: the right lung's zone runs from
    its aerated pixel nearest the midline to the midline (or to the left lung's aerated pixel),
    the left lung's likewise.
    """
    rim_px = max(1, round(SOFT_TISSUE_RIM_MM / min(spacing_ij)))
    x, y, w, h = cv2.boundingRect(labels)
    if not w:
        return
    # the lungs' box and a rim around it: the soft tissue within rim_px of any lung pixel
    box = np.s_[max(y - rim_px, 0):y + h + rim_px, max(x - rim_px, 0):x + w + rim_px]
    box_labels, box_hu = labels[box], hu_slice[box]  # views: the box's labels are cleared in place
    air = box_hu < AIR_THRESHOLD_HU
    # soft tissue and the pixels next to it (partial volume at the heart's and vessels' borders)
    soft_tissue = cv2.dilate((box_hu >= GROUND_GLASS_MAX_HU).astype(np.uint8), np.ones((2 * rim_px + 1,) * 2, np.uint8)) > 0
    cols = np.arange(box[1].start, box[1].start + box_labels.shape[1])  # image columns i
    for side in (RIGHT, LEFT):
        aerated = (box_labels == side) & air
        rows = aerated.any(axis=1)
        if not rows.any():
            continue
        # each row's aerated pixel nearest the midline (rows without one are left alone below)
        if side == RIGHT:  # i grows towards the patient's left
            edge = cols[-1] - np.argmax(aerated[:, ::-1], axis=1)
            medial = (cols[None, :] > edge[:, None]) & (cols[None, :] <= max(midline_col, 0))
        else:
            edge = cols[0] + np.argmax(aerated, axis=1)
            medial = (cols[None, :] < edge[:, None]) & (cols[None, :] >= midline_col)
        box_labels[medial & rows[:, None] & (box_labels == side) & soft_tissue] = 0


def _pseudo_hu(gray_u8: np.ndarray) -> np.ndarray:
    return gray_u8.astype(np.float32) * PSEUDO_HU_SCALE + PSEUDO_HU_OFFSET


def _as_gray(image: np.ndarray) -> np.ndarray:
    """(H, W) uint8, or (H, W, 3|4) colour (a screenshot, a figure) converted to grey."""
    if image.ndim == 3:
        code = cv2.COLOR_BGRA2GRAY if image.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        image = cv2.cvtColor(image, code)
    return image.astype(np.uint8)


def lung_mask_2d(gray_u8: np.ndarray) -> np.ndarray:
    """Lung mask (bool, H x W), lesions included, of one axial slice image in a lung window.

    gray_u8: (H, W) uint8 (`volume_io.read_image_2d`), or (H, W, 3) colour. Any orientation,
    flip or crop: the lung network reads the image as it is. The image has no spacing: its width
    is taken as NOMINAL_FOV_MM. Lungs are candidates at least a fraction of the largest, each
    closed and filled on its own; then, as in a volume, soft-tissue pixels medial to a lung's aerated
    part on its rows (heart, mediastinum, the liver's dome: `_clear_mediastinum`) are dropped,
    medial meaning towards the body's centre column, whichever way the image is flipped.
    """
    gray = _as_gray(gray_u8)
    prob = lung_probability(gray[None])[0]
    return _mask_2d(gray, prob)


def threshold_lung_mask_2d(gray_u8: np.ndarray) -> np.ndarray:
    """Aerated-lung mask (bool) of one lung-window 8-bit slice by threshold only (air regions not
    connected to the image border): the lung network's training labels on healthy slices."""
    return _mask_2d(_as_gray(gray_u8), None)


def _mask_2d(gray: np.ndarray, prob: np.ndarray | None) -> np.ndarray:
    pixel_mm = NOMINAL_FOV_MM / gray.shape[1]
    spacing_ij = (pixel_mm, pixel_mm)
    hu = _pseudo_hu(gray)
    regions = _air_regions(hu, spacing_ij, prob)
    labels = np.zeros(gray.shape, dtype=np.uint8)
    if len(regions.areas) < 2:
        return labels > 0
    for n in np.flatnonzero(regions.areas >= LUNG_MIN_FRACTION * regions.areas[1]):
        if n > 0:
            # the side of the body's centre column it mostly lies on (an image's right may be the patient's left)
            side = RIGHT if 2 * regions.right[n] >= regions.areas[n] else LEFT
            refined = _refine_side((regions.labels == n).astype(np.uint8), regions.centre, spacing_ij) > 0
            labels[refined & (labels == 0)] = side
    if prob is not None:
        _clear_mediastinum(labels, hu, regions.centre[0], spacing_ij)
    return labels > 0
