"""Follow-up against baseline: the change in measured involvement, on two phantoms of one 'patient' where the follow-up
has one more lesion of known size and place."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from CovidCTDiagnosisLib.checkpoint import save_checkpoint
from CovidCTDiagnosisLib.drenet import DRENet, DRENetConfig
from CovidCTDiagnosisLib.errors import UnreadableInputError
from CovidCTDiagnosisLib.followup import compare_involvement
from CovidCTDiagnosisLib.phantom import DEFAULT_LESIONS, LesionSpec, make_chest_phantom
from CovidCTDiagnosisLib.pipeline import Analyzer

NEW_LESION = LesionSpec((-75.0, -10.0, -40.0), 20.0, -500.0)  # ground glass inside the right lower lung


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    torch.manual_seed(0)
    model = save_checkpoint(tmp_path_factory.mktemp("followup") / "tiny.pt", DRENet(DRENetConfig(input_size=64)),
                            trained=False, metadata={"name": "tiny"})
    analyzer = Analyzer(str(model), "cpu")
    baseline = analyzer.analyze(make_chest_phantom().image, slices=3).to_report()
    grown = make_chest_phantom(lesions=(*DEFAULT_LESIONS, NEW_LESION))
    followup = analyzer.analyze(grown.image, slices=3).to_report()
    # the truth: the phantom's lung voxels the new lesion turned from aerated to ground-glass
    before, after = (sitk.GetArrayFromImage(p.image) for p in (make_chest_phantom(), grown))
    lung = sitk.GetArrayFromImage(grown.lung_labels) > 0
    new_ml = float(np.count_nonzero(lung & (after != before))) * float(np.prod(grown.image.GetSpacing())) / 1000.0
    return baseline, followup, new_ml


def test_a_new_lesion_shows_in_its_zone_and_nowhere_else(reports, tmp_path):
    baseline, followup, new_ml = reports
    change = compare_involvement(baseline, followup)
    rows = {(r.lung, r.zone): r for r in change.rows}
    assert list(rows) == [(lung, zone) for lung in ("right", "left") for zone in ("upper", "middle", "lower")] + [
        ("right", "all"), ("left", "all"), ("both", "all")]
    right = rows["right", "all"]
    assert right.ground_glass_change_ml == pytest.approx(new_ml, rel=0.1) and abs(right.consolidation_change_ml) < 1.0
    assert max(rows, key=lambda key: rows[key].change_points if key[1] != "all" else -1) == ("right", "lower")
    for zone in ("upper", "middle", "lower"):  # the left lung's voxels are the same at both times (its mask, nearly)
        assert rows["left", zone].change_points == pytest.approx(0.0, abs=0.25)
    total = change.total
    assert (total.baseline_score, total.followup_score) == (baseline["severity"]["score"], followup["severity"]["score"])
    assert total.followup_score > total.baseline_score
    assert total.change_points == pytest.approx(followup["severity"]["lungs"]["both"]["involved_percent"]
                                                - baseline["severity"]["lungs"]["both"]["involved_percent"])
    assert "right lower" in change.summary() and change.summary().startswith("involvement ")
    assert change.notes == []
    change.write_csv(tmp_path / "change.csv")
    with open(tmp_path / "change.csv", newline="") as f:
        written = list(csv.DictReader(f))
    assert len(written) == 9 and written[-1]["lung"] == "both" and int(written[-1]["followup_score"]) == total.followup_score


def test_what_makes_the_volumes_less_comparable_is_said(reports):
    baseline, followup, _ = reports
    spacing = followup["input"]["spacing"]  # the phantom's axial axis is k
    thick = {**followup, "input": {**followup["input"], "spacing": [*spacing[:2], 2 * spacing[2]]},
             "severity": {**followup["severity"], "partial_coverage": True}}
    notes = compare_involvement(baseline, thick).notes
    assert any("slice spacings differ" in n for n in notes) and any("follow-up CT covers the lungs only in part" in n for n in notes)
    with pytest.raises(UnreadableInputError, match="baseline analysis has no measured involvement"):
        compare_involvement({**baseline, "severity": None}, followup)


def test_follow_up_command(reports, tmp_path):
    """`covidct follow-up BASELINE FOLLOWUP --out CSV`: the summary on stdout, the table written; a result folder without
    measured involvement is one line on stderr with exit 3, and nothing written."""
    import json
    import subprocess
    import sys

    baseline, followup, _ = reports
    folders = []
    for name, report in (("baseline", baseline), ("followup", followup)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.json").write_text(json.dumps(report))
        folders.append(str(tmp_path / name))
    command = [sys.executable, "-m", "CovidCTDiagnosisLib.cli", "follow-up", *folders, "--out", str(tmp_path / "change.csv")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("involvement ") and "right lower" in done.stdout
    assert (tmp_path / "change.csv").read_text().count("\n") == 10
    (tmp_path / "change.csv").write_text("an older table\n")
    again = subprocess.run(command, capture_output=True, text=True, timeout=120)  # the same command again: replaced
    assert again.returncode == 0 and (tmp_path / "change.csv").read_text().count("\n") == 10, again.stderr
    (tmp_path / "baseline" / "report.json").write_text(json.dumps({**baseline, "severity": None}))
    failed = subprocess.run([*command[:-1], str(tmp_path / "other.csv")], capture_output=True, text=True, timeout=120)
    assert failed.returncode == 3 and len(failed.stderr.strip().splitlines()) == 1
    assert "baseline analysis has no measured involvement" in failed.stderr and not (tmp_path / "other.csv").exists()


def test_inputs_that_are_not_two_ct_analyses(reports, tmp_path):
    """The same CT twice is said; a folder that is not a result folder is an input error (exit 3), not an output one."""
    from CovidCTDiagnosisLib.followup import read_analysis

    baseline, _, _ = reports
    same = {**baseline, "input": {**baseline["input"], "path": "/data/P001.nrrd"}}
    assert any("same CT" in note for note in compare_involvement(same, same).notes)
    with pytest.raises(UnreadableInputError, match="is not a covidct result folder"):
        read_analysis(tmp_path)
