"""`lesions.mrk.json`: the lesion boxes as 3D Slicer ROI markups (one ROI node per box).

Follows Slicer's markups schema v1.0.3 and what Slicer's ROI JSON storage node reads: an ROI is
its `center`, its `size` along its own axes and an `orientation`, a row-major 3x3 matrix whose
columns are those axes in the file's coordinate system (LPS here). The axes are the volume's
i, j, k axes, so a box stays aligned to an oblique volume. Like Slicer, one control point sits at
the centre (a Box ROI with no control point is read with size 0).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from os import PathLike

import SimpleITK as sitk

from .geometry import VoxelGrid
from .result import WARNING_KEY, SliceResult
from .segmentation_file import box_description, box_name, lesion_colors

MARKUPS_SCHEMA = (
    "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/"
    "markups-schema-v1.0.3.json#"
)
COORDINATE_SYSTEM = "LPS"
_NAME_PATTERN = re.compile(r"^slice (\d+) box (\d+)$")
_DESCRIPTION_PATTERN = re.compile(r"^navigator score (\S+)")
_DISPLAY = {
    "visibility": True,
    "opacity": 1.0,
    "propertiesLabelVisibility": True,
    "pointLabelsVisibility": False,
    "textScale": 2.0,
    "lineThickness": 0.2,
    "handlesInteractive": False,
}


@dataclass
class LesionMarkup:
    """One ROI read back from a lesions.mrk.json."""

    name: str
    slice_index: int
    rank: int
    score: float
    center_lps: tuple[float, float, float]
    size_mm: tuple[float, float, float]
    orientation: tuple[float, ...]  # 3x3 row-major; columns are the ROI axes in LPS


def write_lesion_markups(path: str | PathLike, slices: Sequence[SliceResult], reference_image: sitk.Image, *,
                         warning: str | None = None) -> None:
    """Write every slice's boxes as locked ROI markups in `path` (.mrk.json, LPS).

    `warning` (an untrained network's note) goes into the document (`covidct_warning`) and into
    every ROI's description (Slicer's node description)."""
    orientation = [float(v) for v in VoxelGrid.from_image(reference_image).rotation_lps().ravel()]  # ROI axes: the volume's
    boxes = [(s.index, box) for s in slices for box in s.boxes]
    colors = lesion_colors([box.score for _, box in boxes])
    markups = []
    for (slice_index, box), color in zip(boxes, colors):
        center = [float(v) for v in box.center_lps]
        markup = {
            "type": "ROI",
            "name": box_name(slice_index, box.rank),
            "coordinateSystem": COORDINATE_SYSTEM,
            "coordinateUnits": "mm",
            "locked": True,
            "fixedNumberOfControlPoints": True,
            "labelFormat": "%N-%d",
            "lastUsedControlPointNumber": 1,
            "roiType": "Box",
            "insideOut": False,
            "center": center,
            "orientation": orientation,
            "size": [float(v) for v in box.size_mm],
            "controlPoints": [
                {
                    "id": "1",
                    "label": f"box {box.rank}",
                    "description": box_description(box.score),
                    "associatedNodeID": "",
                    "position": center,
                    "selected": True,
                    "locked": True,
                    "visibility": True,
                    "positionStatus": "defined",
                }
            ],
            "measurements": [],
            "display": {**_DISPLAY, "color": color, "selectedColor": color},
        }
        if warning:
            markup["description"] = warning
        markups.append(markup)
    document = {"@schema": MARKUPS_SCHEMA, "markups": markups}
    if warning:
        document[WARNING_KEY] = warning
    with open(path, "w", encoding="utf-8") as f:
        json.dump(document, f, indent=2)


def read_lesion_markups(path: str | PathLike) -> list[LesionMarkup]:
    """The boxes of a lesions.mrk.json written by `write_lesion_markups`, in file order.

    Raises ValueError for a file that is not such a markups file.
    """
    with open(path, encoding="utf-8") as f:
        document = json.load(f)
    out = []
    for markup in document.get("markups", []):
        name_match = _NAME_PATTERN.match(markup.get("name", ""))
        points = markup.get("controlPoints") or [{}]
        score_match = _DESCRIPTION_PATTERN.match(points[0].get("description", ""))
        if markup.get("type") != "ROI" or markup.get("coordinateSystem") != COORDINATE_SYSTEM or not (
            name_match and score_match
        ):
            raise ValueError(f"{path}: not a lesion box markup: {markup.get('name')!r}")
        out.append(
            LesionMarkup(
                name=markup["name"],
                slice_index=int(name_match.group(1)),
                rank=int(name_match.group(2)),
                score=float(score_match.group(1)),
                center_lps=tuple(float(v) for v in markup["center"]),
                size_mm=tuple(float(v) for v in markup["size"]),
                orientation=tuple(float(v) for v in markup["orientation"]),
            )
        )
    return out
