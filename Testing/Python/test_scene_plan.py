"""The scene plan: what the Slicer module puts into the scene, checked against SimpleITK's geometry
and against the engine's own result files, for identity, flipped, mirrored and oblique grids."""

from __future__ import annotations

import numpy as np
import pytest
import slicerio
from slicerio.segmentation import terminology_entry_from_string

from CovidCTDiagnosisLib import markups_file, outputs, scene_plan
from CovidCTDiagnosisLib.result import RESEARCH_USE_ONLY, UNTRAINED_WARNING
from CovidCTDiagnosisLib.scene_plan import LPS_TO_RAS, Geometry, plan_scene
from helpers_results import FLIPPED, IDENTITY, MIRRORED, make_result, oblique_direction

GRIDS = {"identity": IDENTITY, "flipped": FLIPPED, "mirrored": MIRRORED, "oblique": oblique_direction()}


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
    np.testing.assert_allclose(Geometry.from_image(result.gradcam).ijk_to_ras(), matrix)


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
    geometry = Geometry.from_report(result.to_report())
    again = Geometry.from_ijk_to_ras(geometry.ijk_to_ras(), geometry.size)
    assert again.matches(geometry)
    moved = geometry.ijk_to_ras()
    moved[0, 3] += 1.0
    assert not Geometry.from_ijk_to_ras(moved, geometry.size).matches(geometry)
    assert not Geometry.from_ijk_to_ras(geometry.ijk_to_ras(), (1, 2, 3)).matches(geometry)


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
    markups = markups_file.read_lesion_markups(folder / outputs.LESIONS_MRK_JSON)
    assert len(markups) == len(plan.rois)
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
    assert "&lt;script&gt;" in plan_scene({**untrained_report, "warnings": ["<script>"]}, "CT").result.html()


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
