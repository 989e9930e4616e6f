"""Patient-level result from slice probabilities.

`mean` is the paper's: the patient's class probabilities are the mean of its slices'. `noisy-or`
(Xu et al.) treats each slice as independent evidence for the positive (disease) class:
P(patient positive) = 1 - prod_i (1 - p_i); the remaining probability is shared among the other
classes in proportion to their mean slice probabilities.
"""

from __future__ import annotations

import numpy as np

METHODS = ("mean", "noisy-or")
TOP_SLICES = 3


def aggregate(probs: np.ndarray, classes, positive_class: str, method: str = "mean") -> dict[str, float]:
    """probs: (N slices, n classes) -> {class: probability}, summing to 1."""
    probs = np.asarray(probs, dtype=np.float64)
    mean = probs.mean(0)
    if method == "mean":
        out = mean
    elif method == "noisy-or":
        pos = list(classes).index(positive_class)
        p_pos = 1.0 - np.prod(1.0 - probs[:, pos])
        others = np.delete(mean, pos)
        share = others / others.sum() if others.sum() > 0 else np.full_like(others, 1.0 / others.size)
        out = np.insert(share * (1.0 - p_pos), pos, p_pos)
    else:
        raise ValueError(f"unknown aggregation {method!r}; choose one of {', '.join(METHODS)}")
    return {c: float(p) for c, p in zip(classes, out)}


def top_slices(probs: np.ndarray, slice_indices, classes, positive_class: str, count: int = TOP_SLICES) -> list[int]:
    """The `count` slice indices with the highest positive-class probability, most suspicious first."""
    pos = np.asarray(probs)[:, list(classes).index(positive_class)]
    order = np.argsort(-pos, kind="stable")[:count]
    return [int(slice_indices[i]) for i in order]
