"""The module's logic run without Slicer: `slicer`, `qt` and PyTorchUtils are replaced by mocks that
accept any call (slicer_stand_ins.py), so these tests check the module's own Python (what it computes and hands to
Slicer), not Slicer's behaviour; test_slicer_module_api checks the names it calls, and the
module's self-test runs it in Slicer."""

from __future__ import annotations

import importlib.util
import sys
import json
import time
import types
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import SimpleITK as sitk

from CovidCTDiagnosisLib import outputs, slicer_runtime
from CovidCTDiagnosisLib.scene_plan import plan_scene
from helpers_results import LAS, left_handed_oblique_direction, make_result, oblique_direction, slicer_right_handed
from slicer_stand_ins import Node, fake_slicer_modules, load_module_file
from test_slicer_module_files import MODULE_FILE, REPO

SLICER_PYTHON = REPO.parent / "shared" / "slicer-api" / "python"  # Slicer's own pure-Python modules (see its README)

TRANSFORM_ID = "vtkMRMLLinearTransformNode1"


def _load_module(monkeypatch, fakes: dict):
    for name, fake in fakes.items():
        monkeypatch.setitem(sys.modules, name, fake)
    monkeypatch.setitem(sys.modules, "CovidCTDiagnosisUnderTest", None)  # removed again after the test
    loaded = load_module_file(MODULE_FILE, "CovidCTDiagnosisUnderTest")
    loaded.fakeSlicer = fakes["slicer"]
    return loaded


@pytest.fixture
def module(tmp_path, monkeypatch):
    """The module file imported against the stand-ins; `fakeSlicer` is its `slicer`."""
    (tmp_path / "slicer-temp").mkdir()
    return _load_module(monkeypatch, fake_slicer_modules(tmp_path / "slicer-temp"))


@pytest.fixture
def module_with_slicers_wrapper(tmp_path, monkeypatch):
    """The module file imported with Slicer's own parameterNodeWrapper package (the rest stand-ins)."""
    package = SLICER_PYTHON / "slicer" / "parameterNodeWrapper"
    if not package.is_dir():
        pytest.skip(f"Slicer's Python modules are not at {SLICER_PYTHON}")
    fakes = fake_slicer_modules(tmp_path)
    fakes["slicer"].vtkMRMLNode = Node  # the volume annotation's class is a node class
    monkeypatch.setitem(sys.modules, "slicer", fakes["slicer"])
    monkeypatch.setitem(sys.modules, "ctk", mock.MagicMock(name="ctk"))
    monkeypatch.setitem(sys.modules, "qt", fakes["qt"])
    spec = importlib.util.spec_from_file_location("slicer.parameterNodeWrapper", package / "__init__.py",
                                                  submodule_search_locations=[str(package)])
    wrapper = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, wrapper)
    loaded_before = set(sys.modules)
    spec.loader.exec_module(wrapper)
    fakes[spec.name] = wrapper
    yield _load_module(monkeypatch, fakes)
    for name in set(sys.modules) - loaded_before:  # its submodules
        if name.startswith(spec.name + "."):
            del sys.modules[name]


class _ScriptedModuleNode:
    """A parameter node: named string parameters and node references, as vtkMRMLScriptedModuleNode stores them."""

    def __init__(self, parameters: dict[str, str]):
        self.parameters, self.references = dict(parameters), {}

    def HasParameter(self, name):
        return name in self.parameters

    def GetParameter(self, name):
        return self.parameters.get(name, "")

    def SetParameter(self, name, value):
        self.parameters[name] = value

    def SetNodeReferenceID(self, name, nodeID):
        self.references[name] = nodeID

    def GetNodeReference(self, name):
        return None

    def AddObserver(self, event, callback, priority=0.0):
        return 1

    def RemoveObserver(self, tag):
        pass


@pytest.fixture
def result_folder(tmp_path):
    result, ct = make_result(direction=oblique_direction())
    return outputs.write_outputs(result, ct, tmp_path / "case1"), result


def _volume(ijk_to_ras, size):
    volume = mock.MagicMock(name="volume")
    volume.GetName.return_value = "CT"
    volume.GetTransformNodeID.return_value = TRANSFORM_ID
    volume.GetImageData.return_value.GetDimensions.return_value = tuple(size)
    volume.GetIJKToRASMatrix.side_effect = lambda m: m.DeepCopy(ijk_to_ras.ravel().tolist())
    volume.GetAttribute.return_value = None  # not from Slicer's DICOM database
    return volume


def _table_columns(table) -> dict:
    """Title -> values of the columns added to a stand-in table node (vtk arrays: numbers or strings)."""
    columns = {}
    for call in table.AddColumn.call_args_list:
        array = call.args[0]
        values = [array.GetValue(i) for i in range(array.GetNumberOfValues())]
        columns[array.GetName()] = values
    return columns


def test_load_results_builds_the_planned_nodes_under_the_volume_transform(module, result_folder):
    folder, result = result_folder
    plan = plan_scene(result, "CT")
    slicer = module.fakeSlicer
    volume = _volume(plan.geometry.ijk_to_ras(), plan.geometry.size)
    segmentation = slicer.mrmlScene.AddNewNodeByClass.return_value  # the stand-in scene's one node of every class
    shown = module.CovidCTDiagnosisLogic().loadResults(str(folder), volume)

    array, matrix, name = slicer.util.addVolumeFromArray.call_args.args
    assert array.shape == tuple(reversed(plan.geometry.size)) and array.dtype == np.float32
    np.testing.assert_allclose(matrix, plan.geometry.ijk_to_ras())
    assert name == plan.heat_name
    added = [c.args[0] for c in slicer.mrmlScene.AddNewNodeByClass.call_args_list]
    assert added.count("vtkMRMLMarkupsROINode") == len(plan.rois) == len(shown.rois)
    assert added.count("vtkMRMLTableNode") == 1
    columns = _table_columns(segmentation)  # the stand-in scene's node: the slice table's columns, then the severity table's
    slice_titles = [t for t, _ in plan.table_columns()]
    assert list(columns)[: len(slice_titles)] == slice_titles and columns["Slice"] == [r.index for r in plan.rows]
    for node in [shown.segmentation, shown.heat, *shown.rois]:
        node.SetAndObserveTransformNodeID.assert_called_with(TRANSFORM_ID)
    assert slicer.util.setSliceViewerLayers.call_args.kwargs["background"] is volume
    ids = [c.args[0] for c in segmentation.GetSegmentation.return_value.GetSegment.call_args_list]
    assert ids == [s.segment_id for s in plan.segments]
    segment = segmentation.GetSegmentation.return_value.GetSegment.return_value
    assert [c.args[0] for c in segment.SetName.call_args_list] == [s.name for s in plan.segments]


def test_load_results_refuses_a_volume_of_another_grid(module, result_folder):
    folder, result = result_folder
    plan = plan_scene(result, "CT")
    moved = plan.geometry.ijk_to_ras()
    moved[2, 3] += 10.0
    with pytest.raises(ValueError, match="another CT"):
        module.CovidCTDiagnosisLogic().loadResults(str(folder), _volume(moved, plan.geometry.size))


def test_load_results_over_a_dicom_ct_matches_its_series_too(module, tmp_path):
    """A CT from Slicer's DICOM database: results of another series are refused, naming it, even on the same grid."""
    from dataclasses import replace

    result, ct = make_result()
    result = replace(result, input=replace(result.input, series_uid="1.2.826.0.1.3680043.8.498.1"))
    folder = outputs.write_outputs(result, ct, tmp_path / "case")
    plan = plan_scene(result, "CT")
    volume = _volume(plan.geometry.ijk_to_ras(), plan.geometry.size)
    volume.GetAttribute.side_effect = {"DICOM.instanceUIDs": "1.2.826.0.1.3680043.8.498.7 1.2.826.0.1.3680043.8.498.8"}.get
    series = {}
    module.fakeSlicer.dicomDatabase.instanceValue.side_effect = lambda uid, tag: series[uid, tag]
    series["1.2.826.0.1.3680043.8.498.7", "0020,000E"] = "1.2.826.0.1.3680043.8.498.1"
    assert module.CovidCTDiagnosisLogic().loadResults(str(folder), volume).plan.rows
    series["1.2.826.0.1.3680043.8.498.7", "0020,000E"] = "1.2.826.0.1.3680043.8.498.2"
    with pytest.raises(ValueError, match=r"another CT than CT: on /data/P001.nii.gz \(DICOM series 1.2.826.0.1.3680043.8.498.1\)"):
        module.CovidCTDiagnosisLogic().loadResults(str(folder), volume)


@pytest.mark.parametrize("direction", [LAS, left_handed_oblique_direction()], ids=["LAS", "oblique left-handed"])
def test_load_results_over_the_right_handed_volume_slicer_reads_from_a_left_handed_file(module, tmp_path, direction):
    """Same voxels, k reversed: accepted, with the heat map, slice numbers and box names on Slicer's grid."""
    result, ct = make_result(direction=direction)
    folder = outputs.write_outputs(result, ct, tmp_path / "case")
    on_file = plan_scene(result, "CT").geometry
    nk = on_file.size[2]
    slicer_matrix = slicer_right_handed(on_file.ijk_to_ras(), on_file.size)
    assert np.linalg.det(slicer_matrix[:3, :3]) > 0 > np.linalg.det(on_file.ijk_to_ras()[:3, :3])
    slicer = module.fakeSlicer
    segment = slicer.mrmlScene.AddNewNodeByClass.return_value.GetSegmentation.return_value.GetSegment.return_value
    shown = module.CovidCTDiagnosisLogic().loadResults(str(folder), _volume(slicer_matrix, on_file.size))

    array, matrix, _ = slicer.util.addVolumeFromArray.call_args.args
    np.testing.assert_allclose(matrix, slicer_matrix, atol=1e-9)
    np.testing.assert_array_equal(array, np.flip(sitk.GetArrayFromImage(result.gradcam), axis=0))
    slice_column = _table_columns(slicer.mrmlScene.AddNewNodeByClass.return_value)["Slice"]
    assert slice_column == [nk - 1 - s.index for s in result.slices]
    boxes = [(s.index, b) for s in result.slices for b in s.boxes]
    lesion_names = [c.args[0] for c in segment.SetName.call_args_list][2:]
    assert lesion_names == [f"slice {nk - 1 - k} box {b.rank}" for k, b in boxes]
    assert [roi.name for roi in shown.plan.rois] == lesion_names
    for roi, (_, box) in zip(shown.plan.rois, boxes):
        np.testing.assert_allclose(roi.center_ras, np.diag([-1.0, -1.0, 1.0]) @ box.center_lps, atol=1e-9)
    descriptions = [c.args[0] for c in slicer.mrmlScene.AddNewNodeByClass.return_value.SetDescription.call_args_list]
    assert descriptions == [f"navigator score {b.score:.4f}" for _, b in boxes]
    for row in shown.plan.rows:  # each row's slice, numbered on Slicer's grid, is where its centre is
        ijk = np.linalg.solve(slicer_matrix, np.append(row.center_ras, 1.0))[:3]
        assert ijk[2] == pytest.approx(row.index)
    half_a_slice = slicer_matrix.copy()
    half_a_slice[:3, 3] += slicer_matrix[:3, 2] / 2
    with pytest.raises(ValueError, match="another CT"):
        module.CovidCTDiagnosisLogic().loadResults(str(folder), _volume(half_a_slice, on_file.size))


def test_load_results_needs_only_the_file_readers(module, result_folder, monkeypatch):
    """No PyTorch extension and no torch asked for; a missing reader package is the only one offered."""
    folder, _ = result_folder
    slicer = module.fakeSlicer
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # `import PyTorchUtils` fails
    with pytest.raises(RuntimeError, match="PyTorch extension"):
        module.CovidCTDiagnosisLogic().setupDependencies()
    module.CovidCTDiagnosisLogic().loadResults(str(folder))
    slicer.util.confirmOkCancelDisplay.assert_not_called()
    monkeypatch.setattr(slicer_runtime, "missing_requirements",
                        lambda names=None: [slicer_runtime.PIP_REQUIREMENTS[n] for n in names or slicer_runtime.PIP_REQUIREMENTS])
    slicer.util.confirmOkCancelDisplay.return_value = False
    with pytest.raises(RuntimeError, match="not installed"):
        module.CovidCTDiagnosisLogic().loadResults(str(folder))
    offered = slicer.util.confirmOkCancelDisplay.call_args.args[0]
    assert "slicerio" in offered and "pynrrd" in offered and "torch" not in offered and "opencv" not in offered


def test_load_results_without_a_volume_and_jump_to_slice(module, result_folder):
    folder, _ = result_folder
    slicer = module.fakeSlicer
    logic = module.CovidCTDiagnosisLogic()
    shown = logic.loadResults(str(folder))
    assert shown.plan.folder_name.startswith("case1")
    shown.heat.SetAndObserveTransformNodeID.assert_called_with(None)
    shown.heat.TransformPointToWorld.side_effect = lambda local, world: world.__setitem__(slice(None), [v + 1 for v in local])
    logic.jumpToSlice(shown, 1)
    expected = [v + 1 for v in shown.plan.rows[1].center_ras]
    jump = slicer.vtkMRMLSliceNode.JumpAllSlices.call_args.args
    assert jump == (slicer.mrmlScene, *expected, slicer.vtkMRMLSliceNode.CenteredJumpSlice)


def test_dependencies_are_installed_only_after_asking(module, monkeypatch):
    slicer = module.fakeSlicer
    asked = []
    monkeypatch.setattr(slicer_runtime, "missing_requirements", lambda names=None: asked.append(names) or ["slicerio>=1.1"])
    slicer.util.confirmOkCancelDisplay.return_value = False
    with pytest.raises(RuntimeError, match="not installed"):
        module.CovidCTDiagnosisLogic().setupDependencies()
    slicer.util.pip_install.assert_not_called()
    slicer.util.confirmOkCancelDisplay.return_value = True
    module.CovidCTDiagnosisLogic().setupDependencies()
    requirements = slicer.util.pip_install.call_args.args[0]
    assert requirements[0] == "slicerio>=1.1" and requirements[1] == "--constraint"
    assert "numpy==" in open(requirements[2]).read()
    assert asked[0] == slicer_runtime.ANALYSIS_REQUIREMENTS and "highdicom" not in asked[0]  # only DICOM export needs it


def _run_job(module, tmp_path, script, cancel=False, dicom=False):
    """An AnalysisJob on a stand-in engine command, polled by hand in place of the QTimer; its input is a file,
    or with `dicom`, a folder of the DICOM database's files."""
    work = tmp_path / "work"
    (work / "result").mkdir(parents=True)
    if dicom:
        (work / module.DICOM_INPUT_DIR).mkdir()
        (work / module.DICOM_INPUT_DIR / "00000.dcm").write_text("")
    else:
        (work / module.INPUT_FILE).write_text("")
    inputPath = work / (module.DICOM_INPUT_DIR if dicom else module.INPUT_FILE)
    logic = mock.MagicMock(name="logic")
    progress, finished = [], []
    job = module.AnalysisJob(logic, mock.MagicMock(), str(work), str(inputPath), [sys.executable, "-c", script],
                             lambda f, s: progress.append((f, s)), finished.append)
    if cancel:
        job.cancel()
    deadline = time.monotonic() + 60
    while not finished and time.monotonic() < deadline:
        job._poll()
        time.sleep(0.05)
    return job, logic, progress, finished, work


@pytest.mark.parametrize("dicom", [False, True])
def test_job_reports_progress_then_loads_its_result_folder(module, tmp_path, dicom):
    script = "print('PROGRESS 0.500 lungs', flush=True); print('PROGRESS 1.000 aggregate', flush=True)"
    job, logic, progress, finished, work = _run_job(module, tmp_path, script, dicom=dicom)
    assert finished == [job] and progress == [(0.5, "lungs"), (1.0, "aggregate")]
    logic.loadResults.assert_called_once_with(str(work / "result"), job.volumeNode)
    assert job.error is None and job.results is logic.loadResults.return_value
    assert not Path(job.inputPath).exists() and (work / "result").is_dir()


def test_job_failure_and_cancel_clean_up(module, tmp_path):
    script = "import sys; print('covidct: error: no lungs found in the image', file=sys.stderr); sys.exit(5)"
    job, logic, _, finished, work = _run_job(module, tmp_path, script)
    assert finished == [job] and job.error == "no lungs found in the image" and not job.cancelled
    logic.loadResults.assert_not_called()
    assert not work.exists()
    job, logic, _, finished, work = _run_job(module, tmp_path, "import time; time.sleep(60)", cancel=True)
    assert finished == [job] and job.cancelled and job.error is None and not work.exists()
    logic.loadResults.assert_not_called()


def test_a_scene_saved_with_noisy_or_still_loads(module_with_slicers_wrapper):
    """Slicer's wrapper reads only the declared parameters: an old node's aggregation is ignored, the rest kept."""
    module = module_with_slicers_wrapper
    old = _ScriptedModuleNode({"aggregation": "NOISY_OR", "device": "CPU", "slices": "ALL", "heatOpacity": "0.7"})
    parameters = module.CovidCTDiagnosisParameterNode(old)
    assert "aggregation" not in parameters.allParameters
    assert (parameters.device, parameters.slices, parameters.heatOpacity) == (module.Device.CPU, module.SliceChoice.ALL, 0.7)
    assert parameters.model == "" and old.parameters["model"] == ""  # a missing parameter gets its default
    parameters.device = module.Device.CUDA
    assert old.parameters["device"] == "CUDA"


@pytest.mark.parametrize("method", ["process", "startAnalysis", "processFiles"])
def test_analyses_accept_only_the_mean(module, method):
    """The removed Noisy-OR, or any other method, is refused before dependencies are checked or anything is written."""
    slicer = module.fakeSlicer
    logic = module.CovidCTDiagnosisLogic()
    call = {
        "process": lambda **kw: logic.process(mock.MagicMock(), **kw),
        "startAnalysis": lambda **kw: logic.startAnalysis(mock.MagicMock(), None, None, **kw),
        "processFiles": lambda **kw: logic.processFiles(["/d/a.nii.gz"], "/d/out", **kw),
    }[method]
    with mock.patch.object(logic, "setupDependencies") as setup:
        with pytest.raises(ValueError, match="Noisy-OR was removed.*use 'mean'"):
            call(aggregate="noisy-or")
        with pytest.raises(ValueError, match="unknown aggregation 'max'"):
            call(aggregate="max")
        setup.assert_not_called()
        slicer.util.exportNode.assert_not_called()


def test_start_analysis_runs_covidct_analyze_with_the_mean(module, monkeypatch):
    volume = mock.MagicMock(name="volume")
    monkeypatch.setattr(module.shutil, "which", lambda name: "/slicer/bin/PythonSlicer")
    monkeypatch.setattr(module, "AnalysisJob", lambda logic, volumeNode, workDir, inputPath, command, *callbacks: command)
    module.fakeSlicer.dicomDatabase = None  # Slicer without its DICOM module
    command = module.CovidCTDiagnosisLogic().startAnalysis(volume, None, None, model="m.pt", device="cpu", aggregate="mean")
    assert command[:4] == ["/slicer/bin/PythonSlicer", "-m", "CovidCTDiagnosisLib.cli", "analyze"]
    assert command[command.index("--aggregate") + 1] == "mean" and command[command.index("--model") + 1] == "m.pt"
    assert module.fakeSlicer.util.exportNode.call_args.args[0] is volume


def _dicom_volume(module, tmp_path, count=3):
    """A volume loaded from DICOM: its instance UIDs, and Slicer's DICOM database's files for them."""
    files = {f"1.2.826.0.1.3680043.2.1125.7.{n}": tmp_path / "database" / f"instance{n}" for n in range(count)}
    for uid, path in files.items():
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(uid.encode())
    volume = mock.MagicMock(name="volume")
    volume.GetAttribute.side_effect = lambda name: " ".join(files) if name == slicer_runtime.DICOM_UIDS_ATTRIBUTE else None
    module.fakeSlicer.dicomDatabase.fileForInstance.side_effect = lambda uid: str(files[uid]) if uid in files else ""
    return volume, [str(path) for path in files.values()]


def test_start_analysis_reads_the_dicom_files_of_a_volume_from_the_database(module, monkeypatch, tmp_path):
    """A CT loaded from DICOM is analysed from its files (so its results can go back into its study), not exported."""
    volume, files = _dicom_volume(module, tmp_path)
    monkeypatch.setattr(module.shutil, "which", lambda name: "/slicer/bin/PythonSlicer")
    monkeypatch.setattr(module, "AnalysisJob", lambda logic, volumeNode, workDir, inputPath, command, *callbacks: command)
    command = module.CovidCTDiagnosisLogic().startAnalysis(volume, None, None)
    folder = Path(command[4])
    assert folder.name == module.DICOM_INPUT_DIR and command[5:7] == ["--out", str(folder.parent / module.RESULT_DIR)]
    assert [p.read_bytes() for p in sorted(folder.iterdir())] == [Path(f).read_bytes() for f in files]
    module.fakeSlicer.util.exportNode.assert_not_called()
    module.fakeSlicer.dicomDatabase.fileForInstance.side_effect = lambda uid: ""  # a file no longer in the database
    module.CovidCTDiagnosisLogic().startAnalysis(volume, None, None)
    assert module.fakeSlicer.util.exportNode.call_args.args[0] is volume


def _as_dicom_analysis(folder):
    report = json.loads((folder / outputs.REPORT_JSON).read_text())
    report["input"]["format"] = "dicom"
    (folder / outputs.REPORT_JSON).write_text(json.dumps(report))


def test_save_as_dicom_exports_with_the_source_files_and_imports(module, result_folder, monkeypatch, tmp_path):
    """Save as DICOM hands the engine's writer the result folder and the CT's files from the DICOM database, then
    adds what it wrote to the database. The writer here stands in for dicom_export (tested in its own tests)."""
    folder, _ = result_folder
    _as_dicom_analysis(folder)
    volume, files = _dicom_volume(module, tmp_path)
    calls = []
    writer = types.ModuleType("CovidCTDiagnosisLib.dicom_export")
    writer.export_dicom = lambda result_dir, source, out: calls.append((result_dir, source, out)) or [Path(out) / "SEG.dcm"]
    dicom_utils = mock.MagicMock(name="DICOMUtils")
    monkeypatch.setitem(sys.modules, "CovidCTDiagnosisLib.dicom_export", writer)
    monkeypatch.setitem(sys.modules, "DICOMLib", types.SimpleNamespace(DICOMUtils=dicom_utils))
    monkeypatch.setattr(slicer_runtime, "missing_requirements", lambda names=None: [])
    logic = module.CovidCTDiagnosisLogic()
    shown = module.ShownResults(None, 0, None, None, None, [], str(folder), volume)
    assert logic.dicomExportProblem(shown) is None
    out = tmp_path / "dicom-out"
    assert logic.saveResultsAsDicom(shown, str(out)) == [str(out / "SEG.dcm")]
    assert calls == [(str(folder), files, str(out))]
    dicom_utils.importDicom.assert_called_once_with(str(out))


def test_save_as_dicom_says_why_not_in_one_line(module, result_folder, tmp_path):
    """Results of a non-DICOM input, or a CT not from the DICOM database: one line, and nothing written."""
    folder, _ = result_folder
    volume, _ = _dicom_volume(module, tmp_path)
    logic = module.CovidCTDiagnosisLogic()
    shown = module.ShownResults(None, 0, None, None, None, [], str(folder), volume)
    problem = logic.dicomExportProblem(shown)
    assert problem.startswith("These results were computed from a nifti input, not a DICOM series")
    with pytest.raises(ValueError, match="computed from a nifti input"):
        logic.saveResultsAsDicom(shown, str(tmp_path / "out"))
    _as_dicom_analysis(folder)
    shown.volumeNode = mock.MagicMock(**{"GetAttribute.return_value": None})  # not loaded from DICOM
    assert logic.dicomExportProblem(shown).startswith("The CT was not loaded from Slicer's DICOM database")
    shown.volumeNode = None  # results shown without a CT
    assert "not loaded from Slicer's DICOM database" in logic.dicomExportProblem(shown)
    assert not (tmp_path / "out").exists()


def test_a_dicom_ct_analysed_and_saved_as_dicom_by_the_engine(module, monkeypatch, tmp_path):
    """The module's whole DICOM path with the real engine: a phantom CT series in the "database", analysed from its
    files by the command startAnalysis builds (run here in-process), saved through dicom_export: the objects
    written belong to the CT's study and the SEG refers to its series."""
    pytest.importorskip("highdicom", reason="DICOM export needs highdicom (Python >= 3.10)")
    pytest.importorskip("CovidCTDiagnosisLib.dicom_export", reason="DICOM export (dicom_export.py) is not in this tree")
    import pydicom
    from dicom_series import write_ct_series

    from CovidCTDiagnosisLib.cli import main
    from CovidCTDiagnosisLib.phantom import make_chest_phantom

    files = write_ct_series(make_chest_phantom().image, tmp_path / "database")
    by_uid = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): str(f) for f in files}
    volume = mock.MagicMock(name="volume")
    volume.GetAttribute.side_effect = lambda name: " ".join(by_uid) if name == slicer_runtime.DICOM_UIDS_ATTRIBUTE else None
    module.fakeSlicer.dicomDatabase.fileForInstance.side_effect = lambda uid: by_uid.get(uid, "")
    monkeypatch.setattr(module.shutil, "which", lambda name: "/slicer/bin/PythonSlicer")
    monkeypatch.setattr(module, "AnalysisJob", lambda logic, volumeNode, workDir, inputPath, command, *callbacks: command)
    logic = module.CovidCTDiagnosisLogic()
    command = logic.startAnalysis(volume, None, None, slices=3)
    assert main([*command[3:], "--quiet"]) == 0  # what the background PythonSlicer runs
    dicom_utils = mock.MagicMock(name="DICOMUtils")
    monkeypatch.setitem(sys.modules, "DICOMLib", types.SimpleNamespace(DICOMUtils=dicom_utils))
    shown = module.ShownResults(None, 0, None, None, None, [], command[command.index("--out") + 1], volume)
    assert logic.dicomExportProblem(shown) is None
    written = logic.saveResultsAsDicom(shown, str(tmp_path / "dicom-out"))
    dicom_utils.importDicom.assert_called_once_with(str(tmp_path / "dicom-out"))
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    objects = [pydicom.dcmread(path) for path in written]
    assert {str(o.StudyInstanceUID) for o in objects} == {str(source.StudyInstanceUID)}
    seg = next(o for o in objects if o.Modality == "SEG")
    assert {str(r.SeriesInstanceUID) for r in seg.ReferencedSeriesSequence} == {str(source.SeriesInstanceUID)}
