"""Issue 11, the command line keeps its promises: exit codes, one-line errors before any work, nothing
left behind, untrained outputs marked in every file, absolute paths, rounded CSV numbers."""

from __future__ import annotations

import csv
import json
import re
import struct
import subprocess
import sys

import nrrd
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from CovidCTDiagnosisLib import cli
from CovidCTDiagnosisLib.errors import BATCH_CASES_FAILED, EXIT_CODES
from CovidCTDiagnosisLib.result import UNTRAINED_NOTE, WARNING_KEY
from CovidCTDiagnosisLib.volume_io import read_volume

from dicom_series import write_ct_series
from test_cli import ct_file, good_and_broken_cases, run, tiny_model  # noqa: F401  (fixtures: the phantom as NRRD, a 64-px model file)
from test_training import synthetic_csv  # noqa: F401  (a fixture: 16 labelled slice images)
from test_volume_io import OTHER_SERIES_UID, SERIES_UID, small_ct, write_dicom_series  # noqa: F401

ERROR = re.compile(r"^covidct: error: .+\n$")




def one_line_error(code, err, expected_code, *words):
    assert code == expected_code, err
    assert ERROR.match(err), f"not one error line: {err!r}"
    for word in words:
        assert word in err, err


# --- item 7 ---------------------------------------------------------------------------------------

def test_batch_exit_code_is_documented():
    assert BATCH_CASES_FAILED == 9 and "failed" in EXIT_CODES[9]
    assert "  9  batch: some or all cases failed" in cli._exit_code_help()


@pytest.mark.parametrize("module", ["tempfile", "CovidCTDiagnosisLib.errors"])
def test_ctrl_c_while_starting_is_one_line_and_130(module):
    """Ctrl-C while the console script imports the command line: as if the import were interrupted."""
    script = f"""
import builtins, sys
real = builtins.__import__
def interrupted(name, globals=None, locals=None, fromlist=(), level=0):
    if name == {module!r} or (level and name == "errors"):
        raise KeyboardInterrupt
    return real(name, globals, locals, fromlist, level)
builtins.__import__ = interrupted
from CovidCTDiagnosisLib.cli import main
sys.exit(main(["analyze", "x.nrrd", "--out", "o"]))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert (done.returncode, done.stderr, done.stdout) == (130, "covidct: interrupted\n", "")


def test_ctrl_c_while_parsing_is_one_line_and_130(monkeypatch, capsys):
    class Interrupted:
        def parse_args(self, argv):
            raise KeyboardInterrupt  # e.g. `train` importing torch while its options are added

    monkeypatch.setattr(cli, "build_parser", Interrupted)
    assert run(["train", "--help"], capsys)[::2] == (130, "covidct: interrupted\n")


def _no_analysis(monkeypatch):
    """Fail the test if a model is loaded (the analysis would start)."""
    from CovidCTDiagnosisLib import pipeline

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(pipeline.Analyzer, "__init__", refuse)


def test_an_output_folder_that_cannot_be_written_is_refused_before_any_work(tmp_path, ct_file, monkeypatch, capsys):
    _no_analysis(monkeypatch)
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for command in ("analyze", "batch"):
        code, _, err = run([command, ct_file, "--out", a_file / "result", "--model", "untrained"], capsys)
        one_line_error(code, err, 7, "is a file, not a folder")
    foreign = tmp_path / "holds-other-files"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    code, _, err = run(["analyze", ct_file, "--out", foreign, "--model", "untrained"], capsys)
    one_line_error(code, err, 7, "notes.txt")
    code, _, err = run(["score-images", ct_file, "--out", a_file / "scores.csv", "--model", "untrained"], capsys)
    one_line_error(code, err, 7)
    code, _, err = run(["demo", "--out", a_file / "demo", "--model", "untrained"], capsys)
    one_line_error(code, err, 7)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "holds-other-files"]
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


def _nifti_with_moved_sform(phantom, path, shift_mm):
    sitk.WriteImage(phantom.image, str(path))
    data = bytearray(path.read_bytes())
    offset = 280 + 3 * 4  # srow_x[3]: the x translation of the sform (NIfTI-1 header)
    (x,) = struct.unpack_from("<f", data, offset)
    struct.pack_into("<f", data, offset, x + shift_mm)
    path.write_bytes(bytes(data))


def test_a_nifti_whose_qform_and_sform_disagree_is_read_with_a_note(tmp_path, phantom):
    agree = tmp_path / "agree.nii"
    sitk.WriteImage(phantom.image, str(agree))
    assert not any("qform" in n for n in read_volume(agree).info.notes)
    disagree = tmp_path / "disagree.nii"
    _nifti_with_moved_sform(phantom, disagree, 30.0)
    notes = [n for n in read_volume(disagree).info.notes if "qform" in n]
    assert len(notes) == 1 and "qform and sform disagree" in notes[0] and "30.0 mm apart" in notes[0]


def test_score_images_scores_the_images_of_a_folder(tmp_path, tiny_model, phantom, capsys):
    hu = sitk.GetArrayFromImage(phantom.image)
    folder = tmp_path / "slices"
    folder.mkdir()
    for k in (20, 24):
        gray = np.clip((hu[k] + 1450) / 1500 * 255, 0, 255).astype(np.uint8)
        sitk.WriteImage(sitk.GetImageFromArray(gray), str(folder / f"slice{k}.png"))
    (folder / "readme.txt").write_text("not an image")
    (written,) = write_ct_series(phantom.image[:, :, 22:23], tmp_path / "dicom")  # in HU
    written.rename(folder / "IM22")  # a PACS's file name: no extension
    out = tmp_path / "scores.csv"
    code, _, err = run(["score-images", folder, "--out", out, "--model", tiny_model], capsys)
    assert code == 0, err
    rows = list(csv.reader(out.open()))
    assert [r[0] for r in rows[1:]] == [str(folder / "IM22"), str(folder / "slice20.png"), str(folder / "slice24.png")]
    assert rows[1][3] == UNTRAINED_NOTE, rows[1]  # scored (by an untrained network, as the note says)
    assert all(len(p.split(".")[1]) == 4 for p in rows[1][1:3])  # probabilities to 4 decimals
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run(["score-images", empty, "--out", tmp_path / "none.csv", "--model", tiny_model], capsys)
    one_line_error(code, err, 3, "no slice images")
    assert not (tmp_path / "none.csv").exists()


# --- item 8 ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["0", "-3", "abc"])
def test_bad_slices_is_a_usage_error(tmp_path, ct_file, value, monkeypatch, capsys):
    _no_analysis(monkeypatch)
    code, _, err = run(["analyze", ct_file, "--out", tmp_path / "o", "--model", "untrained", "--slices", value], capsys)
    one_line_error(code, err, 2, "--slices")
    assert not (tmp_path / "o").exists()


def test_argparse_errors_are_one_line_and_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["analyze", "ct.nrrd"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and ERROR.match(err) and "--out" in err and "covidct analyze --help" in err


@pytest.mark.parametrize("options, words", [
    (["--input-size", "100"], ["--input-size", "multiple of 64"]),
    (["--batch-size", "0"], ["--batch-size"]),
    (["--epochs", "0"], ["--epochs"]),
    (["--classes", "COVID"], ["--classes", "2 or 3"]),
    (["--input-size", "abc"], ["--input-size"]),
])
def test_bad_training_options_are_one_line_usage_errors_and_leave_nothing(synthetic_csv, tmp_path, options, words, capsys):  # noqa: F811
    for command in ("train", "compare"):
        argv = [command, "--data", synthetic_csv, "--out", tmp_path / command, "--no-pretrained", "--quiet", *options]
        try:
            code, _, err = run(argv, capsys)
        except SystemExit as stop:  # argparse's own type errors
            code, err = stop.code, capsys.readouterr().err
        one_line_error(code, err, 2, *words)
        assert not (tmp_path / command).exists()


def test_an_unknown_label_names_its_line(synthetic_csv, tmp_path, capsys):  # noqa: F811
    lines = synthetic_csv.read_text().splitlines()
    lines[6] = lines[6].replace("NonCOVID", "Flu")
    bad = synthetic_csv.parent / "bad-label.csv"
    bad.write_text("\n".join(lines) + "\n")
    code, _, err = run(["train", "--data", bad, "--out", tmp_path / "run", "--input-size", "64", "--no-pretrained",
                        "--quiet"], capsys)
    one_line_error(code, err, 3, "bad-label.csv line 7", "'Flu'")
    assert not (tmp_path / "run").exists()


def test_evaluate_without_data_or_split_is_a_usage_error(tmp_path, tiny_model, capsys):
    code, _, err = run(["evaluate", "--model", tiny_model, "--out", tmp_path / "ev"], capsys)
    one_line_error(code, err, 2, "--data", "--split")
    assert not (tmp_path / "ev").exists()


def test_compare_offline_downloads_nothing(synthetic_csv, tmp_path, monkeypatch, capfd):  # noqa: F811
    """No cached torchvision weights: refused in one line before torchvision is asked (it would print
    "Downloading ..." and try the network)."""
    import torchvision.models

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty-cache"))

    real = torchvision.models.densenet121

    def no_download(*, weights=None):
        if weights is not None:
            raise AssertionError("torchvision was asked for ImageNet weights")
        return real(weights=None)

    monkeypatch.setattr(torchvision.models, "densenet121", no_download)
    code = cli.main(["compare", "--data", str(synthetic_csv), "--out", str(tmp_path / "cmp"), "--baselines", "densenet121",
                     "--input-size", "64", "--epochs", "1", "--quiet"])
    out, err = capfd.readouterr()
    one_line_error(code, err, 6, "densenet121", "downloads nothing", "--no-pretrained")
    assert "Downloading" not in out + err and not (tmp_path / "cmp").exists()


# --- items 9 and 10 on one analysis ----------------------------------------------------------------

@pytest.fixture(scope="module")
def untrained_result(tmp_path_factory, ct_file, tiny_model):
    """`covidct analyze` of the phantom, given as a relative path, with an untrained model."""
    work = tmp_path_factory.mktemp("relative")
    done = subprocess.run([sys.executable, "-m", "CovidCTDiagnosisLib.cli", "analyze", ct_file.name, "--out", str(work / "o"),
                           "--model", tiny_model, "--device", "cpu"], cwd=ct_file.parent, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return work / "o", done.stderr


def test_every_output_of_an_untrained_network_says_it_is_not_a_diagnosis(untrained_result):
    out, _ = untrained_result
    assert "not a diagnosis" in UNTRAINED_NOTE
    rows = list(csv.DictReader((out / "slices.csv").open()))
    assert rows and all(r["note"] == UNTRAINED_NOTE for r in rows)
    for name in ("lungs.seg.nrrd", "gradcam.nrrd"):
        assert nrrd.read_header(str(out / name))[WARNING_KEY] == UNTRAINED_NOTE, name
    markups = json.loads((out / "lesions.mrk.json").read_text())
    assert markups[WARNING_KEY] == UNTRAINED_NOTE
    assert markups["markups"] and all(m["description"] == UNTRAINED_NOTE for m in markups["markups"])
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["trained"] is False and any("not a diagnosis" in w for w in report["warnings"])


def test_trained_outputs_carry_no_untrained_note(tmp_path):
    from helpers_results import make_result

    from CovidCTDiagnosisLib.outputs import write_outputs

    result, ct = make_result(trained=True)
    out = write_outputs(result, ct, tmp_path / "o")
    assert {r["note"] for r in csv.DictReader((out / "slices.csv").open())} == {""}
    assert all(WARNING_KEY not in nrrd.read_header(str(out / n)) for n in ("lungs.seg.nrrd", "gradcam.nrrd"))
    assert WARNING_KEY not in json.loads((out / "lesions.mrk.json").read_text())


def _decimals(value: float) -> int:
    text = repr(float(value))
    return len(text.split(".")[1]) if "." in text and "e" not in text else 0


def test_paths_are_absolute_and_csv_numbers_rounded(untrained_result, ct_file, tiny_model):
    out, _ = untrained_result
    report = json.loads((out / "report.json").read_text())
    assert report["input"]["path"] == str(ct_file.resolve()) and report["model"]["file"] == str(
        __import__("pathlib").Path(tiny_model).resolve())
    for row in csv.DictReader((out / "slices.csv").open()):
        assert len(row["z_mm"].split(".")[1]) == 2 and len(row["COVID-19"].split(".")[1]) == 4
        assert len(row["lung_fraction"].split(".")[1]) == 4


def test_series_on_a_file_is_a_usage_error(tmp_path, ct_file, monkeypatch, capsys):
    _no_analysis(monkeypatch)
    code, _, err = run(["analyze", ct_file, "--out", tmp_path / "o", "--model", "untrained", "--series", "1.2.3"], capsys)
    one_line_error(code, err, 2, "--series", "is a file")
    assert not (tmp_path / "o").exists()
    from CovidCTDiagnosisLib.errors import UsageError

    with pytest.raises(UsageError, match="--series"):
        read_volume(ct_file, series_uid="1.2.3")


def test_series_picks_a_series_of_a_zipped_folder_or_a_dicomdir(tmp_path, small_ct):  # noqa: F811
    """The note of a zipped folder says "use --series UID for another": --series is accepted there (it was refused
    as "a file"), as for a DICOMDIR, and read_volume reads the series it names."""
    import argparse
    import shutil

    folder = tmp_path / "two-series"
    write_dicom_series(small_ct, folder)
    write_dicom_series(small_ct[:, :, :10], folder, uid=OTHER_SERIES_UID, prefix="other")
    archive = shutil.make_archive(str(tmp_path / "study"), "zip", folder)
    (folder / "DICOMDIR").write_bytes(b"")  # only its name matters to the option check
    for given in (archive, folder / "DICOMDIR"):
        cli._check_series(argparse.Namespace(series=OTHER_SERIES_UID, input=str(given)))
    assert read_volume(archive, series_uid=OTHER_SERIES_UID).image.GetSize()[2] == 10


def test_the_series_note_names_the_other_series(tmp_path, small_ct):  # noqa: F811
    folder = tmp_path / "two-series"
    write_dicom_series(small_ct, folder)
    write_dicom_series(small_ct[:, :, :10], folder, uid=OTHER_SERIES_UID, prefix="other")
    notes = [n for n in read_volume(folder).info.notes if "series found" in n]
    assert len(notes) == 1 and f"analysed {SERIES_UID}" in notes[0] and f"{OTHER_SERIES_UID} (10 images)" in notes[0]


def test_batch_failures_exit_9_progress_names_the_case_and_result_folder_is_the_folder(tmp_path, ct_file, tiny_model, capsys):
    cases = good_and_broken_cases(tmp_path / "cases", ct_file)
    out = tmp_path / "results"
    code, stdout, err = run(["batch", cases, "--out", out, "--model", tiny_model, "--progress", "lines"], capsys)
    assert code == BATCH_CASES_FAILED and "1 of 2 cases failed" in err.splitlines()[-1]
    rows = {r["case_id"]: r for r in csv.DictReader((out / "summary.csv").open())}
    assert rows["good"]["status"] == "done" and rows["good"]["result_folder"] == str((out / "good").resolve())
    assert rows["broken"]["status"] == "failed" and rows["broken"]["error"] and not rows["broken"]["result_folder"]
    progress = [line for line in stdout.splitlines() if line.startswith("PROGRESS ")]
    assert progress and all(" good (2/2): " in line or " broken (1/2): " in line for line in progress)
    fractions = [float(line.split()[1]) for line in progress]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_gitignore_covers_the_docs_run_folders():
    from pathlib import Path

    ignored = (Path(__file__).resolve().parents[2] / ".gitignore").read_text().split()
    assert {"/runs/", "/eval/", "/results/"} <= set(ignored)
