"""Shared fixtures: the real-data folder (skipped when absent) and a small synthetic chest phantom."""

from __future__ import annotations

from pathlib import Path

import pytest

from CovidCTDiagnosisLib.phantom import Phantom, make_chest_phantom

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The project's real data (../shared/data from the repository root); skips the test without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not available: {SHARED_DATA} does not exist")
    return SHARED_DATA


@pytest.fixture(scope="session")
def phantom() -> Phantom:
    """The default chest phantom (160 x 128 x 48 voxels, 2 x 2 x 5 mm, identity direction)."""
    return make_chest_phantom()
