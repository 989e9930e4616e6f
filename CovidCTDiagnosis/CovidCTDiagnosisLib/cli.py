"""`covidct`: the command line of the CovidCT engine.

Errors in the input, model or output folder print one line on stderr and exit with the code
listed by `covidct --help`; nothing is left half-written. Each command imports what it needs
when it runs: building the parser loads neither torch nor the training package, which only
`train`, `evaluate` and `compare` import (it needs scikit-learn, which Slicer's Python lacks).
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

try:  # Ctrl-C while Python is still starting: one line and 130, not an import traceback
    import argparse
    import re
    import time
    from pathlib import Path

    from .errors import (BATCH_CASES_FAILED, EXIT_CODES, INTERRUPTED, TERMINATED, CovidCTError, NoLungsError, OutputError,
                         Terminated, UsageError)
except KeyboardInterrupt:
    sys.stderr.write("covidct: interrupted\n")
    raise SystemExit(130) from None

PROG = "covidct"
PROGRESS_PREFIX = "PROGRESS "  # `--progress lines`: "PROGRESS <fraction> <stage>" (read by slicer_runtime)
ERROR_PREFIX = f"{PROG}: error: "
DEMO_OUT = "covidct-demo"
# sub-command -> (help, its argument builder and runner in training/commands.py)
TRAINING_COMMANDS = {
    "train": ("train or fine-tune a DRENet model on labelled slices", "add_train_arguments", "run_train"),
    "evaluate": ("evaluate model(s) on a labelled set or a saved test split", "add_evaluate_arguments", "run_evaluate"),
    "compare": ("the paper's Table 1: DRENet against plain classifiers on one patient split", "add_compare_arguments",
                "run_compare"),
}

DESCRIPTION = """\
COVID-19 diagnosis assistant for chest CT (DRENet, Song et al. 2021). Research use only.

Typical use:
  covidct analyze path/to/dicom_folder --out results/case1
  covidct analyze dicom_folder --out results/case1 --dicom-out dicom/case1   (+ DICOM objects for the PACS)
  covidct batch cases/ --out results/          (one folder per case + summary.csv)
  covidct score-images slice1.png slice2.jpg --out scores.csv
  covidct demo                                 (synthetic phantom, no data needed)
  covidct send dicom_results/ --to PACS@pacs.hospital:104   (DICOM files to a PACS)
Each result folder opens in 3D Slicer by drag and drop: lungs.seg.nrrd (lungs and lesion
boxes), gradcam.nrrd (heat map), lesions.mrk.json (boxes as ROIs); report.html is for reading.
"""


class _OneLineErrors:
    """argparse's errors as one line, like every other error: `covidct: error: <command>: <message>`, exit 2."""

    def error(self, message: str):
        command = self.prog[len(PROG):].strip()
        where = f"{command}: " if command else ""
        self.exit(UsageError.exit_code, f"{ERROR_PREFIX}{where}{message} (see `{self.prog} --help`)\n")


class _Parser(_OneLineErrors, argparse.ArgumentParser):
    pass


def _exit_code_help() -> str:
    return "exit codes:\n" + "\n".join(f"  {code:>3}  {text}" for code, text in sorted(EXIT_CODES.items()))


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="FILE", nargs="+", help="DRENet model file (default: the bundled reference model); "
                   "several files form an ensemble (slice probabilities averaged); "
                   "'untrained' runs an untrained network, for testing only")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where the network runs (default: auto)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or summaries")
    p.add_argument("--threads", type=_positive_int, metavar="N",
                   help="CPU threads for the parallel work (PyTorch, OpenCV, SimpleITK, the DICOM reader, lung extraction; "
                        "default and at most: all this process may run on), e.g. to run several analyses side by side "
                        "(see README, Speed); batch --ray: use --threads-per-worker")


def _add_analysis_options(p: argparse.ArgumentParser) -> None:
    _add_model_options(p)
    p.add_argument("--slices", default="15", metavar="15|all|N",
                   help="axial slices to analyse: 15 equidistant over the lungs (the paper's), N, or 'all' lung slices")
    p.add_argument("--aggregate", default="mean", metavar="mean",
                   help="patient-level score: the mean of the slice probabilities (the paper's; the only method, "
                        "Noisy-OR was removed)")
    p.add_argument("--series", metavar="UID", help="DICOM SeriesInstanceUID to read when a folder holds several series")
    p.add_argument("--progress", choices=("bar", "lines", "none"), default="bar",
                   help="progress on stderr as a bar, or 'lines' on stdout as 'PROGRESS <fraction> <stage>' (for other programs)")


def _add_ray_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ray", metavar="ADDRESS", help="analyse the cases on a Ray cluster: 'auto' or 'ray://host:port' (a running "
                   "one, see docs/ray.md), or 'local' to start one on this machine; needs the extra: "
                   "pip install 'covidct-diagnosis[ray]'")
    p.add_argument("--workers", type=_positive_int, metavar="N", help="with --ray: number of workers, each loads the model "
                   "once (default: one per GPU, else one per two CPU cores)")
    p.add_argument("--threads-per-worker", type=_positive_int, metavar="N",
                   help="with --ray: CPU threads (PyTorch, OpenCV, reading, lung extraction; and CPUs reserved) per worker (default: the cluster's CPUs / workers)")


def _positive_int(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, not {value!r}")
    return int(value)


class _CommandParser(_OneLineErrors, argparse.ArgumentParser):
    """A sub-command's parser; with `add_arguments` (a name in training/commands.py), its options are
    added, and the training package imported, only when that sub-command is parsed."""

    def __init__(self, *args, add_arguments: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._add_arguments = add_arguments

    def parse_known_args(self, args=None, namespace=None):
        if self._add_arguments:
            from .training import commands

            getattr(commands, self._add_arguments)(self)
            self._add_arguments = None
        return super().parse_known_args(args, namespace)


def build_parser() -> argparse.ArgumentParser:
    from .dicom_send import DEFAULT_CALLING_AET  # a constant: pydicom and pynetdicom are imported by a send

    parser = _Parser(prog=PROG, description=DESCRIPTION, epilog=_exit_code_help(),
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_CommandParser)

    p = sub.add_parser("analyze", help="analyse one chest CT volume", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Analyse one chest CT: a DICOM series folder, or a .nii/.nii.gz/.nrrd/.mha file.",
                       epilog=_exit_code_help())
    p.add_argument("input", help="DICOM folder or volume file")
    p.add_argument("--out", required=True, metavar="DIR", help="result folder (replaced atomically if it exists)")
    p.add_argument("--dicom-out", metavar="DDIR", help="also write the analysis as DICOM objects in the source study "
                   "(SEG, Parametric Map, Secondary Captures, SR, PDF; DICOM input only) into DDIR (replaced atomically)")
    _add_analysis_options(p)

    p = sub.add_parser("batch", help="analyse many cases: one result folder each and summary.csv",
                       description="Analyse every case in a folder (DICOM sub-folders and volume files) or listed in a CSV "
                                   "manifest with a 'path' column (optional 'case_id'). Bad cases are reported and skipped; "
                                   "re-running skips cases already finished with the same options and model (both recorded "
                                   "in each report.json) and redoes the others; --ray runs the cases on Ray workers. "
                                   "OUT/summary.csv: one row per case (status "
                                   "done/skipped/failed, label, probabilities, result_folder, error). Exit code 9 when "
                                   "some or all cases failed.", epilog=_exit_code_help(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", metavar="DIR_OR_MANIFEST")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--dicom-out", metavar="DDIR", help="also write each case's analysis as DICOM objects into DDIR/<case_id> "
                   "(see `analyze --dicom-out`; a case that is not a DICOM series fails)")
    _add_analysis_options(p)
    _add_ray_options(p)

    p = sub.add_parser("score-images", help="class probabilities of 2-D slice images (PNG/JPG/DICOM)",
                       description="Score single axial slices (already in a lung window if PNG/JPG), or every slice image "
                                   "in a folder. Writes a CSV: path, one probability column per class, and a note. An image without "
                                   "lungs (a scan's first and last slices) is not scored: its row has no probabilities and "
                                   "the note says why; when no image has lungs, nothing is written (exit 5).", epilog=_exit_code_help(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER")
    p.add_argument("--out", required=True, metavar="CSV")
    _add_model_options(p)

    p = sub.add_parser("demo", help="build a synthetic chest phantom, analyse it and write the report (offline)",
                       description="Build a synthetic chest CT phantom (body, ribs, lungs, vessels, ground-glass lesions at "
                                   "known places), save it as OUT/input/phantom-ct.nrrd, analyse it into OUT/result.",
                       epilog=_exit_code_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=DEMO_OUT, metavar="DIR", help=f"demo folder (default: ./{DEMO_OUT})")
    _add_model_options(p)

    p = sub.add_parser("send", help="send DICOM files (e.g. --dicom-out's) to a PACS (C-STORE or DICOMweb STOW-RS)",
                       description="Store every DICOM file in DDIR (searched recursively) on a PACS or other DICOM node, "
                                   "in one association (or over DICOMweb). Succeeds only when every file was stored; otherwise one line "
                                   "says how many of how many were, and the exit code is 10.",
                       epilog=_exit_code_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", metavar="DDIR", help="a folder of DICOM files (or one file)")
    p.add_argument("--to", required=True, metavar="AET@HOST:PORT|URL",
                   help="the PACS: its AE title, host and DICOM port for C-STORE, e.g. ORTHANC@127.0.0.1:4242; or the "
                        "http(s) URL of its DICOMweb service for STOW-RS, e.g. http://127.0.0.1:8042/dicom-web")
    p.add_argument("--aet", default=DEFAULT_CALLING_AET, metavar="AET",
                   help=f"our (calling) AE title for C-STORE (default: {DEFAULT_CALLING_AET})")
    p.add_argument("--quiet", action="store_true", help="no summary line")

    p = sub.add_parser("follow-up", help="the change in measured lung involvement from a baseline CT to a follow-up CT",
                       description="Compare two result folders of one patient's CTs (a baseline and a follow-up): the "
                                   "involved share (percentage points), ground-glass and consolidation volumes (mL) and "
                                   "scores per zone, per lung and for both lungs (the 6-zone CT severity score), all "
                                   "measured from HU. Prints one summary line and any reason the volumes are less "
                                   "comparable; --out writes the table.",
                       epilog=_exit_code_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("baseline", metavar="BASELINE_DIR", help="result folder of the earlier CT")
    p.add_argument("followup", metavar="FOLLOWUP_DIR", help="result folder of the later CT")
    p.add_argument("--out", metavar="CSV", help="write the change per zone, lung and both lungs here")

    for name, (text, add_arguments, _run) in TRAINING_COMMANDS.items():
        sub.add_parser(name, help=text, add_arguments=add_arguments)
    return parser


class _Progress:
    """Stage progress as a tqdm bar on stderr when it is a terminal (drawn from the first report on, so an error
    before any work stays one line; a log file or pipe gets no bar frames), machine-readable lines on stdout, or
    nothing."""

    def __init__(self, mode: str, label: str = ""):
        self.mode, self.label, self.bar = mode, label, None

    def __call__(self, stage: str, fraction: float) -> None:
        if self.mode == "bar":
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=100, desc=self.label, unit="%", file=sys.stderr, leave=False, disable=None,
                                bar_format="{desc} {percentage:3.0f}%|{bar}| {postfix}")
            self.bar.set_postfix_str(stage)
            self.bar.update(round(fraction * 100) - self.bar.n)
        elif self.mode == "lines":
            try:
                print(f"{PROGRESS_PREFIX}{fraction:.3f} {stage}", flush=True)
            except BrokenPipeError:  # the reader went away (`| head -1`): the analysis goes on without progress lines
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                self.mode = "none"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _analyzer(args):
    from .pipeline import Analyzer

    return Analyzer(_model_spec(args), args.device)


def _load_model_while_reading(args, progress):
    """(Analyzer, preparation.LungCT): the CT is read and its lungs found in a child process
    (`forked`: SimpleITK holds the GIL; lung extraction needs no torch) while this process loads the
    model (imports torch) in a worker thread. Errors come as if the model had been loaded first: a
    bad model file or device before a bad input. On any exit the child is stopped; the worker is
    waited for, except after Ctrl-C: an import cannot be interrupted (torch's takes seconds), and
    the worker thread is joined when Python exits (`run` ends the process at once)."""
    from concurrent.futures import ThreadPoolExecutor

    from .forked import ForkedCall
    from .preparation import FIND_LUNGS_PROGRESS, find_ct_lungs  # before the worker starts: its imports are then all torch's and the model's

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="covidct-model")
    interrupted = False
    try:
        with ForkedCall(find_ct_lungs, args.input, args.series) as finding:
            loading = pool.submit(_analyzer, args)
            try:
                found = finding.result()
            except CovidCTError:
                loading.result()
                raise
            for stage in found.timings:  # done in the child
                progress(stage, FIND_LUNGS_PROGRESS[stage])
            return loading.result(), found
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        pool.shutdown(wait=not interrupted, cancel_futures=True)


def _model_spec(args):
    """None (bundled model), one model, or a list (an ensemble)."""
    if args.model is None or len(args.model) > 1:
        return args.model
    return args.model[0]


def _slices(value: str):
    if value == "all":
        return "all"
    if not value.isdigit() or int(value) < 1:
        raise UsageError(f"--slices must be 'all' or a positive number, not {value!r}")
    return int(value)


def _check_series(args) -> None:
    """--series picks one series of a DICOM folder (or of a DICOMDIR's, or a zipped one); for a volume file it would
    be silently ignored."""
    from .volume_io import is_dicom_series_input

    if args.series is not None and Path(args.input).is_file() and not is_dicom_series_input(args.input):
        raise UsageError(f"--series picks a series of a DICOM folder; {args.input} is a file (leave --series out)")


def _analysis_options(args) -> tuple:
    """(slices, aggregate) after the usage checks, and the output folder checked: all before any work."""
    from .outputs import check_writable

    slices, aggregate = _slices(args.slices), _aggregate(args.aggregate)
    _check_series(args)
    check_writable(args.out, result_folder=args.command == "analyze")
    if args.dicom_out is not None:
        from .dicom_export import check_dicom_out

        check_dicom_out(args.dicom_out, args.out, source=args.input if args.command == "analyze" else None)
    return slices, aggregate


def _check_ray_options(args) -> None:
    """--workers and --threads-per-worker need --ray; --ray needs Ray installed (UsageError naming the extra)."""
    if args.ray is None:
        if args.workers or args.threads_per_worker:
            raise UsageError("--workers and --threads-per-worker need --ray")
        return
    from .ray_batch import require_ray

    require_ray()


def _aggregate(value: str) -> str:
    from .aggregation import check_method

    try:
        check_method(value)
    except ValueError as exc:
        raise UsageError(f"--aggregate {value}: {exc}") from exc
    return value


def _trust_line(model) -> str:
    """How far to trust the labels of a trained model (a ModelInfo), as a second line; empty for an untrained one."""
    from .performance import performance_line

    return f"\ntrust: {performance_line(model.performance)}" if model.trained else ""


def _summary_line(report: dict) -> str:
    probs = ", ".join(f"{c} {p:.2f}" for c, p in report["patient"]["probabilities"].items())
    if not report["model"]["trained"]:
        return f"UNTRAINED network, not a diagnosis ({probs})"
    return f"{report['patient']['label']} ({probs}; {report['patient']['aggregation']} of {len(report['slices'])} slices)"


def cmd_analyze(args) -> int:
    import gc
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    from .html_report import import_figure_modules
    from .outputs import discard_leftovers, write_outputs
    from .result import UNTRAINED_WARNING

    slices, aggregate = _analysis_options(args)
    progress = _Progress("none" if args.quiet and args.progress == "bar" else args.progress, Path(args.input).name)
    try:
        analyzer, found = _load_model_while_reading(args, progress)
        if args.dicom_out is not None:  # before the analysis: the export could not hold a larger series, nor this one
            from .dicom_export import check_export_size, check_export_source

            check_export_size(found.ct.loaded.image.GetSize(), args.input)
            check_export_source(args.input, found.ct.loaded.info.series_uid)
        # what lives now (torch, the model, the CT) lives to the end: frozen, no later collection walks it again
        # (a collection of torch's 200 000 objects costs about 0.1 s on 2 cores; the process ends without one: `run`)
        gc.freeze()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="covidct-figures") as pool:
            pool.submit(import_figure_modules)  # the report's figure needs them; the analysis runs mostly in C meanwhile
            result = analyzer.analyze(found, slices=slices, aggregate=aggregate, progress=progress)
    finally:
        progress.close()
    for folder in (args.out, args.dicom_out):  # what an earlier run killed mid-write left (`kill -9`, Slicer's Cancel)
        if folder is not None:
            discard_leftovers(folder)
    out = write_outputs(result, result.ct, args.out)
    summary = f"{Path(args.input).name}: {_summary_line(result.to_report())}{_trust_line(result.model)}\nresults in {out}"
    warnings = [w for w in result.warnings if w != UNTRAINED_WARNING]  # the summary line says that one already
    dicom = ""
    if args.dicom_out is not None:
        from .dicom_export import export_dicom
        from .memory import release_free_memory

        del result, found  # the export reads the result folder: the analysis's volumes are not needed beside it
        release_free_memory()
        try:
            dicom = f"\nDICOM objects ({len(export_dicom(out, args.input, args.dicom_out))}) in {Path(args.dicom_out).resolve()}"
        except BaseException:  # the command failed or was interrupted: no result folder without its DICOM objects
            shutil.rmtree(out, ignore_errors=True)
            raise
    if not args.quiet:
        print(summary + dicom, file=sys.stderr)
        for warning in warnings:
            print(f"warning: {warning}", file=sys.stderr)
    return 0


def cmd_batch(args) -> int:
    from .batch import SUMMARY_CSV, find_cases, run_batch
    from .result import UNTRAINED_WARNING

    slices, aggregate = _analysis_options(args)
    _check_ray_options(args)
    find_cases(args.input)  # a missing input or bad manifest before the model is loaded
    analyzer = _analyzer(args)

    def report(outcome):
        if args.quiet:
            return
        detail = outcome.error if outcome.status == "failed" else _summary_line(outcome.report)
        print(f"{outcome.case.case_id}: {outcome.status}: {detail}", file=sys.stderr)
        for warning in (outcome.report or {}).get("warnings", []) if outcome.status == "done" else []:
            if warning != UNTRAINED_WARNING:
                print(f"  warning: {warning}", file=sys.stderr)

    mode = "none" if args.quiet and args.progress == "bar" else args.progress
    # a bar only on Ray (cases done / failed / running, time left); the plain batch prints a line per case
    progress = _Progress(mode, "batch") if mode == "lines" or (args.ray and mode == "bar") else None
    try:
        outcomes = run_batch(analyzer, args.input, args.out, on_case=report, slices=slices, aggregate=aggregate,
                             series_uid=args.series, progress=progress, dicom_out=args.dicom_out, ray=args.ray,
                             workers=args.workers, threads_per_worker=args.threads_per_worker)
    finally:
        if progress is not None:
            progress.close()
    failed = sum(o.status == "failed" for o in outcomes)
    if not args.quiet:
        print(f"{len(outcomes)} cases, {failed} failed; summary in {Path(args.out) / SUMMARY_CSV}"
              f"{_trust_line(analyzer.model_info)}", file=sys.stderr)
    if failed:
        print(f"{ERROR_PREFIX}{failed} of {len(outcomes)} cases failed (see {Path(args.out) / SUMMARY_CSV})", file=sys.stderr)
        return BATCH_CASES_FAILED
    return 0


def _natural_order(name: str) -> list:
    """Sort key of a file name with its runs of digits as numbers: slice_2 before slice_10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _slice_images(paths: list[str]) -> list[str]:
    """The paths given, each folder replaced by its slice images (in natural order of their names: slice_2 before
    slice_10), as batch takes folders: PNG, JPEG, BMP and DICOM files by their names, and DICOM files named
    otherwise (as a PACS exports them: a UID, or no extension) by their content (`volume_io.is_dicom_file`)."""
    from .errors import UnreadableInputError
    from .volume_io import DICOM_SUFFIXES, IMAGE_FORMATS, is_dicom_file

    images = []
    for path in paths:
        folder = Path(path)
        if not folder.is_dir():
            images.append(path)
            continue
        found = sorted((str(p) for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                        and (p.name.lower().endswith(tuple(IMAGE_FORMATS)) or is_dicom_file(p))), key=_natural_order)
        if not found:
            raise UnreadableInputError(f"cannot read {folder}: no slice images in this folder (PNG, JPEG, BMP or DICOM "
                                       f"files: named {', '.join(('*' + s for s in (*IMAGE_FORMATS, *DICOM_SUFFIXES)))}, "
                                       "or DICOM files of any name)")
        images += found
    return images


def cmd_score_images(args) -> int:
    from .outputs import check_csv_target, write_csv_file
    from .pipeline import score_images
    from .result import PROBABILITY_DECIMALS, UNTRAINED_NOTE

    check_csv_target(args.out)
    images = _slice_images(args.images)
    analyzer = _analyzer(args)
    rows = score_images(analyzer, images)
    classes = analyzer.config.classes
    scored_note = "" if analyzer.model_info.trained else UNTRAINED_NOTE  # the file says it too, not only stderr
    write_csv_file(args.out, ["path", *classes, "note"], (
        [path, *[""] * len(classes), str(probs)] if isinstance(probs, NoLungsError)
        else [path, *(f"{probs[c]:.{PROBABILITY_DECIMALS}f}" for c in classes), scored_note]
        for path, probs in zip(images, rows)
    ))
    refused = sum(isinstance(probs, NoLungsError) for probs in rows)
    if refused and not args.quiet:
        print(f"warning: {refused} of {len(rows)} images have no lungs and were not scored (their rows in {args.out} "
              "have no probabilities; the note says why)", file=sys.stderr)
    if not analyzer.model_info.trained and not args.quiet:
        print("warning: UNTRAINED network: these probabilities are meaningless", file=sys.stderr)
    return 0


def cmd_demo(args) -> int:
    import SimpleITK as sitk

    from .outputs import check_writable, write_outputs
    from .phantom import make_demo_phantom
    from .pipeline import Analyzer

    out = Path(args.out)
    check_writable(out, result_folder=False)
    analyzer = Analyzer(_model_spec(args), args.device)
    phantom = make_demo_phantom()
    ct_path = out / "input" / "phantom-ct.nrrd"
    try:
        ct_path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(phantom.image, str(ct_path), True)
    except (OSError, RuntimeError) as exc:
        raise OutputError(f"cannot write {ct_path}: {exc}") from exc
    progress = _Progress("none" if args.quiet else "bar", "phantom")
    start = time.perf_counter()
    try:
        result = analyzer.analyze(ct_path, progress=progress)
    finally:
        progress.close()
    result_dir = write_outputs(result, result.ct, out / "result")
    if not args.quiet:
        lesions = "; ".join(f"{l.lung} lung at LPS ({', '.join(f'{v:.0f}' for v in l.center_lps)}) mm" for l in phantom.lesions)
        print(f"phantom with lesions: {lesions}\n{_summary_line(result.to_report())}{_trust_line(result.model)}\n"
              f"analysed in {time.perf_counter() - start:.1f} s; open {result_dir / 'report.html'}, or drag "
              f"{ct_path} and the files in {result_dir} into 3D Slicer", file=sys.stderr)
    return 0


def cmd_send(args) -> int:
    from .dicom_send import parse_destination, send_dicom

    destination = parse_destination(args.to)
    stored = send_dicom(args.folder, destination, calling_aet=args.aet)
    if not args.quiet:
        print(f"{destination}: {stored} of {stored} DICOM files stored", file=sys.stderr)
    return 0


def cmd_follow_up(args) -> int:
    from .followup import compare_involvement, read_analysis
    from .outputs import check_csv_target

    if args.out:
        check_csv_target(args.out)
    change = compare_involvement(read_analysis(args.baseline), read_analysis(args.followup))
    print(change.summary())
    for note in change.notes:
        print(f"note: {note}", file=sys.stderr)
    if args.out:
        change.write_csv(args.out)
    return 0


COMMANDS = {"analyze": cmd_analyze, "batch": cmd_batch, "score-images": cmd_score_images, "demo": cmd_demo,
            "send": cmd_send, "follow-up": cmd_follow_up}


def _limit_threads(args) -> None:
    """--threads: the process's CPU threads, set before anything is read or torch is imported (`cpu_threads`)."""
    if getattr(args, "threads", None) is None:
        return
    if getattr(args, "ray", None):
        raise UsageError("--threads limits this process; on Ray use --threads-per-worker")
    from .cpu_threads import limit_threads

    limit_threads(args.threads)


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)  # parsing `train` imports torch: Ctrl-C may come here too
        if args.command in COMMANDS:  # the training commands set their own threads
            _limit_threads(args)
            return COMMANDS[args.command](args)
        from .training import commands

        return getattr(commands, TRAINING_COMMANDS[args.command][2])(args)
    except CovidCTError as exc:
        print(f"{ERROR_PREFIX}{exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        print(f"{PROG}: {'terminated' if isinstance(exc, Terminated) else 'interrupted'}", file=sys.stderr)
        return TERMINATED if isinstance(exc, Terminated) else INTERRUPTED


def _terminate(signum, frame) -> NoReturn:
    raise Terminated


def run() -> NoReturn:
    """The `covidct` command (and `python -m CovidCTDiagnosisLib.cli`): `main`, then the process ends at once.

    Everything the command writes is complete and closed when `main` returns (outputs renamed into
    place, worker threads joined, Ray shut down); the interpreter's teardown would only free torch's
    memory object by object (0.3-0.9 s on 2 cores), so it is skipped (`os._exit`) once stdout and
    stderr are flushed. In-process callers use `main`, which returns. SIGTERM is unwound as Ctrl-C is (exit 143).
    """
    import signal

    signal.signal(signal.SIGTERM, _terminate)
    code = main()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:  # None: started with that stream closed (`>&-`)
                stream.flush()
        except (OSError, ValueError):  # a reader that went away (`| head`), a closed stream: nothing more to say there
            pass
    os._exit(code)


if __name__ == "__main__":
    run()
