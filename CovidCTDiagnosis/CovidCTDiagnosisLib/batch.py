"""Many cases in one run: one result folder per case and a summary CSV; bad cases are skipped.

A batch input is a folder (each DICOM sub-folder or volume file in it is a case) or a CSV
manifest with a `path` column (and optionally `case_id`). Each case's id names its result folder:
ids must be distinct (also ignoring case) and plain folder names. Cases whose folder is already
complete, analysed from the same input with the same options and model (report.json's `input.path`
and resume key), are not analysed again, so an interrupted batch can simply be re-run. The cases
run here one after the other, or on a Ray cluster (`ray_batch`); both analyse and write each case
through `analyse_case`.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

from . import dicom_export
from .errors import EXIT_CODES, CovidCTError, InputNotFoundError, OutputError, UnreadableInputError
from .outputs import check_writable, discard_leftovers, is_complete, read_report, write_csv_file, write_outputs
from .pipeline import Analyzer, analysis_options

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
    """Cases from a folder (sub-folders and volume files, sorted) or a manifest CSV.

    InputNotFoundError for a missing source; UnreadableInputError for a file that is not a manifest, a
    folder without cases, a case id that is not a plain folder name (empty, ".", "..", hidden, or with a
    path separator) and two cases of one id, ignoring case (their results would land in one folder).
    """
    source = Path(source)
    cases = _manifest_cases(source) if source.is_file() else _folder_cases(source)
    if not cases:
        raise UnreadableInputError(f"no cases in {source}: a case is a DICOM sub-folder or a volume file "
                                   f"({', '.join(VOLUME_SUFFIXES)})")
    seen: dict[str, Case] = {}
    for case in cases:
        name = case.case_id
        if not name or name in (".", "..") or name.startswith(".") or any(sep in name for sep in ("/", "\\")):
            raise UnreadableInputError(f"{source}: case id {name!r} of {case.path} is not a plain folder name "
                                       "(its result folder is named after it)")
        first = seen.setdefault(name.casefold(), case)
        if first is not case:
            raise UnreadableInputError(f"{source}: cases {first.path} and {case.path} have one case id {name!r} "
                                       "(their results would share a folder); rename one, or give case_id in a manifest")
    return cases


def _manifest_cases(source: Path) -> list[Case]:
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


def _folder_cases(source: Path) -> list[Case]:
    if not source.exists():
        raise InputNotFoundError(f"batch input not found: {source}")
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
    *,
    ray: str | None = None,
    workers: int | None = None,
    threads_per_worker: int | None = None,
    **analyze_options,
) -> list[CaseOutcome]:
    """Analyse every case into out_dir/<case_id>/ and write out_dir/summary.csv; the outcomes in case order.

    out_dir is checked before any case is read (OutputError). A case whose folder is complete and was
    analysed with the same options and model (`resume_key`) is skipped; any other is analysed again. A
    case that fails, for any reason but Ctrl-C, is recorded as failed and the batch carries on. With
    `dicom_out`, each case's analysis is also written as DICOM objects into dicom_out/<case_id>/
    (dicom_export.export_dicom; a case that is not a DICOM series fails; a finished case without them gets
    them, not analysed again).

    ray: None analyses the cases here, one after the other; a Ray address ("auto", "ray://host:port", or
    "local" to start a local cluster) analyses them on Ray workers (`ray_batch.run_on_ray`: `workers`
    actors, each with `threads_per_worker` torch threads; defaults in `ray_batch.plan_workers`).
    `progress(stage, fraction)` gets the whole batch's fraction; here stages are "<case_id> (<n>/<cases>):
    <stage>", on Ray "<d> done, <f> failed, <r> running of <n> cases; about <t> left". UsageError, before
    anything is analysed or written, when `ray` is given and Ray is not installed, the cluster cannot be
    reached or is too small for the workers asked for.
    """
    cases = find_cases(source)
    out_dir = check_writable(out_dir, result_folder=False)
    if dicom_out is not None:
        dicom_out = dicom_export.check_dicom_out(dicom_out, out_dir)
    key = resume_key(asdict(analyzer.model_info), analysis_options(**analyze_options))
    with _cluster(ray, analyzer, workers, threads_per_worker) as plan, _created(out_dir):  # before anything is written
        outcomes: list[CaseOutcome | None] = [None] * len(cases)

        def record(n: int, outcome: CaseOutcome) -> None:
            outcomes[n] = outcome
            if on_case is not None:
                on_case(outcome)

        todo = []
        for n, case in enumerate(cases):
            report = finished_report(out_dir / case.case_id, key, case.path)
            if report is None or (dicom_out is not None and not (Path(dicom_out) / case.case_id).is_dir()):
                todo.append(n)
            else:
                record(n, CaseOutcome(case, "skipped", report))
        if ray is None:
            for n in todo:
                case_progress = None if progress is None else _case_progress(progress, cases[n].case_id, n, len(cases))
                record(n, analyse_case(analyzer, cases[n], out_dir, dicom_out, key, progress=case_progress,
                                       **analyze_options))
        else:
            from .ray_batch import run_on_ray

            for i, outcome in run_on_ray(analyzer, [cases[n] for n in todo], out_dir, dicom_out, key, plan, progress,
                                         **analyze_options):
                record(todo[i], outcome)
        write_summary(outcomes, out_dir / SUMMARY_CSV, analyzer.model_info.classes)
    return outcomes


@contextmanager
def _created(out_dir: Path) -> Iterator[None]:
    """out_dir created (OutputError if it cannot be) for the block; removed again if the block ends in an error
    (Ctrl-C before any case finished) while it is still empty and was not there before."""
    existed = out_dir.is_dir()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {out_dir}: {exc.strerror or exc}") from exc
    try:
        yield
    except BaseException:
        if not existed and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise


def _cluster(ray: str | None, analyzer: Analyzer, workers: int | None, threads_per_worker: int | None):
    """The Ray connection and workers' plan for a batch on `ray` (`ray_batch.cluster`); nothing for a plain batch."""
    if ray is None:
        return nullcontext()
    from .ray_batch import cluster

    return cluster(ray, analyzer, workers, threads_per_worker)


def analyse_case(analyzer: Analyzer, case: Case, out_dir: Path, dicom_out: Path | None, key: dict, progress=None,
                 **analyze_options) -> CaseOutcome:
    """Analyse one case and write its result folder out_dir/<case_id> atomically (`outputs.write_outputs`), and
    with `dicom_out` its DICOM objects into dicom_out/<case_id>: the one path of the plain batch and of each
    Ray worker. A result folder finished with `key` (`resume_key`) is not analysed again (only its DICOM
    objects were missing). Leftovers of an attempt that was killed while writing (of both folders) are removed
    first. Any error but Ctrl-C becomes a "failed" outcome with a one-line error."""
    target = out_dir / case.case_id
    discard_case_leftovers(case, out_dir, dicom_out)
    try:
        if dicom_out is not None:
            dicom_export.check_series_input(case.path)
        report = finished_report(target, key, case.path)
        if report is None:
            result = analyzer.analyze(case.path, progress=progress, **analyze_options)
            if dicom_out is not None:  # before anything is written
                dicom_export.check_export_source(case.path, result.input.series_uid)
            write_outputs(result, result.ct, target)
            report = result.to_report()
            del result  # the export reads the result folder: the analysis's volumes are not needed beside it
        if dicom_out is not None:
            dicom_export.export_dicom(target, case.path, Path(dicom_out) / case.case_id)
        return CaseOutcome(case, "done", report)
    except CovidCTError as exc:
        return CaseOutcome(case, "failed", error=str(exc))
    except Exception as exc:  # a bug on one input must not stop the others (it is in summary.csv)
        detail = " ".join(str(exc).split())
        return CaseOutcome(case, "failed", error=f"{EXIT_CODES[1]}: {type(exc).__name__}{': ' + detail if detail else ''}")


def discard_case_leftovers(case: Case, out_dir: Path, dicom_out: Path | None) -> None:
    """Remove what a writer of the case killed mid-write left beside its result folder and, with `dicom_out`,
    its DICOM folder (`outputs.discard_leftovers`); only while no worker is writing the case."""
    discard_leftovers(out_dir / case.case_id)
    if dicom_out is not None:
        discard_leftovers(Path(dicom_out) / case.case_id)


def resume_key(model: dict, options: dict) -> dict:
    """What a finished case must have been analysed with to be skipped on a re-run: the analysis options
    (report.json's `options`, `pipeline.analysis_options`) and the model's SHA-256 (each member's for an
    ensemble; the name for the built-in untrained network, which has no file). `model` is report.json's
    `model` or `asdict(ModelInfo)`."""
    return {"options": options, "models": [m.get("sha256") or m.get("name") for m in (model.get("members") or [model])]}


def finished_report(target: Path, key: dict, source: Path) -> dict | None:
    """The report of a complete result folder analysed from `source` with `key` (`resume_key`); None if the
    case must be analysed (again): no folder, an incomplete one, or one of another input (report.json's
    `input.path`, which is resolved: symlinks followed), other options or another model (reports of schema
    < 1.4 record no options)."""
    if not is_complete(target):
        return None
    report = read_report(target)
    same_input = report.get("input", {}).get("path") == str(Path(source).resolve())
    return report if same_input and resume_key(report["model"], report.get("options")) == key else None


def _case_progress(progress: Callable[[str, float], None], case_id: str, n: int, total: int):
    def report(stage: str, fraction: float) -> None:
        progress(f"{case_id} ({n + 1}/{total}): {stage}", (n + fraction) / total)

    return report


def write_summary(outcomes: list[CaseOutcome], path: Path, classes: Sequence[str] = ()) -> None:
    """One row per case: status, patient label and class probabilities, the measured involvement (% of both
    lungs, ground-glass + consolidation) and the 6-zone CT severity score (0-30), or the error. `classes`: the
    model's, so that the columns are the same when no case succeeded (others found in the reports are added)."""
    classes = list(classes)
    for o in outcomes:
        for c in (o.report or {}).get("model", {}).get("classes", []):
            if c not in classes:
                classes.append(c)
    fields = ["case_id", "path", "status", "label", "aggregation", *classes, "involved_percent", "severity_score",
              "trained_model", "result_folder", "error"]
    write_csv_file(path, fields, ([row.get(f, "") for f in fields] for row in (_summary_row(o, path.parent) for o in outcomes)))


def _summary_row(o: CaseOutcome, out_dir: Path) -> dict:
    row = {"case_id": o.case.case_id, "path": str(o.case.path), "status": o.status, "error": o.error}
    if o.report:
        patient = o.report["patient"]
        row.update(label=patient["label"], aggregation=patient["aggregation"], trained_model=o.report["model"]["trained"])
        row.update({c: f"{p:.4f}" for c, p in patient["probabilities"].items()})
        row["result_folder"] = str(out_dir / o.case.case_id)
        severity = o.report.get("severity")  # absent in reports of schema < 1.3
        if severity:
            row.update(involved_percent=f"{severity['lungs']['both']['involved_percent']:.2f}", severity_score=severity["score"])
    return row
