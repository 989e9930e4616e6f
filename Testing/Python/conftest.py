"""Shared fixtures: the real-data folder (skipped when absent), a small synthetic chest phantom, and Orthanc servers."""

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


@pytest.fixture
def orthanc(tmp_path):
    """Starts Orthanc servers on 127.0.0.1 (orthanc_server.OrthancServer): `orthanc(**settings)` -> a started server,
    each in its own folder under tmp_path; all are stopped at teardown. Skips the test where Orthanc is not installed
    (Testing/install-system-packages.sh installs it)."""
    from orthanc_server import OrthancServer, orthanc_binary

    if orthanc_binary() is None:
        pytest.skip("Orthanc is not installed (Debian package 'orthanc'; Testing/install-system-packages.sh)")
    servers = []

    def start(**settings):
        folder = tmp_path / f"orthanc{len(servers)}"
        folder.mkdir()
        servers.append(OrthancServer(folder, **settings))
        return servers[-1].start()

    yield start
    for server in servers:
        server.stop()
