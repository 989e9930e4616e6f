"""What one analysis puts into a 3D Slicer scene, computed without Slicer.

The Slicer module turns a result (a `Result`, or the dict of a report.json) into a `ScenePlan`
and only applies it to MRML nodes, so the geometry, names, colours and texts are tested here.
Every point and matrix of the plan is in the analysed volume's own RAS frame (Slicer's scene
before the volume's parent transform): RAS = diag(-1, -1, 1) @ LPS.

Slicer may hold the analysed file on another grid of the same voxels (its reader makes every
left-handed volume right-handed by reversing k). The plan is then laid out on Slicer's grid:
slice numbers, box names and the heat map's voxels are converted from the file's grid, which
report.json keeps.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from html import escape
from typing import Any

import numpy as np
from slicerio.segmentation import terminology_entry_to_string

from .display import HEAT_THRESHOLD
from .geometry import LPS_TO_RAS, VoxelGrid
from .html_report import AGGREGATION_TEXT
from .performance import trust_sentence
from .result import RESEARCH_USE_ONLY, UNTRAINED_WARNING
from .segmentation_file import (
    CONSOLIDATION_SEGMENT,
    GROUND_GLASS_SEGMENT,
    LEFT_LUNG_SEGMENT,
    LESION_TERMINOLOGY,
    RIGHT_LUNG_SEGMENT,
    box_description,
    box_name,
    box_segment_id,
    lesion_colors,
)

COLOR_TABLE_NAME = "CovidCT Inferno"
COLOR_TABLE_SIZE = 256
# matplotlib's "inferno" sampled at 0, 1/16, ..., 1 (RGB); the table interpolates linearly between them
_INFERNO_ANCHORS = (
    (0.001, 0.0, 0.014), (0.042, 0.028, 0.141), (0.129, 0.047, 0.291), (0.238, 0.037, 0.396),
    (0.342, 0.062, 0.429), (0.441, 0.099, 0.432), (0.541, 0.135, 0.415), (0.64, 0.171, 0.381),
    (0.736, 0.216, 0.33), (0.822, 0.275, 0.266), (0.894, 0.353, 0.194), (0.947, 0.449, 0.115),
    (0.978, 0.558, 0.035), (0.988, 0.675, 0.065), (0.975, 0.798, 0.206), (0.948, 0.917, 0.411),
    (0.988, 0.998, 0.645),
)
TOP_SLICE_BUTTONS = 3  # how many of the most suspicious slices get a jump button
PROBABILITY_DECIMALS = 3
LUNG_FILL_OPACITY = 0.25  # lungs are filled faintly in slice views; lesion boxes are outlines only
FINDING_FILL_OPACITY = 0.5  # ground-glass and consolidation


@dataclass(frozen=True)
class SegmentPlan:
    """A segment of a segmentation file: its ID there, its name, colour and terminology in the scene and its
    fill in slice views (lungs and measured findings filled faintly, lesion boxes outlines only)."""

    segment_id: str
    name: str
    color: tuple[float, float, float]
    terminology: str  # Slicer's terminology entry string
    is_lesion: bool  # a lesion box of the navigator
    fill_opacity: float


@dataclass(frozen=True)
class RoiPlan:
    """A locked box ROI over one lesion box, labelled with its navigator score."""

    name: str
    description: str
    slice_index: int  # on the scene's grid
    rank: int
    score: float
    center_ras: tuple[float, float, float]
    size_mm: tuple[float, float, float]  # along the volume's i, j, k axes
    object_to_node: np.ndarray  # 4x4: ROI axes (the volume's axes, RAS) and centre
    color: tuple[float, float, float]


@dataclass(frozen=True)
class SliceRow:
    """One analysed slice: a row of the table and a place to jump the views to."""

    index: int  # on the scene's grid
    position_mm: float  # the slice centre's S coordinate
    probabilities: dict[str, float]
    box_count: int
    center_ras: tuple[float, float, float]


@dataclass(frozen=True)
class SeverityPlan:
    """The measured involvement (report.json's `severity`): severity.seg.nrrd's two segments and a table of
    volumes per zone, per lung and for both lungs; the score of a lung is the sum of its zones' (0-15)."""

    segmentation_name: str
    table_name: str
    segments: tuple[SegmentPlan, ...]  # ground-glass, consolidation
    rows: tuple[dict[str, Any], ...]  # one per table row: the keys of SEVERITY_COLUMNS
    summary: str  # one sentence: involved share, volumes, score; partial coverage

    def table_columns(self) -> list[tuple[str, np.ndarray]]:
        """(name, values) of each column of the severity table, in order; Lung and Zone are text."""
        return [(title, np.array([row[key] for row in self.rows])) for key, title in SEVERITY_COLUMNS]


SEVERITY_COLUMNS = (  # (report.json key, table column title)
    ("lung", "Lung"), ("zone", "Zone"), ("lung_ml", "Volume (mL)"), ("ground_glass_ml", "Ground-glass (mL)"),
    ("consolidation_ml", "Consolidation (mL)"), ("involved_percent", "Involved (%)"), ("score", "Score"),
)
VOLUME_DECIMALS = 1  # mL and % in the severity table


@dataclass(frozen=True)
class ResultText:
    """The patient-level result as the module shows it."""

    trained: bool
    label: str
    probabilities: dict[str, float]
    aggregation: str  # sentence describing the aggregation method
    slice_count: int
    warnings: tuple[str, ...]  # untrained network, partial lung coverage, padding outside the field of view, ...
    trust: str  # the model's validated figures, or that it has none (performance.trust_sentence)
    severity: str = ""  # the measured involvement (SeverityPlan.summary); "" when not measured
    notice: str = RESEARCH_USE_ONLY

    @property
    def headline(self) -> str:
        return self.label if self.trained else "No result: the network is untrained"

    def html(self) -> str:
        """Rich text for a Qt label: warnings, the label in large type with the model's validated figures
        under it (for a trained model, as report.html), probabilities, method."""
        def text(value: str) -> str:
            return escape(value, quote=False)

        probs = "".join(f"<tr><td>{text(c)}</td><td align='right'>{p:.3f}</td></tr>" for c, p in self.probabilities.items())
        warnings = "".join(f"<p style='color:#c00000'><b>{text(w)}</b></p>" for w in self.warnings)
        trust = f"<p>{text(self.trust)}</p>" if self.trained else ""  # untrained: the warning says it all
        severity = f"<p><b>{text(self.severity)}</b></p>" if self.severity else ""
        return (
            f"{warnings}<p style='font-size:20pt'><b>{text(self.headline)}</b></p>{trust}"
            f"<table cellspacing='4'>{probs}</table>"
            f"<p>{text(self.aggregation)}, over {self.slice_count} analysed slices.</p>{severity}"
            f"<p><i>{text(self.notice)}</i></p>"
        )


@dataclass(frozen=True)
class ScenePlan:
    """Everything the module creates for one analysis, all under one subject-hierarchy folder."""

    geometry: VoxelGrid  # the scene's grid: the volume's in Slicer, else report.json's
    folder_name: str
    segmentation_name: str
    heat_name: str
    table_name: str
    segments: tuple[SegmentPlan, ...]
    rois: tuple[RoiPlan, ...]
    rows: tuple[SliceRow, ...]
    top_rows: tuple[int, ...]  # indices into `rows`, most suspicious first, at most TOP_SLICE_BUTTONS
    classes: tuple[str, ...]
    result: ResultText
    severity: SeverityPlan | None = None  # None: not measured (slice images, reports of schema < 1.3)

    def table_columns(self) -> list[tuple[str, np.ndarray]]:
        """(name, values) of each column of the slice table, in order."""
        columns = [
            ("Slice", np.array([r.index for r in self.rows], dtype=np.int32)),
            ("S (mm)", np.array([round(r.position_mm, 1) for r in self.rows], dtype=float)),
        ]
        for c in self.classes:
            columns.append((f"P({c})", np.array([round(r.probabilities[c], PROBABILITY_DECIMALS) for r in self.rows], dtype=float)))
        columns.append(("Boxes", np.array([r.box_count for r in self.rows], dtype=np.int32)))
        return columns


def folder_name(volume_name: str) -> str:
    """The subject-hierarchy folder holding one volume's results (found again to replace them)."""
    return f"{volume_name} COVID-CT results"


def plan_scene(result, volume_name: str, volume_geometry: VoxelGrid | None = None) -> ScenePlan:
    """The scene content for a `Result` or a report.json dict of the volume named `volume_name`.

    Args:
        volume_geometry: the grid of that volume in Slicer, if it is loaded: slice numbers and
            names are then given on this grid. None: the grid of report.json.
    Raises:
        ValueError: `volume_geometry` does not hold the analysed voxels at their places.
    """
    report = result.to_report() if hasattr(result, "to_report") else result
    analysed = VoxelGrid.from_report(report)
    scene = analysed if volume_geometry is None else volume_geometry
    to_scene = analysed.voxel_map(scene)
    if to_scene is None:
        raise ValueError("the results were computed on another grid than the volume's")

    def scene_index(index: int) -> int:
        return to_scene.slice_index(analysed.axial_axis(), index)

    slices = report["slices"]
    boxes = [(s["index"], b) for s in slices for b in s["boxes"]]
    colors = [tuple(c) for c in lesion_colors([b["score"] for _, b in boxes])]
    rows = tuple(
        SliceRow(
            index=scene_index(s["index"]),
            position_mm=float(s["z_mm"]),
            probabilities=dict(s["probabilities"]),
            box_count=len(s["boxes"]),
            center_ras=analysed.slice_center_ras(s["index"]),
        )
        for s in slices
    )
    row_of_index = {s["index"]: n for n, s in enumerate(slices)}
    severity = _severity(report.get("severity"), volume_name)
    return ScenePlan(
        geometry=scene,
        folder_name=folder_name(volume_name),
        segmentation_name=f"{volume_name} lungs and lesion boxes",
        heat_name=f"{volume_name} Grad-CAM",
        table_name=f"{volume_name} analysed slices",
        segments=_segments(boxes, colors, scene_index),
        rois=tuple(_roi(analysed, scene_index(index), box, color) for (index, box), color in zip(boxes, colors)),
        rows=rows,
        top_rows=tuple(row_of_index[i] for i in report["top_slices"][:TOP_SLICE_BUTTONS] if i in row_of_index),
        classes=tuple(report["model"]["classes"]),
        result=_result_text(report, severity),
        severity=severity,
    )


def heat_color_table() -> list[tuple[float, float, float, float]]:
    """RGBA entries of the heat map's colour table: Inferno, transparent below HEAT_THRESHOLD."""
    anchors = np.array(_INFERNO_ANCHORS)
    positions = np.linspace(0.0, 1.0, len(anchors))
    values = np.linspace(0.0, 1.0, COLOR_TABLE_SIZE)
    rgb = np.stack([np.interp(values, positions, anchors[:, c]) for c in range(3)], axis=1)
    alpha = (values >= HEAT_THRESHOLD).astype(float)
    return [(float(r), float(g), float(b), float(a)) for (r, g, b), a in zip(rgb, alpha)]


def _segments(boxes, colors, scene_index) -> tuple[SegmentPlan, ...]:
    lungs = [
        SegmentPlan(s["id"], s["name"], tuple(s["color"]), terminology_entry_to_string(s["terminology"]), False,
                    LUNG_FILL_OPACITY)
        for s in (RIGHT_LUNG_SEGMENT, LEFT_LUNG_SEGMENT)
    ]
    lesion_terminology = terminology_entry_to_string(LESION_TERMINOLOGY)
    lesions = [
        SegmentPlan(box_segment_id(index, box["rank"]), box_name(scene_index(index), box["rank"]), color,
                    lesion_terminology, True, 0.0)
        for (index, box), color in zip(boxes, colors)
    ]
    return tuple(lungs + lesions)


def _roi(geometry: VoxelGrid, slice_index: int, box: Mapping[str, Any], color) -> RoiPlan:
    """The ROI of a report.json box along the axes of `geometry`, the analysed grid (as its size_mm)."""
    center = tuple(float(v) for v in LPS_TO_RAS @ np.asarray(box["center_lps"], dtype=float))
    object_to_node = np.eye(4)
    object_to_node[:3, :3] = LPS_TO_RAS @ geometry.rotation_lps()
    object_to_node[:3, 3] = center
    return RoiPlan(
        name=box_name(slice_index, box["rank"]),
        description=box_description(box["score"]),
        slice_index=slice_index,
        rank=box["rank"],
        score=float(box["score"]),
        center_ras=center,
        size_mm=tuple(float(v) for v in box["size_mm"]),
        object_to_node=object_to_node,
        color=color,
    )


def _severity(severity: Mapping[str, Any] | None, volume_name: str) -> SeverityPlan | None:
    """The scene's part of report.json's `severity` block (None where there is none)."""
    if not severity:
        return None
    rows = list(severity["zones"])
    for lung, involvement in severity["lungs"].items():  # "right", "left", "both"
        score = sum(z["score"] for z in severity["zones"] if lung == "both" or z["lung"] == lung)
        rows.append({**involvement, "lung": lung, "zone": "all", "score": score})
    rows = [{key: round(row[key], VOLUME_DECIMALS) if isinstance(row[key], float) else row[key] for key, _ in SEVERITY_COLUMNS}
            for row in rows]
    both = severity["lungs"]["both"]
    summary = (
        f"Measured, not predicted: {both['involved_percent']:.1f} % of the lungs involved (ground-glass "
        f"{both['ground_glass_ml']:.0f} mL, consolidation {both['consolidation_ml']:.0f} mL); "
        f"{severity['score_name']}: {severity['score']}."
    )
    if severity["partial_coverage"]:
        summary += " The scan covers the lungs only in part: only the scanned part was measured."
    return SeverityPlan(
        segmentation_name=f"{volume_name} ground-glass and consolidation",
        table_name=f"{volume_name} lung involvement",
        segments=tuple(
            SegmentPlan(s["id"], s["name"], tuple(s["color"]), terminology_entry_to_string(s["terminology"]), False,
                        FINDING_FILL_OPACITY)
            for s in (GROUND_GLASS_SEGMENT, CONSOLIDATION_SEGMENT)
        ),
        rows=tuple(rows),
        summary=summary,
    )


def _result_text(report: Mapping[str, Any], severity: SeverityPlan | None) -> ResultText:
    patient = report["patient"]
    trained = bool(report["model"]["trained"])
    warnings = list(report.get("warnings", []))
    if not trained and UNTRAINED_WARNING not in warnings:
        warnings.insert(0, UNTRAINED_WARNING)
    return ResultText(
        trained=trained,
        label=patient["label"],
        probabilities=dict(patient["probabilities"]),
        aggregation=AGGREGATION_TEXT.get(patient["aggregation"], patient["aggregation"]).capitalize(),
        slice_count=len(report["slices"]),
        warnings=tuple(warnings),
        trust=trust_sentence(report["model"].get("performance")),  # reports of schema 1.0 lack the field
        severity=severity.summary if severity else "",
    )
