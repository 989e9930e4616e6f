import numpy as np
import pytest

from CovidCTDiagnosisLib.aggregation import aggregate, top_slices

CLASSES = ["COVID-19", "Non-COVID-19"]


def test_mean_is_the_papers():
    probs = np.array([[0.9, 0.1], [0.5, 0.5], [0.1, 0.9]])
    assert aggregate(probs, CLASSES, "COVID-19") == pytest.approx({"COVID-19": 0.5, "Non-COVID-19": 0.5})


def test_noisy_or_was_removed_and_says_why():
    with pytest.raises(ValueError, match="Noisy-OR was removed: .* neither calibrated nor independent"):
        aggregate(np.array([[0.5, 0.5]]), CLASSES, "COVID-19", "noisy-or")


def test_unknown_method():
    with pytest.raises(ValueError):
        aggregate(np.ones((1, 2)) / 2, CLASSES, "COVID-19", "max")


def test_top_slices_most_suspicious_first():
    probs = np.array([[0.1, 0.9], [0.8, 0.2], [0.5, 0.5], [0.95, 0.05]])
    assert top_slices(probs, [10, 20, 30, 40], CLASSES, "COVID-19") == [40, 20, 30]
