"""The result folder: report.json, slices.csv, lungs.seg.nrrd, severity.seg.nrrd, gradcam.nrrd, lesions.mrk.json, report.html.

Written atomically: everything goes into a hidden sibling folder that is renamed into place only
once complete, so a result folder is either the previous one or the new one, never a mixture.
The folder's content is documented in docs/report-schema.md.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from os import PathLike
from pathlib import Path
from typing import Any

import nrrd
import numpy as np
import SimpleITK as sitk

from . import geometry
from .errors import OutputError
from .html_report import render_html
from .markups_file import write_lesion_markups
from .memory import release_free_memory
from .result import MM_DECIMALS, PROBABILITY_DECIMALS, REPORT_SCHEMA_VERSION, WARNING_KEY, Result, untrained_note
from .segmentation_file import GZIP_LEVEL, write_lung_segmentation, write_severity_segmentation

REPORT_JSON = "report.json"
SLICES_CSV = "slices.csv"
LUNGS_SEG_NRRD = "lungs.seg.nrrd"
GRADCAM_NRRD = "gradcam.nrrd"
LESIONS_MRK_JSON = "lesions.mrk.json"
REPORT_HTML = "report.html"
SEVERITY_SEG_NRRD = "severity.seg.nrrd"
OUTPUT_FILES = (REPORT_JSON, SLICES_CSV, LUNGS_SEG_NRRD, SEVERITY_SEG_NRRD, GRADCAM_NRRD, LESIONS_MRK_JSON, REPORT_HTML)
_STAGING, _PREVIOUS = "partial", "previous"  # hidden siblings of a folder while it is written (_sibling)


def write_outputs(result: Result, ct_image: sitk.Image, out_dir: str | PathLike, *, overwrite: bool = True) -> Path:
    """Write the result folder `out_dir` and return its path.

    An existing result folder is replaced (only if `overwrite`) once the new one is complete. A
    folder holding anything but result files is never replaced. On failure nothing is left
    behind: an OSError becomes OutputError("cannot write <dir>: <reason>"); Ctrl-C and bugs
    propagate unchanged.
    """
    out_dir = Path(os.path.realpath(out_dir))  # "." and symlinks become the real folder, renamed as a whole
    severity_labels = result.severity_labels
    if severity_labels is None:  # not measured (a result built by hand): an empty segmentation on the lungs' grid
        severity_labels = sitk.Image(result.lung_labels.GetSize(), sitk.sitkUInt8)
        severity_labels.CopyInformation(result.lung_labels)
    _check_same_grid(ct_image, result.lung_labels, result.gradcam, severity_labels)
    with staged_folder(out_dir, overwrite=overwrite) as staging:
        write_report_json(staging / REPORT_JSON, result)
        write_slices_csv(staging / SLICES_CSV, result)
        note = untrained_note(result.model)  # an untrained network: every file says it is not a diagnosis
        write_lesion_markups(staging / LESIONS_MRK_JSON, result.slices, ct_image, warning=note)
        # the report (matplotlib, zlib) is drawn beside the volumes, which are written one after the other:
        # each writer holds volume-sized buffers (pynrrd copies the voxels to bytes; the lungs file has a
        # layer per overlap of boxes), and two at once would not fit the memory budget (MAX_VOXELS)
        with ThreadPoolExecutor(max_workers=1) as pool:
            report = pool.submit(lambda: (staging / REPORT_HTML).write_text(render_html(result, ct_image), encoding="utf-8"))
            for write in (lambda: write_volume_nrrd(staging / GRADCAM_NRRD, result.gradcam, warning=note),
                          lambda: write_lung_segmentation(staging / LUNGS_SEG_NRRD, result.lung_labels, result.slices, warning=note),
                          lambda: write_severity_segmentation(staging / SEVERITY_SEG_NRRD, severity_labels, warning=note)):
                write()
                release_free_memory()
            report.result()
    return out_dir


def check_csv_target(path: str | PathLike) -> None:
    """OutputError at once, before any work, unless the CSV file `path` can be written: a folder (or
    anything but a regular file) there is refused, an existing file is replaced (`write_csv_file`), and
    its folder must be writable (`check_writable`)."""
    path = Path(os.path.realpath(path))
    if path.is_dir():
        raise OutputError(f"cannot write {path}: it is a folder; --out is the CSV file to write")
    if path.exists() and not path.is_file():
        raise OutputError(f"cannot write {path}: it exists and is not a regular file")
    check_writable(path.parent, result_folder=False)


def write_csv_file(path: str | PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A CSV file written whole or not at all: into a hidden file beside it, renamed into place. OutputError (the
    hidden file removed) when it cannot be written."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "x", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc


def is_result_file(name: str) -> bool:
    """Whether a file name is one of a result folder's (OUTPUT_FILES)."""
    return name in OUTPUT_FILES


@contextmanager
def staged_folder(out_dir: Path, *, overwrite: bool = True, is_ours: Callable[[str], bool] = is_result_file,
                  what: str = "a previous result") -> Iterator[Path]:
    """A new hidden sibling folder of `out_dir` to write into, renamed to `out_dir` when the block ends
    without error; an existing `out_dir` (only if `overwrite`, and only if every file in it `is_ours`) is
    replaced then. On failure nothing is left behind: an OSError becomes OutputError("cannot write <dir>:
    <reason>"); other errors propagate unchanged."""
    staging = None
    try:
        _check_target(out_dir, overwrite, is_ours, what)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = _sibling(out_dir, _STAGING)
        staging.mkdir()  # honours the umask, unlike tempfile.mkdtemp's 0o700
        yield staging
        _move_into_place(staging, out_dir)
    except OSError as exc:  # the first line only: pydicom's writer puts a traceback into its message
        raise OutputError(f"cannot write {out_dir}: {exc.strerror or str(exc).strip().splitlines()[0]}") from exc
    finally:
        if staging is not None and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def check_writable(target: str | PathLike, *, result_folder: bool = True, is_ours: Callable[[str], bool] = is_result_file,
                   what: str = "a previous result") -> Path:
    """OutputError at once, before any analysis, if the folder `target` cannot be written.

    Refuses a path that is a file (or under one), a result folder holding files that are not
    `is_ours` (`result_folder`; `what` names such files in the message), and a place where nothing can be created (permissions, a
    read-only file system): a probe folder is created and removed in the nearest existing folder.
    Nothing is created. A full disk can still be found only while writing.
    """
    target = Path(os.path.realpath(target))
    if result_folder:
        _check_target(target, True, is_ours, what)
    elif target.exists() and not target.is_dir():
        raise OutputError(f"cannot write {target}: it exists and is not a folder")
    place = target if target.is_dir() and not result_folder else target.parent  # a result folder is renamed in its parent
    while not place.exists():
        place = place.parent
    if not place.is_dir():
        raise OutputError(f"cannot write {target}: {place} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{target.name}.probe-", dir=place))
    except OSError as exc:
        raise OutputError(f"cannot write {target}: {exc.strerror or exc} ({place})") from exc
    return target


def read_report(out_dir: str | PathLike) -> dict[str, Any]:
    """The report.json of a result folder; OutputError if missing, unreadable or of another schema."""
    path = Path(out_dir) / REPORT_JSON
    try:
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
    except OSError as exc:
        raise OutputError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise OutputError(f"cannot read {path}: not valid JSON ({exc})") from exc
    major = str(report.get("schema_version", "")).split(".")[0] if isinstance(report, dict) else ""
    if major != REPORT_SCHEMA_VERSION.split(".")[0]:
        raise OutputError(f"cannot read {path}: not a report of schema {REPORT_SCHEMA_VERSION}")
    return report


def is_complete(out_dir: str | PathLike) -> bool:
    """Whether `out_dir` holds every result file (folders written before severity.seg.nrrd existed do not) and a readable report.json (batch re-runs skip it)."""
    out_dir = Path(out_dir)
    if not all((out_dir / name).is_file() for name in OUTPUT_FILES):
        return False
    try:
        read_report(out_dir)
    except OutputError:
        return False
    return True


def write_report_json(path: Path, result: Result) -> None:
    """report.json: `result.to_report()`, indented."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result.to_report(), f, indent=2)
        f.write("\n")


def write_slices_csv(path: Path, result: Result) -> None:
    """One row per analysed slice: index, z_mm, lung_fraction, a probability per class, n_boxes,
    top_box_score, note (empty, or for an untrained network that it is not a diagnosis)."""
    classes = list(result.model.classes)
    note = untrained_note(result.model) or ""
    p = PROBABILITY_DECIMALS
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "z_mm", "lung_fraction", *classes, "n_boxes", "top_box_score", "note"])
        for s in result.slices:
            top_score = max((b.score for b in s.boxes), default=None)
            writer.writerow(
                [
                    s.index,
                    f"{s.z_mm:.{MM_DECIMALS}f}",
                    f"{s.lung_fraction:.{p}f}",
                    *(f"{s.probabilities[c]:.{p}f}" for c in classes),
                    len(s.boxes),
                    "" if top_score is None else f"{top_score:.{p}f}",
                    note,
                ]
            )


def write_volume_nrrd(path: Path, image: sitk.Image, *, warning: str | None = None) -> None:
    """A scalar volume as float32 gzip NRRD, exactly the image's geometry (LPS); `warning` goes
    into the header as `covidct_warning:=...`.

    pynrrd rather than sitk.WriteImage: ITK's NRRD writer ignores a full disk and leaves a
    truncated file, while Python's file I/O raises OSError(ENOSPC).
    """
    affine = geometry.ijk_to_lps_matrix(image)
    header = {
        "space": "left-posterior-superior",
        "kinds": ["domain", "domain", "domain"],
        "space directions": affine[:3, :3].T,  # row a: voxel axis a in LPS, mm
        "space origin": affine[:3, 3],
        "encoding": "gzip",
    }
    if warning:
        header[WARNING_KEY] = warning
    voxels_ijk = sitk.GetArrayViewFromImage(image).astype(np.float32, copy=False).transpose(2, 1, 0)
    nrrd.write(str(path), voxels_ijk, header, compression_level=GZIP_LEVEL)


def _check_target(out_dir: Path, overwrite: bool, is_ours: Callable[[str], bool], what: str) -> None:
    """Refuse a file, an existing folder without `overwrite`, and a folder holding files that are not `is_ours`."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"cannot write {out_dir}: it exists and is not a folder")
    if not out_dir.is_dir():
        return
    present = set(os.listdir(out_dir))
    if present and not overwrite:
        raise OutputError(f"cannot write {out_dir}: it already exists (allow overwriting to replace it)")
    foreign = sorted(name for name in present if not is_ours(name))
    if foreign:
        raise OutputError(
            f"cannot write {out_dir}: it holds other files than {what} ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}); choose an empty or new folder"
        )


def _check_same_grid(reference: sitk.Image, *images: sitk.Image) -> None:
    """The label and heat-map volumes must share the CT's voxel grid (a pipeline bug otherwise)."""
    grid = geometry.VoxelGrid.from_image(reference)
    for image in images:
        if not geometry.VoxelGrid.from_image(image).equals(grid):
            raise ValueError("lung labels / Grad-CAM / severity labels are not on the CT's voxel grid")


def discard_leftovers(out_dir: str | PathLike) -> None:
    """Delete the hidden siblings that a writer of `out_dir` killed mid-write (SIGKILL, power loss) left behind:
    its staging folder and a previous result set aside. The folder itself is never touched; call it only
    while no other process writes `out_dir`."""
    out_dir = Path(os.path.realpath(out_dir))
    if out_dir.parent.is_dir():
        for tag in (_STAGING, _PREVIOUS):
            for leftover in out_dir.parent.glob(f".{glob.escape(out_dir.name)}.{tag}-*"):
                shutil.rmtree(leftover, ignore_errors=True)


def _sibling(out_dir: Path, tag: str) -> Path:
    """A hidden, unique path next to `out_dir` (same file system, so renames are atomic)."""
    return out_dir.parent / f".{out_dir.name}.{tag}-{secrets.token_hex(4)}"


def _move_into_place(staging: Path, out_dir: Path) -> None:
    """Rename `staging` to `out_dir`; a previous result folder is set aside first and deleted after."""
    if not out_dir.exists():
        staging.rename(out_dir)
        return
    previous = _sibling(out_dir, _PREVIOUS)
    out_dir.rename(previous)
    try:
        staging.rename(out_dir)
    except BaseException:
        previous.rename(out_dir)
        raise
    shutil.rmtree(previous, ignore_errors=True)
