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


# ---- lesions kept, field of view, slice images (issue: lung extraction that keeps the disease) ----

INFNET_MEAN_COVERAGE = 0.95  # mean share of the radiologists' infection inside the 2-D mask
INFNET_MIN_COVERAGE = 0.60  # every slice


def _p001(shared_data, every: int = 1):
    image = read_volume(shared_data / "ct" / "covid-ct-md" / "P001-covid").image
    return geometry.orient_to_lps(image[:, :, ::every])


@pytest.fixture(scope="module")
def p001_clean(shared_data):
    """Every 3rd slice of P001 (LPS-oriented image) and its lungs: the clean case that lesions are painted into."""
    oriented = _p001(shared_data, every=3)
    return oriented, extract_lungs(sitk.GetArrayViewFromImage(oriented), oriented.GetSpacing())


def test_infnet_infection_inside_2d_mask(shared_data):
    """On the 98 Inf-Net slices (tight crops, rotated), the radiologists' infection lies inside the mask."""
    import cv2

    folder = shared_data / "slices" / "infnet-lung-infection"
    coverage = []
    for path in sorted(folder.glob("*/Imgs/*")):
        infection = cv2.imread(str(path.parent.parent / "GT" / (path.stem + ".png")), cv2.IMREAD_GRAYSCALE) > 127
        mask = lung_mask_2d(read_image_2d(path))
        coverage.append(np.count_nonzero(mask & infection) / max(np.count_nonzero(infection), 1))
    assert len(coverage) == 98
    assert np.mean(coverage) >= INFNET_MEAN_COVERAGE, f"mean coverage {np.mean(coverage):.3f}"
    assert min(coverage) >= INFNET_MIN_COVERAGE, f"worst slice {min(coverage):.3f}"


# the target, 0.80 for both; measured 0.82 and 0.88 (every 3rd slice) with the lung network of
# 2026-12-01 (0.81 and 0.75 with the one before; 0.52 for the 40 % band before the body-wall rule,
# `lungs._drop_body_wall`, kept a band whose outline leaked through the chest wall)
@pytest.mark.parametrize("fraction, inside", [(0.2, 0.80), (0.4, 0.80)])
def test_dense_posterior_consolidation_stays_inside(p001_clean, fraction, inside):
    """The posterior 20 % / 40 % of each lung of P001 made dense (35 HU) stays inside the mask."""
    oriented, clean = p001_clean
    hu = sitk.GetArrayFromImage(oriented)  # a copy to paint into
    dense = np.zeros(hu.shape, bool)
    rows = np.arange(hu.shape[1])[:, None]
    for side in (RIGHT, LEFT):
        for k in range(hu.shape[0]):
            lung = clean.labels[k] == side
            if lung.any():
                j = np.flatnonzero(lung.any(1))
                dense[k] |= lung & (rows >= j[0] + (1 - fraction) * (j[-1] - j[0] + 1))
    hu[dense] = 35.0 + np.random.default_rng(0).normal(0, 10, np.count_nonzero(dense))
    lungs = extract_lungs(hu, oriented.GetSpacing())
    assert np.count_nonzero(lungs.mask & dense) / np.count_nonzero(dense) >= inside
    # and not the chest wall with it: what lies outside the clean lungs (measured 1.3 % and 5.7 % of them: the
    # lung network's outline of the band, a few millimetres into the chest wall and between spine and lung)
    assert np.count_nonzero(lungs.mask & ~clean.mask) <= 0.08 * np.count_nonzero(clean.mask)


def test_medial_ground_glass_stays_inside(p001_clean):
    """Ground glass (-450 HU) over the medial half of each lung of P001, aerated lung lateral to it: it stays inside
    the 3-D mask and the 2-D masks of lung-window renderings. (Clearing every non-air pixel medial to a row's
    aerated lung, as the mediastinum was dropped before, kept 3 % in 3-D and 32 % in 2-D, in rows.)"""
    from CovidCTDiagnosisLib.volume_io import hu_to_u8

    oriented, clean = p001_clean
    hu = sitk.GetArrayFromImage(oriented)  # a copy to paint into
    ggo = np.zeros(hu.shape, bool)
    cols = np.arange(hu.shape[2])[None, :]
    for k in range(hu.shape[0]):
        for side in (RIGHT, LEFT):
            lung = clean.labels[k] == side
            if np.count_nonzero(lung) >= 2000:
                i = np.flatnonzero(lung.any(0))
                ggo[k] |= lung & ((cols > (i[0] + i[-1]) / 2) if side == RIGHT else (cols < (i[0] + i[-1]) / 2))
    hu[ggo] = -450.0 + np.random.default_rng(0).normal(0, 40, np.count_nonzero(ggo))
    lungs = extract_lungs(hu, oriented.GetSpacing())
    assert np.count_nonzero(lungs.mask & ggo) / np.count_nonzero(ggo) >= 0.8
    inside_2d = [np.count_nonzero(lung_mask_2d(hu_to_u8(hu[k])) & ggo[k]) / np.count_nonzero(ggo[k])
                 for k in range(hu.shape[0]) if np.count_nonzero(ggo[k]) > 5000]
    assert len(inside_2d) >= 30 and np.mean(inside_2d) >= 0.85 and min(inside_2d) >= 0.5


@pytest.mark.parametrize("name", ["P001-covid", "normal001-normal"])
def test_clean_lung_volume_as_aerated(shared_data, name):
    """On these lungs the whole-lung mask adds little to the air-like lung (no heart, wall, airways)."""
    from CovidCTDiagnosisLib.lungs import extract_aerated_lungs

    image = geometry.orient_to_lps(read_volume(shared_data / "ct" / "covid-ct-md" / name).image[:, :, ::3])
    hu = sitk.GetArrayViewFromImage(image)
    lungs, aerated = extract_lungs(hu, image.GetSpacing()), extract_aerated_lungs(hu, image.GetSpacing())
    assert abs(lungs.volume_ml() / aerated.volume_ml() - 1) < 0.06


@pytest.mark.parametrize("name", ["P001-covid", "normal001-normal"])
def test_2d_mask_agrees_with_3d(shared_data, name):
    """Lung-window 8-bit renderings of the CT's slices: the 2-D mask agrees with the 3-D one (Dice >= 0.9;
    measured minimum 0.95 on normal001 and 0.98 on P001 over every slice of at least half the largest
    lung area, 0.89 before the 2-D mask dropped the mediastinum as the 3-D one does)."""
    from CovidCTDiagnosisLib.volume_io import hu_to_u8

    image = geometry.orient_to_lps(read_volume(shared_data / "ct" / "covid-ct-md" / name).image)
    hu = sitk.GetArrayViewFromImage(image)
    lungs = extract_lungs(hu, image.GetSpacing())
    chosen = np.flatnonzero(lungs.area_mm2 >= 0.5 * lungs.area_mm2.max())[::8]
    scores = [dice(lung_mask_2d(hu_to_u8(hu[k])), lungs.mask[k]) for k in chosen]
    assert min(scores) >= 0.9, scores


@pytest.mark.parametrize("padding", [-3024.0, -2000.0])
def test_padding_outside_a_field_of_view_that_cuts_the_chest(shared_data, padding):
    """Padding outside a reconstruction circle through the chest wall is no data, not air joined to the lungs."""
    oriented = _p001(shared_data, every=4)
    hu = sitk.GetArrayFromImage(oriented)
    full = extract_lungs(hu, oriented.GetSpacing())
    _, rows, cols = hu.shape
    jj, ii = np.mgrid[:rows, :cols]
    radius = 0.39 * cols  # cuts the lateral chest wall and the lungs of P001
    hu[:, (jj - rows / 2) ** 2 + (ii - cols / 2) ** 2 > radius**2] = padding
    lungs = extract_lungs(hu, oriented.GetSpacing(), geometry.midline_column(oriented))
    assert lungs.volume_ml() > 0.8 * full.volume_ml()
    assert lungs.volume_ml(RIGHT) > 0.35 * lungs.volume_ml() and lungs.volume_ml(LEFT) > 0.35 * lungs.volume_ml()
    assert any("field of view" in note for note in lungs.notes)


def test_field_of_view_of_one_side(shared_data):
    """A targeted reconstruction of the patient's right half: all of it is the right lung (by LPS x)."""
    oriented = _p001(shared_data, every=4)
    full = extract_lungs(sitk.GetArrayViewFromImage(oriented), oriented.GetSpacing(), geometry.midline_column(oriented))
    half = oriented[: oriented.GetSize()[0] // 2 + 20]  # columns i = 0 .. : the patient's right (LPS)
    lungs = extract_lungs(sitk.GetArrayViewFromImage(half), half.GetSpacing(), geometry.midline_column(half))
    assert lungs.volume_ml(LEFT) < 0.05 * lungs.volume_ml()
    assert abs(lungs.volume_ml(RIGHT) / full.volume_ml(RIGHT) - 1) < 0.1
    assert any("field of view" in note for note in lungs.notes)


@pytest.mark.parametrize("kind", ["black", "noise", "large-noise", "dark-noise", "text"])
def test_no_lungs_in_a_non_ct_image(kind):
    """Blank, noise and text images hold no lung (black ones matter: lungs are black in a mediastinal window)."""
    import cv2

    rng = np.random.default_rng(0)
    image = {"black": np.zeros((256, 256), np.uint8), "noise": rng.integers(0, 256, (256, 256)).astype(np.uint8),
             "large-noise": rng.integers(0, 256, (512, 512)).astype(np.uint8),
             "dark-noise": np.clip(rng.normal(10, 8, (512, 512)), 0, 255).astype(np.uint8)}.get(kind)
    if image is None:
        image = np.full((256, 384), 255, np.uint8)
        for row in range(20, 256, 24):
            cv2.putText(image, "Deep Learning Enables Accurate Diagnosis", (4, row), cv2.FONT_HERSHEY_SIMPLEX, 0.5, 0, 1)
    assert lung_mask_2d(image).mean() < 0.02
