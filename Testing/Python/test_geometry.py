"""Reorientation to LPS and back, index mappings and coordinate conventions."""

from __future__ import annotations

import time

import numpy as np
import pytest
import SimpleITK as sitk

from CovidCTDiagnosisLib import geometry


def rotation(ax_deg: float, ay_deg: float) -> np.ndarray:
    ax, ay = np.radians(ax_deg), np.radians(ay_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    return rx @ ry


DIRECTIONS = {
    "identity": np.eye(3),
    "oblique": rotation(20, 20),
    "flipped": np.diag([-1.0, -1.0, 1.0]),
    "flipped-k": np.diag([1.0, -1.0, -1.0]),
    "sagittal": np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]),  # i->P, j->S, k->R
    "coronal-oblique": np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]]) @ rotation(0, 15),
}


def make_image(direction: np.ndarray, size=(7, 6, 5), spacing=(0.7, 1.3, 2.5), origin=(10.0, -20.0, 30.0)):
    values = np.random.default_rng(0).random(size[::-1]).astype(np.float32)
    image = sitk.GetImageFromArray(values)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(tuple(direction.ravel()))
    return image, values


@pytest.fixture(params=sorted(DIRECTIONS))
def pair(request):
    original, values = make_image(DIRECTIONS[request.param])
    return original, geometry.orient_to_lps(original), values


def test_round_trip_is_exact(pair):
    original, oriented, values = pair
    back = geometry.to_original_grid(sitk.GetArrayFromImage(oriented), oriented, original)
    assert np.array_equal(sitk.GetArrayFromImage(back), values)
    assert back.GetOrigin() == original.GetOrigin()
    assert back.GetSpacing() == original.GetSpacing()
    assert back.GetDirection() == original.GetDirection()


def test_round_trip_keeps_dtype_and_bool_becomes_uint8(pair):
    original, oriented, _ = pair
    labels = (sitk.GetArrayFromImage(oriented) * 3).astype(np.uint8)
    assert geometry.to_original_grid(labels, oriented, original).GetPixelID() == sitk.sitkUInt8
    mask = geometry.to_original_grid(labels > 0, oriented, original)
    assert mask.GetPixelID() == sitk.sitkUInt8
    back = geometry.to_original_grid(labels, oriented, original)
    assert np.array_equal(sitk.GetArrayFromImage(mask), sitk.GetArrayFromImage(back) > 0)


def test_slices_to_original_grid_equals_the_whole_volume_mapped(pair):
    """A few axial slices pasted into the original grid: the same voxels as the full oriented volume
    (zero elsewhere) mapped by to_original_grid, on every grid (flipped, permuted, oblique)."""
    original, oriented, _ = pair
    full = np.zeros(tuple(reversed(oriented.GetSize())), np.float32)
    planes = {k: np.random.default_rng(k).random(full.shape[1:]).astype(np.float32) for k in (0, 2, full.shape[0] - 1)}
    for k, plane in planes.items():
        full[k] = plane
    pasted = geometry.slices_to_original_grid(planes, oriented, original)
    assert np.array_equal(sitk.GetArrayFromImage(pasted), sitk.GetArrayFromImage(geometry.to_original_grid(full, oriented, original)))
    assert geometry.VoxelGrid.from_image(pasted).equals(geometry.VoxelGrid.from_image(original))


def test_an_lps_image_is_its_own_oriented_image():
    """No copy of the voxels when the axes already run L, P, S (the usual axial CT)."""
    image, _ = make_image(np.eye(3))
    assert geometry.orient_to_lps(image) is image


def test_oriented_axes_point_left_posterior_superior(pair):
    _, oriented, _ = pair
    direction = np.array(oriented.GetDirection()).reshape(3, 3)
    assert np.all(np.argmax(np.abs(direction), axis=0) == [0, 1, 2])
    assert np.all(np.diag(direction) > 0)
    assert geometry.axial_axis(oriented) == 2


def test_index_mappings_agree_with_physical_points(pair):
    original, oriented, _ = pair
    for ijk in [(0, 0, 0), (6, 5, 4), (3, 1, 2), (1, 4, 0)]:
        mapped = geometry.original_to_oriented_index(oriented, original, ijk)
        assert all(isinstance(v, int) for v in mapped)
        assert oriented.TransformIndexToPhysicalPoint(mapped) == pytest.approx(
            original.TransformIndexToPhysicalPoint(ijk), abs=1e-6
        )
        assert geometry.oriented_to_original_index(oriented, original, mapped) == ijk


def test_voxel_at_known_lps_point_comes_back_there(pair):
    original, oriented, _ = pair
    point = original.TransformIndexToPhysicalPoint((2, 3, 1))
    k, j, i = reversed(oriented.TransformPhysicalPointToIndex(point))
    marked = np.zeros(sitk.GetArrayViewFromImage(oriented).shape, dtype=np.uint8)
    marked[k, j, i] = 1
    back = sitk.GetArrayFromImage(geometry.to_original_grid(marked, oriented, original))
    (found,) = np.argwhere(back)
    assert original.TransformIndexToPhysicalPoint(tuple(int(v) for v in found[::-1])) == pytest.approx(point)


def test_axial_axis_of_stored_volumes():
    assert geometry.axial_axis(make_image(DIRECTIONS["identity"])[0]) == 2
    assert geometry.axial_axis(make_image(DIRECTIONS["oblique"])[0]) == 2
    assert geometry.axial_axis(make_image(DIRECTIONS["sagittal"])[0]) == 1


def test_oriented_array_is_radiological():
    """Array [k, j, i]: k grows to S, j to P, i to L (patient's left on the right of the display)."""
    original, _ = make_image(DIRECTIONS["sagittal"])
    oriented = geometry.orient_to_lps(original)
    corner = np.array(oriented.TransformIndexToPhysicalPoint((0, 0, 0)))
    steps = [np.array(oriented.TransformIndexToPhysicalPoint(idx)) - corner for idx in [(1, 0, 0), (0, 1, 0), (0, 0, 1)]]
    assert steps[0][0] > 0 and steps[1][1] > 0 and steps[2][2] > 0


def test_mismatched_grids_are_refused():
    original, _ = make_image(DIRECTIONS["identity"])
    other, _ = make_image(DIRECTIONS["identity"], size=(7, 6, 6))
    with pytest.raises(ValueError):
        geometry.to_original_grid(sitk.GetArrayFromImage(other), other, original)


def test_lps_ras_and_affine():
    assert geometry.lps_to_ras((1.0, 2.0, 3.0)) == (-1.0, -2.0, 3.0)
    assert geometry.ras_to_lps(geometry.lps_to_ras((4.0, -5.0, 6.0))) == (4.0, -5.0, 6.0)
    image, _ = make_image(DIRECTIONS["oblique"])
    affine = geometry.ijk_to_lps_matrix(image)
    ijk = (3, 2, 4)
    assert affine @ np.r_[ijk, 1.0] == pytest.approx(np.r_[image.TransformIndexToPhysicalPoint(ijk), 1.0])


def test_to_original_grid_is_fast():
    image = sitk.Image((512, 512, 150), sitk.sitkInt16)
    image.SetDirection((1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, -1.0))
    oriented = geometry.orient_to_lps(image)
    labels = np.zeros((150, 512, 512), dtype=np.uint8)
    start = time.perf_counter()
    geometry.to_original_grid(labels, oriented, image)
    assert time.perf_counter() - start < 0.5
