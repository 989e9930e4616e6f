"""Which axial slices the network reads.

As in the DRENet paper: equidistant slices over the lungs' extent (first to last slice with
lung), keeping only those whose lung area is at least half of the largest slice's, so that
slices through the apex and the diaphragm, which show little lung, are not scored.
"""

from __future__ import annotations

import numpy as np

DEFAULT_COUNT = 15
DEFAULT_MIN_FRACTION = 0.5


def lung_fraction(lung_area: np.ndarray) -> np.ndarray:
    """Each slice's lung area relative to the largest (zeros when there is no lung)."""
    area = np.asarray(lung_area, dtype=float)
    largest = area.max(initial=0.0)
    return area / largest if largest > 0 else np.zeros_like(area)


def choose_slices(
    lung_area: np.ndarray, count: int | None = DEFAULT_COUNT, min_fraction: float = DEFAULT_MIN_FRACTION
) -> list[int]:
    """Slice indices (ascending, unique) to analyse.

    `count` slices at the centres of equal parts of the lungs' extent, or every slice of it when
    None; either way only slices with lung_fraction >= min_fraction are kept.
    """
    if count is not None and count < 1:
        raise ValueError(f"count must be at least 1 or None, not {count}")
    fraction = lung_fraction(lung_area)
    with_lung = np.flatnonzero(fraction > 0)
    if len(with_lung) == 0:
        return []
    first, last = with_lung[0], with_lung[-1]
    if count is None:
        candidates = np.arange(first, last + 1)
    else:
        positions = first + (last - first + 1) * (np.arange(count) + 0.5) / count
        candidates = np.unique(np.clip(np.floor(positions), first, last).astype(int))
    return [int(k) for k in candidates if fraction[k] >= min_fraction]
