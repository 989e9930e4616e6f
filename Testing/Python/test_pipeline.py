"""End to end on the phantom with a hand-set network, so that where it looks is known.

The test network's backbone is the mean brightness of each 32-pixel cell, its navigator ranks
anchors by that brightness, and its head scores the positive class by the global brightness.
Inside a lung-windowed, lung-masked slice the brightest cells are the drawn lesions, so the top
box and the Grad-CAM peak must land on them: this checks every coordinate mapping (crop,
resize, reorientation, IJK, LPS) on oblique and flipped volumes, not the learned weights.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from torch import nn

from CovidCTDiagnosisLib import geometry
from CovidCTDiagnosisLib.drenet import DRENet, DRENetConfig
from CovidCTDiagnosisLib.errors import AnalysisCancelled, NoLungsError, NotACTError
from CovidCTDiagnosisLib.phantom import make_chest_phantom
from CovidCTDiagnosisLib.pipeline import Analyzer
from CovidCTDiagnosisLib.preparation import find_ct_lungs
from CovidCTDiagnosisLib.result import ModelInfo

INPUT = 256
CHANNELS = 4
CELL = 32


class BrightnessBackbone(nn.Module):
    """Feature map = mean (normalised) brightness of each 32x32 cell, in every channel."""

    out_channels = CHANNELS

    def forward(self, x):
        return F.avg_pool2d(x[:, :1], CELL).repeat(1, CHANNELS, 1, 1)


def hand_set_network() -> DRENet:
    net = DRENet(DRENetConfig(input_size=INPUT, dropout=0.0), backbone=BrightnessBackbone())
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        nav = net.navigator
        nav.down1.weight[:, 0, 1, 1] = 1.0  # centre tap: brightness of the cell
        nav.down1.bias.fill_(3.0)  # normalised brightness is >= -2.2: keep it positive through ReLU
        nav.down2.weight[:, :, 1, 1] = 1.0 / nav.down2.in_channels
        nav.tidy1.weight.fill_(1.0 / nav.tidy1.in_channels)
        nav.tidy2.weight.fill_(0.5 / nav.tidy2.in_channels)  # prefer the small, precise anchors
        head = net.concat_head
        head[0].weight[0, 0] = 1.0  # hidden 0 = global brightness (+3)
        head[0].bias[0] = 3.0
        head[3].weight[0, 0] = 1.0  # positive class ("COVID-19", index 0) rises with brightness
    return net.eval()


def analyzer() -> Analyzer:
    info = ModelInfo("hand-set", None, None, ["COVID-19", "Non-COVID-19"], "brightness", INPUT, trained=False)
    return Analyzer.from_network(hand_set_network(), info, "cpu")


def rotation(ax: float, ay: float) -> np.ndarray:
    cx, sx, cy, sy = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    return rx @ ry


GEOMETRIES = {
    "identity": np.eye(3),
    "flipped": np.diag([-1.0, 1.0, -1.0]),
    "oblique": rotation(np.radians(12), np.radians(-8)),
}


@pytest.fixture(scope="module")
def hand_analyzer():
    return analyzer()


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_boxes_and_heat_land_on_drawn_lesions(name, hand_analyzer):
    direction = GEOMETRIES[name]
    phantom = make_chest_phantom(size=(160, 128, 48), spacing=(2.0, 2.0, 5.0), origin=(-160, -128, -120),
                                 direction=tuple(direction.ravel()))
    result = hand_analyzer.analyze(phantom.image, slices="all")
    assert result.gradcam.GetDirection() == pytest.approx(phantom.image.GetDirection())
    assert result.gradcam.GetOrigin() == pytest.approx(phantom.image.GetOrigin())
    centres = np.array([l.center_lps for l in phantom.lesions])
    radii = np.array([l.radius_mm for l in phantom.lesions])
    normal = direction[:, geometry.axial_axis(phantom.image)]  # the analysed slices' plane normal (LPS)
    hits = checked = 0
    for s in result.slices:
        top = s.boxes[0]
        # slices cutting a lesion near its middle: the brightest cell must be the lesion's
        dz = np.abs((centres - np.array(top.center_lps)) @ normal)
        near = dz < radii / 2
        if not near.any():
            continue
        checked += 1
        dist = np.linalg.norm(centres[near] - np.array(top.center_lps), axis=1).min()
        hits += dist < radii[near].max() + 25.0  # within the lesion or the 32-px cell holding it
        # the LPS centre agrees with the voxel box under the volume's own geometry
        mid = (np.array(top.ijk_min) + np.array(top.ijk_max)) / 2
        assert phantom.image.TransformContinuousIndexToPhysicalPoint(mid.tolist()) == pytest.approx(top.center_lps, abs=1e-3)
    assert checked >= 2, "the phantom's lesions must be cut by analysed slices"
    assert hits / checked >= 0.75, f"top boxes missed the lesions on {checked - hits} of {checked} slices"

    heat = sitk.GetArrayFromImage(result.gradcam)
    peak = np.unravel_index(np.argmax(heat), heat.shape)[::-1]  # (i, j, k)
    peak_lps = np.array(phantom.image.TransformIndexToPhysicalPoint([int(v) for v in peak]))
    assert np.linalg.norm(centres - peak_lps, axis=1).min() < radii.max() + 25.0


def test_result_contents(hand_analyzer):
    phantom = make_chest_phantom()
    progress = []
    result = hand_analyzer.analyze(phantom.image, progress=lambda stage, f: progress.append((stage, f)))
    assert 1 <= len(result.slices) <= 15
    assert [s.index for s in result.slices] == sorted(s.index for s in result.slices)
    assert all(s.lung_fraction >= 0.5 for s in result.slices)
    assert set(result.patient.probabilities) == {"COVID-19", "Non-COVID-19"}
    assert len(result.top_slices) == min(3, len(result.slices))
    assert progress[-1][1] == 1.0 and [f for _, f in progress] == sorted(f for _, f in progress)
    assert {"read", "lungs", "network"} <= set(result.timings)
    assert "UNTRAINED" in result.warnings[0]
    labels = sitk.GetArrayFromImage(result.lung_labels)
    truth = sitk.GetArrayFromImage(phantom.lung_labels)
    for side in (1, 2):
        dice = 2 * np.sum((labels == side) & (truth == side)) / (np.sum(labels == side) + np.sum(truth == side))
        assert dice > 0.85
    report = result.to_report()
    assert report["slices"][0]["boxes"][0]["rank"] == 1
    heat = sitk.GetArrayFromImage(result.gradcam)
    analysed = {s.index for s in result.slices}
    for k in range(heat.shape[0]):
        if k not in analysed:
            assert not heat[k].any(), "heat only on analysed slices"


def test_an_analysis_goes_on_from_the_lungs_found_before_the_model(hand_analyzer):
    """`find_ct_lungs` then `analyze` (the command line loads the model meanwhile): the same result,
    the read and lungs stages timed once each, in order, and progress from both parts in order."""
    image = make_chest_phantom().image
    progress = []
    found = find_ct_lungs(image, progress=lambda stage, f: progress.append((stage, f)))
    assert list(found.timings) == ["read", "lungs"] and [s for s, _ in progress] == ["read", "lungs"]
    result = hand_analyzer.analyze(found, progress=lambda stage, f: progress.append((stage, f)))
    direct = hand_analyzer.analyze(image)
    assert list(result.timings) == list(direct.timings) and result.timings["lungs"] == found.timings["lungs"]
    assert [f for _, f in progress] == sorted(f for _, f in progress) and progress[-1][1] == 1.0
    assert result.to_report()["slices"] == direct.to_report()["slices"]
    assert result.patient == direct.patient and result.warnings == direct.warnings
    assert np.array_equal(sitk.GetArrayViewFromImage(result.lung_labels), sitk.GetArrayViewFromImage(direct.lung_labels))


def test_more_slices_and_no_noisy_or(hand_analyzer):
    phantom = make_chest_phantom()
    all_slices = hand_analyzer.analyze(phantom.image, slices="all")
    assert len(all_slices.slices) >= 15 and all_slices.patient.aggregation == "mean"
    with pytest.raises(ValueError, match="noisy-or|Noisy-OR"):
        hand_analyzer.analyze(phantom.image, aggregate="noisy-or")


def test_cancel_stops_before_any_work(hand_analyzer):
    with pytest.raises(AnalysisCancelled):
        hand_analyzer.analyze(make_chest_phantom().image, cancel=lambda: True)


def test_no_lungs_and_not_ct(hand_analyzer):
    body = sitk.Image([64, 64, 20], sitk.sitkFloat32)
    arr = np.full((20, 64, 64), -1000, np.float32)
    arr[:, 8:56, 8:56] = 40  # a water cylinder: CT-like, but no lungs
    water = sitk.GetImageFromArray(arr)
    with pytest.raises(NoLungsError):
        hand_analyzer.analyze(water)
    with pytest.raises(NotACTError):
        hand_analyzer.analyze(body)  # constant volume
