"""The analysis result: what `analyze()` returns and what `report.json` serialises.

Coordinates: voxel indices are (i, j, k) of the *input* volume as stored on disk (i fastest;
numpy arrays of that volume are indexed [k, j, i]); physical points are LPS millimetres, as in
DICOM and ITK. Slicer's RAS is LPS with the first two signs flipped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk

REPORT_SCHEMA_VERSION = "1.4"  # 1.1: model.performance; 1.2: its sensitivity, specificity and ci95; 1.3: severity; 1.4: options
RESEARCH_USE_ONLY = "Research use only. Not for diagnosis or any clinical decision."
UNTRAINED_WARNING = (
    "UNTRAINED NETWORK: the model's weights are random, so every probability, label and box "
    "below is meaningless. This output is not a diagnosis."
)

UNTRAINED_NOTE = "UNTRAINED network (random weights): every value here is meaningless; not a diagnosis"  # in every output file
WARNING_KEY = "covidct_warning"  # NRRD header key (key:=value) and markups JSON key holding UNTRAINED_NOTE

# Decimals of the numbers in the CSV files (slices.csv, summary.csv, score-images); report.json and
# lesions.mrk.json keep full precision (geometry that Slicer places exactly)
PROBABILITY_DECIMALS = 4  # probabilities, box scores, lung fractions
MM_DECIMALS = 2  # positions in mm (voxels are 0.1 mm or larger)


def untrained_note(model: "ModelInfo") -> str | None:
    """UNTRAINED_NOTE for an untrained model, None for a trained one."""
    return None if model.trained else UNTRAINED_NOTE


@dataclass
class LesionBox:
    """One navigator region on one slice, ranked by the navigator's score."""

    rank: int  # 1 = most informative region
    score: float  # navigator confidence normalised over the slice's K regions (softmax, sums to 1)
    ijk_min: tuple[int, int, int]  # inclusive voxel index corner of the input volume
    ijk_max: tuple[int, int, int]  # inclusive; the k range spans the one analysed slice
    center_lps: tuple[float, float, float]  # box centre, LPS mm
    size_mm: tuple[float, float, float]  # extent along the volume's i, j, k axes, mm

    @classmethod
    def from_voxel_range(cls, image: sitk.Image, rank: int, score: float, ijk_min, ijk_max) -> LesionBox:
        """A box from its inclusive voxel range in `image`; centre and size follow from its geometry."""
        lo, hi = np.asarray(ijk_min), np.asarray(ijk_max)
        centre = image.TransformContinuousIndexToPhysicalPoint([float(v) for v in (lo + hi) / 2])
        return cls(
            rank=rank,
            score=score,
            ijk_min=tuple(int(v) for v in lo),
            ijk_max=tuple(int(v) for v in hi),
            center_lps=tuple(float(v) for v in centre),
            size_mm=tuple(float(v) for v in (hi - lo + 1) * np.array(image.GetSpacing())),
        )


@dataclass
class SliceResult:
    """The model's reading of one analysed axial slice."""

    index: int  # voxel index of the slice along the input volume's axis nearest to patient S
    z_mm: float  # LPS S coordinate of the slice centre, mm
    lung_fraction: float  # lung area of this slice / largest lung area of the volume
    probabilities: dict[str, float]  # class name -> probability
    boxes: list[LesionBox] = field(default_factory=list)

    @classmethod
    def from_report(cls, entry: dict[str, Any]) -> SliceResult:
        """A slice back from its report.json entry (`Result.to_report()["slices"][n]`)."""
        boxes = [LesionBox(**{**b, **{k: tuple(b[k]) for k in ("ijk_min", "ijk_max", "center_lps", "size_mm")}})
                 for b in entry["boxes"]]
        return cls(**{**entry, "boxes": boxes})


@dataclass
class PatientResult:
    label: str  # class with the highest aggregated probability
    probabilities: dict[str, float]
    aggregation: str  # "mean" (the paper's) or "noisy-or"


@dataclass
class InputInfo:
    path: str | None  # None when an in-memory image was analysed
    format: str  # "dicom", "nifti", "nrrd", "mha", "image" (in memory) ...
    size: tuple[int, int, int]  # voxels along i, j, k
    spacing: tuple[float, float, float]  # mm along i, j, k
    origin: tuple[float, float, float]  # LPS mm of voxel (0, 0, 0)
    direction: tuple[float, ...]  # 3x3 row-major, columns are the i, j, k axes in LPS
    series_uid: str | None = None
    notes: list[str] = field(default_factory=list)  # e.g. "3 series found; analysed the largest"


@dataclass
class ModelInfo:
    name: str
    file: str | None  # path of the checkpoint, None for the built-in untrained network
    sha256: str | None
    classes: list[str]
    backbone: str
    input_size: int
    trained: bool
    members: list[dict] = field(default_factory=list)  # ensemble: {name, file, sha256} of every model averaged
    performance: dict | None = None  # validated figures from the model file (performance.validated_performance); None: none


@dataclass
class Result:
    """Everything one analysis produced. `to_report()` is the content of report.json."""

    input: InputInfo
    model: ModelInfo
    device: str
    patient: PatientResult
    slices: list[SliceResult]
    top_slices: list[int]  # slice indices, most suspicious first (highest positive-class probability)
    positive_class: str  # class used for ranking slices and for Noisy-OR
    timings: dict[str, float]  # seconds per stage
    lung_labels: sitk.Image = field(repr=False)  # uint8, input geometry: 0 none, 1 right lung, 2 left lung
    gradcam: sitk.Image = field(repr=False)  # float32 in [0, 1], input geometry, 0 where not analysed
    warnings: list[str] = field(default_factory=list)
    ct: sitk.Image | None = field(default=None, repr=False)  # the analysed CT (HU, input geometry), for writing figures
    severity: Any = None  # severity.Severity: measured ground-glass / consolidation and the 6-zone score; None: not measured
    severity_labels: sitk.Image | None = field(default=None, repr=False)  # uint8, input geometry: 0, 1 ground-glass, 2 consolidation
    options: dict[str, Any] = field(default_factory=dict)  # the analysis options (pipeline.analysis_options); batch's resume key

    def to_report(self) -> dict[str, Any]:
        """The JSON-ready report (schema REPORT_SCHEMA_VERSION, documented in docs/report-schema.md).

        Numbers keep full precision: the Slicer module's scene plan places boxes and slices from it."""
        report = {
            "schema_version": REPORT_SCHEMA_VERSION,
            "notice": RESEARCH_USE_ONLY,
            "input": asdict(self.input),
            "model": asdict(self.model),
            "device": self.device,
            "patient": asdict(self.patient),
            "positive_class": self.positive_class,
            "slices": [asdict(s) for s in self.slices],
            "top_slices": list(self.top_slices),
            "timings": dict(self.timings),
            "warnings": list(self.warnings),
            "severity": None if self.severity is None else self.severity.to_report(),
            "options": dict(self.options),
        }
        return _to_json_types(report)


def _to_json_types(value: Any) -> Any:
    """Tuples -> lists and numpy scalars -> Python numbers, recursively."""
    if isinstance(value, dict):
        return {str(k): _to_json_types(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json_types(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        return value.item()
    return value
