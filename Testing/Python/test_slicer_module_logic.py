"""The module's logic run without Slicer: `slicer`, `qt` and PyTorchUtils are replaced by mocks that
accept any call, so these tests check the module's own Python (what it computes and hands to
Slicer), not Slicer's behaviour; test_slicer_module_api checks the names it calls, and the
module's self-test runs it in Slicer."""

from __future__ import annotations

import importlib.util
import sys
import time
import types
from unittest import mock

import numpy as np
import pytest

from CovidCTDiagnosisLib import outputs, slicer_runtime
from CovidCTDiagnosisLib.scene_plan import plan_scene
from helpers_results import make_result, oblique_direction
from test_slicer_module_files import MODULE_FILE

TRANSFORM_ID = "vtkMRMLLinearTransformNode1"


class _Node:
    """Stands for the MRML classes the module imports by name (usable in annotations)."""


def _fake_slicer_modules(temporary_path) -> dict[str, types.ModuleType]:
    slicer = mock.MagicMock(name="slicer")
    slicer.vtkMRMLScalarVolumeNode = _Node
    slicer.app.temporaryPath = str(temporary_path)
    slicer.util.VTKObservationMixin = type("VTKObservationMixin", (), {"__init__": lambda self: None})
    slicer.util.confirmOkCancelDisplay.return_value = True
    slicer.util.arrayFromVTKMatrix.side_effect = lambda m: np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = lambda cls: cls
    wrapper.WithinRange = lambda low, high: (low, high)
    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleTest"):
        setattr(slm, name, type(name, (), {"__init__": lambda self, *args: None}))
    slm.ScriptedLoadableModuleLogic = type("ScriptedLoadableModuleLogic", (), {
        "__init__": lambda self: None, "getParameterNode": lambda self: mock.MagicMock()})
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    pytorch = types.ModuleType("PyTorchUtils")
    pytorch.PyTorchUtilsLogic = lambda: mock.MagicMock(**{"torchInstalled.return_value": True})
    return {"slicer": slicer, "slicer.util": slicer.util, "slicer.parameterNodeWrapper": wrapper,
            "slicer.ScriptedLoadableModule": slm, "slicer.i18n": i18n, "qt": mock.MagicMock(name="qt"),
            "PyTorchUtils": pytorch, "sitkUtils": mock.MagicMock(name="sitkUtils")}


@pytest.fixture
def module(tmp_path, monkeypatch):
    """The module file imported against the mocks; `fakeSlicer` is its `slicer`."""
    (tmp_path / "slicer-temp").mkdir()
    fakes = _fake_slicer_modules(tmp_path / "slicer-temp")
    for name, fake in fakes.items():
        monkeypatch.setitem(sys.modules, name, fake)
    spec = importlib.util.spec_from_file_location("CovidCTDiagnosisUnderTest", MODULE_FILE)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    loaded.fakeSlicer = fakes["slicer"]
    return loaded


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
    return volume


def test_load_results_builds_the_planned_nodes_under_the_volume_transform(module, result_folder):
    folder, result = result_folder
    plan = plan_scene(result, "CT")
    slicer = module.fakeSlicer
    volume = _volume(plan.geometry.ijk_to_ras(), plan.geometry.size)
    segmentation = slicer.util.loadSegmentation.return_value
    segmentation.GetSegmentation.return_value.GetSegment.return_value = mock.MagicMock()
    shown = module.CovidCTDiagnosisLogic().loadResults(str(folder), volume)

    array, matrix, name = slicer.util.addVolumeFromArray.call_args.args
    assert array.shape == tuple(reversed(plan.geometry.size)) and array.dtype == np.float32
    np.testing.assert_allclose(matrix, plan.geometry.ijk_to_ras())
    assert name == plan.heat_name
    added = [c.args[0] for c in slicer.mrmlScene.AddNewNodeByClass.call_args_list]
    assert added.count("vtkMRMLMarkupsROINode") == len(plan.rois) == len(shown.rois)
    assert added.count("vtkMRMLTableNode") == 1
    arrays, titles = slicer.util.updateTableFromArray.call_args.args[1:]
    assert titles == [t for t, _ in plan.table_columns()] and arrays[0].tolist() == [r.index for r in plan.rows]
    for node in [shown.segmentation, shown.heat, *shown.rois]:
        node.SetAndObserveTransformNodeID.assert_called_with(TRANSFORM_ID)
    assert slicer.util.setSliceViewerLayers.call_args.kwargs["background"] is volume
    names = [c.args[0] for c in segmentation.GetSegmentation.return_value.GetSegmentIdBySegmentName.call_args_list]
    assert names == [s.name for s in plan.segments]


def test_load_results_refuses_a_volume_of_another_grid(module, result_folder):
    folder, result = result_folder
    plan = plan_scene(result, "CT")
    moved = plan.geometry.ijk_to_ras()
    moved[2, 3] += 10.0
    with pytest.raises(ValueError, match="another volume"):
        module.CovidCTDiagnosisLogic().loadResults(str(folder), _volume(moved, plan.geometry.size))


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
    assert list(slicer.modules.markups.logic.return_value.JumpSlicesToLocation.call_args.args) == [*expected, True]


def test_dependencies_are_installed_only_after_asking(module, monkeypatch):
    slicer = module.fakeSlicer
    monkeypatch.setattr(slicer_runtime, "missing_requirements", lambda: ["slicerio>=1.1"])
    slicer.util.confirmOkCancelDisplay.return_value = False
    with pytest.raises(RuntimeError, match="not installed"):
        module.CovidCTDiagnosisLogic().setupDependencies()
    slicer.util.pip_install.assert_not_called()
    slicer.util.confirmOkCancelDisplay.return_value = True
    module.CovidCTDiagnosisLogic().setupDependencies()
    requirements = slicer.util.pip_install.call_args.args[0]
    assert requirements[0] == "slicerio>=1.1" and requirements[1] == "--constraint"
    assert "numpy==" in open(requirements[2]).read()


def _run_job(module, tmp_path, script, cancel=False):
    """An AnalysisJob on a stand-in engine command, polled by hand in place of the QTimer."""
    work = tmp_path / "work"
    (work / "result").mkdir(parents=True)
    (work / module.INPUT_FILE).write_text("")
    logic = mock.MagicMock(name="logic")
    progress, finished = [], []
    job = module.AnalysisJob(logic, mock.MagicMock(), str(work), [sys.executable, "-c", script],
                             lambda f, s: progress.append((f, s)), finished.append)
    if cancel:
        job.cancel()
    deadline = time.monotonic() + 60
    while not finished and time.monotonic() < deadline:
        job._poll()
        time.sleep(0.05)
    return job, logic, progress, finished, work


def test_job_reports_progress_then_loads_its_result_folder(module, tmp_path):
    script = "print('PROGRESS 0.500 lungs', flush=True); print('PROGRESS 1.000 aggregate', flush=True)"
    job, logic, progress, finished, work = _run_job(module, tmp_path, script)
    assert finished == [job] and progress == [(0.5, "lungs"), (1.0, "aggregate")]
    logic.loadResults.assert_called_once_with(str(work / "result"), job.volumeNode)
    assert job.error is None and job.results is logic.loadResults.return_value
    assert not (work / module.INPUT_FILE).exists() and (work / "result").is_dir()


def test_job_failure_and_cancel_clean_up(module, tmp_path):
    script = "import sys; print('covidct: error: no lungs found in the image', file=sys.stderr); sys.exit(5)"
    job, logic, _, finished, work = _run_job(module, tmp_path, script)
    assert finished == [job] and job.error == "no lungs found in the image" and not job.cancelled
    logic.loadResults.assert_not_called()
    assert not work.exists()
    job, logic, _, finished, work = _run_job(module, tmp_path, "import time; time.sleep(60)", cancel=True)
    assert finished == [job] and job.cancelled and job.error is None and not work.exists()
    logic.loadResults.assert_not_called()
