"""The one preparation path: oriented CT facts, lung coverage, slice images without lungs, training skips."""

from __future__ import annotations

import csv
import gc
import json
import random
from pathlib import Path

import cv2
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from CovidCTDiagnosisLib import geometry
from CovidCTDiagnosisLib.checkpoint import save_checkpoint
from CovidCTDiagnosisLib.cli import main
from CovidCTDiagnosisLib.drenet import DRENet, DRENetConfig
from CovidCTDiagnosisLib.errors import NoLungsError
from CovidCTDiagnosisLib.lungs import Lungs
from CovidCTDiagnosisLib.phantom import make_chest_phantom
from CovidCTDiagnosisLib.preparation import (
    EDGE_LUNG_FRACTION,
    MIN_ANALYSABLE_LUNG_ML,
    MIN_LUNG_FRACTION_2D,
    check_coverage,
    prepare_ct,
    prepare_image,
    read_ct,
)
from CovidCTDiagnosisLib.result import UNTRAINED_NOTE
from CovidCTDiagnosisLib.training.datasets import prepare_set, read_labels
from CovidCTDiagnosisLib.volume_io import NO_DATA_HU, has_data

CLASSES = ("COVID-19", "Non-COVID-19")
SPACING = (1.0, 1.0, 10.0)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    torch.manual_seed(0)
    return str(save_checkpoint(tmp_path_factory.mktemp("m") / "tiny.pt", DRENet(DRENetConfig(input_size=64)), trained=False))


def lungs_with_areas(area_mm2) -> Lungs:
    """Lungs whose slice k holds area_mm2[k] (mm2, whole pixels on a 1 x 1 mm grid, 10 mm slices)."""
    area = np.asarray(area_mm2, dtype=int)
    labels = np.zeros((len(area), 100, 100), np.uint8)
    for k, a in enumerate(area):
        labels[k].flat[:a] = 1
    return Lungs(labels, SPACING, area.astype(float))


# ---- the oriented CT ----------------------------------------------------------------------------


def test_oriented_ct_midline_and_valid_voxels():
    flipped = make_chest_phantom(size=(64, 56, 12), spacing=(5.0, 5.0, 10.0), origin=(160.0, 140.0, -60.0),
                                 direction=(-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)).image
    array = sitk.GetArrayFromImage(flipped)
    array[:, :, :3] = NO_DATA_HU  # the input's first columns (patient's left) hold no data
    padded = sitk.GetImageFromArray(array)
    padded.CopyInformation(flipped)
    ct = read_ct(padded)
    midline = geometry.midline_column(ct.oriented)
    assert ct.oriented.TransformContinuousIndexToPhysicalPoint((midline, 27.5, 5.5))[0] == pytest.approx(0.0, abs=1e-6)
    assert ct.oriented.TransformContinuousIndexToPhysicalPoint((0, 27.5, 5.5))[0] < 0  # i = 0 at the patient's right
    valid = has_data(ct.hu)
    assert not valid[:, :, -3:].any() and valid[:, :, :-3].all()


def test_hu_of_a_temporary_ct_stays_valid():
    """`read_ct(x).hu` outlives its OrientedCT: the view keeps the image, whose memory would otherwise be reused."""
    image = make_chest_phantom(size=(64, 56, 12), spacing=(5.0, 5.0, 10.0)).image
    expected = sitk.GetArrayFromImage(read_ct(image).oriented)
    hu = read_ct(image).hu
    gc.collect()
    reuse = [np.full(expected.shape, 1234, expected.dtype) for _ in range(8)]  # would land in freed memory
    assert not hu.flags.writeable
    assert np.array_equal(hu, expected)
    del reuse


# ---- coverage ---------------------------------------------------------------------------------


def test_coverage_thresholds():
    full = np.r_[0, 450, np.full(8, 9000), 200, 0]  # lung area in mm2 per 10 mm slice: 0.73 L
    assert check_coverage(lungs_with_areas(full)) == []
    cut_top = lungs_with_areas(np.r_[0, 450, np.full(8, 9000)])
    (warning,) = check_coverage(cut_top)
    assert warning.startswith("partial lung coverage") and "superior end (100 %" in warning
    assert "only the scanned 0.7 L of lung over 90 mm" in warning
    edge = int(EDGE_LUNG_FRACTION * 9000)
    assert check_coverage(lungs_with_areas(np.r_[edge - 1, np.full(8, 9000), edge - 1])) == []
    (both,) = check_coverage(lungs_with_areas(np.r_[edge, np.full(8, 9000), edge]))
    assert "inferior end (25 %" in both and "superior end (25 %" in both
    small = lungs_with_areas(np.full(10, 4000))  # 0.40 L
    with pytest.raises(NoLungsError, match=f"too little lung to analyse: 0.40 L found, at least {MIN_ANALYSABLE_LUNG_ML / 1000:.1f} L"):
        check_coverage(small)


def test_a_cut_phantom_is_analysed_with_a_warning(tmp_path, tiny_model, capsys):
    phantom = make_chest_phantom().image
    upper = phantom[:, :, 24:]  # the phantom's lungs span most of its 48 slices: cut through them
    path = tmp_path / "upper.nrrd"
    sitk.WriteImage(upper, str(path))
    assert main(["analyze", str(path), "--out", str(tmp_path / "out"), "--model", tiny_model, "--progress", "none"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    partial = [w for w in report["warnings"] if w.startswith("partial lung coverage")]
    assert len(partial) == 1 and "inferior end" in partial[0]
    err = capsys.readouterr().err
    assert f"warning: {partial[0]}" in err.splitlines()
    assert partial[0] in (tmp_path / "out" / "report.html").read_text()


def test_training_uses_the_analysis_preparation(tmp_path):
    sitk.WriteImage(sitk.Cast(make_chest_phantom().image, sitk.sitkInt16), str(tmp_path / "case.nrrd"))
    prepared = prepare_ct(tmp_path / "case.nrrd", 64, -700.0, 1500.0)
    (tmp_path / "labels.csv").write_text("path,label,patient_id\ncase.nrrd,COVID,C1\n")
    data = prepare_set(read_labels(tmp_path / "labels.csv", CLASSES), CLASSES, 64)
    assert len(data) == len(prepared.chosen) > 1
    assert np.array_equal(data.images, np.round(prepared.inputs * 255).astype(np.uint8))


# ---- slice images without lungs --------------------------------------------------------------


NO_LUNG_IMAGES = ("black.png", "noise.png", "text.png", "drawing.png")


def no_lung_images(folder):
    """An all-black PNG, uniform noise, a page of black text on white, and a two-tone drawing of a chest (a grey
    body with two black lungs, in which the lung network alone outlines 14 % of the image), as files (NO_LUNG_IMAGES)."""
    rng = np.random.default_rng(0)
    text = np.full((512, 512), 255, np.uint8)
    for n, line in enumerate(["Figure 3. Axial CT", "of the chest shows", "bilateral ground-glass", "opacities (arrows)",
                              "in the lower lobes."]):
        cv2.putText(text, line, (10, 60 + 80 * n), cv2.FONT_HERSHEY_SIMPLEX, 1.4, 0, 4)
    drawing = np.zeros((512, 512), np.uint8)
    cv2.ellipse(drawing, (256, 256), (230, 170), 0, 0, 360, 200, -1)
    for centre, axes in (((170, 250), (70, 120)), ((342, 250), (65, 115))):
        cv2.ellipse(drawing, centre, axes, 0, 0, 360, 0, -1)
    images = {"black.png": np.zeros((512, 512), np.uint8), "noise.png": rng.integers(0, 256, (512, 512), dtype=np.uint8),
              "text.png": text, "drawing.png": drawing}
    for name, image in images.items():
        cv2.imwrite(str(folder / name), image)
    return [folder / name for name in NO_LUNG_IMAGES]


@pytest.mark.parametrize("name", NO_LUNG_IMAGES)
def test_score_images_refuses_images_without_lungs(tmp_path, tiny_model, capsys, name):
    image = dict(zip(NO_LUNG_IMAGES, no_lung_images(tmp_path)))[name]
    out = tmp_path / "scores.csv"
    code = main(["score-images", str(image), "--out", str(out), "--model", tiny_model, "--quiet"])
    err = capsys.readouterr().err
    assert code == NoLungsError.exit_code, f"{image.name} was scored"
    assert len(err.strip().splitlines()) == 1 and f"no lungs in {image}" in err
    assert not out.exists() and not list(tmp_path.glob(f".{out.name}.*"))


def test_score_images_scores_a_folder_in_which_some_images_have_no_lungs(tmp_path, tiny_model, capsys):
    """A folder of slices (a scan's, with blank or non-chest frames): those without lungs get a row with no
    probabilities and the reason; the rest are scored. Only when none has lungs is the command refused."""
    folder = tmp_path / "scan"
    folder.mkdir()
    hu = sitk.GetArrayFromImage(make_chest_phantom().image)[24]
    cv2.imwrite(str(folder / "chest.png"), np.clip((hu + 1450) / 1500 * 255, 0, 255).astype(np.uint8))
    no_lung_images(folder)
    out = tmp_path / "scores.csv"
    code = main(["score-images", str(folder), "--out", str(out), "--model", tiny_model])
    err = capsys.readouterr().err
    assert code == 0, err
    rows = {Path(r["path"]).name: r for r in csv.DictReader(out.open())}
    assert sorted(rows) == sorted(["chest.png", *NO_LUNG_IMAGES])
    chest = rows.pop("chest.png")
    assert float(chest["COVID-19"]) + float(chest["Non-COVID-19"]) == pytest.approx(1, abs=1e-3) and chest["note"] == UNTRAINED_NOTE
    for name, row in rows.items():
        assert row["COVID-19"] == row["Non-COVID-19"] == "" and row["note"].startswith(f"no lungs in {folder / name}:")
    assert f"warning: {len(NO_LUNG_IMAGES)} of {len(NO_LUNG_IMAGES) + 1} images have no lungs and were not scored" in err
    (folder / "chest.png").unlink()
    code = main(["score-images", str(folder), "--out", str(tmp_path / "none.csv"), "--model", tiny_model, "--quiet"])
    err = capsys.readouterr().err
    assert code == NoLungsError.exit_code and len(err.strip().splitlines()) == 1 and f"no lungs in any of the {len(NO_LUNG_IMAGES)} images" in err
    assert not (tmp_path / "none.csv").exists()


def test_training_skips_images_without_lungs(tmp_path):
    no_lungs = no_lung_images(tmp_path)[:2]  # black and noise
    slice_png = tmp_path / "chest.png"
    hu = sitk.GetArrayFromImage(make_chest_phantom().image)[24]
    cv2.imwrite(str(slice_png), np.clip((hu + 1450) * 255 / 1500, 0, 255).astype(np.uint8))  # lung window
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "patient_id"])
        writer.writerows([[p.name, "COVID", f"P{n}"] for n, p in enumerate([slice_png, *no_lungs])])
    data = prepare_set(read_labels(tmp_path / "labels.csv", CLASSES), CLASSES, 64)
    assert len(data) == 1 and data.paths == [str(slice_png)]
    assert len(data.skipped) == 2 and all("no lungs in" in s for s in data.skipped)


# ---- real data ----------------------------------------------------------------------------------


def test_real_slices_are_not_refused(shared_data):
    """Real axial slices (tight crops from papers, hospital slices) hold lungs on enough of the image."""
    random.seed(0)
    folders = {"ucsd-covid-ct": "*/*.png", "infnet-lung-infection": "*/Imgs/*.jpg", "mosmed-derived": "*/*.jpg"}
    refused = []
    for folder, pattern in folders.items():
        paths = sorted((shared_data / "slices" / folder).glob(pattern))
        for path in random.sample(paths, 10):
            try:
                prepare_image(path, 64)
            except NoLungsError as exc:
                refused.append(str(exc))
    assert not refused, f"{len(refused)} of 30 real slices refused (threshold {MIN_LUNG_FRACTION_2D}): {refused[:3]}"


def test_real_coverage(shared_data, tmp_path, tiny_model, capsys):
    """The abdominal CT's lung bases and a chest CT's lowest 6 cm are refused; its lower half is analysed."""
    abdomen = shared_data / "ct" / "totalsegmentator-example" / "example_ct_sm.nii.gz"
    code = main(["analyze", str(abdomen), "--out", str(tmp_path / "abdomen"), "--model", tiny_model, "--quiet"])
    err = capsys.readouterr().err
    assert code == NoLungsError.exit_code and "too little lung to analyse: 0.1" in err and not (tmp_path / "abdomen").exists()
    chest = geometry.orient_to_lps(read_ct(shared_data / "ct" / "covid-ct-md" / "P001-covid").loaded.image)
    with pytest.raises(NoLungsError, match="too little lung"):
        prepare_ct(chest[:, :, :30], 64, -700.0, 1500.0)  # the lungs' lowest 6 cm (0.34 L)
    lower_half = prepare_ct(chest[:, :, :75], 64, -700.0, 1500.0)
    assert lower_half.lungs.volume_ml() > 2 * MIN_ANALYSABLE_LUNG_ML
    assert len(lower_half.warnings) == 1 and "superior end" in lower_half.warnings[0]
    assert check_coverage(prepare_ct(chest, 64, -700.0, 1500.0).lungs) == []
