"""Choosing slices: equidistant over the lungs, dropping slices with little lung."""

from __future__ import annotations

import numpy as np
import pytest

from CovidCTDiagnosisLib.slice_selection import choose_slices, lung_fraction


def lung_profile(before: int = 10, lung: int = 60, after: int = 10) -> np.ndarray:
    """Lung area per slice: none, then a dome shaped profile, then none."""
    return np.r_[np.zeros(before), np.sin(np.linspace(0.05, np.pi - 0.05, lung)) * 30000, np.zeros(after)]


def test_fifteen_equidistant_slices_with_enough_lung():
    area = lung_profile()
    chosen = choose_slices(area)
    assert chosen == sorted(set(chosen))
    assert all(10 <= k < 70 for k in chosen)
    assert all(area[k] >= 0.5 * area.max() for k in chosen)
    steps = np.diff(chosen)
    assert steps.max() - steps.min() <= 1  # equidistant up to rounding
    # the 15 candidates are spread over the whole extent; those in the middle two thirds survive
    assert 8 <= len(chosen) <= 15


def test_count_and_all():
    area = lung_profile()
    all_slices = choose_slices(area, count=None)
    assert all_slices == [k for k in range(len(area)) if area[k] >= 0.5 * area.max()]
    assert set(choose_slices(area, count=5)) <= set(all_slices)
    assert choose_slices(area, count=1) == [40]  # the middle of the lungs
    assert choose_slices(area, count=1000) == all_slices  # never more than there are
    assert choose_slices(area, count=None, min_fraction=0.0) == list(range(10, 70))


def test_no_lung_and_bad_count():
    assert choose_slices(np.zeros(20)) == []
    assert np.array_equal(lung_fraction(np.zeros(5)), np.zeros(5))
    with pytest.raises(ValueError):
        choose_slices(lung_profile(), count=0)


def test_lung_fraction():
    fraction = lung_fraction(np.array([0.0, 50.0, 200.0, 100.0]))
    assert fraction.tolist() == [0.0, 0.25, 1.0, 0.5]
