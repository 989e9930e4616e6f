"""The synthetic chest phantom: geometry, HU, anatomy where it should be, in any voxel grid."""

from __future__ import annotations

import time

import numpy as np
import pytest
import SimpleITK as sitk

from CovidCTDiagnosisLib import geometry
from CovidCTDiagnosisLib.phantom import (
    DEFAULT_LESIONS,
    DEMO_SIZE,
    DEMO_SPACING,
    HU_AIR,
    HU_BONE,
    HU_TABLE,
    LesionSpec,
    make_chest_phantom,
    make_demo_phantom,
)


def oriented_arrays(phantom):
    hu = sitk.GetArrayFromImage(geometry.orient_to_lps(phantom.image))
    labels = sitk.GetArrayFromImage(geometry.orient_to_lps(phantom.lung_labels))
    return hu, labels


def test_geometry_and_types(phantom):
    assert phantom.image.GetSize() == (160, 128, 48)
    assert phantom.image.GetSpacing() == (2.0, 2.0, 5.0)
    assert phantom.image.GetPixelID() == sitk.sitkFloat32
    assert phantom.lung_labels.GetPixelID() == sitk.sitkUInt8
    for attribute in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(phantom.lung_labels, attribute)() == getattr(phantom.image, attribute)()


def test_hounsfield_units(phantom):
    hu, labels = oriented_arrays(phantom)
    assert np.median(hu[:, :3, :]) == pytest.approx(HU_AIR, abs=30)  # air in front of the patient
    lung = hu[labels > 0]
    assert -900 < np.median(lung) < -800
    assert np.percentile(hu, 99.9) > HU_BONE - 100  # ribs and spine
    assert set(np.unique(labels)) == {0, 1, 2}


def test_lungs_fill_the_middle_slices_only(phantom):
    _, labels = oriented_arrays(phantom)
    with_lung = np.flatnonzero(labels.any(axis=(1, 2)))
    assert with_lung[0] > 0 and with_lung[-1] < labels.shape[0] - 1


def test_right_lung_is_on_the_patients_right(phantom):
    """Patient right is -L: low i in the LPS-oriented array."""
    _, labels = oriented_arrays(phantom)
    right_i = np.argwhere(labels == 1)[:, 2].mean()
    left_i = np.argwhere(labels == 2)[:, 2].mean()
    assert right_i < labels.shape[2] / 2 < left_i


def test_table_is_posterior_and_separated_by_air(phantom):
    hu, _ = oriented_arrays(phantom)
    column = hu[hu.shape[0] // 2, :, hu.shape[2] // 2]  # anterior -> posterior through the midline
    table_rows = np.flatnonzero(np.abs(column - HU_TABLE) < 50)
    assert len(table_rows) and table_rows.min() > hu.shape[1] // 2
    above_table = column[table_rows.min() - 3:table_rows.min()]
    assert np.all(above_table < -900)


def test_trachea_is_air_and_not_lung(phantom):
    hu, labels = oriented_arrays(phantom)
    top = hu.shape[0] - 2
    centre = hu[top, :, hu.shape[2] // 2 - 3:hu.shape[2] // 2 + 3]
    assert (centre < -900).sum() >= 10  # the trachea's cross-section
    assert not labels[top].any()


def test_lesions_are_in_their_lungs(phantom):
    hu = sitk.GetArrayFromImage(phantom.image)
    labels = sitk.GetArrayFromImage(phantom.lung_labels)
    assert len(phantom.lesions) == len(DEFAULT_LESIONS)
    for lesion, spec in zip(phantom.lesions, DEFAULT_LESIONS):
        i, j, k = lesion.center_ijk
        assert phantom.image.TransformIndexToPhysicalPoint((i, j, k)) == pytest.approx(lesion.center_lps, abs=5.1)
        assert labels[k, j, i] == {"right": 1, "left": 2}[lesion.lung]
        assert hu[k, j, i] == pytest.approx(spec.hu, abs=100)
    ground_glass = [l for l in phantom.lesions if -500 <= l.hu <= -300]
    assert len(ground_glass) >= 2 and any(l.hu > -100 for l in phantom.lesions)


def test_consolidation_touches_the_lung_wall(phantom):
    """Growing the dense lesion by one voxel reaches soft tissue outside the lung."""
    labels = sitk.GetArrayFromImage(phantom.lung_labels)
    hu = sitk.GetArrayFromImage(phantom.image)
    dense = max(phantom.lesions, key=lambda l: l.hu)
    i, j, k = dense.center_ijk
    near = np.zeros(labels.shape, dtype=bool)
    near[k, j - 12:j + 13, i - 12:i + 13] = True
    lesion_in_lung = near & (labels > 0) & (hu > -250)
    grown = sitk.BinaryDilate(sitk.GetImageFromArray(lesion_in_lung.astype(np.uint8)), [1, 1, 0])
    assert np.any(sitk.GetArrayFromImage(grown).astype(bool) & (labels == 0) & (hu > -250))


def test_custom_lesions():
    phantom = make_chest_phantom(lesions=[LesionSpec((70.0, -12.0, 0.0), 10.0, -400.0)])
    assert [l.lung for l in phantom.lesions] == ["left"]


@pytest.mark.parametrize("direction", [
    (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0),
    tuple(np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]).ravel()),
    tuple((np.array([[1, 0, 0], [0, np.cos(0.3), -np.sin(0.3)], [0, np.sin(0.3), np.cos(0.3)]])).ravel()),
])
def test_anatomy_is_defined_in_physical_space(direction):
    phantom = make_chest_phantom(size=(96, 80, 40), spacing=(3.0, 3.0, 6.0), direction=direction)
    _, labels = oriented_arrays(phantom)
    right_i = np.argwhere(labels == 1)[:, 2].mean()
    left_i = np.argwhere(labels == 2)[:, 2].mean()
    assert right_i < left_i
    lesion_labels = sitk.GetArrayViewFromImage(phantom.lung_labels)
    for lesion in phantom.lesions:
        i, j, k = lesion.center_ijk
        assert lesion_labels[k, j, i] == {"right": 1, "left": 2}[lesion.lung]


def test_fast_and_demo_size():
    start = time.perf_counter()
    make_chest_phantom()
    assert time.perf_counter() - start < 1.0
    demo = make_demo_phantom()
    assert demo.image.GetSize() == DEMO_SIZE and demo.image.GetSpacing() == DEMO_SPACING
