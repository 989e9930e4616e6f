"""Severity: ground-glass and consolidation volumes, zones and the 6-zone score (severity.py), in every output."""

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from CovidCTDiagnosisLib import severity as sv
from CovidCTDiagnosisLib.batch import Case, CaseOutcome, write_summary
from CovidCTDiagnosisLib.html_report import render_html
from CovidCTDiagnosisLib.lungs import Lungs
from CovidCTDiagnosisLib.outputs import SEVERITY_SEG_NRRD, write_outputs
from CovidCTDiagnosisLib.preparation import find_lungs, read_ct

P001_LABELS = "ct/covid-ct-md/P001-covid-slice-labels.csv"
P001_FIRST_Z_MM, P001_STEP_MM = -52.1, 2.0  # label row i: the slice with InstanceNumber i + 1, at z = -52.1 - 2 i mm
PHANTOM_TOLERANCE = 0.05  # measured lesion volume within 5 % of the painted one


def _phantom_measure(phantom, remove_vessels=True):
    """The phantom's drawn lungs (identity direction: already LPS-oriented) measured; (severity, lungs)."""
    labels = sitk.GetArrayFromImage(phantom.lung_labels)
    spacing = phantom.image.GetSpacing()
    lungs = Lungs(labels, spacing, np.count_nonzero(labels, axis=(1, 2)) * spacing[0] * spacing[1])
    hu = sitk.GetArrayFromImage(phantom.image)
    z = np.array([phantom.image.TransformIndexToPhysicalPoint((0, 0, k))[2] for k in range(hu.shape[0])])
    return sv.measure_severity(hu, lungs, z, remove_vessels=remove_vessels), lungs


def _painted_ml(phantom, lungs, side):
    """Volume (mL) of the lesion spheres painted inside one lung of the phantom."""
    size = phantom.image.GetSize()
    k, j, i = np.meshgrid(*(np.arange(n) for n in size[::-1]), indexing="ij")
    origin, spacing = np.array(phantom.image.GetOrigin()), np.array(phantom.image.GetSpacing())
    x, y, z = (origin[a] + spacing[a] * idx for a, idx in enumerate((i, j, k)))
    painted = np.zeros(lungs.labels.shape, bool)
    for lesion in phantom.lesions:
        cx, cy, cz = lesion.center_lps
        painted |= (x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 < lesion.radius_mm**2
    label = {"right": 1, "left": 2}[side]
    return np.count_nonzero(painted & (lungs.labels == label)) * np.prod(spacing) / 1000


def test_zone_score_bands():
    assert [sv.zone_score(p) for p in (0, 0.1, 4.9, 5, 25, 25.1, 50, 51, 75, 76, 100)] == [0, 0, 1, 2, 2, 3, 3, 4, 4, 5, 5]


@pytest.mark.parametrize("side", ["right", "left"])
def test_phantom_lesion_volumes_within_a_few_percent(phantom, side):
    severity, lungs = _phantom_measure(phantom)
    measured = severity.lungs[side].ground_glass_ml + severity.lungs[side].consolidation_ml
    painted = _painted_ml(phantom, lungs, side)
    assert painted > 10
    assert abs(measured - painted) <= PHANTOM_TOLERANCE * painted, (measured, painted)


def test_phantom_bands_and_vessels(phantom):
    severity, _ = _phantom_measure(phantom)
    # the only consolidation is the left -50 HU lesion (r 15 mm, cut by the chest wall); ground-glass -350 to -450 HU
    assert severity.lungs["left"].consolidation_ml > 5 * severity.lungs["right"].consolidation_ml
    assert severity.lungs["right"].ground_glass_ml > 20
    raw, _ = _phantom_measure(phantom, remove_vessels=False)
    assert raw.lungs["both"].consolidation_ml > severity.lungs["both"].consolidation_ml + 5  # the vessel tree, left out
    assert len(severity.zones) == 6 and severity.score == sum(z.score for z in severity.zones)
    assert all(0 <= z.score <= 5 for z in severity.zones) and 1 <= severity.score <= 30


def test_partial_coverage_is_said(phantom):
    labels = sitk.GetArrayFromImage(phantom.lung_labels)
    lungs = Lungs(labels, phantom.image.GetSpacing(), np.count_nonzero(labels, axis=(1, 2)).astype(float))
    hu = sitk.GetArrayFromImage(phantom.image)
    severity = sv.measure_severity(hu, lungs, np.arange(hu.shape[0], dtype=float), partial_coverage=True)
    report = severity.to_report()
    assert report["partial_coverage"] is True and "partial lung coverage" in report["notes"][0]
    assert report["score_name"] == sv.SCORE_NAME == "6-zone CT severity score (0-30)"


def test_outputs_carry_severity(phantom, tmp_path):
    from helpers_results import make_result

    result, ct = make_result()
    severity, _ = _phantom_measure(phantom)
    labels = np.zeros(sitk.GetArrayViewFromImage(ct).shape, np.uint8)
    labels[1, 1:3, 1:4] = sv.GROUND_GLASS
    labels[2, 2, 2] = sv.CONSOLIDATION
    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(ct)
    result.severity, result.severity_labels = severity, image
    out = write_outputs(result, ct, tmp_path / "case")
    report = json.loads((out / "report.json").read_text())
    assert report["schema_version"] == "1.4" and report["severity"]["score"] == severity.score
    assert set(report["severity"]["lungs"]) == {"right", "left", "both"} and len(report["severity"]["zones"]) == 6
    seg = slicerio.read_segmentation(str(out / SEVERITY_SEG_NRRD))
    assert [s["name"] for s in seg["segments"]] == ["Ground-glass", "Consolidation"]
    assert np.array_equal(seg["voxels"].transpose(2, 1, 0), labels)
    lungs_seg = slicerio.read_segmentation(str(out / "lungs.seg.nrrd"))
    assert np.allclose(seg["ijkToLPS"], lungs_seg["ijkToLPS"])
    assert "6-zone CT severity score (0-30)" in (out / "report.html").read_text()
    write_summary([CaseOutcome(Case("c1", out), "done", report)], tmp_path / "summary.csv")
    row = next(csv.DictReader(open(tmp_path / "summary.csv")))
    assert row["severity_score"] == str(severity.score)
    assert float(row["involved_percent"]) == pytest.approx(severity.lungs["both"].involved_percent, abs=0.01)
    result.severity = None
    assert "Lung involvement" not in render_html(result, ct)


def _measure_real(shared_data, name):
    ct = read_ct(shared_data / "ct" / "covid-ct-md" / name)
    lungs, warnings = find_lungs(ct)
    o = ct.oriented
    z = np.array([o.TransformContinuousIndexToPhysicalPoint((0.0, 0.0, float(k)))[2] for k in range(o.GetSize()[2])])
    return sv.measure_severity(ct.hu, lungs, z), z


def test_p001_involvement_lies_on_the_labelled_slices(shared_data):
    severity, z = _measure_real(shared_data, "P001-covid")
    with open(shared_data / P001_LABELS, newline="") as f:
        infected = np.array([int(r["infected"]) for r in csv.DictReader(f)]) == 1
    rows = np.rint((P001_FIRST_Z_MM - z) / P001_STEP_MM).astype(int)
    assert rows.min() == 0 and rows.max() == len(infected) - 1
    on_infected = severity.slice_involved_ml[infected[rows]].sum() / severity.slice_involved_ml.sum()
    assert on_infected > 0.85  # measured 0.88; the labelled slices hold 75 % of the lung volume
    both = severity.lungs["both"]
    assert both.ground_glass_ml > 60 and both.consolidation_ml > 60  # measured 75 and 75 mL
    assert 2.0 < both.involved_percent < 4.0 and severity.score >= 6  # measured 2.4 %, score 6


def test_normal001_shows_little(shared_data):
    severity, _ = _measure_real(shared_data, "normal001-normal")
    both = severity.lungs["both"]
    assert both.ground_glass_ml < 12 and both.involved_percent < 2.5  # measured 6.8 mL and 2.0 %
