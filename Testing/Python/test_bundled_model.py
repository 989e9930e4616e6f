"""The shipped reference model, measured again on its own held-out test patients and on real CT (real data)."""

import csv

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from CovidCTDiagnosisLib.bundled_model import default_model_path
from CovidCTDiagnosisLib.checkpoint import read_checkpoint
from CovidCTDiagnosisLib.training.evaluate import evaluate, load_test_items


def test_bundled_model_scores_its_recorded_test_split_as_its_card_says(shared_data, tmp_path):
    model = default_model_path()
    assert model is not None, "the reference model file is missing"
    meta = read_checkpoint(model)["metadata"]
    items = load_test_items(model, ("COVID-19", "Non-COVID-19"), [shared_data / "slices" / "ucsd-covid-ct" / "labels.csv"])
    assert len({it.patient_id for it in items}) == len(meta["split"]["test"]) == 115
    result = evaluate(model, items, tmp_path)  # as the analysis runs: regions over the lungs
    patient_auc = result["patient_level"]["mean"]["positive"]["auc"]
    image_auc = result["image_level"]["positive"]["auc"]
    # the numbers stored in the file (and printed in MODEL_CARD.md) are this file's own
    assert patient_auc == pytest.approx(meta["test"]["patient_level_mean"]["auc"], abs=1e-6)
    assert image_auc == pytest.approx(meta["test"]["image_level"]["auc"], abs=1e-6)
    # below the 0.90 target (see the card): 0.808 / 0.807 measured (fine-tuned on the lung network's masks
    # of 2026-12-01; before the fine-tune 0.794 / 0.801 on them, 0.806 / 0.831 on the previous masks); the
    # model before it scored 0.793 / 0.785 (0.832 / 0.822 before the mediastinum was dropped in 2-D)
    assert patient_auc >= 0.78 and image_auc >= 0.78


# P001's slice labels, row i: the slice of InstanceNumber i + 1, SliceLocation -52.1 - 2 i mm (superior first;
# checked against the images, docs/training.md)
P001_FIRST_ROW_Z_MM, P001_ROW_STEP_MM = -52.1, -2.0


def test_bundled_model_separates_the_real_ct_volumes(shared_data):
    """The COVID-19 patient P001 above 0.5, the normal CT below it, and P001's radiologist-labelled infected
    slices above normal001's lung slices (measured: 0.73, 0.20 and slice AUC 0.91 at every lung slice)."""
    from CovidCTDiagnosisLib.pipeline import Analyzer

    folder = shared_data / "ct" / "covid-ct-md"
    analyzer = Analyzer(default_model_path(), device="cpu")
    covid = analyzer.analyze(folder / "P001-covid")
    normal = analyzer.analyze(folder / "normal001-normal")
    assert covid.patient.label == "COVID-19" and covid.patient.probabilities["COVID-19"] >= 0.6
    assert normal.patient.label == "Non-COVID-19" and normal.patient.probabilities["COVID-19"] <= 0.4
    with open(folder / "P001-covid-slice-labels.csv") as f:
        infected = {int(r["slice_index"]): r["infected"] == "1" for r in csv.DictReader(f)}
    covid_all = analyzer.analyze(folder / "P001-covid", slices="all")
    normal_all = analyzer.analyze(folder / "normal001-normal", slices="all")
    rows = [round((s.z_mm - P001_FIRST_ROW_Z_MM) / P001_ROW_STEP_MM) for s in covid_all.slices]
    lesion = [s.probabilities["COVID-19"] for s, r in zip(covid_all.slices, rows) if infected[r]]
    clean = [s.probabilities["COVID-19"] for s in normal_all.slices]
    auc = roc_auc_score(np.r_[np.ones(len(lesion)), np.zeros(len(clean))], lesion + clean)
    assert len(lesion) >= 60 and auc >= 0.80
