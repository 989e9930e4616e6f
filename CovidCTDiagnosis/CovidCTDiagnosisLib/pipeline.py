"""The whole analysis of one chest CT, as a Python API: `Analyzer(...).analyze(path_or_image)`.

Stages: read -> lungs (`preparation.find_ct_lungs`: no model needed) -> choose slices -> prepare
input (all four in `preparation.prepare_ct`, shared with training) -> severity (measured from HU, `severity.measure_severity`) -> DRENet -> Grad-CAM -> map back to
the input's voxels and patient coordinates -> aggregate. Nothing is printed and nothing global
is kept: an `Analyzer` holds one loaded model and can be reused for many cases. Writing files
is separate (`outputs.write_outputs`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import SimpleITK as sitk

from . import aggregation, geometry
from .checkpoint import check_ensemble, resolve_model
from .cpu_threads import limit_threads
from .errors import NoLungsError
from .inference import SliceScorer
from .preparation import PARTIAL_COVERAGE, LungCT, ProgressCallback, Stages, prepare_ct
from .preprocessing import CropTransform
from .severity import measure_severity
from .result import UNTRAINED_WARNING, LesionBox, ModelInfo, PatientResult, Result, SliceResult
from .slice_selection import lung_fraction

PAPER_SLICE_COUNT = 15


class Analyzer:
    """One loaded DRENet on one device, ready to analyse CT volumes.

    model: None (the bundled reference model), a checkpoint path, "untrained[:backbone]", or a
    list of checkpoint paths: an ensemble whose slice probabilities are averaged (Ji et al.).
    threads: CPU threads for this process's analyses from now on (`cpu_threads.limit_threads`: PyTorch,
    OpenCV, the reader, lung extraction; process-wide, as PyTorch's own setting is); None leaves them as
    they are (all available cores unless limited before). `spec` keeps (model, device, expected_classes)
    as given, to build the same Analyzer elsewhere (a Ray worker, `ray_batch`, with its own threads);
    None for one built `from_network`.
    """

    def __init__(self, model=None, device: str = "auto", expected_classes: Sequence[str] | None = None,
                 threads: int | None = None):
        if threads is not None:
            limit_threads(threads)
        self.spec = (model, device, expected_classes)
        specs = list(model) if isinstance(model, (list, tuple)) else [model]
        loaded = [resolve_model(spec, expected_classes) for spec in specs]
        self.scorer = SliceScorer(loaded[0][0], device)
        self.model_info = loaded[0][1]
        self.ensemble = [SliceScorer(net, device) for net, _ in loaded[1:]]
        if self.ensemble:
            self.model_info = _ensemble_info([info for _, info in loaded], [net.config for net, _ in loaded])

    @classmethod
    def from_network(cls, net, model_info, device: str = "auto") -> "Analyzer":
        """Wrap a DRENet already in memory (e.g. just trained, or built by hand in a test)."""
        self = cls.__new__(cls)
        self.spec = None
        self.model_info, self.scorer, self.ensemble = model_info, SliceScorer(net, device), []
        return self

    @property
    def config(self):
        return self.scorer.config

    def analyze(
        self,
        source,
        *,
        slices: int | str | None = PAPER_SLICE_COUNT,
        aggregate: str = "mean",
        series_uid: str | None = None,
        progress: ProgressCallback | None = None,
        cancel: Callable[[], bool] | None = None,
    ) -> Result:
        """Analyse a CT (path to DICOM folder / NIfTI / NRRD / MHA, a SimpleITK image, or a
        `preparation.LungCT` already read and its lungs found, whose timings are kept).

        slices: 15 (the paper's equidistant choice), another count, or "all"/None for every lung slice.
        """
        options = analysis_options(slices, aggregate, series_uid)
        count = None if options["slices"] == "all" else options["slices"]
        timings = dict(source.timings) if isinstance(source, LungCT) else {}
        stage = Stages(progress, cancel, timings)
        cfg = self.config

        prepared = prepare_ct(
            source, cfg.input_size, cfg.window_level, cfg.window_width, count=count, series_uid=series_uid, stage=stage
        )
        ct, lungs, chosen, crops, batch, input_masks = (
            prepared.ct, prepared.lungs, prepared.chosen, prepared.crops, prepared.inputs, prepared.masks
        )
        image, oriented, hu = ct.loaded.image, ct.oriented, ct.hu
        fractions = lung_fraction(lungs.area_mm2)
        positive = cfg.classes.index(cfg.positive_class)
        mapper = _BoxMapper(oriented, image)
        with stage("severity", 0.4):  # measured from HU, independent of the network
            partial = any(w.startswith(PARTIAL_COVERAGE) for w in prepared.warnings)
            z_mm = np.array([mapper.slice_z(k) for k in range(hu.shape[0])])
            severity = measure_severity(hu, lungs, z_mm, partial_coverage=partial)
            severity_labels = geometry.to_original_grid(severity.labels, oriented, image)
            severity.labels = severity.slice_involved_ml = None  # the file's labels are severity_labels
        with stage("network", 0.9):
            scores = self.scorer.score(batch, explain_class=positive, lung_masks=input_masks)
            if self.ensemble:  # an ensemble averages its members' slice probabilities; boxes and heat are the first model's
                members = [scores.probabilities] + [
                    m.score(batch, positive, with_cam=False, lung_masks=input_masks).probabilities for m in self.ensemble
                ]
                scores.probabilities = np.mean(members, axis=0)
        with stage("explain", 0.97):
            gradcam = geometry.slices_to_original_grid(
                {k: _cam_to_slice(scores.cams[n], crops[n], hu.shape[1:]) * (lungs.labels[k] > 0) for n, k in enumerate(chosen)}, oriented, image
            )
            lung_labels = geometry.to_original_grid(lungs.labels, oriented, image)
            slice_results = [
                SliceResult(
                    index=mapper.slice_index(k),
                    z_mm=mapper.slice_z(k),
                    lung_fraction=float(fractions[k]),
                    probabilities={c: float(p) for c, p in zip(cfg.classes, scores.probabilities[n])},
                    boxes=[
                        mapper.box(k, crops[n], scores.boxes[n, r], rank=r + 1, score=float(scores.box_scores[n, r]))
                        for r in range(scores.boxes.shape[1])
                    ],
                )
                for n, k in enumerate(chosen)
            ]
        with stage("aggregate", 1.0):
            probs = aggregation.aggregate(scores.probabilities, cfg.classes, cfg.positive_class, aggregate)
            indices = [s.index for s in slice_results]
            top = aggregation.top_slices(scores.probabilities, indices, cfg.classes, cfg.positive_class)
        warnings = list(ct.loaded.info.notes) + prepared.warnings
        if not self.model_info.trained:
            warnings.insert(0, UNTRAINED_WARNING)
        info = ct.loaded.info  # its path absolute, as model.file is
        if info.path is not None:
            info = replace(info, path=str(Path(info.path).resolve()))
        return Result(
            input=info,
            model=self.model_info,
            device=str(self.scorer.device),
            patient=PatientResult(label=max(probs, key=probs.get), probabilities=probs, aggregation=aggregate),
            slices=slice_results,
            top_slices=top,
            positive_class=cfg.positive_class,
            timings=timings,
            lung_labels=lung_labels,
            gradcam=gradcam,
            warnings=warnings,
            ct=image,
            severity=severity,
            severity_labels=severity_labels,
            options=options,
        )


def analysis_options(slices: int | str | None = PAPER_SLICE_COUNT, aggregate: str = "mean",
                     series_uid: str | None = None) -> dict:
    """The options that decide an analysis's result, as report.json's `options` records them: `slices` (a count, or
    "all" for None/"all"), `aggregate`, `series_uid` (None: the reader's choice). The device is left out (it does not
    change the result). ValueError for an unknown aggregation."""
    if aggregate not in aggregation.METHODS:
        raise ValueError(f"unknown aggregation {aggregate!r}; choose one of {', '.join(aggregation.METHODS)}")
    return {"slices": "all" if slices in (None, "all") else int(slices), "aggregate": aggregate, "series_uid": series_uid}


def _ensemble_info(infos: list[ModelInfo], configs: list) -> ModelInfo:
    """One description of several models; they must agree on classes and input preparation."""
    check_ensemble(configs, [info.file or info.name for info in infos], [info.sha256 or info.name for info in infos])
    return replace(
        infos[0],
        name="ensemble of " + " + ".join(i.name for i in infos),
        trained=all(i.trained for i in infos),
        performance=None,  # the members' figures are not the ensemble's
        members=[{"name": i.name, "file": i.file, "sha256": i.sha256} for i in infos],
    )


def analyze(source, model=None, device: str = "auto", **options) -> Result:
    """One-off analysis; for several cases build one `Analyzer` and call `.analyze` on each."""
    return Analyzer(model, device).analyze(source, **options)


def _cam_to_slice(cam: np.ndarray, crop: CropTransform, shape: tuple[int, int]) -> np.ndarray:
    """Model-input heat map -> slice pixels (J, I), zero outside the crop."""
    return cv2.warpAffine(
        cam.astype(np.float32), crop.matrix(), (shape[1], shape[0]), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderValue=0.0
    )


class _BoxMapper:
    """Maps slices and model-input boxes from the LPS-oriented grid back to the input volume."""

    def __init__(self, oriented: sitk.Image, original: sitk.Image):
        self.oriented, self.original = oriented, original
        self.axis = geometry.axial_axis(original)
        self.size = oriented.GetSize()

    def slice_index(self, k: int) -> int:
        return int(geometry.oriented_to_original_index(self.oriented, self.original, (0, 0, k))[self.axis])

    def slice_z(self, k: int) -> float:
        centre = ((self.size[0] - 1) / 2, (self.size[1] - 1) / 2, float(k))
        return float(self.oriented.TransformContinuousIndexToPhysicalPoint(centre)[2])

    def box(self, k: int, crop: CropTransform, xyxy: np.ndarray, rank: int, score: float) -> LesionBox:
        # box edges in model-input pixels -> pixel-centre coordinates -> slice pixel edges
        (i0, i1), (j0, j1) = (v + 0.5 for v in crop.to_slice(xyxy[[0, 2]] - 0.5, xyxy[[1, 3]] - 0.5))
        i_lo, i_hi = _pixel_range(i0, i1, self.size[0])
        j_lo, j_hi = _pixel_range(j0, j1, self.size[1])
        corners = np.array(
            [geometry.oriented_to_original_index(self.oriented, self.original, (i, j, k)) for i in (i_lo, i_hi) for j in (j_lo, j_hi)]
        )
        return LesionBox.from_voxel_range(self.original, rank, score, corners.min(0), corners.max(0))


def _pixel_range(lo: float, hi: float, n: int) -> tuple[int, int]:
    """Pixel edges [lo, hi) -> inclusive indices of the pixels whose centres lie inside, clipped to [0, n)."""
    first = int(np.clip(np.ceil(lo - 0.5), 0, n - 1))
    last = int(np.clip(np.ceil(hi - 0.5) - 1, first, n - 1))
    return first, last


def score_images(analyzer: Analyzer, paths: Sequence) -> list[dict[str, float] | NoLungsError]:
    """Class probabilities of 2-D slice images (PNG/JPG/single-slice DICOM), one dict per path.

    An image without lungs (`preparation.prepare_image`) is not scored: its entry is the
    NoLungsError saying so, so that a folder of a scan's slices is scored although its first and
    last slices hold no lung. Raises NoLungsError when no image has lungs (the image's own error
    for one image), and read errors.
    """
    from .preparation import prepare_image
    from .preprocessing import crop_mask

    cfg = analyzer.config
    prepared: list[tuple[np.ndarray, np.ndarray, CropTransform] | NoLungsError] = []
    for path in paths:
        try:
            prepared.append(prepare_image(Path(path), cfg.input_size))
        except NoLungsError as refusal:
            prepared.append(refusal)
    scored = [p for p in prepared if not isinstance(p, NoLungsError)]
    if not scored:
        raise prepared[0] if len(prepared) == 1 else NoLungsError(f"no lungs in any of the {len(prepared)} images ({prepared[0]})")
    batch = np.stack([image for image, _, _ in scored])
    masks = np.stack([crop_mask(mask, cfg.input_size) for _, mask, _ in scored])
    rows = iter(analyzer.scorer.score(batch, explain_class=0, with_cam=False, lung_masks=masks).probabilities)
    return [p if isinstance(p, NoLungsError) else dict(zip(cfg.classes, map(float, next(rows)))) for p in prepared]
