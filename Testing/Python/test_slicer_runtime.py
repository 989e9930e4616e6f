"""What the Slicer module needs from the engine without Slicer: the background `covidct analyze`
process (progress, errors, a cancel that kills the whole process tree), the pip packages, the
bundled model's location, and batch inputs."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import SimpleITK as sitk

from CovidCTDiagnosisLib import bundled_model, slicer_runtime
from CovidCTDiagnosisLib.cli import build_parser
from CovidCTDiagnosisLib.errors import InputNotFoundError
from CovidCTDiagnosisLib.outputs import REPORT_JSON, read_report
from CovidCTDiagnosisLib.scene_plan import plan_scene
from CovidCTDiagnosisLib.slicer_runtime import BackgroundAnalysis, analyze_command, parse_progress

REPO = Path(__file__).resolve().parents[2]
ENGINE = REPO / "CovidCTDiagnosis" / "CovidCTDiagnosisLib"
# What Slicer's Python ships, and what the PyTorch extension installs
SLICER_SHIPPED = {"numpy", "SimpleITK", "scipy", "PIL", "pydicom", "requests", "packaging", "vtk"}
PYTORCH_EXTENSION = {"torch", "torchvision"}
TRAINING_ONLY = {"sklearn"}  # imported by `covidct train/evaluate` only, never by the module
QUICK_SLICES = 3  # enough to exercise every stage of a real run


def test_parse_progress():
    assert parse_progress("PROGRESS 0.350 prepare") == (0.35, "prepare")
    assert parse_progress("PROGRESS 1.000 aggregate") == (1.0, "aggregate")
    assert parse_progress("PROGRESS x read") is None
    assert parse_progress("results in /tmp/x") is None


def test_analyze_command():
    command = analyze_command("PythonSlicer", "/t/in.nrrd", "/t/out", model="m.pt", device="cpu", slices="all", aggregate="mean")
    assert command[:4] == ["PythonSlicer", "-m", "CovidCTDiagnosisLib.cli", "analyze"]
    assert command[4:] == ["/t/in.nrrd", "--out", "/t/out", "--progress", "lines", "--device", "cpu", "--slices", "all",
                           "--aggregate", "mean", "--model", "m.pt"]
    assert "--model" not in analyze_command("py", "a", "b")
    args = build_parser().parse_args(analyze_command("py", "a", "b")[3:])  # the engine's own parser reads it
    assert (args.input, args.out, args.aggregate, args.model) == ("a", "b", "mean", None)


def test_pip_requirements_cover_the_engine_imports():
    """Every third-party module the engine imports (outside training/) is shipped by Slicer, comes with the
    PyTorch extension, or is installed by the module; the versions agree with pyproject.toml."""
    tomllib = pytest.importorskip("tomllib")
    imported = set()
    for path in ENGINE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    third_party = {name for name in imported - set(sys.stdlib_module_names) if name not in ("CovidCTDiagnosisLib", "__future__")}
    assert third_party - SLICER_SHIPPED - PYTORCH_EXTENSION - TRAINING_ONLY <= set(slicer_runtime.PIP_REQUIREMENTS)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    def name_of(requirement: str) -> str:  # "ray[client]>=2.9" -> "ray"
        return re.split(r"[\[<>=;! ]", requirement, maxsplit=1)[0].lower()

    declared = {name_of(req): req for req in project["dependencies"] + project["optional-dependencies"]["ray"]}
    assert slicer_runtime.PIP_REQUIREMENTS["ray"] == declared["ray"]  # the `ray` extra
    for requirement in slicer_runtime.PIP_REQUIREMENTS.values():
        if name_of(requirement) in declared:
            assert declared[name_of(requirement)] == requirement
    assert declared["torch"] == "torch" + slicer_runtime.TORCH_REQUIREMENT
    assert declared["torchvision"] == "torchvision" + slicer_runtime.TORCHVISION_REQUIREMENT


def test_reading_result_folders_needs_only_the_reader_packages():
    """What the module's loadResults imports (outputs, scene_plan) loads no torch: of the packages the module
    installs, exactly READER_REQUIREMENTS."""
    code = ("import sys, CovidCTDiagnosisLib.outputs, CovidCTDiagnosisLib.scene_plan; "
            "print(' '.join({m.split('.')[0] for m in sys.modules}))")
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split())
    assert not loaded & (PYTORCH_EXTENSION | TRAINING_ONLY | {"cv2", "matplotlib"})
    assert {name for name in slicer_runtime.PIP_REQUIREMENTS if name in loaded} == set(slicer_runtime.READER_REQUIREMENTS)
    assert slicer_runtime.missing_requirements(slicer_runtime.READER_REQUIREMENTS) == []


def test_missing_requirements(monkeypatch):
    monkeypatch.setattr(slicer_runtime, "PIP_REQUIREMENTS", {"numpy": "numpy", "no_such_module_xyz": "no-such>=1",
                                                             "no_such_old_xyz": "old-only>=1; python_version < '3.0'"})
    assert slicer_runtime.missing_requirements() == ["no-such>=1"]  # a marker excluding this Python: not to install


def test_constraints_pin_what_pip_must_not_change(tmp_path):
    lines = slicer_runtime.write_constraints(tmp_path).read_text().splitlines()
    import numpy

    assert f"numpy=={numpy.__version__}" in lines
    assert all("==" in line for line in lines)


def test_bundled_model_path_is_found_without_torch(tmp_path, monkeypatch):
    monkeypatch.setenv(bundled_model.MODEL_DIR_ENV, str(tmp_path))
    assert slicer_runtime.bundled_model_path() is None
    (tmp_path / bundled_model.DEFAULT_MODEL_FILE).write_bytes(b"x")
    assert slicer_runtime.bundled_model_path() == tmp_path / bundled_model.DEFAULT_MODEL_FILE
    source = Path(bundled_model.__file__).read_text()
    assert "import torch" not in source and "from .checkpoint" not in source


def test_batch_source(tmp_path):
    cases = tmp_path / "cases"
    cases.mkdir()
    manifest = tmp_path / "list.csv"
    manifest.write_text("path\n")
    assert slicer_runtime.batch_source(cases, tmp_path / "w") == cases
    assert slicer_runtime.batch_source(str(manifest), tmp_path / "w") == manifest
    written = slicer_runtime.batch_source([tmp_path / "a.nrrd", str(tmp_path / "b.nii.gz")], tmp_path / "w")
    assert written.read_text().splitlines() == ["path", str(tmp_path / "a.nrrd"), str(tmp_path / "b.nii.gz")]
    single = slicer_runtime.batch_source(tmp_path / "one.nrrd", tmp_path / "w1")
    assert single.read_text().splitlines() == ["path", str(tmp_path / "one.nrrd")]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z" if Path(f"/proc/{pid}").exists() else True


@pytest.mark.skipif(os.name == "nt", reason="POSIX process groups")
def test_cancel_kills_the_whole_process_tree():
    """Like PythonSlicer (a launcher that starts the real Python), the child starts a grandchild."""
    script = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        "print(f'GRANDCHILD {child.pid}', flush=True)\n"
        "time.sleep(120)\n"
    )
    analysis = BackgroundAnalysis([sys.executable, "-c", script])
    lines = []
    deadline = time.monotonic() + 30
    while not lines and time.monotonic() < deadline:
        lines += analysis.poll().lines
        time.sleep(0.05)
    grandchild = int(lines[0].split()[1])
    analysis.cancel()
    analysis.wait(timeout=10)
    assert analysis.finished and analysis.cancelled and analysis.returncode != 0
    deadline = time.monotonic() + 10
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild)


def test_engine_error_is_one_line_with_its_exit_code(tmp_path):
    missing = tmp_path / "missing.nrrd"
    analysis = BackgroundAnalysis(analyze_command(sys.executable, missing, tmp_path / "out", model="untrained", device="cpu"))
    analysis.wait(timeout=120)
    assert analysis.returncode == InputNotFoundError.exit_code
    assert str(missing) in analysis.error_message and "\n" not in analysis.error_message
    assert not analysis.error_message.startswith("covidct")
    assert not (tmp_path / "out").exists()


def test_background_analysis_reports_progress_and_writes_the_result(tmp_path, phantom):
    """A real `covidct analyze` with the untrained network, run the way the module runs it."""
    ct = tmp_path / "input.nrrd"
    sitk.WriteImage(phantom.image, str(ct))
    out = tmp_path / "result"
    analysis = BackgroundAnalysis(analyze_command(sys.executable, ct, out, model="untrained", device="cpu", slices=QUICK_SLICES))
    printed = analysis.wait(timeout=300)
    assert analysis.returncode == 0, printed.lines
    fractions = [fraction for fraction, _ in printed.progress]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert [stage for _, stage in printed.progress][0] == "read"
    assert (out / REPORT_JSON).is_file()
    plan = plan_scene(read_report(out), "phantom")
    assert len(plan.rows) == QUICK_SLICES and plan.rois and not plan.result.trained


def test_forget_engine_modules_makes_the_next_import_read_the_files_again(tmp_path):
    """What the module's Reload does for the engine: a changed engine file is seen by the next import (in a fresh process:
    forgetting the package here would give the other tests' modules second copies)."""
    import shutil
    import textwrap

    package = tmp_path / "CovidCTDiagnosisLib"
    shutil.copytree(Path(slicer_runtime.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__", "training"))
    script = textwrap.dedent("""
        import sys
        from pathlib import Path
        sys.path.insert(0, sys.argv[1])
        from CovidCTDiagnosisLib import aggregation, slicer_runtime
        target = Path(aggregation.__file__)
        target.write_text(target.read_text() + "\\nRELOADED = True\\n")
        forgotten = slicer_runtime.forget_engine_modules()
        import CovidCTDiagnosisLib.aggregation as again
        print("CovidCTDiagnosisLib.aggregation" in forgotten, again is not aggregation, getattr(again, "RELOADED", False))
    """)
    out = subprocess.run([sys.executable, "-B", "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True", "True"]


def test_dicom_source_files_and_gathering_them(tmp_path):
    """A volume's DICOM files through the database's lookup; gathered into one folder for the engine, untouched."""
    database = {f"1.2.3.{n}": tmp_path / "db" / str(n) / "same-name" for n in range(4)}  # files of one name
    for uid, path in database.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(uid.encode())
    lookup = lambda uid: str(database[uid]) if uid in database else ""  # noqa: E731  (fileForInstance)
    files = slicer_runtime.dicom_source_files("1.2.3.0 1.2.3.1", lookup)
    assert files == [str(database["1.2.3.0"]), str(database["1.2.3.1"])]
    assert slicer_runtime.dicom_source_files(None, lookup) == slicer_runtime.dicom_source_files("", lookup) == []
    assert slicer_runtime.dicom_source_files("1.2.3.0 9.9", lookup) == []  # one not in the database: none
    folder = slicer_runtime.gather_files(files, tmp_path / "work" / "input")
    assert [p.read_bytes() for p in sorted(folder.iterdir())] == [b"1.2.3.0", b"1.2.3.1"]
    shutil.rmtree(folder)
    assert all(Path(f).read_bytes() for f in files)  # removing the gathered folder leaves the database's files


def test_dicom_export_problem():
    assert slicer_runtime.dicom_export_problem("dicom", ["a.dcm"], (3, 12)) is None
    assert slicer_runtime.dicom_export_problem("dicom", ["a.dcm"], (3, 9)) == (
        "Saving as DICOM needs Slicer with Python 3.10 or newer (highdicom); this Slicer has Python 3.9.")
    assert "not a DICOM series" in slicer_runtime.dicom_export_problem("nrrd", ["a.dcm"], (3, 12))
    assert "not loaded from Slicer's DICOM database" in slicer_runtime.dicom_export_problem("dicom", [], (3, 12))
