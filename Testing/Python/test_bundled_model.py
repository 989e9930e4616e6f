"""The shipped reference model, measured again on its own held-out test patients (real data)."""

import pytest

from CovidCTDiagnosisLib.bundled_model import default_model_path
from CovidCTDiagnosisLib.checkpoint import read_checkpoint
from CovidCTDiagnosisLib.training.datasets import prepare_set
from CovidCTDiagnosisLib.training.evaluate import evaluate, load_test_items


def test_bundled_model_scores_its_recorded_test_split_as_its_card_says(shared_data, tmp_path):
    model = default_model_path()
    assert model is not None, "the reference model file is missing"
    meta = read_checkpoint(model)["metadata"]
    items = load_test_items(model, ("COVID-19", "Non-COVID-19"), [shared_data / "slices" / "ucsd-covid-ct" / "labels.csv"])
    assert len({it.patient_id for it in items}) == len(meta["split"]["test"]) == 115
    prepared = prepare_set(items, ("COVID-19", "Non-COVID-19"), read_checkpoint(model)["config"]["input_size"])
    # the numbers stored in the file (and printed in MODEL_CARD.md) are this file's own, measured
    # before regions were restricted to the anchors over the lungs
    before = evaluate(model, prepared, tmp_path / "all-anchors", regions_over_lungs=False)
    assert before["patient_level"]["mean"]["positive"]["auc"] == pytest.approx(meta["test"]["patient_level_mean"]["auc"], abs=1e-6)
    assert before["image_level"]["positive"]["auc"] == pytest.approx(meta["test"]["image_level"]["auc"], abs=1e-6)
    # as the analysis runs now (regions over the lungs): 0.732 / 0.723, within 0.01 of the card
    result = evaluate(model, prepared, tmp_path / "over-lungs")
    patient_auc = result["patient_level"]["mean"]["positive"]["auc"]
    image_auc = result["image_level"]["positive"]["auc"]
    assert patient_auc == pytest.approx(meta["test"]["patient_level_mean"]["auc"], abs=0.01)
    assert image_auc == pytest.approx(meta["test"]["image_level"]["auc"], abs=0.01)
    # far from chance; below the 0.90 target (see the card). Trained on the old threshold masks, it
    # scores 0.73 / 0.72 with the lung network's masks (0.79 / 0.78 with the old ones)
    assert patient_auc >= 0.70 and image_auc >= 0.70
