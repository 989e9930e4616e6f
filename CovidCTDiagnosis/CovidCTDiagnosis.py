"""COVID CT Diagnosis: the 3D Slicer module of CovidCTDiagnosis (DRENet, Song et al. 2021).

A thin layer over the Slicer-free engine CovidCTDiagnosisLib, which sits next to this file. The
widget runs `covidct analyze` in a background PythonSlicer process, so Slicer stays responsive
and Cancel can kill it; the logic also analyses in-process (`process`), in batch
(`processFiles`), and shows result folders (`loadResults`). What goes into the scene is computed
by CovidCTDiagnosisLib.scene_plan; this file only applies it to MRML nodes.
"""

import enum
import logging
import os
import shutil
import sys
import tempfile
import time
from typing import Annotated, Optional

import qt
import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
if MODULE_DIR not in sys.path:
    sys.path.insert(0, MODULE_DIR)

from CovidCTDiagnosisLib import slicer_runtime  # noqa: E402  (standard library only: works before the dependencies)
from CovidCTDiagnosisLib.display import HEAT_OPACITY, HEAT_THRESHOLD  # noqa: E402  (constants only)

UNTRAINED_MODEL = "untrained"
TEMP_KEY = "CovidCTDiagnosis"
INPUT_FILE = "input.nrrd"
DICOM_INPUT_DIR = "input-dicom"
RESULT_DIR = "result"
POLL_INTERVAL_MS = 200
PROGRESS_STEPS = 100
JOB_TIMEOUT_S = 600  # the self-test's limit for a background analysis
SERIES_INSTANCE_UID_TAG = "0020,000E"  # as ctkDICOMDatabase names tags


class Device(enum.Enum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"

    def label(self):
        return {"auto": _("Auto (GPU if available)"), "cpu": _("CPU"), "cuda": _("GPU (CUDA)")}[self.value]


class SliceChoice(enum.Enum):
    PAPER = "15"
    ALL = "all"

    def label(self):
        return {"15": _("15 equidistant (as in the paper)"), "all": _("All lung slices")}[self.value]


class CovidCTDiagnosis(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("COVID CT Diagnosis")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Chest Imaging")]
        self.parent.dependencies = []
        self.parent.contributors = ["CovidCTDiagnosis developers"]
        self.parent.helpText = _(
            "Analyses a chest CT for COVID-19 with DRENet (Song et al. 2021): the patient-level result, the lungs and "
            "lesion boxes as a segmentation, a Grad-CAM heat map and a table of the analysed slices. "
            "<b>Research use only; not for diagnosis.</b> See docs/slicer.md in the extension's repository."
        )
        self.parent.acknowledgementText = _(
            "Method: Song Y. et al., Deep Learning Enables Accurate Diagnosis of Novel Coronavirus (COVID-19) With CT "
            "Images, IEEE/ACM Transactions on Computational Biology and Bioinformatics, 2021."
        )


@parameterNodeWrapper
class CovidCTDiagnosisParameterNode:
    """The user's choices, saved with the scene.

    inputVolume - the chest CT to analyse.
    model - "" for the bundled model, "untrained" (tests the pipeline only), or a model file path.
    device, slices - the engine's options (it aggregates slices by their mean, its only method).
    heatOpacity - opacity of the Grad-CAM map over the CT.

    Scenes saved before Noisy-OR was removed also hold an "aggregation" parameter: the wrapper reads
    only the parameters declared here, so that one is ignored.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    model: str = ""
    device: Device = Device.AUTO
    slices: SliceChoice = SliceChoice.PAPER
    heatOpacity: Annotated[float, WithinRange(0.0, 1.0)] = HEAT_OPACITY


class ShownResults:
    """The nodes one analysis put into the scene, with the plan they were made from."""

    def __init__(self, plan, folderItem: int, segmentation: slicer.vtkMRMLSegmentationNode, heat: vtkMRMLScalarVolumeNode,
                 table: slicer.vtkMRMLTableNode, rois: list[slicer.vtkMRMLMarkupsROINode], resultFolder: str,
                 volumeNode: Optional[vtkMRMLScalarVolumeNode], severity: Optional[slicer.vtkMRMLSegmentationNode] = None,
                 severityTable: Optional[slicer.vtkMRMLTableNode] = None):
        self.plan, self.folderItem = plan, folderItem
        self.segmentation, self.heat, self.table, self.rois = segmentation, heat, table, rois
        self.resultFolder, self.volumeNode = resultFolder, volumeNode  # where they were read from, and over which CT
        self.severity, self.severityTable = severity, severityTable  # None where the CT's involvement was not measured

    def nodes(self) -> list:
        """Every node of these results (all under `folderItem`)."""
        measured = [n for n in (self.severity, self.severityTable) if n is not None]
        return [self.segmentation, self.heat, self.table, *self.rois, *measured]


class AnalysisJob:
    """A background `covidct analyze` of one volume: polls the process, then shows its results."""

    def __init__(self, logic, volumeNode: vtkMRMLScalarVolumeNode, workDir, inputPath, command, onProgress, onFinished):
        self.logic, self.volumeNode, self.workDir, self.inputPath = logic, volumeNode, workDir, inputPath
        self.onProgress, self.onFinished = onProgress, onFinished
        self.resultFolder = os.path.join(workDir, RESULT_DIR)
        self.results = None
        self.error = None
        self.analysis = slicer_runtime.BackgroundAnalysis(command)
        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_INTERVAL_MS)
        self.timer.connect("timeout()", self._poll)
        self.timer.start()

    @property
    def cancelled(self):
        return self.analysis.cancelled

    @property
    def finished(self):
        return not self.timer.active

    def cancel(self):
        self.analysis.cancel()

    def _poll(self):
        update = self.analysis.poll()
        for line in update.lines:
            logging.info(line)
        for fraction, stage in update.progress:
            self.onProgress(fraction, stage)
        if not self.analysis.finished:
            return
        self.timer.stop()
        if os.path.isdir(self.inputPath):
            shutil.rmtree(self.inputPath)  # links to (or copies of) the DICOM database's files
        else:
            os.remove(self.inputPath)
        if self.cancelled or self.analysis.returncode != 0:
            self.error = None if self.cancelled else self.analysis.error_message
            shutil.rmtree(self.workDir, ignore_errors=True)
        else:
            try:
                self.results = self.logic.loadResults(self.resultFolder, self.volumeNode)
            except Exception as exc:
                logging.exception("Loading the analysis results failed")
                self.error = str(exc)
        self.onFinished(self)


class CovidCTDiagnosisWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._shown = None
        self._topSliceButtons = []
        self._modelChoices = None  # the model combo box's (text, model) items

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CovidCTDiagnosis.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.ui.progressBar.maximum = PROGRESS_STEPS
        self.logic = CovidCTDiagnosisLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChosen)
        self.ui.loadModelButton.connect("clicked(bool)", self.onLoadModel)
        self.ui.analyzeButton.connect("clicked(bool)", self.onAnalyze)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.loadResultsButton.connect("clicked(bool)", self.onLoadResults)
        self.ui.slicesTableView.connect("clicked(QModelIndex)", self.onSliceClicked)
        self.ui.opacitySliderWidget.connect("valueChanged(double)", self.onOpacityChanged)
        self.ui.saveDicomButton.connect("clicked(bool)", self.onSaveAsDicom)
        self.initializeParameterNode()

    def onReload(self):
        """Developer mode's Reload: the engine (CovidCTDiagnosisLib) is imported afresh too, not only this file."""
        slicer_runtime.forget_engine_modules()
        super().onReload()

    def cleanup(self):
        if self._job:
            self._job.cancel()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event):
        if self._job:
            self._job.cancel()
        self._showResults(None)
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def setParameterNode(self, parameterNode: Optional[CovidCTDiagnosisParameterNode]):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)
            self.updateGUI()

    def updateGUI(self, caller=None, event=None):
        """Model choices and which buttons can be used."""
        if not self._parameterNode:
            return
        model = self._parameterNode.model
        bundled = slicer_runtime.bundled_model_path()
        choices = [(_("Bundled DRENet model") if bundled else _("Bundled model (not installed)"), "")]
        if model not in ("", UNTRAINED_MODEL):
            choices.append((os.path.basename(model), model))
        choices.append((_("Untrained network (tests the pipeline; not a diagnosis)"), UNTRAINED_MODEL))
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        if choices != self._modelChoices:  # rebuilt only when they change, not on every parameter change (slider steps)
            combo.clear()
            for text, spec in choices:
                combo.addItem(text, spec)
            self._modelChoices = choices
        combo.currentIndex = [spec for _text, spec in choices].index(model)
        combo.blockSignals(wasBlocked)

        modelReady = bool(bundled) if model == "" else model == UNTRAINED_MODEL or os.path.isfile(model)
        running = self._job is not None
        self.ui.analyzeButton.enabled = bool(self._parameterNode.inputVolume) and modelReady and not running
        self.ui.analyzeButton.toolTip = (
            _("Analyse the selected CT") if modelReady else _("No model: load a model file, or choose the untrained network")
        )
        self.ui.cancelButton.enabled = running
        self.ui.loadModelButton.enabled = not running
        self.ui.loadResultsButton.enabled = not running

    def onModelChosen(self, index):
        self._parameterNode.model = self.ui.modelComboBox.itemData(index)

    def onLoadModel(self):
        path = qt.QFileDialog.getOpenFileName(
            slicer.util.mainWindow(), _("Load model file"), "", _("DRENet model files (*.pt *.pth);;All files (*)")
        )
        if not path:
            return
        with slicer.util.tryWithErrorDisplay(_("This file cannot be used as a model."), waitCursor=True):
            self.logic.checkModelFile(path)
            self._parameterNode.model = path

    def onAnalyze(self):
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to start the analysis."), waitCursor=True):
            self._job = self.logic.startAnalysis(
                p.inputVolume, model=p.model or None, device=p.device.value, slices=p.slices.value,
                onProgress=self.onProgress, onFinished=self.onFinished,
            )
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = _("Analysing {volume}...").format(volume=p.inputVolume.GetName())
        self.updateGUI()

    def onProgress(self, fraction, stage):
        self.ui.progressBar.value = round(fraction * PROGRESS_STEPS)
        self.ui.statusLabel.text = _("Analysing: {stage} done").format(stage=stage)

    def onFinished(self, job):
        self._job = None
        if job.cancelled:
            self.ui.statusLabel.text = _("Analysis cancelled.")
        elif job.error:
            self.ui.statusLabel.text = _("Analysis failed.")
            slicer.util.errorDisplay(_("The analysis failed:\n{error}").format(error=job.error))
        else:
            self.ui.statusLabel.text = _("Done. Result files: {folder}").format(folder=job.resultFolder)
            self._showResults(job.results)
        self.ui.progressBar.value = 0
        self.updateGUI()

    def onCancel(self):
        if self._job:
            self._job.cancel()

    def onLoadResults(self):
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Select a result folder of covidct analyze"))
        if not folder:
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to load the results."), waitCursor=True):
            self._showResults(self.logic.loadResults(folder, self._parameterNode.inputVolume))

    def _showResults(self, results: Optional[ShownResults]):
        """The patient-level result, the slice table and the top-slice buttons of `results` (or none)."""
        self._shown = results
        for button in self._topSliceButtons:
            button.deleteLater()
        self._topSliceButtons = []
        self.ui.resultsCollapsibleButton.enabled = results is not None
        if results is None:
            self.ui.resultLabel.text = ""
            self.ui.slicesTableView.setMRMLTableNode(None)
            return
        self.ui.resultLabel.text = results.plan.result.html()
        self.ui.slicesTableView.setMRMLTableNode(results.table)
        for rowIndex in results.plan.top_rows:
            row = results.plan.rows[rowIndex]
            button = qt.QPushButton(_("Slice {index}").format(index=row.index))
            button.toolTip = ", ".join(f"P({c}) {p:.2f}" for c, p in row.probabilities.items())
            button.connect("clicked(bool)", lambda checked, r=rowIndex: self.logic.jumpToSlice(results, r))
            self.ui.topSlicesWidget.layout().addWidget(button)
            self._topSliceButtons.append(button)
        self.ui.resultsCollapsibleButton.collapsed = False
        self.onOpacityChanged(self.ui.opacitySliderWidget.value)
        problem = self.logic.dicomExportProblem(results)
        self.ui.saveDicomButton.enabled = problem is None
        self.ui.dicomStatusLabel.text = problem or ""

    def onSaveAsDicom(self):
        folder = qt.QFileDialog.getExistingDirectory(
            slicer.util.mainWindow(), _("Select a new or empty folder for the DICOM objects"))
        if not folder:
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to save the results as DICOM."), waitCursor=True):
            written = self.logic.saveResultsAsDicom(self._shown, folder)
            self.ui.dicomStatusLabel.text = _("{count} DICOM objects written to {folder} and added to the DICOM "
                                              "database.").format(count=len(written), folder=folder)

    def onSliceClicked(self, index):
        if self._shown:
            row = self.ui.slicesTableView.sortFilterProxyModel().mapToSource(index).row()
            self.logic.jumpToSlice(self._shown, row)

    def onOpacityChanged(self, value):
        if self._shown:
            slicer.util.setSliceViewerLayers(foreground=self._shown.heat, foregroundOpacity=value)


class CovidCTDiagnosisLogic(ScriptedLoadableModuleLogic):
    """Analysis and scene building, usable without the widget (Python console, tests).

    process() analyses in this process and blocks; startAnalysis() runs the engine's command line
    in the background; processFiles() analyses many cases into folders; loadResults() shows a
    result folder. Analysing a volume again replaces its previous results in the scene.
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.shownResults = None  # the ShownResults most recently put into the scene

    def getParameterNode(self):
        return CovidCTDiagnosisParameterNode(super().getParameterNode())

    def setupDependencies(self):
        """Install PyTorch (PyTorch extension) and the engine's missing pip packages, after asking."""
        try:
            import PyTorchUtils
        except ModuleNotFoundError as exc:
            raise RuntimeError(_("This module needs the PyTorch extension: install it from the Extensions Manager.")) from exc
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if not torchLogic.torchInstalled():
            torch = torchLogic.installTorch(
                askConfirmation=True,
                torchVersionRequirement=slicer_runtime.TORCH_REQUIREMENT,
                torchvisionVersionRequirement=slicer_runtime.TORCHVISION_REQUIREMENT,
            )
            if torch is None:
                raise RuntimeError(_("PyTorch is required to analyse images."))
        self._pipInstall(slicer_runtime.missing_requirements(slicer_runtime.ANALYSIS_REQUIREMENTS))

    def setupFileReaders(self):
        """Install the pip packages that reading result folders needs (not PyTorch), after asking."""
        self._pipInstall(slicer_runtime.missing_requirements(slicer_runtime.READER_REQUIREMENTS))

    @staticmethod
    def _pipInstall(missing):
        """Ask, then install the pip requirements `missing` without changing Slicer's own packages."""
        if not missing:
            return
        if not slicer.util.confirmOkCancelDisplay(
            _("COVID CT Diagnosis needs these Python packages, which will now be downloaded and installed:\n{packages}").format(
                packages="\n".join(missing)
            )
        ):
            raise RuntimeError(_("The required Python packages were not installed."))
        constraints = slicer_runtime.write_constraints(os.path.join(slicer.app.temporaryPath, TEMP_KEY))
        slicer.util.pip_install([*missing, "--constraint", str(constraints)])

    def checkModelFile(self, path):
        """Raise the engine's one-line ModelFileError unless `path` is a usable DRENet model."""
        self.setupDependencies()
        from CovidCTDiagnosisLib.checkpoint import load_model

        load_model(path)

    def process(self, volumeNode: vtkMRMLScalarVolumeNode, model=None, device="auto", slices=15, aggregate="mean"):
        """Analyse `volumeNode` in this process (blocks), show the result, and return the engine's Result.

        `aggregate` must be "mean", the engine's only method (kept for existing calls); anything else,
        such as the removed "noisy-or", raises ValueError before anything is done.
        """
        self._checkAggregate(aggregate)
        import sitkUtils

        self.setupDependencies()
        from CovidCTDiagnosisLib.outputs import write_outputs
        from CovidCTDiagnosisLib.pipeline import Analyzer

        workDir = self._workDirectory()
        sourceFiles = self.dicomSourceFiles(volumeNode)
        source = (slicer_runtime.gather_files(sourceFiles, os.path.join(workDir, DICOM_INPUT_DIR)) if sourceFiles
                  else sitkUtils.PullVolumeFromSlicer(volumeNode))
        try:
            result = Analyzer(model, device).analyze(
                source, slices=slices, aggregate=aggregate, progress=lambda stage, fraction: logging.info(f"{stage}: {fraction:.0%}")
            )
        finally:
            if sourceFiles:
                shutil.rmtree(source)
        folder = write_outputs(result, result.ct, os.path.join(workDir, RESULT_DIR))
        self.loadResults(str(folder), volumeNode)
        return result

    def startAnalysis(self, volumeNode: vtkMRMLScalarVolumeNode, onProgress, onFinished, model=None, device="auto", slices=15,
                      aggregate="mean"):
        """Analyse `volumeNode` in a background PythonSlicer process; returns the AnalysisJob (cancel() stops it).
        `aggregate` as for process()."""
        self._checkAggregate(aggregate)
        self.setupDependencies()
        python = shutil.which("PythonSlicer")
        if not python:
            raise RuntimeError(_("PythonSlicer, Slicer's Python interpreter, was not found."))
        workDir = self._workDirectory()
        sourceFiles = self.dicomSourceFiles(volumeNode)
        if sourceFiles:
            inputPath = str(slicer_runtime.gather_files(sourceFiles, os.path.join(workDir, DICOM_INPUT_DIR)))
        else:
            inputPath = os.path.join(workDir, INPUT_FILE)
            if not slicer.util.exportNode(volumeNode, inputPath, {"useCompression": False}):
                raise RuntimeError(_("Cannot write {volume} to {path}.").format(volume=volumeNode.GetName(), path=inputPath))
        command = slicer_runtime.analyze_command(python, inputPath, os.path.join(workDir, RESULT_DIR), model=model, device=device,
                                                 slices=slices, aggregate=aggregate)
        return AnalysisJob(self, volumeNode, workDir, inputPath, command, onProgress, onFinished)

    def processFiles(self, pathsOrFolder, outputFolder, model=None, device="auto", slices=15, aggregate="mean", ray=None,
                     workers=None, threadsPerWorker=None):
        """Analyse many CTs (a folder, a CSV manifest, or a list of paths) into one result folder each and
        summary.csv in `outputFolder`, carrying on past bad cases; the scene is not touched. `aggregate` as
        for process(). `ray`: None analyses here, one case after the other; a Ray address ("auto",
        "ray://host:port", or "local") analyses on Ray workers (Ray is installed after asking;
        `workers`, `threadsPerWorker` as `covidct batch --workers`, `--threads-per-worker`, docs/ray.md)."""
        self._checkAggregate(aggregate)
        self.setupDependencies()
        if ray is not None:
            self._pipInstall(slicer_runtime.missing_requirements(slicer_runtime.RAY_REQUIREMENTS))
        from CovidCTDiagnosisLib.batch import SUMMARY_CSV, run_batch
        from CovidCTDiagnosisLib.pipeline import Analyzer

        def logOutcome(outcome):
            level = logging.WARNING if outcome.status == "failed" else logging.INFO
            logging.log(level, f"{outcome.case.case_id}: {outcome.status} {outcome.error}".strip())
            slicer.app.processEvents()

        source = slicer_runtime.batch_source(pathsOrFolder, os.path.join(slicer.app.temporaryPath, TEMP_KEY))
        outcomes = run_batch(Analyzer(model, device), source, outputFolder, on_case=logOutcome, slices=slices, aggregate=aggregate,
                             ray=ray, workers=workers, threads_per_worker=threadsPerWorker)
        logging.info(f"{len(outcomes)} cases; summary in {os.path.join(outputFolder, SUMMARY_CSV)}")
        return outcomes

    def loadResults(self, resultFolder, volumeNode: vtkMRMLScalarVolumeNode = None):
        """Show a result folder (of `covidct analyze` or this module) in the scene: all under one folder named
        after the volume, replacing its previous results, under the volume's parent transform.

        Needs only the file readers, not PyTorch. Over a volume, the results must hold its voxels at their
        places, on any grid of them (Slicer makes left-handed files right-handed): slice numbers and box
        names are then those of the volume's grid. Raises ValueError for results of another volume (or DICOM series).
        Returns the ShownResults.
        """
        self.setupFileReaders()
        import numpy as np
        import SimpleITK as sitk
        from CovidCTDiagnosisLib import outputs, scene_plan
        from CovidCTDiagnosisLib.geometry import VoxelGrid

        report = outputs.read_report(resultFolder)
        name = volumeNode.GetName() if volumeNode else os.path.basename(os.path.normpath(resultFolder))
        volumeGeometry = self._volumeGeometry(volumeNode) if volumeNode else None
        analysedSeries, volumeSeries = report["input"].get("series_uid"), self._dicomSeriesUID(volumeNode)
        otherSeries = bool(analysedSeries and volumeSeries and analysedSeries != volumeSeries)
        if otherSeries or (volumeGeometry is not None and not VoxelGrid.from_report(report).matches(volumeGeometry)):
            source = report["input"].get("path") or _("an image in memory")
            if analysedSeries:
                source += _(" (DICOM series {uid})").format(uid=analysedSeries)
            raise ValueError(_("These results were computed on another CT than {volume}: on {source}. Select that CT, or "
                               "none.").format(volume=name, source=source))
        plan = scene_plan.plan_scene(report, name, volumeGeometry)
        heatImage = sitk.ReadImage(os.path.join(resultFolder, outputs.GRADCAM_NRRD))
        heatToScene = VoxelGrid.from_image(heatImage).voxel_map(plan.geometry)
        if heatToScene is None:
            raise ValueError(_("{file} does not have the grid of report.json.").format(file=outputs.GRADCAM_NRRD))
        heatArray = np.ascontiguousarray(heatToScene.array(sitk.GetArrayViewFromImage(heatImage)))

        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        volumeItem = 0
        if volumeNode:  # Slicer's subject-hierarchy plugins give every volume an item; on a bare MRML scene give it one
            volumeItem = shNode.GetItemByDataNode(volumeNode) or shNode.CreateItem(shNode.GetSceneItemID(), volumeNode)
        parentItem = shNode.GetItemParent(volumeItem) if volumeItem else shNode.GetSceneItemID()
        previous = shNode.GetItemChildWithName(parentItem, plan.folder_name)
        if previous:
            shNode.RemoveItem(previous)
        folderItem = shNode.CreateFolderItem(parentItem, plan.folder_name)

        slicer.mrmlScene.StartState(slicer.mrmlScene.BatchProcessState)
        try:
            segmentation = self._addSegmentation(os.path.join(resultFolder, outputs.LUNGS_SEG_NRRD), plan.segmentation_name,
                                                 plan.segments)
            heat = slicer.util.addVolumeFromArray(heatArray, plan.geometry.ijk_to_ras(), plan.heat_name)
            self._styleHeatVolume(heat)
            table = self._addTable(plan.table_name, plan.table_columns())
            rois = [self._addRoi(roi) for roi in plan.rois]
            severity = severityTable = None
            if plan.severity is not None:
                severity = self._addSegmentation(os.path.join(resultFolder, outputs.SEVERITY_SEG_NRRD),
                                                 plan.severity.segmentation_name, plan.severity.segments)
                severityTable = self._addTable(plan.severity.table_name, plan.severity.table_columns())
        finally:
            slicer.mrmlScene.EndState(slicer.mrmlScene.BatchProcessState)
        shown = ShownResults(plan, folderItem, segmentation, heat, table, rois, str(resultFolder), volumeNode, severity,
                             severityTable)

        if volumeNode:  # the segmentations belong to the CT (its grid and node), as DICOM SEG export needs
            for node in (segmentation, severity):
                if node is not None:
                    node.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        transformID = volumeNode.GetTransformNodeID() if volumeNode else None
        for node in shown.nodes():
            if node.IsA("vtkMRMLTransformableNode"):
                node.SetAndObserveTransformNodeID(transformID)
            item = shNode.GetItemByDataNode(node)  # Slicer's subject-hierarchy plugins (Qt) make items for new
            if item:                               # nodes; without them (a bare MRML scene) make them here
                shNode.SetItemParent(item, folderItem)
            else:
                shNode.CreateItem(folderItem, node)
        for roi, planned in zip(rois, plan.rois):  # last: a markups ROI clears its description when its geometry or
            roi.SetDescription(planned.description)  # parent transform changes (the score stays in its segment and report.json)
        background = volumeNode if volumeNode else "keep-current"
        slicer.util.setSliceViewerLayers(background=background, foreground=heat,
                                         foregroundOpacity=self.getParameterNode().heatOpacity)  # as saved with the scene
        self.shownResults = shown
        return self.shownResults

    @staticmethod
    def dicomSourceFiles(volumeNode: Optional[vtkMRMLScalarVolumeNode]):
        """The DICOM files `volumeNode` was loaded from, found in Slicer's DICOM database; [] if none."""
        database = getattr(slicer, "dicomDatabase", None)
        if volumeNode is None or database is None:
            return []
        return slicer_runtime.dicom_source_files(volumeNode.GetAttribute(slicer_runtime.DICOM_UIDS_ATTRIBUTE),
                                                 database.fileForInstance)

    def dicomExportProblem(self, results: ShownResults) -> Optional[str]:
        """One line saying why `results` cannot be saved as DICOM here (old Python, not a DICOM analysis, no
        source files in the DICOM database), or None."""
        from CovidCTDiagnosisLib.outputs import read_report

        resultFormat = read_report(results.resultFolder)["input"]["format"]
        return slicer_runtime.dicom_export_problem(resultFormat, self.dicomSourceFiles(results.volumeNode))

    def saveResultsAsDicom(self, results: ShownResults, outputFolder, addToDatabase=True):
        """Write `results` as DICOM objects in their CT's study (the engine's dicom_export: SEG, parametric map,
        secondary captures, SR, PDF) into `outputFolder` (new, or holding only an earlier export), and add them to
        Slicer's DICOM database. Returns the written paths. Raises ValueError with dicomExportProblem's line, or
        the engine's one-line errors."""
        problem = self.dicomExportProblem(results)
        if problem:
            raise ValueError(problem)
        self._pipInstall(slicer_runtime.missing_requirements(slicer_runtime.DICOM_REQUIREMENTS))
        from CovidCTDiagnosisLib.dicom_export import export_dicom

        written = [str(path) for path in export_dicom(results.resultFolder, self.dicomSourceFiles(results.volumeNode),
                                                      outputFolder)]
        if addToDatabase:
            from DICOMLib import DICOMUtils

            DICOMUtils.importDicom(str(outputFolder))
        return written

    def jumpToSlice(self, results: ShownResults, rowIndex: int):
        """Centre every slice view on the analysed slice in row `rowIndex` of the results' table."""
        world = [0.0, 0.0, 0.0]
        results.heat.TransformPointToWorld(results.plan.rows[rowIndex].center_ras, world)
        # What Markups' JumpSlicesToLocation(..., centered=True) does, without needing the application's module logics.
        slicer.vtkMRMLSliceNode.JumpAllSlices(slicer.mrmlScene, *world, slicer.vtkMRMLSliceNode.CenteredJumpSlice)

    @staticmethod
    def _checkAggregate(aggregate):
        """The engine's ValueError unless `aggregate` is one of its methods (its message says why Noisy-OR went)."""
        from CovidCTDiagnosisLib.aggregation import check_method

        check_method(aggregate)

    @staticmethod
    def _workDirectory():
        """A new folder in Slicer's temporary folder for one analysis (its result folder stays there)."""
        return tempfile.mkdtemp(prefix=TEMP_KEY, dir=slicer.app.temporaryPath)

    @staticmethod
    def _dicomSeriesUID(volumeNode: Optional[vtkMRMLScalarVolumeNode]) -> Optional[str]:
        """The SeriesInstanceUID of a volume loaded from Slicer's DICOM database, else None."""
        instanceUIDs = volumeNode.GetAttribute(slicer_runtime.DICOM_UIDS_ATTRIBUTE) if volumeNode else None
        database = getattr(slicer, "dicomDatabase", None)
        if not instanceUIDs or database is None:
            return None
        return database.instanceValue(instanceUIDs.split()[0], SERIES_INSTANCE_UID_TAG) or None

    @staticmethod
    def _volumeGeometry(volumeNode: vtkMRMLScalarVolumeNode):
        from CovidCTDiagnosisLib.geometry import VoxelGrid

        ijkToRAS = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRAS)
        return VoxelGrid.from_ijk_to_ras(slicer.util.arrayFromVTKMatrix(ijkToRAS), volumeNode.GetImageData().GetDimensions())

    @staticmethod
    def _addTable(name, columns):
        """A locked table node of (title, values) columns: text columns as strings, the others as numbers."""
        import numpy as np
        from vtk.util import numpy_support

        table = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", name)
        for title, values in columns:
            if values.dtype.kind in "US":
                column = vtk.vtkStringArray()
                for value in values:
                    column.InsertNextValue(str(value))
            else:
                column = numpy_support.numpy_to_vtk(np.ascontiguousarray(values), deep=True)
            column.SetName(title)
            table.AddColumn(column)
        table.SetLocked(True)
        return table

    @staticmethod
    def _addSegmentation(path, name, segments):
        """Read `path` through Slicer's segmentation storage node (what the application's reader uses; needs no
        application, so the Logic also runs on a bare MRML scene), then name, colour and tag the planned segments."""
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        storageNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
        storageNode.SetFileName(path)
        segmentationNode.SetAndObserveStorageNodeID(storageNode.GetID())
        if not storageNode.ReadData(segmentationNode):
            raise ValueError(_("{path} cannot be read as a segmentation.").format(path=path))
        segmentationNode.CreateDefaultDisplayNodes()
        segmentation = segmentationNode.GetSegmentation()
        display = segmentationNode.GetDisplayNode()
        for planned in segments:
            segment = segmentation.GetSegment(planned.segment_id)
            if segment is None:
                raise ValueError(_("Segment {name} is missing from {path}.").format(name=planned.segment_id, path=path))
            segment.SetName(planned.name)
            segment.SetColor(*planned.color)
            segment.SetTag(segment.GetTerminologyEntryTagName(), planned.terminology)
            display.SetSegmentOpacity2DFill(planned.segment_id, planned.fill_opacity)
        return segmentationNode

    @staticmethod
    def _styleHeatVolume(heat: vtkMRMLScalarVolumeNode):
        """Inferno colours over [0, 1], transparent below the plan's threshold."""
        from CovidCTDiagnosisLib import scene_plan

        colorTable = slicer.util.getFirstNodeByClassByName("vtkMRMLColorTableNode", scene_plan.COLOR_TABLE_NAME)
        if colorTable is None:
            colorTable = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLColorTableNode", scene_plan.COLOR_TABLE_NAME)
            colorTable.SetTypeToUser()
            entries = scene_plan.heat_color_table()
            colorTable.SetNumberOfColors(len(entries))
            for index, (r, g, b, a) in enumerate(entries):
                colorTable.SetColor(index, r, g, b, a)
        display = heat.GetScalarVolumeDisplayNode()
        display.SetAndObserveColorNodeID(colorTable.GetID())
        display.SetAutoWindowLevel(False)
        display.SetWindowLevelMinMax(0.0, 1.0)
        display.SetAutoThreshold(False)
        display.SetThreshold(HEAT_THRESHOLD, 1.0)
        display.SetApplyThreshold(True)

    @staticmethod
    def _addRoi(planned):
        roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", planned.name)
        roi.SetAndObserveObjectToNodeMatrix(slicer.util.vtkMatrixFromArray(planned.object_to_node))
        roi.SetSize(*planned.size_mm)
        roi.SetLocked(True)
        roi.CreateDefaultDisplayNodes()
        display = roi.GetDisplayNode()
        display.SetColor(*planned.color)
        display.SetSelectedColor(*planned.color)
        display.SetHandlesInteractive(False)
        display.SetFillOpacity(0.0)
        return roi


class CovidCTDiagnosisTest(ScriptedLoadableModuleTest):
    """Runs the logic on the engine's synthetic chest phantom with the untrained network (no data, no model)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_ProcessObliqueVolume()
        self.setUp()
        self.test_TransformedVolumeIsReplacedNotDuplicated()
        self.setUp()
        self.test_BackgroundAnalysisCancelAndLoadResults()

    @staticmethod
    def _phantomVolume(direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)):
        import sitkUtils
        from CovidCTDiagnosisLib.phantom import make_chest_phantom

        return sitkUtils.PushVolumeToSlicer(make_chest_phantom(direction=direction).image, name="phantom")

    def _checkNodes(self, volumeNode: vtkMRMLScalarVolumeNode, results: ShownResults, slices):
        """One folder named after the volume; heat map on the CT's grid; segments, ROIs and table rows per slice and box."""
        import numpy as np
        from CovidCTDiagnosisLib.geometry import LPS_TO_RAS
        from CovidCTDiagnosisLib.scene_plan import folder_name

        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        parentItem = shNode.GetItemParent(shNode.GetItemByDataNode(volumeNode))
        self.assertEqual(shNode.GetItemChildWithName(parentItem, folder_name(volumeNode.GetName())), results.folderItem)
        volumeMatrix, heatMatrix = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(volumeMatrix)
        results.heat.GetIJKToRASMatrix(heatMatrix)
        np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(heatMatrix), slicer.util.arrayFromVTKMatrix(volumeMatrix), atol=1e-4)
        self.assertEqual(results.heat.GetImageData().GetDimensions(), volumeNode.GetImageData().GetDimensions())
        boxes = [b for s in slices for b in s.boxes]
        segmentation = results.segmentation.GetSegmentation()
        self.assertEqual(segmentation.GetNumberOfSegments(), 2 + len(boxes))
        self.assertTrue(segmentation.GetSegmentIdBySegmentName("Right lung"))
        self.assertTrue(segmentation.GetSegmentIdBySegmentName("Left lung"))
        self.assertEqual(len(results.rois), len(boxes))
        center = [0.0, 0.0, 0.0]
        results.rois[0].GetCenter(center)
        np.testing.assert_allclose(center, LPS_TO_RAS @ np.array(boxes[0].center_lps), atol=1e-3)
        self.assertEqual(results.table.GetNumberOfRows(), len(slices))
        self.assertEqual(list(slicer.util.arrayFromTableColumn(results.table, "Slice")), [s.index for s in slices])
        severity = results.severity.GetSegmentation()  # the phantom's lesions are ground-glass and consolidation
        self.assertEqual([severity.GetNthSegment(i).GetName() for i in range(2)], ["Ground-glass", "Consolidation"])
        self.assertEqual(results.severityTable.GetNumberOfRows(), len(results.plan.severity.rows))

    def test_ProcessObliqueVolume(self):
        """In-process analysis of an oblique volume."""
        self.delayDisplay("Analysing an oblique phantom in-process")
        c, s = 0.9396926, 0.3420201  # 20 degrees about S
        volumeNode = self._phantomVolume(direction=(c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
        logic = CovidCTDiagnosisLogic()
        result = logic.process(volumeNode, model=UNTRAINED_MODEL, device="cpu")
        self.assertFalse(result.model.trained)
        self._checkNodes(volumeNode, logic.shownResults, result.slices)
        self.delayDisplay("Test passed")

    def test_TransformedVolumeIsReplacedNotDuplicated(self):
        """Results follow the volume's parent transform, jumping lands on the transformed slice, re-analysis replaces."""
        self.delayDisplay("Analysing a transformed phantom twice")
        import numpy as np

        volumeNode = self._phantomVolume()
        transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "tilt")
        c, s = 0.9396926, 0.3420201  # 20 degrees about R, then a shift
        matrix = np.array([[1.0, 0.0, 0.0, 10.0], [0.0, c, -s, -20.0], [0.0, s, c, 30.0], [0.0, 0.0, 0.0, 1.0]])
        transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(matrix))
        volumeNode.SetAndObserveTransformNodeID(transform.GetID())
        logic = CovidCTDiagnosisLogic()
        logic.process(volumeNode, model=UNTRAINED_MODEL, device="cpu")
        result = logic.process(volumeNode, model=UNTRAINED_MODEL, device="cpu")
        results = logic.shownResults
        self._checkNodes(volumeNode, results, result.slices)
        self.assertEqual(len(slicer.util.getNodesByClass("vtkMRMLSegmentationNode")), 2)  # lungs and boxes; involvement
        for node in [results.segmentation, results.heat, *results.rois]:
            self.assertEqual(node.GetTransformNodeID(), transform.GetID())
        logic.jumpToSlice(results, 0)
        world = matrix @ np.append(results.plan.rows[0].center_ras, 1.0)
        sliceNodes = slicer.util.getNodesByClass("vtkMRMLSliceNode")
        self.assertTrue(sliceNodes)
        for sliceNode in sliceNodes:  # every view centred on the row's slice centre
            sliceToRAS = slicer.util.arrayFromVTKMatrix(sliceNode.GetSliceToRAS())
            np.testing.assert_allclose(sliceToRAS[:3, 3], world[:3], atol=1e-3)
        self.delayDisplay("Test passed")

    def test_BackgroundAnalysisCancelAndLoadResults(self):
        """The widget's path: a background process with progress; cancel kills it; results load without a volume."""
        self.delayDisplay("Analysing in the background")
        logic = CovidCTDiagnosisLogic()
        volumeNode = self._phantomVolume()
        progress = []
        cancelled = logic.startAnalysis(volumeNode, lambda fraction, stage: None, lambda job: None, model=UNTRAINED_MODEL, device="cpu")
        cancelled.cancel()
        job = logic.startAnalysis(volumeNode, lambda fraction, stage: progress.append(fraction), lambda job: None,
                                  model=UNTRAINED_MODEL, device="cpu")
        deadline = time.time() + JOB_TIMEOUT_S
        while not (job.finished and cancelled.finished) and time.time() < deadline:
            slicer.app.processEvents()
            time.sleep(0.05)
        self.assertTrue(cancelled.finished and cancelled.cancelled)
        self.assertIsNone(cancelled.results)
        self.assertFalse(os.path.exists(cancelled.workDir))
        self.assertIsNone(job.error)
        self.assertEqual(progress, sorted(progress))
        self.assertEqual(progress[-1], 1.0)
        self.assertEqual(job.results.table.GetNumberOfRows(), len(job.results.plan.rows))
        loaded = logic.loadResults(job.resultFolder)
        self.assertEqual(len(loaded.rois), len(job.results.rois))
        self.assertIsNone(loaded.heat.GetTransformNodeID())
        self.delayDisplay("Test passed")
