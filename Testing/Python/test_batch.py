"""`batch.run_batch` without Ray: the resume key (options and model) decides which finished cases a re-run keeps."""

from __future__ import annotations

import json

import pytest
import torch

from CovidCTDiagnosisLib.batch import SUMMARY_CSV, resume_key, run_batch
from CovidCTDiagnosisLib.checkpoint import save_checkpoint
from CovidCTDiagnosisLib.drenet import DRENet, DRENetConfig
from CovidCTDiagnosisLib.outputs import REPORT_JSON
from CovidCTDiagnosisLib.pipeline import Analyzer
from helpers_batch import phantom_cases, summary_rows


def tiny_model_file(folder, seed: int) -> str:
    """A small untrained DRENet file (64 px input); another seed gives another file (another SHA-256)."""
    torch.manual_seed(seed)
    return str(save_checkpoint(folder / f"tiny{seed}.pt", DRENet(DRENetConfig(input_size=64)), trained=False,
                               metadata={"name": "tiny"}))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    return tiny_model_file(folder, 0), tiny_model_file(folder, 1)


@pytest.fixture(scope="module")
def cases(tmp_path_factory, phantom):
    return phantom_cases(tmp_path_factory.mktemp("cases"), phantom, ("a.nrrd", "b.mha"))


def test_report_records_the_resume_key(tmp_path, cases, models):
    analyzer = Analyzer(models[0])
    run_batch(analyzer, cases, tmp_path, slices=3)
    report = json.loads((tmp_path / "a" / REPORT_JSON).read_text())
    assert report["schema_version"] == "1.4"
    assert report["options"] == {"slices": 3, "aggregate": "mean", "series_uid": None}
    assert resume_key(report["model"], report["options"]) == {"options": report["options"],
                                                              "models": [analyzer.model_info.sha256]}
    assert len(analyzer.model_info.sha256) == 64


def test_rerun_skips_only_cases_of_the_same_options_and_model(tmp_path, cases, models):
    first = Analyzer(models[0])
    run_batch(first, cases, tmp_path, slices=3)
    stamp = (tmp_path / "a" / REPORT_JSON).stat().st_mtime_ns

    same = run_batch(Analyzer(models[0]), cases, tmp_path, slices=3)
    assert [o.status for o in same] == ["skipped", "skipped"]
    assert (tmp_path / "a" / REPORT_JSON).stat().st_mtime_ns == stamp
    assert [r["status"] for r in summary_rows(tmp_path / SUMMARY_CSV)] == ["skipped", "skipped"]

    other_options = run_batch(Analyzer(models[0]), cases, tmp_path, slices=7)
    assert [o.status for o in other_options] == ["done", "done"]
    assert json.loads((tmp_path / "a" / REPORT_JSON).read_text())["options"]["slices"] == 7

    other_model = run_batch(Analyzer(models[1]), cases, tmp_path, slices=7)
    assert [o.status for o in other_model] == ["done", "done"]
    report = json.loads((tmp_path / "b" / REPORT_JSON).read_text())
    assert report["model"]["sha256"] == Analyzer(models[1]).model_info.sha256 != first.model_info.sha256


def test_reports_without_options_are_redone(tmp_path, cases, models):
    """A folder of schema 1.3 records no options: a re-run cannot tell how it was made, so it redoes it."""
    run_batch(Analyzer(models[0]), cases, tmp_path)
    path = tmp_path / "a" / REPORT_JSON
    old = json.loads(path.read_text())
    del old["options"]
    old["schema_version"] = "1.3"
    path.write_text(json.dumps(old))
    statuses = {o.case.case_id: o.status for o in run_batch(Analyzer(models[0]), cases, tmp_path)}
    assert statuses == {"a": "done", "b": "skipped"}
    assert "options" in json.loads(path.read_text())


def test_leftovers_of_a_killed_writer_are_removed(tmp_path, cases, models):
    """A writer killed mid-write leaves a hidden staging folder beside the case's (never a half-written case
    folder); the next attempt at that case removes it."""
    staging = tmp_path / ".a.partial-0badf00d"
    staging.mkdir()
    (staging / REPORT_JSON).write_text("{")
    outcomes = run_batch(Analyzer(models[0]), cases, tmp_path)
    assert [o.status for o in outcomes] == ["done", "done"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", SUMMARY_CSV]



def test_ctrl_c_before_any_case_finished_leaves_no_folder(tmp_path, cases, models, monkeypatch):
    """Interrupted before a case was written: the --out folder it created is not left behind (empty); one that was
    there before stays."""
    from CovidCTDiagnosisLib import batch

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(batch, "analyse_case", interrupted)
    for out in (tmp_path / "new", tmp_path):
        with pytest.raises(KeyboardInterrupt):
            run_batch(Analyzer(models[0]), cases, out)
    assert list(tmp_path.iterdir()) == []


def test_summary_has_the_models_class_columns_when_no_case_succeeded(tmp_path):
    """Scripts read summary.csv by column: the class columns are there even when every case failed."""
    import csv as csv_module

    from CovidCTDiagnosisLib.batch import Case, CaseOutcome, write_summary

    outcomes = [CaseOutcome(Case("c1", tmp_path / "c1.nrrd"), "failed", error="no lungs")]
    write_summary(outcomes, tmp_path / "summary.csv", ["COVID-19", "Non-COVID-19"])
    with open(tmp_path / "summary.csv", newline="") as f:
        reader = csv_module.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames[:7] == ["case_id", "path", "status", "label", "aggregation", "COVID-19", "Non-COVID-19"]
    assert rows[0]["status"] == "failed" and rows[0]["COVID-19"] == ""


def test_rerun_redoes_a_case_whose_input_changed(tmp_path, cases, models):
    """A finished folder is kept only for the input it was made from (report.json's input.path, symlinks
    resolved): a case id now naming another CT is analysed again, not reported with the other CT's result."""
    out = tmp_path / "out"
    run_batch(Analyzer(models[0]), cases, out, slices=3)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"case_id,path\na,{cases / 'b.mha'}\nb,{cases / 'b.mha'}\n")
    statuses = {o.case.case_id: o.status for o in run_batch(Analyzer(models[0]), manifest, out, slices=3)}
    assert statuses == {"a": "done", "b": "skipped"}
    assert json.loads((out / "a" / REPORT_JSON).read_text())["input"]["path"] == str((cases / "b.mha").resolve())
    link = tmp_path / "linked"
    link.mkdir()
    (link / "b.mha").symlink_to(cases / "b.mha")  # the same CT by another path: the same input
    assert [o.status for o in run_batch(Analyzer(models[0]), link, out, slices=3)] == ["skipped"]


@pytest.mark.parametrize("rows, message", [
    ("case_id,path\nx,{a}\nX,{b}\n", "have one case id"),  # one result folder for two CTs (ignoring case)
    ("case_id,path\n../escape,{a}\n", "not a plain folder name"),
    ("case_id,path\n.hidden,{a}\n", "not a plain folder name"),
    ("case_id,path\nsub/dir,{a}\n", "not a plain folder name"),
])
def test_manifest_case_ids_that_cannot_name_one_folder_each_are_refused(tmp_path, cases, models, rows, message, capsys):
    from CovidCTDiagnosisLib.cli import main

    manifest = tmp_path / "manifest.csv"
    manifest.write_text(rows.format(a=cases / "a.nrrd", b=cases / "b.mha"))
    code = main(["batch", str(manifest), "--out", str(tmp_path / "out"), "--model", models[0], "--quiet"])
    err = capsys.readouterr().err
    assert code == 3 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "escape").exists()


def test_folder_cases_of_one_name_and_empty_folders_are_refused(tmp_path, phantom, models, capsys):
    """case.nrrd and case.mha would both be case "case": refused before anything is read or written, as
    is a folder without cases (nothing to do is not success)."""
    from CovidCTDiagnosisLib.cli import main

    (tmp_path / "both").mkdir()
    both = phantom_cases(tmp_path / "both", phantom, ("case.nrrd", "case.mha"))
    code = main(["batch", str(both), "--out", str(tmp_path / "out"), "--model", models[0], "--quiet"])
    err = capsys.readouterr().err
    assert code == 3 and "case.mha" in err and "case.nrrd" in err and not (tmp_path / "out").exists()
    (tmp_path / "empty").mkdir()
    code = main(["batch", str(tmp_path / "empty"), "--out", str(tmp_path / "out"), "--model", models[0], "--quiet"])
    err = capsys.readouterr().err
    assert code == 3 and "no cases in" in err and not (tmp_path / "out").exists()
