"""The module's Logic on Slicer's real MRML: the pip package `slicer-core` (Slicer's C++ core: vtkMRMLScene, node
classes, storage nodes) with Slicer's own pure-Python modules from ../shared/slicer-api/python (never copied here).

The engine analyses the synthetic phantom (a tiny untrained DRENet, fast) on an identity, an oblique and an oblique
left-handed grid; its CT is read into the scene by Slicer's volume reader (vtkMRMLVolumeArchetypeStorageNode, which
makes a left-handed grid right-handed), and `loadResults` puts the result folder over it. Every output file is read
back through Slicer's storage nodes and compared with what the engine wrote. Frames: report.json and the files are
LPS, the scene RAS; IJK is the CT's voxel grid as Slicer holds it.

Stand-ins, the only ones (Slicer has no Qt here): the modules `qt` and `ctk` (MagicMocks; Slicer's
ScriptedLoadableModule and parameterNodeWrapper import them at load) and the Qt widget classes that
parameterNodeWrapper names at load (QT_WIDGET_CLASSES, empty classes put on `slicer`). No `slicer.app`: loadResults
and jumpToSlice do not need it.
"""

from __future__ import annotations

import json
import sys
from unittest import mock

import numpy as np
import pytest
import SimpleITK as sitk

pytest.importorskip("slicer_core", reason="slicer-core (Slicer's MRML; Python >= 3.10, Linux/Windows/macOS arm64) is not installed")
import slicer  # noqa: E402  (slicer-core's package)
import vtk  # noqa: E402

from CovidCTDiagnosisLib import outputs, slicer_runtime  # noqa: E402
from CovidCTDiagnosisLib.checkpoint import save_checkpoint  # noqa: E402
from CovidCTDiagnosisLib.drenet import DRENet, DRENetConfig  # noqa: E402
from CovidCTDiagnosisLib.phantom import make_chest_phantom  # noqa: E402
from CovidCTDiagnosisLib.pipeline import Analyzer  # noqa: E402
from CovidCTDiagnosisLib.display import HEAT_OPACITY  # noqa: E402
from CovidCTDiagnosisLib.geometry import LPS_TO_RAS  # noqa: E402
from CovidCTDiagnosisLib.scene_plan import folder_name  # noqa: E402
from CovidCTDiagnosisLib.segmentation_file import box_description  # noqa: E402
from helpers_results import left_handed_oblique_direction, oblique_direction  # noqa: E402
from slicer_stand_ins import load_module_file  # noqa: E402
from test_slicer_module_files import MODULE_FILE  # noqa: E402
from test_slicer_module_logic import SLICER_PYTHON  # noqa: E402

QT_WIDGET_CLASSES = ["qMRMLNodeComboBox", "qMRMLRangeWidget", "qMRMLSliderWidget", "qMRMLSpinBox", "qMRMLUtils",
                     "qMRMLWidget", "qSlicerWidget"]
GRIDS = {"phantom": None, "oblique": oblique_direction(), "oblique left-handed": left_handed_oblique_direction()}
TILT = np.array([[1.0, 0.0, 0.0, 10.0], [0.0, 0.94, -0.342, -20.0], [0.0, 0.342, 0.94, 30.0], [0.0, 0.0, 0.0, 1.0]])


@pytest.fixture(scope="module")
def module():
    """The module file imported against slicer-core and Slicer's own ScriptedLoadableModule, i18n, parameterNodeWrapper."""
    if not (SLICER_PYTHON / "slicer" / "ScriptedLoadableModule.py").is_file():
        pytest.skip(f"Slicer's Python modules are not at {SLICER_PYTHON}")
    before = set(sys.modules)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "qt", mock.MagicMock(name="qt"))
        patch.setitem(sys.modules, "ctk", mock.MagicMock(name="ctk"))
        patch.setattr(slicer, "__path__", [*slicer.__path__, str(SLICER_PYTHON / "slicer")])
        for name in QT_WIDGET_CLASSES:
            patch.setattr(slicer, name, type(name, (), {}), raising=False)
        yield load_module_file(MODULE_FILE, "CovidCTDiagnosisOnMRML")
    for name in set(sys.modules) - before:  # Slicer's Python modules and the module file, bound to these stand-ins
        if name.startswith("slicer.") or name == "CovidCTDiagnosisOnMRML":
            del sys.modules[name]


@pytest.fixture
def scene(module, monkeypatch):
    """A new vtkMRMLScene as `slicer.mrmlScene`, with the Red slice view's nodes (axial) that a layout would add."""
    scene = slicer.vtkMRMLScene()
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    for node_class in ("vtkMRMLSliceNode", "vtkMRMLSliceCompositeNode"):  # singletons, as in Slicer: kept by Clear()
        node = scene.CreateNodeByClass(node_class)
        node.SetLayoutName("Red")
        node.SetSingletonTag("Red")
        scene.AddNode(node)
    yield scene
    scene.Clear(True)


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    """Grid name -> (CT file, result folder, lung labels k, j, i on the file's grid) of the engine on the phantom on that grid (tiny untrained DRENet)."""
    import torch

    work = tmp_path_factory.mktemp("mrml")
    torch.manual_seed(0)
    model = save_checkpoint(work / "tiny.pt", DRENet(DRENetConfig(input_size=64)), trained=False, metadata={"name": "tiny"})
    analyzer, done = Analyzer(str(model), "cpu"), {}

    def analyse(grid):
        if grid not in done:
            kwargs = {"direction": GRIDS[grid]} if GRIDS[grid] else {}
            image = make_chest_phantom(**kwargs).image
            ct = work / f"{grid}.nrrd".replace(" ", "-")
            sitk.WriteImage(image, str(ct))
            result = analyzer.analyze(image, slices=5)
            folder = outputs.write_outputs(result, image, work / grid.replace(" ", "-"))
            done[grid] = ct, folder, sitk.GetArrayFromImage(result.lung_labels)
        return done[grid]

    return analyse


def _read(scene, node_class, storage_class, path, name="read"):
    """A node of `node_class` read from `path` by Slicer's storage node `storage_class`."""
    node = scene.AddNewNodeByClass(node_class, name)
    storage = scene.AddNewNodeByClass(storage_class)
    storage.SetFileName(str(path))
    node.SetAndObserveStorageNodeID(storage.GetID())
    assert storage.ReadData(node), f"{storage_class} cannot read {path}"
    return node


def _ijk_to_ras(volume) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def _ct_in_scene(scene, ct_file, transformed=False):
    """The CT read by Slicer's volume reader, with the subject-hierarchy item Slicer's (Qt) plugins would give it."""
    volume = _read(scene, "vtkMRMLScalarVolumeNode", "vtkMRMLVolumeArchetypeStorageNode", ct_file, "CT")
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    shNode.CreateItem(shNode.GetSceneItemID(), volume)
    if transformed:
        transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "tilt")
        transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(TILT))
        volume.SetAndObserveTransformNodeID(transform.GetID())
    return volume


@pytest.mark.parametrize("grid, transformed", [("phantom", False), ("oblique", False), ("oblique left-handed", False),
                                               ("phantom", True)], ids=[*GRIDS, "under a parent transform"])
def test_load_results_on_a_real_scene(module, scene, analysed, grid, transformed):
    ct_file, folder, lung_labels = analysed(grid)
    volume = _ct_in_scene(scene, ct_file, transformed)
    report = json.loads((folder / outputs.REPORT_JSON).read_text())
    ct_matrix = _ijk_to_ras(volume)
    if grid == "oblique left-handed":  # Slicer's reader made it right-handed: the k axis reversed
        on_file = sitk.ReadImage(str(ct_file))
        assert np.linalg.det(ct_matrix[:3, :3]) > 0 > np.linalg.det(np.reshape(on_file.GetDirection(), (3, 3)))
    shown = module.CovidCTDiagnosisLogic().loadResults(str(folder), volume)

    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    assert shNode.GetItemChildWithName(shNode.GetSceneItemID(), folder_name("CT")) == shown.folderItem
    children = vtk.vtkIdList()
    shNode.GetItemChildren(shown.folderItem, children)
    nodes = [shown.segmentation, shown.heat, shown.table, *shown.rois, shown.severity, shown.severityTable]
    assert sorted(children.GetId(i) for i in range(children.GetNumberOfIds())) == sorted(shNode.GetItemByDataNode(n) for n in nodes)

    boxes_lps = np.array([b["center_lps"] for s in report["slices"] for b in s["boxes"]])
    segmentation = shown.segmentation.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 2 + len(boxes_lps)
    for planned in shown.plan.segments:
        segment = segmentation.GetSegment(planned.segment_id)
        assert segment.GetName() == planned.name and segment.GetColor() == pytest.approx(planned.color)
        terminology = vtk.reference("")
        assert segment.GetTag(segment.GetTerminologyEntryTagName(), terminology)
        assert str(terminology) == planned.terminology  # SNOMED CT codes, as the file's
    assert [segmentation.GetNthSegment(i).GetName() for i in range(2)] == ["Right lung", "Left lung"]

    np.testing.assert_allclose(_ijk_to_ras(shown.heat), ct_matrix, atol=1e-6)  # the heat map on the CT's IJK grid
    assert shown.heat.GetImageData().GetDimensions() == volume.GetImageData().GetDimensions()
    centres = np.array([r.GetCenter() for r in shown.rois])  # RAS, in the volume's (parent transform's) frame
    descriptions = sorted(box_description(b["score"]) for s in report["slices"] for b in s["boxes"])
    assert sorted(r.GetDescription() for r in shown.rois) == descriptions  # set after SetSize, which clears it
    np.testing.assert_allclose(np.sort(centres, axis=0), np.sort(boxes_lps @ LPS_TO_RAS, axis=0), atol=1e-6)
    slices = slicer.util.arrayFromTableColumn(shown.table, "Slice").tolist()
    nk = volume.GetImageData().GetDimensions()[2]
    flipped = grid == "oblique left-handed"
    assert slices == [nk - 1 - s["index"] if flipped else s["index"] for s in report["slices"]]
    for node in [shown.segmentation, shown.heat, *shown.rois, shown.severity]:
        assert node.GetTransformNodeID() == volume.GetTransformNodeID()
    for node in (shown.segmentation, shown.severity):  # linked to the CT, as Slicer's editor and DICOM SEG export need
        assert node.GetNodeReferenceID(node.GetReferenceImageGeometryReferenceRole()) == volume.GetID()
    severity = shown.severity.GetSegmentation()  # the measured involvement: its own node and table
    assert [severity.GetNthSegment(i).GetName() for i in range(severity.GetNumberOfSegments())] == ["Ground-glass", "Consolidation"]
    table = shown.severityTable
    assert table.GetNumberOfRows() == 9 and table.GetColumnName(0) == "Lung"
    assert [table.GetCellText(r, 0) + " " + table.GetCellText(r, 1) for r in (0, 5, 8)] == ["right upper", "left lower", "both all"]
    assert int(table.GetCellText(8, table.GetColumnIndex("Score"))) == report["severity"]["score"]
    assert float(table.GetCellText(8, table.GetColumnIndex("Involved (%)"))) == pytest.approx(
        report["severity"]["lungs"]["both"]["involved_percent"], abs=0.05)

    # Every output file through Slicer's own storage nodes, against what the engine wrote (sitk: LPS, the file's grid)
    def on_ct_grid(array_kji):
        return np.flip(array_kji, axis=0) if flipped else array_kji

    lungs = vtk.vtkStringArray()  # exported in this order: label 1 the right lung, 2 the left, as the engine numbers them
    for name in ["Right lung", "Left lung"]:
        lungs.InsertNextValue(segmentation.GetSegmentIdBySegmentName(name))
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(shown.segmentation, lungs, labelmap, volume)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(labelmap), on_ct_grid(lung_labels))
    bands = vtk.vtkStringArray()  # label 1 ground-glass, 2 consolidation, as the engine numbers them
    for name in ["Ground-glass", "Consolidation"]:
        bands.InsertNextValue(severity.GetSegmentIdBySegmentName(name))
    assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(shown.severity, bands, labelmap, volume)
    engine_bands = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / outputs.SEVERITY_SEG_NRRD)))
    assert (engine_bands == 1).sum() > 0 and (engine_bands == 2).sum() > 0  # the phantom's lesions
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(labelmap), on_ct_grid(engine_bands))
    heat = _read(scene, "vtkMRMLScalarVolumeNode", "vtkMRMLVolumeArchetypeStorageNode", folder / outputs.GRADCAM_NRRD)
    np.testing.assert_allclose(_ijk_to_ras(heat), ct_matrix, atol=1e-6)
    engine_heat = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / outputs.GRADCAM_NRRD)))
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(heat), on_ct_grid(engine_heat))
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(shown.heat), on_ct_grid(engine_heat))
    markups = scene.AddNode(slicer.vtkMRMLMarkupsJsonStorageNode())  # a class the scene registers only with Markups' logic
    path = str(folder / outputs.LESIONS_MRK_JSON)
    read_rois = [markups.AddNewMarkupsNodeFromFile(path, "", i) for i in range(len(boxes_lps))]
    assert all(r is not None and r.IsA("vtkMRMLMarkupsROINode") for r in read_rois)
    np.testing.assert_allclose([r.GetCenter() for r in read_rois], boxes_lps @ LPS_TO_RAS, atol=1e-6)
    table = _read(scene, "vtkMRMLTableNode", "vtkMRMLTableStorageNode", folder / outputs.SLICES_CSV)
    assert table.GetNumberOfRows() == len(report["slices"])
    assert [int(table.GetCellText(r, 0)) for r in range(table.GetNumberOfRows())] == [s["index"] for s in report["slices"]]


def test_results_load_with_the_heat_opacity_saved_in_the_parameter_node(module, scene, analysed):
    ct_file, folder, _ = analysed("phantom")
    volume = _ct_in_scene(scene, ct_file)
    logic = module.CovidCTDiagnosisLogic()
    logic.getParameterNode().heatOpacity = 0.7  # as a scene saved with another opacity brings it back
    logic.loadResults(str(folder), volume)
    assert scene.GetFirstNodeByClass("vtkMRMLSliceCompositeNode").GetForegroundOpacity() == pytest.approx(0.7)


def test_reload_replaces_and_jump_lands_on_the_transformed_slice(module, scene, analysed):
    """Loading again replaces the folder and its nodes; jumpToSlice centres the slice views on the row's slice in world RAS."""
    ct_file, folder, _ = analysed("phantom")
    volume = _ct_in_scene(scene, ct_file, transformed=True)
    logic = module.CovidCTDiagnosisLogic()
    logic.loadResults(str(folder), volume)
    shown = logic.loadResults(str(folder), volume)
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    top = vtk.vtkIdList()
    shNode.GetItemChildren(shNode.GetSceneItemID(), top)
    named = [shNode.GetItemName(top.GetId(i)) for i in range(top.GetNumberOfIds())]
    assert named.count(folder_name("CT")) == 1 and named.count("CT") == 1
    # Found with slicer-core: items of removed nodes stay, empty (no data node), at the scene level, whether the folder
    # is removed with RemoveItem or its nodes with vtkMRMLScene.RemoveNode (the subject hierarchy node reports a
    # "DataNodeCache inconsistency"); Slicer's Qt subject-hierarchy plugins, absent here, keep them in step.
    assert all(shNode.GetItemDataNode(top.GetId(i)) is None for i, n in enumerate(named) if n not in ("CT", folder_name("CT")))
    counts = {c: scene.GetNumberOfNodesByClass(c) for c in
              ["vtkMRMLSegmentationNode", "vtkMRMLTableNode", "vtkMRMLMarkupsROINode", "vtkMRMLColorTableNode"]}
    assert counts == {"vtkMRMLSegmentationNode": 2, "vtkMRMLTableNode": 2, "vtkMRMLMarkupsROINode": len(shown.rois),
                      "vtkMRMLColorTableNode": 1}
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 2  # the CT and one heat map
    composite = scene.GetFirstNodeByClass("vtkMRMLSliceCompositeNode")
    assert (composite.GetBackgroundVolumeID(), composite.GetForegroundVolumeID()) == (volume.GetID(), shown.heat.GetID())
    assert composite.GetForegroundOpacity() == pytest.approx(HEAT_OPACITY)

    row = 1
    logic.jumpToSlice(shown, row)
    world = TILT @ np.append(shown.plan.rows[row].center_ras, 1.0)
    red = scene.GetFirstNodeByClass("vtkMRMLSliceNode")
    np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(red.GetSliceToRAS())[:3, 3], world[:3], atol=1e-6)


@pytest.fixture
def in_process(module, monkeypatch, tmp_path):
    """What process() needs beyond MRML: Slicer's own sitkUtils (from Slicer's Python modules) and, as stand-ins, the
    PyTorch extension's `PyTorchUtils` reporting torch installed (it is, here) and `slicer.app.temporaryPath`."""
    monkeypatch.syspath_prepend(str(SLICER_PYTHON))
    monkeypatch.delitem(sys.modules, "sitkUtils", raising=False)  # imported again, and removed after the test
    torch_utils = mock.MagicMock(name="PyTorchUtils")
    torch_utils.PyTorchUtilsLogic.return_value.torchInstalled.return_value = True
    monkeypatch.setitem(sys.modules, "PyTorchUtils", torch_utils)
    monkeypatch.setattr(slicer, "app", mock.MagicMock(name="app", temporaryPath=str(tmp_path)), raising=False)
    return module


def test_process_analyses_the_volume_in_the_scene(in_process, scene, analysed, tmp_path):
    """process(): the engine on the scene's own volume (pulled with Slicer's sitkUtils), results shown over it;
    a second process() replaces them."""
    import torch

    ct_file, _, _ = analysed("oblique")
    volume = _ct_in_scene(scene, ct_file)
    torch.manual_seed(0)
    model = save_checkpoint(tmp_path / "tiny.pt", DRENet(DRENetConfig(input_size=64)), trained=False, metadata={"name": "tiny"})
    logic = in_process.CovidCTDiagnosisLogic()
    logic.process(volume, model=str(model), device="cpu", slices=5)
    result = logic.process(volume, model=str(model), device="cpu", slices=5)
    shown = logic.shownResults
    assert not result.model.trained and 0 < len(result.slices) <= 5  # of 5 equidistant, those with enough lung
    np.testing.assert_allclose(_ijk_to_ras(shown.heat), _ijk_to_ras(volume), atol=1e-6)
    assert slicer.util.arrayFromTableColumn(shown.table, "Slice").tolist() == [s.index for s in result.slices]
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 2  # lungs and involvement, replaced not added
    assert shown.severity.GetSegmentation().GetNumberOfSegments() == 2
    lungs = vtk.vtkStringArray()
    for name in ["Right lung", "Left lung"]:
        lungs.InsertNextValue(shown.segmentation.GetSegmentation().GetSegmentIdBySegmentName(name))
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(shown.segmentation, lungs, labelmap, volume)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(labelmap), sitk.GetArrayFromImage(result.lung_labels))


def _dicom_files_in_slicer_order(folder) -> list[str]:
    """A DICOM series' files as Slicer's DICOM scalar-volume plugin loads them: sorted by position along the slice normal."""
    positions = []
    for path in sorted(folder.iterdir()):
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        orientation = np.array(reader.GetMetaData("0020|0037").split("\\"), dtype=float)
        normal = np.cross(orientation[:3], orientation[3:])
        positions.append((float(np.dot(normal, np.array(reader.GetMetaData("0020|0032").split("\\"), dtype=float))), str(path)))
    return [path for _, path in sorted(positions)]


def _read_as_slicers_dicom_module_does(scene, folder):
    """A volume node of the DICOM series in `folder`, read by Slicer's reader from its files in the DICOM module's order."""
    files = _dicom_files_in_slicer_order(folder)
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", folder.name)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(files[0])
    storage.ResetFileNameList()
    for path in files:
        storage.AddFileName(path)
    storage.SetSingleFile(False)
    volume.SetAndObserveStorageNodeID(storage.GetID())
    assert storage.ReadData(volume), f"Slicer's reader cannot read {folder}"
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    shNode.CreateItem(shNode.GetSceneItemID(), volume)
    return volume


def test_load_results_over_a_real_dicom_ct_read_as_slicers_dicom_module_does(module, scene, tmp_path):
    """P001 (real, JPEG-lossless DICOM): analysed by the engine from its folder; Slicer's reader given the files in the
    DICOM module's order holds the same voxels, and the results land on it (heat map on the CT's grid, slice numbers)."""
    from conftest import SHARED_DATA

    folder = SHARED_DATA / "ct" / "covid-ct-md" / "P001-covid"
    if not folder.is_dir():
        pytest.skip(f"real CT not available: {folder} does not exist")
    import torch

    torch.manual_seed(0)
    model = save_checkpoint(tmp_path / "tiny.pt", DRENet(DRENetConfig(input_size=64)), trained=False, metadata={"name": "tiny"})
    result = Analyzer(str(model), "cpu").analyze(str(folder), slices=3)
    results = outputs.write_outputs(result, result.ct, tmp_path / "P001")

    volume = _read_as_slicers_dicom_module_does(scene, folder)
    assert volume.GetImageData().GetDimensions() == tuple(result.ct.GetSize())

    shown = module.CovidCTDiagnosisLogic().loadResults(str(results), volume)
    ct_matrix = _ijk_to_ras(volume)
    np.testing.assert_allclose(_ijk_to_ras(shown.heat), ct_matrix, atol=1e-4)
    hu_scene, hu_engine = slicer.util.arrayFromVolume(volume), sitk.GetArrayFromImage(result.ct)
    flipped = not np.array_equal(hu_scene, hu_engine)  # Slicer may hold the slices in the other order (k reversed)
    if flipped:
        np.testing.assert_array_equal(hu_scene, np.flip(hu_engine, axis=0))
    nk = hu_engine.shape[0]
    assert [row.index for row in shown.plan.rows] == [nk - 1 - s.index if flipped else s.index for s in result.slices]
    for row in shown.plan.rows:  # each row's slice number, on Slicer's grid, is where its centre lies in the CT
        assert np.linalg.solve(ct_matrix, np.append(row.center_ras, 1.0))[2] == pytest.approx(row.index, abs=1e-3)


def test_the_modules_self_test_passes_on_slicer_core(in_process, scene, monkeypatch):
    """The module's own in-process self-tests (an oblique volume; a transformed one analysed twice, then the jump) on
    Slicer's real MRML; its background test needs Slicer's PythonSlicer and runs only in Slicer. delayDisplay (a Qt
    dialog) only logs here."""
    self_test = in_process.CovidCTDiagnosisTest()
    monkeypatch.setattr(self_test, "delayDisplay", lambda message, *args, **kwargs: None)
    for test in (self_test.test_ProcessObliqueVolume, self_test.test_TransformedVolumeIsReplacedNotDuplicated):
        self_test.setUp()  # clears the scene, keeping its singletons (the slice views' nodes), as runTest does
        test()
        assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 2  # lungs and boxes; involvement


def test_process_analyses_a_dicom_ct_from_its_files_in_the_database(in_process, scene, tmp_path, monkeypatch):
    """process() on P001 loaded from the DICOM database analyses its files (found through DICOM.instanceUIDs and the
    database), not a copy of the voxels: the results are of the DICOM series (so they can be saved into its study),
    land on the volume, and the gathered files are removed afterwards."""
    import pydicom
    import torch

    from conftest import SHARED_DATA

    folder = SHARED_DATA / "ct" / "covid-ct-md" / "P001-covid"
    if not folder.is_dir():
        pytest.skip(f"real CT not available: {folder} does not exist")
    volume = _read_as_slicers_dicom_module_does(scene, folder)
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in _dicom_files_in_slicer_order(folder)]
    by_uid = {str(h.SOPInstanceUID): str(h.filename) for h in headers}
    volume.SetAttribute(slicer_runtime.DICOM_UIDS_ATTRIBUTE, " ".join(by_uid))  # as Slicer's DICOM plugin does
    series = str(headers[0].SeriesInstanceUID)
    database = mock.MagicMock(name="dicomDatabase", **{"fileForInstance.side_effect": lambda uid: by_uid.get(uid, ""),
                                                      "instanceValue.return_value": series})
    monkeypatch.setattr(slicer, "dicomDatabase", database, raising=False)
    torch.manual_seed(0)
    model = save_checkpoint(tmp_path / "tiny.pt", DRENet(DRENetConfig(input_size=64)), trained=False, metadata={"name": "tiny"})
    logic = in_process.CovidCTDiagnosisLogic()
    report = logic.process(volume, model=str(model), device="cpu", slices=3).to_report()
    assert (report["input"]["format"], report["input"]["series_uid"]) == ("dicom", series)
    np.testing.assert_allclose(_ijk_to_ras(logic.shownResults.heat), _ijk_to_ras(volume), atol=1e-4)
    assert logic.dicomExportProblem(logic.shownResults) is None
    assert not list(tmp_path.rglob(in_process.DICOM_INPUT_DIR))
