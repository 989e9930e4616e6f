"""The scene plan: what the Slicer module puts into the scene, checked against SimpleITK's geometry
and against the engine's own result files, for identity, flipped, mirrored and oblique grids."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
from slicerio.segmentation import terminology_entry_from_string

from CovidCTDiagnosisLib import markups_file, outputs, scene_plan
from CovidCTDiagnosisLib.performance import NO_FIGURES, trust_sentence, validated_performance
from CovidCTDiagnosisLib.result import RESEARCH_USE_ONLY, UNTRAINED_WARNING
from CovidCTDiagnosisLib.geometry import LPS_TO_RAS, VoxelGrid
from CovidCTDiagnosisLib.scene_plan import plan_scene
from helpers_results import (
    FLIPPED,
    IDENTITY,
    LAS,
    MIRRORED,
    SIZE,
    left_handed_oblique_direction,
    make_image,
    make_result,
    oblique_direction,
    slicer_right_handed,
)

GRIDS = {"identity": IDENTITY, "flipped": FLIPPED, "mirrored": MIRRORED, "oblique": oblique_direction()}
LPS_TO_RAS_4 = np.diag([-1.0, -1.0, 1.0, 1.0])


def _ras(point_lps) -> np.ndarray:
    return LPS_TO_RAS @ np.asarray(point_lps, dtype=float)


@pytest.fixture(params=sorted(GRIDS))
def result_and_ct(request):
    return make_result(direction=GRIDS[request.param])


def test_heat_matrix_maps_voxel_centres_like_simpleitk(result_and_ct):
    result, ct = result_and_ct
    matrix = plan_scene(result, "CT").geometry.ijk_to_ras()
    size = np.array(ct.GetSize())
    for ijk in [(0, 0, 0), tuple(size - 1), (3, 17, 5), (size[0] - 1, 0, size[2] // 2)]:
        expected = _ras(ct.TransformIndexToPhysicalPoint([int(v) for v in ijk]))
        np.testing.assert_allclose((matrix @ np.append(ijk, 1.0))[:3], expected, atol=1e-9)
    np.testing.assert_allclose(VoxelGrid.from_image(result.gradcam).ijk_to_ras(), matrix)


def test_box_at_known_lps_point_comes_out_at_its_ras_point_with_the_volume_axes(result_and_ct):
    result, ct = result_and_ct
    plan = plan_scene(result, "CT")
    boxes = [(s.index, b) for s in result.slices for b in s.boxes]
    assert len(plan.rois) == len(boxes)
    for roi, (index, box) in zip(plan.rois, boxes):
        assert (roi.slice_index, roi.rank, roi.score) == (index, box.rank, box.score)
        np.testing.assert_allclose(roi.center_ras, _ras(box.center_lps), atol=1e-9)
        np.testing.assert_allclose(roi.object_to_node[:3, 3], roi.center_ras)
        rotation = roi.object_to_node[:3, :3]
        np.testing.assert_allclose(rotation.T @ rotation, np.eye(3), atol=1e-9)
        assert np.linalg.det(rotation) == pytest.approx(1.0)
        # the ROI's corners are the outer voxel edges of the box's voxel range, in RAS
        lo, hi = np.array(box.ijk_min) - 0.5, np.array(box.ijk_max) + 0.5
        corners_ijk = [np.where([bit >> a & 1 for a in range(3)], hi, lo) for bit in range(8)]
        expected = sorted(tuple(np.round(_ras(ct.TransformContinuousIndexToPhysicalPoint(c.tolist())), 6)) for c in corners_ijk)
        half = np.array(roi.size_mm) / 2
        corners_obj = [np.where([bit >> a & 1 for a in range(3)], half, -half) for bit in range(8)]
        got = sorted(tuple(np.round((roi.object_to_node @ np.append(c, 1.0))[:3], 6)) for c in corners_obj)
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_geometry_from_slicer_matrix_round_trips(result_and_ct):
    result, _ = result_and_ct
    geometry = VoxelGrid.from_report(result.to_report())
    again = VoxelGrid.from_ijk_to_ras(geometry.ijk_to_ras(), geometry.size)
    assert again.matches(geometry)
    moved = geometry.ijk_to_ras()
    moved[0, 3] += 1.0
    assert not VoxelGrid.from_ijk_to_ras(moved, geometry.size).matches(geometry)
    assert not VoxelGrid.from_ijk_to_ras(geometry.ijk_to_ras(), (1, 2, 3)).matches(geometry)


def test_slice_rows_jump_to_the_centre_of_their_slice(result_and_ct):
    result, ct = result_and_ct
    plan = plan_scene(result, "CT")
    axis = plan.geometry.axial_axis()
    assert [r.index for r in plan.rows] == [s.index for s in result.slices]
    for row, s in zip(plan.rows, result.slices):
        centre = (np.array(ct.GetSize(), dtype=float) - 1) / 2
        centre[axis] = s.index
        np.testing.assert_allclose(row.center_ras, _ras(ct.TransformContinuousIndexToPhysicalPoint(centre.tolist())), atol=1e-9)
        assert row.position_mm == s.z_mm and row.box_count == len(s.boxes) and row.probabilities == s.probabilities


def test_plan_matches_the_engine_files(tmp_path):
    """Segment names, colours and terminology as in lungs.seg.nrrd; ROI centres as in lesions.mrk.json."""
    result, ct = make_result(direction=oblique_direction())
    folder = outputs.write_outputs(result, ct, tmp_path / "case")
    plan = plan_scene(outputs.read_report(folder), "CT")
    segmentation = slicerio.read_segmentation(str(folder / outputs.LUNGS_SEG_NRRD), skip_voxels=True)
    file_segments = {s["name"]: s for s in segmentation["segments"]}
    assert [s.name for s in plan.segments] == [s["name"] for s in segmentation["segments"]]
    for planned in plan.segments:
        on_file = file_segments[planned.name]
        np.testing.assert_allclose(planned.color, on_file["color"], atol=1e-3)
        assert terminology_entry_from_string(planned.terminology) == on_file["terminology"]
        assert planned.is_lesion == (planned.name not in ("Right lung", "Left lung"))
    assert [s.segment_id for s in plan.segments] == [s["id"] for s in segmentation["segments"]]
    markups = markups_file.read_lesion_markups(folder / outputs.LESIONS_MRK_JSON)
    assert len(markups) == len(plan.rois)
    # one name per region in both files and the scene; the score in its description
    assert [m.name for m in markups] == [s["name"] for s in segmentation["segments"][2:]] == [r.name for r in plan.rois]
    assert [s["tags"]["Description"] for s in segmentation["segments"][2:]] == [r.description for r in plan.rois]
    assert all(r.name == f"slice {r.slice_index} box {r.rank}" for r in plan.rois)
    for roi, markup in zip(plan.rois, markups):
        np.testing.assert_allclose(roi.center_ras, _ras(markup.center_lps), atol=1e-6)
        np.testing.assert_allclose(roi.size_mm, markup.size_mm, atol=1e-6)
        np.testing.assert_allclose(roi.object_to_node[:3, :3], LPS_TO_RAS @ np.reshape(markup.orientation, (3, 3)), atol=1e-9)


def test_names_table_and_top_slices():
    result, _ = make_result()
    plan = plan_scene(result, "P001")
    assert plan.folder_name == scene_plan.folder_name("P001") and "P001" in plan.folder_name
    assert len({plan.folder_name, plan.segmentation_name, plan.heat_name, plan.table_name}) == 4
    assert [plan.rows[i].index for i in plan.top_rows] == result.top_slices[: scene_plan.TOP_SLICE_BUTTONS]
    names = [name for name, _ in plan.table_columns()]
    assert names == ["Slice", "S (mm)", *(f"P({c})" for c in result.model.classes), "Boxes"]
    columns = dict(plan.table_columns())
    assert columns["Slice"].tolist() == [s.index for s in result.slices]
    assert columns["Boxes"].tolist() == [len(s.boxes) for s in result.slices]
    assert columns["P(COVID-19)"].tolist() == [round(s.probabilities["COVID-19"], 3) for s in result.slices]
    assert all(len(values) == len(result.slices) for values in columns.values())


def test_result_text_trained_and_untrained():
    trained = plan_scene(make_result(trained=True)[0], "CT").result
    assert trained.headline == trained.label and UNTRAINED_WARNING not in trained.warnings
    html = trained.html()
    assert trained.label in html and RESEARCH_USE_ONLY in html and "font-size" in html
    untrained_report = make_result(trained=False)[0].to_report()
    untrained_report["warnings"] = []  # the plan adds the warning even where a report lacks it
    untrained = plan_scene(untrained_report, "CT").result
    assert not untrained.trained and untrained.warnings[0] == UNTRAINED_WARNING
    assert "untrained" in untrained.headline and UNTRAINED_WARNING in untrained.html()
    assert "How far to trust" not in untrained.html()  # no label, so nothing to trust
    assert "&lt;script&gt;" in plan_scene({**untrained_report, "warnings": ["<script>"]}, "CT").result.html()


def test_result_panel_shows_validated_figures_under_the_label_and_warnings_above():
    """As report.html: the model's figures and the target between the label and the probabilities."""
    result = make_result()[0]
    test = {"patient_level_mean": {"auc": 0.794, "n": 115}, "image_level": {"auc": 0.779, "n": 216}, "ece_image_level": 0.077}
    figures = validated_performance({"data": ["/d/ucsd-covid-ct/labels.csv"], "test": test})
    result.model = replace(result.model, performance=figures)
    result.warnings = ["partial lung coverage: the scan ends inside the lungs",
                       "16 % of voxels are padding outside the scanner's field of view"]
    html = plan_scene(result, "CT").result.html()
    label, table = html.index(f"<b>{result.patient.label}</b>"), html.index("<table")
    under_label = html[label:table]
    assert trust_sentence(figures) in under_label
    assert "115 held-out patients (216 images) of ucsd-covid-ct" in under_label and "patient AUC 0.794" in under_label
    assert "BELOW the target of 0.90" in under_label and "(ECE) 0.077" in under_label
    assert all(warning in html[:label] for warning in result.warnings)


def test_result_panel_of_a_schema_1_0_report_says_the_model_has_no_figures():
    """Older reports have no model.performance and may name the removed Noisy-OR: they still load."""
    report = make_result()[0].to_report()
    del report["model"]["performance"]
    report.update(schema_version="1.0", patient={**report["patient"], "aggregation": "noisy-or"})
    text = plan_scene(report, "CT").result
    assert text.trust == trust_sentence(None) and NO_FIGURES in text.html()
    assert "Noisy-or, over 3 analysed slices" in text.html()


def test_scene_plan_imports_without_torch():
    """Load results runs without PyTorch: the scene plan and the figures it shows never import torch."""
    script = "import sys; sys.modules['torch'] = None; import CovidCTDiagnosisLib.scene_plan, CovidCTDiagnosisLib.performance"
    engine_parent = Path(scene_plan.__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-c", script], cwd=engine_parent, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_heat_color_table_is_inferno_and_transparent_below_threshold():
    entries = scene_plan.heat_color_table()
    assert len(entries) == scene_plan.COLOR_TABLE_SIZE
    values = np.linspace(0, 1, len(entries))
    alphas = np.array([e[3] for e in entries])
    assert np.all(alphas[values < scene_plan.HEAT_THRESHOLD] == 0) and np.all(alphas[values >= scene_plan.HEAT_THRESHOLD] == 1)
    from matplotlib import colormaps

    inferno = colormaps["inferno"]
    for value, entry in zip(values[::17], entries[::17]):
        np.testing.assert_allclose(entry[:3], inferno(value)[:3], atol=0.02)


def test_known_lps_box_on_a_flipped_grid_lands_at_its_ras_point():
    """A hand-written report: i runs to the patient's right, j anteriorly (as in files written from RAS)."""
    report = make_result(direction=FLIPPED)[0].to_report()
    box = report["slices"][0]["boxes"][0]
    box["center_lps"], box["size_mm"] = [12.5, -40.0, 100.0], [8.0, 6.0, 2.5]
    roi = plan_scene(report, "CT").rois[0]
    assert roi.center_ras == (-12.5, 40.0, 100.0)
    # the volume's i axis is RAS +R and j is +A: the ROI axes are the identity in RAS
    np.testing.assert_allclose(roi.object_to_node[:3, :3], np.eye(3), atol=1e-12)
    assert roi.size_mm == (8.0, 6.0, 2.5)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
@pytest.mark.parametrize("direction", [LAS, left_handed_oblique_direction()], ids=["LAS", "oblique left-handed"])
def test_left_handed_file_and_the_grid_slicer_reads_it_on_hold_the_same_voxels(tmp_path, suffix, direction):
    """SimpleITK (covidct) keeps a left-handed file's grid; Slicer reverses k. Every voxel is at the same
    place on both, so the grids match, and slice indices and arrays map between them."""
    path = tmp_path / f"ct{suffix}"
    array = np.arange(np.prod(SIZE), dtype=np.int16).reshape(SIZE[::-1])
    sitk.WriteImage(make_image(array, direction), str(path))
    on_file = sitk.ReadImage(str(path))
    file_grid = VoxelGrid.from_image(on_file)
    assert np.linalg.det(np.reshape(file_grid.direction, (3, 3))) < 0
    slicer_grid = VoxelGrid.from_ijk_to_ras(slicer_right_handed(file_grid.ijk_to_ras(), file_grid.size), file_grid.size)
    mapping = file_grid.voxel_map(slicer_grid)
    assert file_grid.matches(slicer_grid) and slicer_grid.matches(file_grid)
    assert (mapping.axes, mapping.signs) == ((0, 1, 2), (1, 1, -1))
    on_slicer = mapping.array(sitk.GetArrayViewFromImage(on_file))
    for ijk in [(0, 0, 0), (5, 7, 2), (SIZE[0] - 1, SIZE[1] - 1, SIZE[2] - 1)]:
        there = mapping.index(ijk)
        assert there[2] == mapping.slice_index(2, ijk[2]) == SIZE[2] - 1 - ijk[2]
        assert on_slicer[there[::-1]] == array[ijk[::-1]]
        np.testing.assert_allclose(slicer_grid.ijk_to_lps() @ np.append(there, 1.0),
                                   np.append(on_file.TransformIndexToPhysicalPoint(ijk), 1.0), atol=1e-6)
        assert mapping.inverse_index(there) == ijk


def test_grids_of_other_voxels_do_not_match():
    grid = VoxelGrid.from_report(make_result(direction=left_handed_oblique_direction())[0].to_report())
    m = grid.ijk_to_ras()
    size = grid.size
    spacing = min(grid.spacing)
    shifted = m.copy()
    shifted[:3, 3] += m[:3, 2] * 0.5  # half a slice along k
    nudged = m.copy()
    nudged[:3, 3] += [0.0, 0.0, 0.02 * spacing]  # more than SAME_PLACE_TOLERANCE of a voxel
    finer = m @ np.diag([1.0, 1.0, 0.5, 1.0])
    turned = m.copy()
    turned[:3, :3] = np.reshape(oblique_direction(21.0), (3, 3)) @ m[:3, :3]
    for other in (shifted, nudged, finer, turned, slicer_right_handed(shifted, size)):
        assert not grid.matches(VoxelGrid.from_ijk_to_ras(other, size))
    assert not grid.matches(VoxelGrid.from_ijk_to_ras(slicer_right_handed(m, size), (size[0], size[1], size[2] + 1)))
    within = m.copy()
    within[:3, 3] += [0.0, 0.0, 0.005 * spacing]
    assert grid.matches(VoxelGrid.from_ijk_to_ras(slicer_right_handed(within, size), size))


def test_permuted_axes_hold_the_same_voxels():
    """Any permutation/flip of the voxel axes that keeps every voxel in place is the same grid."""
    grid = VoxelGrid.from_report(make_result(direction=oblique_direction())[0].to_report())
    m, size = grid.ijk_to_lps(), grid.size
    # new i = old k reversed, new j = old i, new k = old j
    permuted = np.eye(4)
    permuted[:3, 0], permuted[:3, 1], permuted[:3, 2] = -m[:3, 2], m[:3, 0], m[:3, 1]
    permuted[:3, 3] = m[:3, 3] + m[:3, 2] * (size[2] - 1)
    other = VoxelGrid.from_ijk_to_ras(LPS_TO_RAS_4 @ permuted, (size[2], size[0], size[1]))
    mapping = grid.voxel_map(other)
    assert (mapping.axes, mapping.signs) == ((1, 2, 0), (1, 1, -1))
    values = np.arange(np.prod(size)).reshape(size[::-1])
    moved = mapping.array(values)
    assert moved.shape == tuple(reversed(other.size))
    for ijk in [(0, 0, 0), (3, 5, 7), (size[0] - 1, 0, 4)]:
        there = mapping.index(ijk)
        assert moved[there[::-1]] == values[ijk[::-1]]
        np.testing.assert_allclose(other.ijk_to_lps() @ np.append(there, 1.0), m @ np.append(ijk, 1.0), atol=1e-9)


def test_plan_on_the_slicer_grid_numbers_slices_and_boxes_there():
    result, _ = make_result(direction=LAS)
    on_file = plan_scene(result, "CT")
    grid = on_file.geometry
    slicer_grid = VoxelGrid.from_ijk_to_ras(slicer_right_handed(grid.ijk_to_ras(), grid.size), grid.size)
    plan = plan_scene(result, "CT", slicer_grid)
    nk = grid.size[2]
    assert plan.geometry == slicer_grid
    assert [r.index for r in plan.rows] == [nk - 1 - s.index for s in result.slices]
    assert [plan.rows[i].index for i in plan.top_rows] == [nk - 1 - k for k in result.top_slices]
    assert [r.name for r in plan.rois] == [f"slice {nk - 1 - s.index} box {b.rank}" for s in result.slices for b in s.boxes]
    assert [s.name for s in plan.segments[2:]] == [r.name for r in plan.rois]
    assert [s.segment_id for s in plan.segments] == [s.segment_id for s in on_file.segments]
    for ours, theirs in zip(plan.rois, on_file.rois):
        np.testing.assert_allclose(ours.object_to_node, theirs.object_to_node)
        assert ours.description == theirs.description == f"navigator score {ours.score:.4f}"
    for ours, theirs in zip(plan.rows, on_file.rows):
        assert ours.center_ras == theirs.center_ras
    with pytest.raises(ValueError, match="another grid"):
        plan_scene(result, "CT", VoxelGrid.from_ijk_to_ras(grid.ijk_to_ras() @ np.diag([1.0, 1.0, 2.0, 1.0]), grid.size))


def _severity_report(partial: bool = False) -> dict:
    """A report.json `severity` block as severity.Severity writes it: left lower zone 30 % involved (score 3), the rest 1 %."""
    from CovidCTDiagnosisLib.severity import Involvement, Severity, Zone

    def involvement(lung_ml, ggo_ml, cons_ml):
        return dict(lung_ml=lung_ml, ground_glass_ml=ggo_ml, consolidation_ml=cons_ml, ground_glass_percent=100 * ggo_ml / lung_ml,
                    consolidation_percent=100 * cons_ml / lung_ml, involved_percent=100 * (ggo_ml + cons_ml) / lung_ml)

    zones = [Zone(**involvement(400.0, 4.0, 0.0), lung=lung, zone=zone, z_range_mm=(0.0, 1.0), score=1)
             for lung in ("right", "left") for zone in ("upper", "middle", "lower")]
    zones[-1] = Zone(**involvement(400.0, 100.0, 20.0), lung="left", zone="lower", z_range_mm=(0.0, 1.0), score=3)
    lungs = {"right": Involvement(**involvement(1200.0, 12.0, 0.0)), "left": Involvement(**involvement(1200.0, 108.0, 20.0)),
             "both": Involvement(**involvement(2400.0, 120.0, 20.0))}
    return Severity(lungs=lungs, zones=zones, score=8, partial_coverage=partial).to_report()


def test_severity_plan_has_its_segments_a_table_of_zones_lungs_and_both_and_a_summary():
    """Measured involvement in the scene: severity.seg.nrrd's segments, a row per zone, per lung and for both, the score."""
    report = make_result()[0].to_report()
    assert plan_scene(report, "CT").severity is None and plan_scene(report, "CT").result.severity == ""
    plan = plan_scene({**report, "severity": _severity_report()}, "P001")
    severity = plan.severity
    assert [s.name for s in severity.segments] == ["Ground-glass", "Consolidation"]
    assert all(s.fill_opacity > 0 and not s.is_lesion for s in severity.segments)
    assert len({plan.segmentation_name, plan.table_name, severity.segmentation_name, severity.table_name}) == 4
    columns = dict(severity.table_columns())
    assert list(columns) == ["Lung", "Zone", "Volume (mL)", "Ground-glass (mL)", "Consolidation (mL)", "Involved (%)", "Score"]
    assert columns["Lung"].tolist() == ["right"] * 3 + ["left"] * 3 + ["right", "left", "both"]
    assert columns["Zone"].tolist() == ["upper", "middle", "lower"] * 2 + ["all"] * 3
    assert columns["Score"].tolist() == [1, 1, 1, 1, 1, 3, 3, 5, 8]  # a lung's score: its zones' sum; both: the 0-30 score
    assert columns["Involved (%)"].tolist() == [1.0] * 5 + [30.0, 1.0, 10.7, 5.8]
    assert columns["Consolidation (mL)"][-1] == 20.0
    assert severity.summary == ("Measured, not predicted: 5.8 % of the lungs involved (ground-glass 120 mL, consolidation 20 mL); "
                                "6-zone CT severity score (0-30): 8.")
    assert severity.summary in plan.result.html()
    partial = plan_scene({**report, "severity": _severity_report(partial=True)}, "P001").severity
    assert "only in part" in partial.summary
