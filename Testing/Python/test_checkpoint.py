"""Model files: round trip, clear errors for missing, corrupt, foreign or mismatched files."""

import pytest
import torch

from CovidCTDiagnosisLib.performance import performance_line
from CovidCTDiagnosisLib.checkpoint import load_model, read_checkpoint, resolve_model, save_checkpoint, untrained_model
from CovidCTDiagnosisLib.drenet import DRENet, DRENetConfig
from CovidCTDiagnosisLib.errors import ModelFileError


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(1)
    cfg = DRENetConfig(classes=("COVID-19", "Bacterial pneumonia", "Healthy"), input_size=64)
    return DRENet(cfg).eval()


def test_round_trip_keeps_config_and_weights(tmp_path, small_model):
    path = save_checkpoint(tmp_path / "m.pt", small_model, trained=True, metadata={"name": "tiny"})
    model, info = load_model(path)
    assert model.config == small_model.config
    assert info.classes == ["COVID-19", "Bacterial pneumonia", "Healthy"] and info.trained and info.name == "tiny"
    assert len(info.sha256) == 64
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x).logits, small_model(x).logits, atol=1e-5)


def test_validated_figures_come_from_the_file_and_are_not_an_ensembles(tmp_path, small_model):
    from CovidCTDiagnosisLib.pipeline import Analyzer

    bare = save_checkpoint(tmp_path / "bare.pt", small_model, trained=True)
    assert load_model(bare)[1].performance is None
    test = {"patient_level_mean": {"auc": 0.91, "n": 40, "recall": 0.8, "specificity": 0.85}, "image_level": {"auc": 0.88, "n": 80},
            "ece_image_level": 0.05, "ci95": {"patient_auc": [0.82, 0.97]}}
    path = save_checkpoint(tmp_path / "m.pt", small_model, trained=True, metadata={"test": test, "data": ["/x/site-a/labels.csv"]})
    figures = load_model(path)[1].performance
    assert figures == {"test_data": ["site-a"], "patients": 40, "images": 80, "patient_auc": 0.91, "image_auc": 0.88,
                       "sensitivity": 0.8, "specificity": 0.85, "ece": 0.05, "ci95": {"patient_auc": [0.82, 0.97]},
                       "target_patient_auc": 0.90, "below_target": False}
    line = performance_line(figures)
    assert "patient AUC 0.910 (95 % CI 0.820-0.970)" in line and "sensitivity 0.800 and specificity 0.850" in line
    assert Analyzer([path, bare], device="cpu").model_info.performance is None


def test_the_same_model_twice_is_not_an_ensemble(tmp_path, small_model):
    from CovidCTDiagnosisLib.pipeline import Analyzer

    path = save_checkpoint(tmp_path / "m.pt", small_model, trained=True)
    copy = tmp_path / "copy.pt"
    copy.write_bytes(path.read_bytes())
    for models in ([path, path], [path, copy], ["untrained", "untrained"]):
        with pytest.raises(ModelFileError, match="same model"):
            Analyzer(models, device="cpu")


def test_half_precision_file_loads_close(tmp_path, small_model):
    path = save_checkpoint(tmp_path / "h.pt", small_model, trained=True, half=True)
    model, _ = load_model(path)
    assert next(model.parameters()).dtype == torch.float32
    stored = read_checkpoint(path)["state_dict"]
    assert stored["global_head.weight"].dtype == torch.float16
    assert stored["backbone._bn1.running_var"].dtype == torch.float32  # statistics keep full precision
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(torch.softmax(model(x).logits, 1), torch.softmax(small_model(x).logits, 1), atol=2e-2)


def test_errors(tmp_path, small_model):
    with pytest.raises(ModelFileError, match="not found"):
        load_model(tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00not a model" * 100)
    with pytest.raises(ModelFileError, match="corrupt"):
        load_model(corrupt)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(ModelFileError, match="not a CovidCT"):
        load_model(foreign)
    path = save_checkpoint(tmp_path / "m.pt", small_model, trained=True)
    with pytest.raises(ModelFileError, match="expected classes"):
        load_model(path, expected_classes=["COVID-19", "Non-COVID-19"])
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(ModelFileError):
        load_model(truncated)
    payload = torch.load(path, weights_only=True)
    payload["state_dict"].pop("navigator.tidy1.weight")
    torch.save(payload, tmp_path / "mismatch.pt")
    with pytest.raises(ModelFileError, match="does not match"):
        load_model(tmp_path / "mismatch.pt")


def test_untrained_only_by_name():
    model, info = untrained_model("untrained:efficientnet_lite0")
    assert info.trained is False and info.file is None and "untrained" in info.name
    _, info2 = resolve_model("untrained")
    assert info2.trained is False


def test_no_bundled_model_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("COVIDCT_MODEL_DIR", str(tmp_path))
    with pytest.raises(ModelFileError, match="no trained model"):
        resolve_model(None)
