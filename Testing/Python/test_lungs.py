"""Lung extraction: agreement with the phantom's drawn lungs, lesions kept inside, sides, real CT."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from CovidCTDiagnosisLib import geometry
from CovidCTDiagnosisLib.errors import NoLungsError
from CovidCTDiagnosisLib.lungs import LEFT, RIGHT, extract_lungs, lung_mask_2d
from CovidCTDiagnosisLib.phantom import make_chest_phantom
from CovidCTDiagnosisLib.volume_io import read_image_2d, read_volume

OBLIQUE = np.array([[1, 0, 0], [0, np.cos(0.35), -np.sin(0.35)], [0, np.sin(0.35), np.cos(0.35)]]) @ np.array(
    [[np.cos(0.35), 0, np.sin(0.35)], [0, 1, 0], [-np.sin(0.35), 0, np.cos(0.35)]]
)  # 20 degrees about two axes
DIRECTIONS = {
    "identity": np.eye(3),
    "flipped": np.diag([-1.0, -1.0, 1.0]),
    "flipped-k": np.diag([1.0, 1.0, -1.0]),
    "oblique": OBLIQUE,
}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def extract_oriented(phantom):
    oriented = geometry.orient_to_lps(phantom.image)
    truth = sitk.GetArrayFromImage(geometry.orient_to_lps(phantom.lung_labels))
    return oriented, truth, extract_lungs(sitk.GetArrayViewFromImage(oriented), oriented.GetSpacing())


@pytest.fixture(scope="module", params=sorted(DIRECTIONS))
def extracted(request):
    phantom = make_chest_phantom(size=(176, 144, 52), direction=tuple(DIRECTIONS[request.param].ravel()))
    return (phantom, *extract_oriented(phantom))


def test_each_lung_matches_the_drawn_one(extracted):
    _, _, truth, lungs = extracted
    for side in (RIGHT, LEFT):
        assert dice(lungs.labels == side, truth == side) > 0.9


def test_lesions_stay_inside_the_mask(extracted):
    """Ground glass and the juxta-pleural consolidation: at least 90% of each lesion is lung."""
    phantom, oriented, truth, lungs = extracted
    hu = sitk.GetArrayViewFromImage(oriented)
    for lesion in phantom.lesions:
        i, j, k = oriented.TransformPhysicalPointToIndex(lesion.center_lps)
        assert lungs.labels[k, j, i] == {"right": RIGHT, "left": LEFT}[lesion.lung]
        r = int(np.ceil(lesion.radius_mm / min(oriented.GetSpacing())))
        window = (slice(max(k - r, 0), k + r + 1), slice(j - r, j + r + 1), slice(i - r, i + r + 1))
        lesion_voxels = (truth[window] > 0) & (np.abs(hu[window] - lesion.hu) < 150)
        assert np.count_nonzero(lungs.mask[window][lesion_voxels]) >= 0.9 * np.count_nonzero(lesion_voxels)


def test_trachea_is_not_lung(phantom):
    oriented, _, lungs = extract_oriented(phantom)
    hu = sitk.GetArrayViewFromImage(oriented)
    top = hu.shape[0] - 2
    assert np.count_nonzero(hu[top] < -900) > 0  # the trachea is there ...
    assert not lungs.labels[top].any()  # ... and not lung


def test_area_and_volume(phantom):
    _, truth, lungs = extract_oriented(phantom)
    voxel_ml = np.prod(phantom.image.GetSpacing()) / 1000
    assert lungs.volume_ml() == pytest.approx(np.count_nonzero(lungs.labels) * voxel_ml)
    assert lungs.volume_ml(RIGHT) + lungs.volume_ml(LEFT) == pytest.approx(lungs.volume_ml())
    assert lungs.volume_ml(RIGHT) == pytest.approx(np.count_nonzero(truth == RIGHT) * voxel_ml, rel=0.05)
    assert lungs.area_mm2.shape == (truth.shape[0],)
    assert lungs.area_mm2[truth.shape[0] // 2] == pytest.approx(np.count_nonzero(lungs.labels[truth.shape[0] // 2]) * 4.0)
    assert lungs.mask.dtype == bool


def test_joined_lungs_are_split(phantom):
    """Lungs joined by an air-filled band across the mediastinum are one 3-D component; the cut
    still tells them apart."""
    oriented = geometry.orient_to_lps(phantom.image)
    hu = sitk.GetArrayFromImage(oriented)
    truth = sitk.GetArrayFromImage(geometry.orient_to_lps(phantom.lung_labels))
    with_lung = np.flatnonzero(truth.any(axis=(1, 2)))
    middle_k = with_lung[len(with_lung) // 2]
    rows = np.flatnonzero(truth[middle_k].any(axis=1))
    band_j = slice(rows.mean().astype(int) - 2, rows.mean().astype(int) + 3)
    columns = np.flatnonzero(truth[middle_k].any(axis=0))
    hu[middle_k - 2:middle_k + 3, band_j, columns.min():columns.max()] = -850.0
    lungs = extract_lungs(hu, oriented.GetSpacing())
    assert np.all(lungs.labels[middle_k, band_j, columns.min() + 1:columns.max() - 1] > 0)  # joined
    for side in (RIGHT, LEFT):
        assert dice(lungs.labels == side, truth == side) > 0.95


def test_no_lungs_raises():
    body = np.full((20, 64, 64), -1000.0, dtype=np.float32)
    body[:, 8:56, 8:56] = 40.0
    with pytest.raises(NoLungsError, match="no lungs found"):
        extract_lungs(body, (2.0, 2.0, 5.0))


def test_mask_2d_on_windowed_phantom_slice(phantom):
    oriented, truth, _ = extract_oriented(phantom)
    k = truth.shape[0] // 2
    hu = sitk.GetArrayViewFromImage(oriented)[k]
    gray = np.clip((hu + 1000) / 3, 0, 255).astype(np.uint8)  # the inverse of pseudo-HU
    mask = lung_mask_2d(gray)
    assert mask.dtype == bool and mask.shape == gray.shape
    assert dice(mask, truth[k] > 0) > 0.9
    assert not lung_mask_2d(np.full((64, 64), 200, dtype=np.uint8)).any()


@pytest.mark.parametrize("name", ["P001-covid", "normal001-normal"])
def test_real_ct_lungs(shared_data, name):
    loaded = read_volume(shared_data / "ct" / "covid-ct-md" / name)
    oriented = geometry.orient_to_lps(loaded.image)
    lungs = extract_lungs(sitk.GetArrayViewFromImage(oriented), oriented.GetSpacing())
    assert 2500 < lungs.volume_ml() < 9000
    assert lungs.volume_ml(RIGHT) > 800 and lungs.volume_ml(LEFT) > 800
    right_i = np.argwhere(lungs.labels[::4] == RIGHT)[:, 2].mean()
    left_i = np.argwhere(lungs.labels[::4] == LEFT)[:, 2].mean()
    assert right_i < left_i


def test_real_single_slice_mask(shared_data):
    gray = read_image_2d(shared_data / "ct" / "lidc-slice" / "lidc_slice.dcm")
    assert lung_mask_2d(gray).sum() > 0.05 * gray.size
