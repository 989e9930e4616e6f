"""`lungs.seg.nrrd`: the lungs and the lesion boxes as a 3D Slicer segmentation.

Written with slicerio in Slicer's own layout: layer 0 holds the right (label 1) and left
(label 2) lung; boxes overlap the lungs and each other, so they go into further layers (a 4-D
NRRD, `kinds: list domain domain domain`), each box into the first layer where it overlaps
nothing. The grid is exactly the lung labels' (origin, spacing, direction).
"""

from __future__ import annotations

from collections.abc import Sequence
from os import PathLike

import numpy as np
import SimpleITK as sitk
import slicerio

from . import geometry
from .result import WARNING_KEY, LesionBox, SliceResult

GZIP_LEVEL = 1  # a P001-sized volume (512x512x148) compresses in ~0.2 s per layer; level 9 is ~10x slower
LUNG_LAYER = 0
RIGHT_LUNG_LABEL = 1
LEFT_LUNG_LABEL = 2
_MAX_LABEL = np.iinfo(np.uint8).max
DESCRIPTION_TAG = "Description"  # segment tag holding a box's navigator score

_ANATOMY_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
_ANATOMIC_REGION_CONTEXT = "Anatomic codes - DICOM master list"
_ANATOMICAL_STRUCTURE = ["SCT", "123037004", "Anatomical Structure"]
_ALTERED_STRUCTURE = ["SCT", "49755003", "Morphologically Altered Structure"]
_LESION = ["SCT", "52988006", "Lesion"]
_LUNG = ["SCT", "39607008", "Lung"]

RIGHT_LUNG_SEGMENT = {
    "id": "right_lung",
    "name": "Right lung",
    "color": [0.5, 0.68, 0.5],
    "terminology": {
        "contextName": _ANATOMY_CONTEXT,
        "category": _ANATOMICAL_STRUCTURE,
        "type": ["SCT", "3341006", "Right lung"],
        "anatomicContextName": _ANATOMIC_REGION_CONTEXT,
    },
}
LEFT_LUNG_SEGMENT = {
    "id": "left_lung",
    "name": "Left lung",
    "color": [0.41, 0.64, 0.74],
    "terminology": {
        "contextName": _ANATOMY_CONTEXT,
        "category": _ANATOMICAL_STRUCTURE,
        "type": ["SCT", "44029006", "Left lung"],
        "anatomicContextName": _ANATOMIC_REGION_CONTEXT,
    },
}
LESION_TERMINOLOGY = {
    "contextName": _ANATOMY_CONTEXT,
    "category": _ALTERED_STRUCTURE,
    "type": _LESION,
    "anatomicContextName": _ANATOMIC_REGION_CONTEXT,
    "anatomicRegion": _LUNG,
}

_COOL_RGB = np.array([1.0, 0.85, 0.2])  # yellow: the lowest-scoring box
_HOT_RGB = np.array([0.9, 0.1, 0.1])  # red: the highest-scoring box


def lesion_colors(scores: Sequence[float]) -> list[list[float]]:
    """A warm colour per score, yellow (lowest) to red (highest), so the strongest boxes stand out."""
    if not scores:
        return []
    low, span = min(scores), max(scores) - min(scores)
    heat = [(s - low) / span if span > 0 else 1.0 for s in scores]
    return [[round(float(c), 3) for c in _COOL_RGB + h * (_HOT_RGB - _COOL_RGB)] for h in heat]


def box_name(slice_index: int, rank: int) -> str:
    """The name of a lesion box everywhere (segment, ROI, module), e.g. "slice 82 box 1" (ASCII)."""
    return f"slice {slice_index} box {rank}"


def box_description(score: float) -> str:
    """The description of a lesion box (segment tag, ROI), e.g. "navigator score 0.9100"."""
    return f"navigator score {score:.4f}"


def box_segment_id(slice_index: int, rank: int) -> str:
    """The segment ID of a box in lungs.seg.nrrd (indices on the file's grid)."""
    return f"lesion_slice{slice_index}_box{rank}"


def _overlaps(a: LesionBox, b: LesionBox) -> bool:
    return all(a.ijk_min[d] <= b.ijk_max[d] and b.ijk_min[d] <= a.ijk_max[d] for d in range(3))


def _assign_layers(boxes: Sequence[LesionBox]) -> list[tuple[int, int]]:
    """(layer, label) per box: the first layer after the lungs' with no overlapping box and a free label."""
    layers: list[list[LesionBox]] = []
    placement = []
    for box in boxes:
        for index, members in enumerate(layers):
            if len(members) < _MAX_LABEL and not any(_overlaps(box, m) for m in members):
                break
        else:
            layers.append([])
            index = len(layers) - 1
        layers[index].append(box)
        placement.append((LUNG_LAYER + 1 + index, len(layers[index])))
    return placement


def write_lung_segmentation(path: str | PathLike, lung_labels: sitk.Image, slices: Sequence[SliceResult], *,
                            warning: str | None = None) -> None:
    """Write the lung labels (0 none, 1 right, 2 left) and every slice's boxes as `path` (.seg.nrrd);
    `warning` (an untrained network's note) goes into the header as `covidct_warning:=...`."""
    labels_kji = sitk.GetArrayViewFromImage(lung_labels)
    boxes = [(s.index, box) for s in slices for box in s.boxes]
    placement = _assign_layers([box for _, box in boxes])
    n_layers = 1 + max((layer for layer, _ in placement), default=LUNG_LAYER)

    voxels_kjil = np.zeros(labels_kji.shape + (n_layers,), dtype=np.uint8)  # layer varies fastest on disk
    voxels_kjil[..., LUNG_LAYER] = labels_kji
    for (_, box), (layer, label) in zip(boxes, placement):
        (i0, j0, k0), (i1, j1, k1) = box.ijk_min, box.ijk_max
        voxels_kjil[k0 : k1 + 1, j0 : j1 + 1, i0 : i1 + 1, layer] = label

    segments = [
        {**RIGHT_LUNG_SEGMENT, "layer": LUNG_LAYER, "labelValue": RIGHT_LUNG_LABEL},
        {**LEFT_LUNG_SEGMENT, "layer": LUNG_LAYER, "labelValue": LEFT_LUNG_LABEL},
    ]
    colors = lesion_colors([box.score for _, box in boxes])
    for (slice_index, box), (layer, label), color in zip(boxes, placement, colors):
        segments.append(
            {
                "id": box_segment_id(slice_index, box.rank),
                "name": box_name(slice_index, box.rank),
                "color": color,
                "terminology": LESION_TERMINOLOGY,
                "tags": {DESCRIPTION_TAG: box_description(box.score)},
                "layer": layer,
                "labelValue": label,
            }
        )
    voxels = voxels_kjil.transpose(3, 2, 1, 0)  # [layer, i, j, k], Fortran-contiguous: written as is
    _write_segmentation(path, voxels if n_layers > 1 else voxels[0], lung_labels, segments, warning)


GROUND_GLASS_SEGMENT = {"id": "ground_glass", "name": "Ground-glass", "color": [0.95, 0.8, 0.25], "terminology": LESION_TERMINOLOGY}
CONSOLIDATION_SEGMENT = {"id": "consolidation", "name": "Consolidation", "color": [0.85, 0.3, 0.15], "terminology": LESION_TERMINOLOGY}


def write_severity_segmentation(path: str | PathLike, severity_labels: sitk.Image, *, warning: str | None = None) -> None:
    """`severity.seg.nrrd`: one layer, label 1 "Ground-glass", 2 "Consolidation" (severity.GROUND_GLASS,
    CONSOLIDATION), on exactly the labels' grid (that of lungs.seg.nrrd); `warning` as in the lungs file."""
    segments = [{**segment, "layer": 0, "labelValue": value} for segment, value in ((GROUND_GLASS_SEGMENT, 1), (CONSOLIDATION_SEGMENT, 2))]
    _write_segmentation(path, sitk.GetArrayViewFromImage(severity_labels).transpose(2, 1, 0), severity_labels, segments, warning)


def _write_segmentation(path, voxels: np.ndarray, grid: sitk.Image, segments: list[dict], warning: str | None) -> None:
    """Write a .seg.nrrd: voxels [i, j, k] or [layer, i, j, k] on `grid`'s geometry, the segments (each
    given the full extent: some Slicer versions crop a shared layer to its first segment's), and
    `warning` as the header field `covidct_warning:=...` (slicerio writes extra keys as key:=value)."""
    full_extent = [v for n in grid.GetSize() for v in (0, n - 1)]
    for segment in segments:
        segment.update(extent=full_extent, nameAutoGenerated=False, colorAutoGenerated=False)
    segmentation = {
        "voxels": voxels,
        "ijkToLPS": geometry.ijk_to_lps_matrix(grid),
        "containedRepresentationNames": ["Binary labelmap"],
        "segments": segments,
    }
    if warning:
        segmentation[WARNING_KEY] = warning
    slicerio.write_segmentation(str(path), segmentation, compression_level=GZIP_LEVEL)
