"""lesions.mrk.json: Slicer's markups schema, ROI geometry on oblique/flipped volumes, read-back."""

import itertools
import json
import re
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from helpers_results import FLIPPED, IDENTITY, MIRRORED, make_result, oblique_direction

from CovidCTDiagnosisLib.markups_file import read_lesion_markups, write_lesion_markups

SCHEMA = json.loads(Path("/work/shared/slicer-api/markups-schema-v1.0.3.json").read_text())
SLICER_ACCEPTED_SCHEMA = re.compile(r".*markups-schema-v1\.[0-9]+\.[0-9]+\.json#*$")  # vtkMRMLMarkupsJsonStorageNode
DIRECTIONS = {"identity": IDENTITY, "flipped": FLIPPED, "mirrored": MIRRORED, "oblique": oblique_direction()}


@pytest.fixture(params=sorted(DIRECTIONS))
def written(request, tmp_path):
    result, ct = make_result(DIRECTIONS[request.param])
    path = tmp_path / "lesions.mrk.json"
    write_lesion_markups(path, result.slices, ct)
    return result, ct, json.loads(path.read_text()), path


def _boxes(result):
    return [(s.index, b) for s in result.slices for b in s.boxes]


def test_validates_against_slicer_schema(written):
    _, _, document, _ = written
    jsonschema.validate(document, SCHEMA)
    assert SLICER_ACCEPTED_SCHEMA.match(document["@schema"].lower())


def test_one_locked_box_roi_per_box_centred_on_the_box(written):
    result, ct, document, _ = written
    boxes = _boxes(result)
    assert len(document["markups"]) == len(boxes) == 6
    for markup, (index, box) in zip(document["markups"], boxes):
        assert (markup["type"], markup["roiType"], markup["coordinateSystem"]) == ("ROI", "Box", "LPS")
        assert markup["locked"] is True
        assert markup["name"] == f"slice {index} box {box.rank}"
        assert f"{box.score:.4f}" in markup["controlPoints"][0]["description"]
        centre_ijk = (np.array(box.ijk_min) + np.array(box.ijk_max)) / 2
        expected = np.array(ct.GetOrigin()) + np.array(ct.GetDirection()).reshape(3, 3) @ (centre_ijk * ct.GetSpacing())
        np.testing.assert_allclose(markup["center"], expected, atol=1e-9)
        np.testing.assert_allclose(markup["controlPoints"][0]["position"], expected, atol=1e-9)
        np.testing.assert_allclose(markup["size"], box.size_mm)


def test_roi_corners_are_the_box_voxel_edges(written):
    """The ROI (center, orientation columns = its axes, size) spans exactly the box's voxels."""
    result, ct, document, _ = written
    for markup, (_, box) in zip(document["markups"], _boxes(result)):
        axes = np.array(markup["orientation"]).reshape(3, 3)  # schema: [o[0], o[3], o[6]] is the x axis
        assert np.linalg.det(axes) == pytest.approx(1.0)  # a proper rotation, whatever the grid's handedness
        half = np.array(markup["size"]) / 2
        corners = [np.array(markup["center"]) + axes @ (half * signs) for signs in itertools.product((-1, 1), repeat=3)]
        found = sorted(tuple(np.round(ct.TransformPhysicalPointToContinuousIndex(c.tolist()), 6)) for c in corners)
        lo, hi = np.array(box.ijk_min) - 0.5, np.array(box.ijk_max) + 0.5
        expected = sorted(tuple(np.where(s, hi, lo)) for s in itertools.product((False, True), repeat=3))
        np.testing.assert_allclose(found, expected, atol=1e-6)


def test_oblique_orientation_is_the_volume_axes(tmp_path):
    direction = oblique_direction(30.0)
    result, ct = make_result(direction)
    path = tmp_path / "lesions.mrk.json"
    write_lesion_markups(path, result.slices, ct)
    markup = json.loads(path.read_text())["markups"][0]
    np.testing.assert_allclose(markup["orientation"], direction, atol=1e-12)  # row-major, columns = i, j, k in LPS


def test_round_trip(written):
    result, _, document, path = written
    read = read_lesion_markups(path)
    assert [(m.slice_index, m.rank) for m in read] == [(i, b.rank) for i, b in _boxes(result)]
    for markup, m, (_, box) in zip(document["markups"], read, _boxes(result)):
        assert m.name == markup["name"]
        assert m.score == pytest.approx(box.score, abs=1e-4)
        np.testing.assert_allclose(m.center_lps, box.center_lps)
        np.testing.assert_allclose(m.size_mm, box.size_mm)
        assert m.orientation == tuple(markup["orientation"])


def test_no_boxes_is_a_valid_empty_file(tmp_path):
    _, ct = make_result()
    path = tmp_path / "lesions.mrk.json"
    write_lesion_markups(path, [], ct)
    jsonschema.validate(json.loads(path.read_text()), SCHEMA)
    assert read_lesion_markups(path) == []


def test_reading_another_markups_file_is_refused(tmp_path):
    path = tmp_path / "points.mrk.json"
    path.write_text(json.dumps({"@schema": "x", "markups": [{"type": "Fiducial", "name": "F"}]}))
    with pytest.raises(ValueError, match="not a lesion box"):
        read_lesion_markups(path)
