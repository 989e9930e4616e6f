"""How far to trust a model's result: its validated figures, as stored in the model file.

`publish_model` (training/train.py) stores `test_figures(evaluation)` in the model file's
metadata under "test": `covidct evaluate`'s metrics on the held-out test patients, computed, not
typed. `validated_performance` reads them back for `ModelInfo.performance`, which report.json,
report.html, the command line and the Slicer module's result panel show beside the label. Standard
library only: Slicer's Load results imports it without PyTorch.
"""

from __future__ import annotations

from pathlib import Path

TARGET_PATIENT_AUC = 0.90  # the project's accuracy target: patient-level AUC on held-out patients
NO_FIGURES = "no validated performance figures for this model"


def test_figures(evaluation: dict) -> dict:
    """`training.evaluate.evaluate`'s result -> the block stored as the model file's metadata["test"]."""

    def level(metrics: dict) -> dict:
        return {**metrics["positive"], "accuracy": metrics["accuracy"], "n": metrics["n"]}

    return {
        "image_level": level(evaluation["image_level"]),
        "patient_level_mean": level(evaluation["patient_level"]["mean"]),
        "ece_image_level": evaluation["calibration"]["ece"],
        "backbone_head_image_level": level(evaluation["backbone_head"]["image_level"]),
        "backbone_head_patient_level_mean": level(evaluation["backbone_head"]["patient_level"]["mean"]),
        "ci95": evaluation.get("ci95", {}),
    }


def validated_performance(metadata: dict) -> dict | None:
    """The figures report.json carries as `model.performance`, or None when the file holds none.

    Returns: test_data (folder names of the labels CSVs split into train/validation/test),
    patients and images tested, patient_auc (mean aggregation), image_auc, sensitivity and
    specificity (patient level, at the label's threshold), ece (image level, 10 bins), ci95
    ({figure: [low, high]}, bootstrap over patients; {} when not measured), target_patient_auc
    and below_target.
    """
    test = metadata.get("test") or {}
    patient, image = test.get("patient_level_mean") or {}, test.get("image_level") or {}
    if patient.get("auc") is None:
        return None
    return {
        "test_data": [Path(p).parent.name for p in metadata.get("data", [])],
        "patients": patient.get("n"),
        "images": image.get("n"),
        "patient_auc": patient["auc"],
        "image_auc": image.get("auc"),
        "sensitivity": patient.get("recall"),
        "specificity": patient.get("specificity"),
        "ece": test.get("ece_image_level"),
        "ci95": test.get("ci95") or {},
        "target_patient_auc": TARGET_PATIENT_AUC,
        "below_target": patient["auc"] < TARGET_PATIENT_AUC,
    }


def performance_line(performance: dict | None) -> str:
    """One sentence for a reader: the validated figures and whether they reach the target."""
    if performance is None:
        return f"{NO_FIGURES}: how often its labels are right is unknown"
    p = performance

    def num(value, figure: str | None = None) -> str:
        text = "n/a" if value is None else f"{value:.3f}"
        interval = p.get("ci95", {}).get(figure)
        return f"{text} (95 % CI {interval[0]:.3f}-{interval[1]:.3f})" if interval and value is not None else text

    where = f" of {', '.join(p['test_data'])}" if p["test_data"] else ""
    verdict = (f"BELOW the target of {p['target_patient_auc']:.2f}" if p["below_target"]
               else f"meets the target of {p['target_patient_auc']:.2f}")
    operating = ""
    if p.get("sensitivity") is not None:
        operating = (f", at this label's threshold sensitivity {num(p['sensitivity'], 'patient_sensitivity')} and "
                     f"specificity {num(p.get('specificity'), 'patient_specificity')}")
    return (f"validated on {p['patients']} held-out patients ({p['images']} images){where}: patient AUC "
            f"{num(p['patient_auc'], 'patient_auc')} ({verdict}){operating}, image AUC {num(p['image_auc'], 'image_auc')}, "
            f"calibration error (ECE) {num(p['ece'])}; not validated on other data or scanners")


def trust_sentence(performance: dict | None) -> str:
    """The sentence shown under a trained model's label (report.html, the Slicer module)."""
    return f"How far to trust this label: {performance_line(performance)}."
