"""The result folder: its files, atomic replacement, and one-line OutputErrors."""

import csv
import errno
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
from helpers_results import CLASSES, make_result, oblique_direction

from CovidCTDiagnosisLib import outputs
from CovidCTDiagnosisLib.errors import OutputError
from CovidCTDiagnosisLib.outputs import OUTPUT_FILES, is_complete, read_report, write_outputs


@pytest.fixture(scope="module")
def case():
    return make_result(oblique_direction())


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def _fail_with(monkeypatch, name, exc):
    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr(outputs, name, fail)


def test_writes_every_file(case, tmp_path):
    result, ct = case
    out = write_outputs(result, ct, tmp_path / "cases" / "P001")
    assert out == tmp_path / "cases" / "P001"
    assert sorted(os.listdir(out)) == sorted(OUTPUT_FILES)
    assert os.listdir(tmp_path / "cases") == ["P001"]  # no staging folder left
    assert read_report(out) == json.loads(json.dumps(result.to_report()))
    assert is_complete(out)


def test_slices_csv(case, tmp_path):
    result, ct = case
    out = write_outputs(result, ct, tmp_path / "r")
    with open(out / outputs.SLICES_CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["index", "z_mm", "lung_fraction", *CLASSES, "n_boxes", "top_box_score", "note"]
    assert [int(r["index"]) for r in rows] == [s.index for s in result.slices]
    for row, s in zip(rows, result.slices):
        assert float(row["COVID-19"]) == pytest.approx(s.probabilities["COVID-19"], abs=5e-5)  # 4 decimals
        assert float(row["z_mm"]) == pytest.approx(s.z_mm, abs=5e-3)  # 0.01 mm
        assert int(row["n_boxes"]) == len(s.boxes)
        assert float(row["top_box_score"]) == pytest.approx(max(b.score for b in s.boxes), abs=5e-5)


def test_gradcam_nrrd_has_the_input_geometry(case, tmp_path):
    result, ct = case
    out = write_outputs(result, ct, tmp_path / "r")
    cam = sitk.ReadImage(str(out / outputs.GRADCAM_NRRD))
    assert cam.GetPixelID() == sitk.sitkFloat32
    assert cam.GetSize() == ct.GetSize()
    np.testing.assert_allclose(cam.GetOrigin(), ct.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(cam.GetSpacing(), ct.GetSpacing(), atol=1e-9)
    np.testing.assert_allclose(cam.GetDirection(), ct.GetDirection(), atol=1e-9)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(cam), sitk.GetArrayFromImage(result.gradcam))


def test_failure_midway_leaves_nothing(case, tmp_path, monkeypatch):
    result, ct = case
    _fail_with(monkeypatch, "write_lesion_markups", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    target = tmp_path / "P001"
    with pytest.raises(OutputError) as info:
        write_outputs(result, ct, target)
    assert str(info.value) == f"cannot write {target}: No space left on device"
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "exc, raised",
    [
        (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), OutputError),
        (PermissionError(errno.EACCES, os.strerror(errno.EACCES)), OutputError),
        (KeyboardInterrupt(), KeyboardInterrupt),
        (RuntimeError("a bug"), RuntimeError),
    ],
)
def test_failure_keeps_the_previous_result(case, tmp_path, monkeypatch, exc, raised):
    result, ct = case
    target = write_outputs(result, ct, tmp_path / "P001")
    before = _snapshot(target)
    _fail_with(monkeypatch, "render_html", exc)
    with pytest.raises(raised):
        write_outputs(result, ct, target)
    assert os.listdir(tmp_path) == ["P001"]
    assert _snapshot(target) == before


def test_permission_error_is_one_line(case, tmp_path, monkeypatch):
    result, ct = case
    _fail_with(monkeypatch, "write_slices_csv", PermissionError(errno.EACCES, os.strerror(errno.EACCES)))
    with pytest.raises(OutputError, match=r"^cannot write .*P001: Permission denied$"):
        write_outputs(result, ct, tmp_path / "P001")


def test_replaces_a_previous_result(case, tmp_path):
    result, ct = case
    target = write_outputs(result, ct, tmp_path / "P001")
    (target / outputs.REPORT_HTML).write_text("old")
    result.device = "cuda:0"
    try:
        write_outputs(result, ct, target)
    finally:
        result.device = "cpu"
    assert read_report(target)["device"] == "cuda:0"
    assert (target / outputs.REPORT_HTML).read_text() != "old"
    assert os.listdir(tmp_path) == ["P001"]


def test_overwrite_false_refuses_an_existing_result(case, tmp_path):
    result, ct = case
    target = write_outputs(result, ct, tmp_path / "P001")
    with pytest.raises(OutputError, match="already exists"):
        write_outputs(result, ct, target, overwrite=False)
    write_outputs(result, ct, tmp_path / "empty", overwrite=False)  # a new folder is fine


def test_out_dir_is_a_file(case, tmp_path):
    result, ct = case
    target = tmp_path / "P001"
    target.write_text("keep me")
    with pytest.raises(OutputError, match="is not a folder"):
        write_outputs(result, ct, target)
    assert target.read_text() == "keep me"


def test_a_folder_with_other_files_is_never_replaced(case, tmp_path):
    result, ct = case
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="notes.txt"):
        write_outputs(result, ct, tmp_path)
    assert os.listdir(tmp_path) == ["notes.txt"]


def test_volumes_off_the_ct_grid_are_a_bug(case, tmp_path):
    result, ct = case
    shifted = sitk.Image(ct)
    shifted.SetOrigin((0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="grid"):
        write_outputs(result, shifted, tmp_path / "P001")


def test_is_complete_and_read_report(case, tmp_path):
    result, ct = case
    assert not is_complete(tmp_path / "missing")
    with pytest.raises(OutputError, match="cannot read"):
        read_report(tmp_path / "missing")
    target = write_outputs(result, ct, tmp_path / "P001")
    (target / outputs.LESIONS_MRK_JSON).unlink()
    assert not is_complete(target)
    target = write_outputs(result, ct, target)
    (target / outputs.REPORT_JSON).write_text('{"schema_version": "1.0", ')
    assert not is_complete(target)
    (target / outputs.REPORT_JSON).write_text('{"schema_version": "2.0"}')
    assert not is_complete(target)
    with pytest.raises(OutputError, match="schema"):
        read_report(target)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_disk_is_reported_not_ignored(case, tmp_path):
    """The volume writer raises ENOSPC (ITK's NRRD writer would silently truncate)."""
    result, _ = case
    path = tmp_path / outputs.GRADCAM_NRRD
    path.symlink_to("/dev/full")
    with pytest.raises(OSError) as info:
        outputs.write_volume_nrrd(path, result.gradcam)
    assert info.value.errno == errno.ENOSPC
