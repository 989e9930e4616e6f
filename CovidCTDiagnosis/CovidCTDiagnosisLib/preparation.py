"""One path from a CT volume or a slice image to the network's input, for analysis and training.

Volume: read -> check it is a CT -> orient to LPS -> lungs -> coverage (`find_ct_lungs`: all that
needs no model) -> choose slices -> window and crop (`prepare_ct`). Slice image: read -> lung
mask -> refuse without lungs -> crop (`prepare_image`). `pipeline.Analyzer` and `training.datasets` both call these, so the network
is trained on exactly the masks and crops it is later asked about.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import geometry
from .errors import AnalysisCancelled, NoLungsError
from .lungs import Lungs, extract_lungs, lung_mask_2d
from .memory import release_free_memory
from .preprocessing import CropTransform, crop_mask, prepare_image_2d, prepare_slice
from .slice_selection import DEFAULT_COUNT, choose_slices
from .volume_io import LoadedVolume, check_ct, read_image_2d, read_volume, voxel_view

# Coverage, measured with lungs.extract_lungs: full chest CTs hold 6.1 L (P001) and 3.4 L
# (normal001) of lung; their lowest 4 / 6 / 8 cm hold 0.14 / 0.34 / 0.74 L and 0.09 / 0.24 /
# 0.52 L, their lower halves 2.8 and 1.5 L; the TotalSegmentator abdominal CT's lung bases 0.10 L.
MIN_ANALYSABLE_LUNG_ML = 500.0
# A full scan's first and last slices hold at most 2 % of the largest slice's lung area; a scan
# cut through the lungs 97 % or more.
EDGE_LUNG_FRACTION = 0.25
PARTIAL_COVERAGE = "partial lung coverage"  # the coverage warning starts so (severity.py says it too)
# 2-D images: lung_mask_2d must find lung on at least this fraction of the image's pixels.
MIN_LUNG_FRACTION_2D = 0.05
# 2-D images: a CT slice spreads over many grey levels (the two commonest held at most 79 % of the pixels
# of any of the 2,400 slice images measured: UCSD, MosMed, Inf-Net, sy575, CC-CCII, NY-SBU); a mask or a
# drawing (the Inf-Net infection masks: 100 %) does not, and the lung network may still outline "lungs" in it.
MAX_TWO_LEVEL_FRACTION_2D = 0.97

StageContext = Callable[[str, float], AbstractContextManager]  # (stage name, fraction done when it ends)
ProgressCallback = Callable[[str, float], None]  # (stage just done, fraction of the analysis done)


def _no_stages(name: str, done_fraction: float) -> AbstractContextManager:
    return nullcontext()


FIND_LUNGS_PROGRESS = {"read": 0.05, "lungs": 0.25}  # an analysis's fraction done after each stage of `find_ct_lungs`


class Stages:
    """A StageContext that times each stage into `timings` (seconds, rounded), reports progress after
    it, and honours cancellation (AnalysisCancelled) before it."""

    def __init__(self, progress: ProgressCallback | None = None, cancel: Callable[[], bool] | None = None,
                 timings: dict[str, float] | None = None):
        self.timings = {} if timings is None else timings
        self.progress, self.cancel = progress, cancel

    @contextmanager
    def __call__(self, name: str, done_fraction: float):
        if self.cancel is not None and self.cancel():
            raise AnalysisCancelled("analysis cancelled")
        start = time.perf_counter()
        yield
        release_free_memory()
        self.timings[name] = round(time.perf_counter() - start, 4)
        if self.progress is not None:
            self.progress(name, done_fraction)


@dataclass
class OrientedCT:
    """A loaded CT and its copy reoriented to LPS (`geometry.orient_to_lps`, no resampling)."""

    loaded: LoadedVolume  # the input's own geometry
    oriented: sitk.Image  # HU (int16 or float32, `volume_io.hu_pixel_type`), LPS-oriented: numpy [k, j, i] = inferior->superior, anterior->posterior, right->left

    @property
    def hu(self) -> np.ndarray:
        """HU [k, j, i] (a read-only view of `oriented`, which it keeps alive)."""
        return voxel_view(self.oriented)


@dataclass
class LungCT:
    """A CT read and its lungs found (`find_ct_lungs`): the part of an analysis that needs no model."""

    ct: OrientedCT
    lungs: Lungs  # on the LPS-oriented grid
    warnings: list[str]  # e.g. field of view, partial lung coverage
    timings: dict[str, float] = field(default_factory=dict)  # seconds of its stages, "read" and "lungs"


@dataclass
class PreparedCT:
    """A CT ready for the network: its lungs, the chosen slices and their model inputs."""

    ct: OrientedCT
    lungs: Lungs  # on the LPS-oriented grid
    chosen: list[int]  # k indices of the LPS-oriented grid, ascending
    inputs: np.ndarray  # float32 (N, S, S) in [0, 1], one per chosen slice
    crops: list[CropTransform]  # model-input pixels -> slice pixels, one per chosen slice
    masks: np.ndarray  # bool (N, S, S): each input's lung mask (`preprocessing.crop_mask`), in model-input pixels
    warnings: list[str] = field(default_factory=list)  # e.g. partial lung coverage


def read_ct(source, series_uid: str | None = None) -> OrientedCT:
    """Read a CT (path or SimpleITK image), check it is usable, and reorient a copy to LPS.

    Raises InputNotFoundError, UnreadableInputError, NotACTError.
    """
    loaded = read_volume(source, series_uid=series_uid)
    check_ct(loaded.image)
    return OrientedCT(loaded, geometry.orient_to_lps(loaded.image))


def find_lungs(ct: OrientedCT) -> tuple[Lungs, list[str]]:
    """The lungs of an oriented CT, and warnings (field of view, coverage); NoLungsError when too little lung."""
    lungs = extract_lungs(ct.hu, ct.oriented.GetSpacing(), geometry.midline_column(ct.oriented))
    return lungs, lungs.notes + check_coverage(lungs)


def check_coverage(lungs: Lungs) -> list[str]:
    """Warnings about partly scanned lungs; NoLungsError below MIN_ANALYSABLE_LUNG_ML.

    The lungs are partly covered when the volume's first (inferior) or last (superior) axial
    slice holds at least EDGE_LUNG_FRACTION of the largest slice's lung area: the scan ends
    inside the lungs.
    """
    volume_ml = lungs.volume_ml()
    if volume_ml < MIN_ANALYSABLE_LUNG_ML:
        raise NoLungsError(
            f"too little lung to analyse: {volume_ml / 1000:.2f} L found, at least {MIN_ANALYSABLE_LUNG_ML / 1000:.1f} L "
            "needed (does the scan cover the chest?)"
        )
    area = lungs.area_mm2
    largest = float(area.max())
    cut = [
        f"{end} end ({100 * area[k] / largest:.0f} % of the largest lung area on its {which} slice)"
        for k, end, which in ((0, "inferior", "first"), (-1, "superior", "last"))
        if area[k] >= EDGE_LUNG_FRACTION * largest
    ]
    if not cut:
        return []
    extent_mm = np.count_nonzero(area) * lungs.spacing_ijk[2]
    return [
        f"{PARTIAL_COVERAGE}: the scan ends inside the lungs at its {' and its '.join(cut)}; "
        f"only the scanned {volume_ml / 1000:.1f} L of lung over {extent_mm:.0f} mm was analysed"
    ]


def find_ct_lungs(
    source, series_uid: str | None = None, *, progress: ProgressCallback | None = None, cancel: Callable[[], bool] | None = None
) -> LungCT:
    """Read a CT (path or SimpleITK image) and find its lungs: the stages "read" and "lungs", timed.

    `prepare_ct` (and so `Analyzer.analyze`) goes on from the result, so that a caller can load the
    model meanwhile (the command line does, calling this in a child process: `forked`). progress
    and cancel as in `Analyzer.analyze`. Raises what `read_ct` raises, NoLungsError, and
    AnalysisCancelled.
    """
    stages = Stages(progress, cancel)
    found = _read_and_find_lungs(source, series_uid, stages)
    found.timings = stages.timings
    return found


def _read_and_find_lungs(source, series_uid: str | None, stage: StageContext) -> LungCT:
    with stage("read", FIND_LUNGS_PROGRESS["read"]):
        ct = read_ct(source, series_uid)
    with stage("lungs", FIND_LUNGS_PROGRESS["lungs"]):
        lungs, warnings = find_lungs(ct)
    return LungCT(ct, lungs, warnings)


def prepare_ct(
    source,
    size: int,
    window_level: float,
    window_width: float,
    *,
    count: int | None = DEFAULT_COUNT,
    series_uid: str | None = None,
    stage: StageContext = _no_stages,
) -> PreparedCT:
    """A CT (path or SimpleITK image, or a LungCT already read) -> the model inputs of its chosen slices.

    size: model input pixels; window: HU level and width; count: slices to choose (None: every
    lung slice); stage: a context per stage ("read", "lungs", "slices", "prepare"; a LungCT has
    been through the first two), for timing, progress and cancellation. Raises what `read_ct`
    raises, and NoLungsError.
    """
    found = source if isinstance(source, LungCT) else _read_and_find_lungs(source, series_uid, stage)
    ct, lungs, warnings = found.ct, found.lungs, list(found.warnings)
    with stage("slices", 0.3):
        chosen = choose_slices(lungs.area_mm2, count)
    with stage("prepare", 0.35):
        hu = ct.hu
        prepared = [prepare_slice(hu[k], lungs.labels[k] > 0, size, window_level, window_width) for k in chosen]
        masks = np.stack([crop_mask(lungs.labels[k] > 0, size) for k in chosen]) if chosen else np.zeros((0, size, size), bool)
    inputs = np.stack([p[0] for p in prepared]) if prepared else np.zeros((0, size, size), np.float32)
    return PreparedCT(ct, lungs, chosen, inputs, [p[1] for p in prepared], masks, warnings)


def prepare_image(path: str | Path, size: int) -> tuple[np.ndarray, np.ndarray, CropTransform]:
    """A 2-D slice image -> (S, S) float32 model input in [0, 1], its (H, W) bool lung mask, the crop.

    Raises NoLungsError when more than MAX_TWO_LEVEL_FRACTION_2D of the pixels take two grey levels (a
    mask or a drawing, not a CT slice) or when the lung mask covers less than MIN_LUNG_FRACTION_2D of the
    image (no lungs in it: a blank, noise, text, a non-chest image), and what `read_image_2d` raises.
    """
    gray = read_image_2d(path)
    two_levels = np.sort(np.bincount(gray.ravel(), minlength=256))[-2:].sum() / gray.size
    if two_levels > MAX_TWO_LEVEL_FRACTION_2D:
        raise NoLungsError(
            f"no lungs in {path}: {100 * two_levels:.1f} % of its pixels take two grey levels (a mask or a drawing?); "
            "a CT slice in a lung window spreads over many"
        )
    mask = lung_mask_2d(gray)
    found = float(mask.mean())
    if found < MIN_LUNG_FRACTION_2D:
        raise NoLungsError(
            f"no lungs in {path}: lung found on {100 * found:.1f} % of the image, at least "
            f"{100 * MIN_LUNG_FRACTION_2D:.0f} % needed (is it an axial chest CT slice in a lung window?)"
        )
    image, crop = prepare_image_2d(gray, mask, size)
    return image, mask, crop
