"""`covidct analyze` end to end on the real chest CTs in ../shared/data (skipped without them)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import slicerio
import SimpleITK as sitk
import torch

from CovidCTDiagnosisLib.checkpoint import save_checkpoint
from CovidCTDiagnosisLib.cli import main
from CovidCTDiagnosisLib.drenet import DRENet, DRENetConfig

CASES = ["P001-covid", "normal001-normal"]
ADULT_LUNG_ML = (2500, 9000)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    torch.manual_seed(0)
    return str(save_checkpoint(tmp_path_factory.mktemp("m") / "small.pt", DRENet(DRENetConfig(input_size=128)), trained=False))


@pytest.mark.parametrize("case", CASES)
def test_analyze_real_ct(case, shared_data, small_model, tmp_path, capsys):
    source = shared_data / "ct" / "covid-ct-md" / case
    out = tmp_path / case
    assert main(["analyze", str(source), "--out", str(out), "--model", small_model, "--quiet"]) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    size = report["input"]["size"]
    assert report["input"]["format"] == "dicom" and size[:2] == [512, 512]
    assert 5 <= len(report["slices"]) <= 15
    for s in report["slices"]:
        assert s["lung_fraction"] >= 0.5
        for box in s["boxes"]:
            assert all(0 <= lo <= hi < n for lo, hi, n in zip(box["ijk_min"], box["ijk_max"], size))
            assert box["ijk_min"][2] == box["ijk_max"][2] == s["index"]
    seg = slicerio.read_segmentation(str(out / "lungs.seg.nrrd"))
    spacing = np.linalg.norm(seg["ijkToLPS"][:3, :3], axis=0)
    voxel_ml = float(np.prod(spacing)) / 1000
    volumes = {}
    for name in ("Right lung", "Left lung"):
        segment = slicerio.segment_from_name(seg, name)
        volumes[name] = float(np.sum(slicerio.extract_segments(seg, [(name, 1)])["voxels"] == 1)) * voxel_ml
        assert segment["terminology"]
    assert ADULT_LUNG_ML[0] <= sum(volumes.values()) <= ADULT_LUNG_ML[1], volumes
    assert min(volumes.values()) > 0.3 * max(volumes.values()), f"left and right separated: {volumes}"
    heat = sitk.ReadImage(str(out / "gradcam.nrrd"))
    assert heat.GetSize() == tuple(size) and heat.GetOrigin() == pytest.approx(report["input"]["origin"])
