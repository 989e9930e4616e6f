"""Patient-level result from slice probabilities.

`mean` is the paper's, and the only method: the patient's class probabilities are the mean of
its slices'. Noisy-OR (Xu et al.) was removed: it needs calibrated probabilities of independent
pieces of evidence, and neighbouring slices of one CT read by one model are neither. With the
reference model it called both real volumes COVID-19 (docs/training.md, "Aggregation").
"""

from __future__ import annotations

import numpy as np

METHODS = ("mean",)
REMOVED_METHODS = {
    "noisy-or": "Noisy-OR was removed: slice probabilities are neither calibrated nor independent, so it "
                "saturates (a normal lung scored P(COVID-19) 1.00 over all slices); use 'mean'",
}
TOP_SLICES = 3


def check_method(method: str) -> None:
    """ValueError with one line unless `method` is in METHODS; a removed method's message says why."""
    if method not in METHODS:
        raise ValueError(REMOVED_METHODS.get(method, f"unknown aggregation {method!r}; choose one of {', '.join(METHODS)}"))


def aggregate(probs: np.ndarray, classes, positive_class: str, method: str = "mean") -> dict[str, float]:
    """probs: (N slices, n classes) -> {class: probability}, summing to 1. `positive_class` is
    kept for callers' sake: the mean treats every class alike."""
    check_method(method)
    mean = np.asarray(probs, dtype=np.float64).mean(0)
    return {c: float(p) for c, p in zip(classes, mean)}


def top_slices(probs: np.ndarray, slice_indices, classes, positive_class: str, count: int = TOP_SLICES) -> list[int]:
    """The `count` slice indices with the highest positive-class probability, most suspicious first."""
    pos = np.asarray(probs)[:, list(classes).index(positive_class)]
    order = np.argsort(-pos, kind="stable")[:count]
    return [int(slice_indices[i]) for i in order]
