"""lungs.seg.nrrd, checked through slicerio (the reader Slicer's own Python tooling uses)."""

import nrrd
import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
from helpers_results import FLIPPED, IDENTITY, MIRRORED, make_box, make_result, oblique_direction

from CovidCTDiagnosisLib.result import SliceResult
from CovidCTDiagnosisLib.segmentation_file import write_lung_segmentation

DIRECTIONS = {"identity": IDENTITY, "flipped": FLIPPED, "mirrored": MIRRORED, "oblique": oblique_direction()}


def _expected_ijk_to_lps(image):
    matrix = np.eye(4)
    matrix[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())  # scales columns
    matrix[:3, 3] = image.GetOrigin()
    return matrix


@pytest.fixture(params=sorted(DIRECTIONS))
def written(request, tmp_path):
    result, _ = make_result(DIRECTIONS[request.param])
    path = tmp_path / "lungs.seg.nrrd"
    write_lung_segmentation(path, result.lung_labels, result.slices)
    return result, path


def test_header_geometry_is_the_image_geometry(written):
    result, path = written
    header = nrrd.read_header(str(path))
    expected = _expected_ijk_to_lps(result.lung_labels)
    assert header["space"] == "left-posterior-superior"
    assert header["kinds"] == ["list", "domain", "domain", "domain"]
    np.testing.assert_allclose(header["space origin"], expected[:3, 3])
    np.testing.assert_allclose(header["space directions"][1:], expected[:3, :3].T)  # row a: axis a
    np.testing.assert_allclose(slicerio.read_segmentation(str(path), skip_voxels=True)["ijkToLPS"], expected)


def test_segments_names_terminology_and_colours(written):
    result, path = written
    seg = slicerio.read_segmentation(str(path), skip_voxels=True)
    names = slicerio.segment_names(seg)
    assert names[:2] == ["Right lung", "Left lung"]
    assert names[2:] == [f"slice {s.index} box {b.rank}" for s in result.slices for b in s.boxes]
    assert [s["tags"]["Description"] for s in seg["segments"][2:]] == [
        f"navigator score {b.score:.4f}" for s in result.slices for b in s.boxes]
    right, left = seg["segments"][:2]
    assert right["terminology"]["category"] == ["SCT", "123037004", "Anatomical Structure"]
    assert right["terminology"]["type"] == ["SCT", "3341006", "Right lung"]
    assert left["terminology"]["type"] == ["SCT", "44029006", "Left lung"]
    assert right["color"] == [0.5, 0.68, 0.5] and left["color"] != right["color"]
    boxes = seg["segments"][2:]
    for box in boxes:
        assert box["terminology"]["category"] == ["SCT", "49755003", "Morphologically Altered Structure"]
        assert box["terminology"]["type"] == ["SCT", "52988006", "Lesion"]
        red, green, blue = box["color"]
        assert red >= 0.9 and blue <= 0.2  # warm
    by_score = sorted(boxes, key=lambda b: float(b["tags"]["Description"].split()[-1]))
    assert by_score[-1]["color"] == [0.9, 0.1, 0.1]  # the top box is the reddest
    assert by_score[0]["color"][1] > by_score[-1]["color"][1]


def test_voxels_lungs_and_boxes_at_their_indices(written):
    result, path = written
    seg = slicerio.read_segmentation(str(path))
    labels_ijk = sitk.GetArrayFromImage(result.lung_labels).transpose(2, 1, 0)
    np.testing.assert_array_equal(slicerio.segment_mask(seg, "right_lung"), labels_ijk == 1)
    np.testing.assert_array_equal(slicerio.segment_mask(seg, "left_lung"), labels_ijk == 2)
    for s in result.slices:
        for box in s.boxes:
            mask = slicerio.segment_mask(seg, f"lesion_slice{s.index}_box{box.rank}")
            expected = np.zeros_like(mask)
            (i0, j0, k0), (i1, j1, k1) = box.ijk_min, box.ijk_max
            expected[i0 : i1 + 1, j0 : j1 + 1, k0 : k1 + 1] = True
            np.testing.assert_array_equal(mask, expected)


def test_overlapping_boxes_get_separate_layers_others_share(written):
    _, path = written
    seg = slicerio.read_segmentation(str(path), skip_voxels=True)
    layers = {s["id"]: s["layer"] for s in seg["segments"]}
    assert layers["right_lung"] == layers["left_lung"] == 0
    assert layers["lesion_slice4_box1"] != layers["lesion_slice4_box2"]  # these overlap
    assert layers["lesion_slice6_box1"] != layers["lesion_slice6_box2"]
    assert max(layers.values()) == 2  # at most two boxes overlap anywhere


def test_box_is_found_at_its_lps_point(tmp_path):
    result, _ = make_result(oblique_direction(35.0))
    labels = result.lung_labels
    target_ijk = (30, 17, 5)
    target_lps = np.array(labels.TransformIndexToPhysicalPoint(target_ijk))
    box = make_box(labels, 1, 0.8, (29, 16, 5), (31, 18, 5))  # 3x3 voxels centred on the target
    path = tmp_path / "lungs.seg.nrrd"
    write_lung_segmentation(path, labels, [SliceResult(5, 0.0, 1.0, {}, [box])])

    seg = slicerio.read_segmentation(str(path))
    ijk = np.argwhere(slicerio.segment_mask(seg, "lesion_slice5_box1"))
    assert len(ijk) == 9
    centroid_lps = (seg["ijkToLPS"] @ np.append(ijk.mean(axis=0), 1.0))[:3]
    np.testing.assert_allclose(centroid_lps, target_lps, atol=1e-6)
    np.testing.assert_allclose(centroid_lps, box.center_lps, atol=1e-6)


def test_without_boxes_a_single_layer(tmp_path):
    result, _ = make_result()
    path = tmp_path / "lungs.seg.nrrd"
    write_lung_segmentation(path, result.lung_labels, [])
    seg = slicerio.read_segmentation(str(path))
    assert seg["voxels"].ndim == 3 and nrrd.read_header(str(path))["kinds"] == ["domain"] * 3
    assert slicerio.segment_names(seg) == ["Right lung", "Left lung"]
    assert slicerio.segment_mask(seg, "Left lung").sum() == (sitk.GetArrayViewFromImage(result.lung_labels) == 2).sum()
