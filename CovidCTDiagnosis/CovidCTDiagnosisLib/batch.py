"""Many cases in one run: one result folder per case and a summary CSV; bad cases are skipped.

A batch input is a folder (each DICOM sub-folder or volume file in it is a case) or a CSV
manifest with a `path` column (and optionally `case_id`). Cases whose folder is already complete
are not analysed again, so an interrupted batch can simply be re-run.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import dicom_export
from .errors import EXIT_CODES, CovidCTError, InputNotFoundError, OutputError
from .outputs import check_writable, is_complete, read_report, write_outputs
from .pipeline import Analyzer

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".zip")  # .zip: a zipped DICOM folder
SUMMARY_CSV = "summary.csv"


@dataclass
class Case:
    case_id: str
    path: Path


@dataclass
class CaseOutcome:
    case: Case
    status: str  # "done", "skipped" (already complete) or "failed"
    report: dict | None = None
    error: str = ""


def _case_id(path: Path) -> str:
    name = path.name
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def find_cases(source) -> list[Case]:
    """Cases from a folder (sub-folders and volume files, sorted) or a manifest CSV."""
    source = Path(source)
    if not source.exists():
        raise InputNotFoundError(f"batch input not found: {source}")
    if source.is_file():
        with open(source, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows or "path" not in rows[0]:
            raise InputNotFoundError(f"{source} is not a manifest: it needs a 'path' column")
        cases = []
        for row in rows:
            path = Path(row["path"])
            path = path if path.is_absolute() else source.parent.absolute() / path
            cases.append(Case(row.get("case_id") or _case_id(path), path))
        return cases
    return [
        Case(_case_id(p), p)
        for p in sorted(source.absolute().iterdir())
        if not p.name.startswith(".") and (p.is_dir() or p.name.lower().endswith(VOLUME_SUFFIXES))
    ]


def run_batch(
    analyzer: Analyzer,
    source,
    out_dir,
    on_case: Callable[[CaseOutcome], None] | None = None,
    progress: Callable[[str, float], None] | None = None,
    dicom_out=None,
    **analyze_options,
) -> list[CaseOutcome]:
    """Analyse every case into out_dir/<case_id>/ and write out_dir/summary.csv.

    out_dir is checked before any case is read (OutputError). A case that fails, for any reason
    but Ctrl-C, is recorded as failed and the batch carries on. `progress(stage, fraction)` gets
    the whole batch's fraction and stages named "<case_id> (<n>/<cases>): <stage>". With `dicom_out`, each
    case's analysis is also written as DICOM objects into dicom_out/<case_id>/ (dicom_export.export_dicom; a case
    that is not a DICOM series fails; a finished case without them gets them, not analysed again).
    """
    cases = find_cases(source)
    out_dir = check_writable(out_dir, result_folder=False)
    if dicom_out is not None:
        dicom_out = dicom_export.check_dicom_out(dicom_out, out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {out_dir}: {exc.strerror or exc}") from exc
    outcomes = []
    for n, case in enumerate(cases):
        target = out_dir / case.case_id
        dicom_target = None if dicom_out is None else Path(dicom_out) / case.case_id
        if is_complete(target) and (dicom_target is None or dicom_target.is_dir()):
            outcome = CaseOutcome(case, "skipped", read_report(target))
        else:
            case_progress = None if progress is None else _case_progress(progress, case.case_id, n, len(cases))
            try:
                if dicom_target is not None:
                    dicom_export.check_series_input(case.path)
                if is_complete(target):  # only its DICOM objects are missing
                    report = read_report(target)
                else:
                    result = analyzer.analyze(case.path, progress=case_progress, **analyze_options)
                    write_outputs(result, result.ct, target)
                    report = result.to_report()
                if dicom_target is not None:
                    dicom_export.export_dicom(target, case.path, dicom_target)
                outcome = CaseOutcome(case, "done", report)
            except CovidCTError as exc:
                outcome = CaseOutcome(case, "failed", error=str(exc))
            except Exception as exc:  # a bug on one input must not stop the others (it is in summary.csv)
                detail = " ".join(str(exc).split())
                outcome = CaseOutcome(case, "failed", error=f"{EXIT_CODES[1]}: {type(exc).__name__}{': ' + detail if detail else ''}")
        outcomes.append(outcome)
        if on_case is not None:
            on_case(outcome)
    write_summary(outcomes, out_dir / SUMMARY_CSV)
    return outcomes


def _case_progress(progress: Callable[[str, float], None], case_id: str, n: int, total: int):
    def report(stage: str, fraction: float) -> None:
        progress(f"{case_id} ({n + 1}/{total}): {stage}", (n + fraction) / total)

    return report


def write_summary(outcomes: list[CaseOutcome], path: Path) -> None:
    """One row per case: status, patient label and class probabilities, the measured involvement (% of both
    lungs, ground-glass + consolidation) and the 6-zone CT severity score (0-30), or the error."""
    classes: list[str] = []
    for o in outcomes:
        for c in (o.report or {}).get("model", {}).get("classes", []):
            if c not in classes:
                classes.append(c)
    fields = ["case_id", "path", "status", "label", "aggregation", *classes, "involved_percent", "severity_score",
              "trained_model", "result_folder", "error"]
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        _write_rows(tmp, fields, outcomes, path.parent)
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc


def _write_rows(tmp: Path, fields: list[str], outcomes: list[CaseOutcome], out_dir: Path) -> None:
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for o in outcomes:
            row = {"case_id": o.case.case_id, "path": str(o.case.path), "status": o.status, "error": o.error}
            if o.report:
                patient = o.report["patient"]
                row.update(label=patient["label"], aggregation=patient["aggregation"], trained_model=o.report["model"]["trained"])
                row.update({c: f"{p:.4f}" for c, p in patient["probabilities"].items()})
                row["result_folder"] = str(out_dir / o.case.case_id)
                severity = o.report.get("severity")  # absent in reports of schema < 1.3
                if severity:
                    row.update(involved_percent=f"{severity['lungs']['both']['involved_percent']:.2f}", severity_score=severity["score"])
            writer.writerow(row)
