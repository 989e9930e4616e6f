"""The analysis as DICOM objects in the source study: SEG, Parametric Map, Secondary Captures, SR and PDF.

`export_dicom(result_dir, source_dicom, dicom_out)` reads a complete result folder (outputs.py) and
the DICOM series it was computed from, and writes into `dicom_out` (atomically, only .dcm files):

| file | IOD (SOP class) | content |
|---|---|---|
| `SEG_lungs_regions.dcm` | Segmentation (BINARY) | right lung, left lung (SNOMED CT, as lungs.seg.nrrd), the navigator's lesion regions (one segment, their union) on every source image |
| `PM_gradcam.dcm` | Parametric Map (float) | the Grad-CAM values (0..1) on the analysed slices' source images |
| `SC_top<n>_slice<k>.dcm` | Secondary Capture (RGB) | top slice n: lung window, heat map and regions burned in, as in report.html |
| `SR_measurement_report.dcm` | Comprehensive 3D SR, TID 1500 | patient probabilities (the aggregation), per analysed slice its probabilities, per region its rectangle on its source image and score; the model as algorithm |
| `DOC_report.dcm` | Encapsulated PDF | the report page (matplotlib), as report.html reads |

Every object has new UIDs, belongs to the source study (its patient and study attributes copied
from the source images), and says "research use only" (series description, ContentQualification
RESEARCH where the IOD has it, the burned-in and PDF text). Voxels go from the result's grid
(report.json's input grid, the order of the series' images along the slice normal) to each source
image's own pixel grid by `geometry.voxel_map`, checked image by image. Written with highdicom and
pydicom (PS3.3); the objects pass dciodvfy (dicom3tools) without errors (Testing/Python/test_dicom_export.py).
highdicom needs Python >= 3.10: `unavailable_reason()` says so in one line on older Pythons (Slicer 5.6, 5.8).
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from . import __version__, geometry, volume_io
from .errors import NotACTError, UnreadableInputError, UsageError
from .memory import release_free_memory
from .outputs import GRADCAM_NRRD, LUNGS_SEG_NRRD, check_writable, is_complete, read_report, staged_folder
from .result import RESEARCH_USE_ONLY, UNTRAINED_NOTE, SliceResult
from .segmentation_file import LEFT_LUNG_SEGMENT, LESION_TERMINOLOGY, RIGHT_LUNG_SEGMENT, box_name, lesion_colors
from .slicer_runtime import DICOM_MIN_PYTHON

SOFTWARE = "CovidCTDiagnosis"
RESEARCH_SHORT = "research use only"
SEG_FILE = "SEG_lungs_regions.dcm"
PM_FILE = "PM_gradcam.dcm"
SR_FILE = "SR_measurement_report.dcm"
PDF_FILE = "DOC_report.dcm"
SC_PREFIX = "SC_top"
DICOM_SUFFIX = ".dcm"
DICOM_FOLDER_CONTENT = "a previous DICOM export (.dcm files)"
# series numbers of the new series (the source series keeps its own); descriptions say what each is (LO: 64 chars)
SERIES = {
    "seg": (9901, f"CovidCT lungs and lesion regions SEG ({RESEARCH_SHORT})"),
    "pm": (9902, f"CovidCT Grad-CAM heat map ({RESEARCH_SHORT})"),
    "sc": (9903, f"CovidCT top slices, heat map and regions ({RESEARCH_SHORT})"),
    "sr": (9904, f"CovidCT measurement report SR ({RESEARCH_SHORT})"),
    "pdf": (9905, f"CovidCT report PDF ({RESEARCH_SHORT})"),
}
LESION_SEGMENT_LABEL = "Lesion regions"
# codes of this software (a private coding scheme, PS3.16 8.2: 99 prefix) where no standard code exists
CODING_SCHEME = "99COVIDCT"
NAVIGATOR_SCORE = ("navigator-score", "Navigator region score")
LUNG_FRACTION = ("lung-fraction", "Lung area fraction of the largest")
MOST_LIKELY_CLASS = ("most-likely-class", "Most likely class")
# The measured involvement (report.json `severity`, measured from HU, not predicted): one group per lung, both lungs and zone
INVOLVEMENT_MEASUREMENTS = (  # (report key, code, meaning, UCUM unit)
    ("lung_ml", "lung-volume", "Lung volume", ("ml", "milliliter")),
    ("ground_glass_ml", "ggo-volume", "Ground-glass volume (-700 to -300 HU)", ("ml", "milliliter")),
    ("consolidation_ml", "consol-volume", "Consolidation volume (-300 to +50 HU)", ("ml", "milliliter")),
    ("involved_percent", "involved-percent", "Involved share of the lung", ("%", "percent")),
)
SEVERITY_SCORE = ("severity-score", "6-zone CT severity score (0-30)")
ZONE_SCORE = ("zone-score", "Zone involvement score (0-5)")
MEASURED_METHOD = ("hu-bands", "HU bands inside the lung mask, vessels removed")
CHEST_CT = ("24627-2", "LN", "CT Chest")  # LOINC: the procedure reported
MEAN = ("373098007", "SCT", "Mean")  # the aggregation of slice probabilities
GRADCAM_LABEL = "GRADCAM"
BODY_PART = "CHEST"
SC_DPI = 128  # one 4-inch panel: 512 pixels wide
PDF_PAGE_INCHES = (8.27, 11.69)  # A4
# Patient and study attributes the new objects copy (Type 2: present, empty when unknown); some exports leave them out
TYPE_2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyID", "StudyDate", "StudyTime",
                 "AccessionNumber", "ReferringPhysicianName")
# The export holds about 17 bytes per voxel beside the model (highdicom's SEG frames and their packed
# bits, the CT for the figures, the heat map): `analyze --dicom-out` of 157 M voxels (512 x 512 x 600)
# peaked at 3.5 GB. Larger series are refused before the analysis, to stay under 4 GB.
MAX_EXPORT_VOXELS = 160_000_000
POSITION_TOLERANCE_SLICES = 0.25  # a source image lies within this fraction of a slice of its slice on the result grid
GRID_TOLERANCE_MM = 1e-3  # the source series against report.json's grid (mm, direction cosines)


def unavailable_reason() -> str | None:
    """One line saying why DICOM export cannot run in this Python (too old, highdicom missing), or None."""
    if sys.version_info[:2] < DICOM_MIN_PYTHON:
        return (f"DICOM export needs Python {DICOM_MIN_PYTHON[0]}.{DICOM_MIN_PYTHON[1]} or newer (highdicom); this is Python "
                f"{sys.version_info[0]}.{sys.version_info[1]}")
    try:
        import highdicom  # noqa: F401
        import pydicom  # noqa: F401
    except ImportError as exc:
        return f"DICOM export needs the Python package {exc.name} (pip install highdicom pydicom)"
    return None


def is_ours(name: str) -> bool:
    """Whether a file in a DICOM output folder is one export_dicom writes (a previous export is replaced)."""
    return name.endswith(DICOM_SUFFIX)


def check_series_input(source) -> None:
    """UsageError unless `source` is a DICOM series input (a folder, DICOMDIR or .zip): other inputs have no study."""
    if not volume_io.is_dicom_series_input(source):
        raise UsageError(f"--dicom-out needs a DICOM series input (a folder, DICOMDIR or .zip): {source} is a file, "
                         "so there is no study to add the results to")


def check_export_size(size: Sequence[int], where) -> None:
    """NotACTError (exit 4) for a series of more than MAX_EXPORT_VOXELS voxels (size: i, j, k)."""
    voxels = float(np.prod(size, dtype=float))
    if voxels > MAX_EXPORT_VOXELS:
        raise NotACTError(
            f"{volume_io.size_text(size)} voxels ({voxels / 1e6:.1f} million): DICOM export (--dicom-out) "
            f"takes at most {MAX_EXPORT_VOXELS / 1e6:.0f} million to stay within 4 GB of memory; analyse it without "
            f"--dicom-out, or a thicker reconstruction ({where})"
        )


def check_dicom_out(dicom_out, out, *, source=None) -> Path:
    """The command line's checks of --dicom-out, before any work; returns its real path.

    `source`: the input of `analyze` (UsageError unless a DICOM series); None for `batch`, whose `dicom_out`
    holds a folder per case. UsageError when DICOM export cannot run here (`unavailable_reason`) or when
    `dicom_out` and `out` (the result folder) are one inside the other; OutputError unless it can be written.
    """
    if source is not None:
        check_series_input(source)
    reason = unavailable_reason()
    if reason:
        raise UsageError(reason)
    target, results = Path(os.path.realpath(dicom_out)), Path(os.path.realpath(out))
    if target == results or results in target.parents or target in results.parents:
        raise UsageError(f"--dicom-out {dicom_out} and --out {out} must be separate folders, neither inside the other")
    if source is None:
        return check_writable(target, result_folder=False)
    return check_writable(target, is_ours=is_ours, what=DICOM_FOLDER_CONTENT)


def export_dicom(result_dir: str | PathLike, source_dicom: str | PathLike | Sequence[str | PathLike],
                 dicom_out: str | PathLike) -> list[Path]:
    """Write a result folder's analysis as DICOM objects in the source study; return the files written.

    Args:
        result_dir: a complete result folder (outputs.write_outputs) of a DICOM input.
        source_dicom: the analysed series: the folder (DICOMDIR, .zip) given to the analysis, whose series
            report.json names is taken, or the list of that series' files.
        dicom_out: the folder to write (replaced atomically; only .dcm files may be in it).
    Returns:
        the paths of the written files in `dicom_out` (module docstring: SEG, PM, SC, SR, PDF).
    Raises:
        UsageError (exit 2): not a DICOM analysis, or Python/highdicom unavailable (`unavailable_reason`);
        UnreadableInputError (3): an incomplete result folder, or a source series that is not the analysed
        one (another series UID, or images not on the result's voxel grid); OutputError (7): `dicom_out`
        cannot be written. Nothing is written on error; the inputs are never modified.
    """
    reason = unavailable_reason()
    if reason:
        raise UsageError(reason)
    result_dir, dicom_out = Path(result_dir), Path(os.path.realpath(dicom_out))
    if not is_complete(result_dir):
        raise UnreadableInputError(f"cannot read {result_dir}: not a complete result folder (see docs/report-schema.md)")
    report = read_report(result_dir)
    if report["input"]["format"] != "dicom" or not report["input"]["series_uid"]:
        raise UsageError(f"{result_dir} is the analysis of a {report['input']['format']} input, not of a DICOM series: "
                         "there is no study to add the results to")
    with _source_series(source_dicom, report["input"]["series_uid"]) as (names, where):
        _check_single_frames(names)
        source = _SourceSeries.read(names, where, report)
    objects = _build_objects(source, report, result_dir)
    with staged_folder(dicom_out, is_ours=is_ours, what=DICOM_FOLDER_CONTENT) as staging:
        for name, dataset in objects.items():
            dataset.save_as(staging / name, enforce_file_format=True)
    return [dicom_out / name for name in objects]


def check_export_source(source_dicom, series_uid: str) -> None:
    """Before an analysis with --dicom-out: UsageError when the series `series_uid` of `source_dicom` (a
    folder, DICOMDIR or .zip) cannot be exported, being one multi-frame image (`export_dicom` refuses it)."""
    with _source_series(source_dicom, series_uid) as (names, _):
        _check_single_frames(names)


def _check_single_frames(names: list[str]) -> None:
    if len(names) == 1 and volume_io.dicom_frames(Path(names[0])) > 1:
        raise UsageError(f"{names[0]} is one multi-frame image (Enhanced CT): the DICOM objects reference the "
                         "single-frame CT images of a series; export from such a series")


@contextmanager
def _source_series(source, series_uid: str) -> Iterator[tuple[list[str], Path]]:
    """The analysed series' files in the volume's slice order, and where they are (for messages)."""
    if isinstance(source, (list, tuple)):
        if not source:
            raise UnreadableInputError("no DICOM files given for the source series")
        yield volume_io.sort_series_files([str(p) for p in source]), Path(source[0]).parent
        return
    with volume_io.dicom_folder(source) as folder:
        names, _, _ = volume_io.dicom_series_files(folder, series_uid)
        yield names, Path(source)


class _SourceSeries:
    """The source images (pydicom, no pixel data), the CT volume read from them (the result's grid), and
    where each image's pixels are on that grid."""

    def __init__(self, datasets, ct: sitk.Image, planes: list[tuple[int, geometry.VoxelMap]]):
        self.datasets = datasets  # in the volume's slice order
        self.ct = ct  # HU, the result's grid
        self.planes = planes  # per dataset: its slice k on the result grid, and the map from that slice to its pixels

    @classmethod
    def read(cls, names: list[str], where: Path, report: dict[str, Any]) -> _SourceSeries:
        import pydicom

        uid = report["input"]["series_uid"]
        datasets = [pydicom.dcmread(name, stop_before_pixels=True) for name in names]
        for ds in datasets:  # the copies in memory only: the files are never modified
            for keyword in TYPE_2_COPIED:
                if keyword not in ds:
                    setattr(ds, keyword, "")
        check_export_size((int(datasets[0].Columns), int(datasets[0].Rows), len(datasets)), where)
        others = sorted({str(ds.SeriesInstanceUID) for ds in datasets} - {uid})
        if others:
            raise UnreadableInputError(f"cannot use {where} as the source: series {', '.join(others)} is not the analysed "
                                       f"series {uid}")
        ct = volume_io.read_dicom_files(names, where, uid)
        _check_grid(ct, report, where)
        return cls(datasets, ct, [_plane_map(ds, ct, where) for ds in datasets])

    def frames(self, plane_of_slice: Callable[[int], np.ndarray], keep: Sequence[int] | None = None) -> np.ndarray:
        """A map on the result grid, given slice by slice (`plane_of_slice(k)`: [j, i] or [j, i, c]), as one
        frame per source image ([n, rows, columns] or [n, rows, columns, c]) for the images `keep` (indices
        into `datasets`; default all). Slice by slice: no volume of the map need exist."""
        keep = range(len(self.datasets)) if keep is None else keep
        frames = []
        for n in keep:
            k, mapping = self.planes[n]
            plane = plane_of_slice(k)
            channels = [plane] if plane.ndim == 2 else [plane[..., c] for c in range(plane.shape[2])]
            frame = [mapping.array(channel[None])[0] for channel in channels]
            frames.append(frame[0] if plane.ndim == 2 else np.stack(frame, axis=-1))
        return np.stack(frames)

    def image_of_slice(self, k: int) -> int:
        """The index into `datasets` of the image holding slice k of the result grid."""
        return next(n for n, (slice_k, _) in enumerate(self.planes) if slice_k == k)


def _check_grid(ct: sitk.Image, report: dict[str, Any], where: Path) -> None:
    if not geometry.VoxelGrid.from_image(ct).equals(geometry.VoxelGrid.from_report(report), GRID_TOLERANCE_MM):
        raise UnreadableInputError(f"cannot use {where} as the source: its series is not on the analysed voxel grid "
                                   "(another reconstruction or a changed series)")


def _plane_map(ds, ct: sitk.Image, where: Path) -> tuple[int, geometry.VoxelMap]:
    """The result grid's slice k holding source image `ds`, and the VoxelMap from that slice to the image's pixels."""
    grid = geometry.ijk_to_lps_matrix(ct)
    row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
    cosines = np.array([float(v) for v in ds.ImageOrientationPatient])
    position = np.array([float(v) for v in ds.ImagePositionPatient])
    k_continuous = float(np.linalg.solve(grid, np.append(position, 1.0))[2])
    k = int(round(k_continuous))
    image = np.eye(4)  # the image's pixel grid as a one-slice volume: i along its rows, j down its columns
    image[:3, 0] = cosines[:3] * column_spacing
    image[:3, 1] = cosines[3:] * row_spacing
    image[:3, 2] = np.cross(cosines[:3], cosines[3:]) * np.linalg.norm(grid[:3, 2])
    image[:3, 3] = position
    slab = grid.copy()
    slab[:3, 3] = (grid @ [0.0, 0.0, k_continuous, 1.0])[:3]
    size = ct.GetSize()
    mapping = geometry.voxel_map(slab, (size[0], size[1], 1), image, (int(ds.Columns), int(ds.Rows), 1))
    if abs(k_continuous - k) > POSITION_TOLERANCE_SLICES or not 0 <= k < size[2] or mapping is None:
        raise UnreadableInputError(f"cannot use {where} as the source: image {ds.SOPInstanceUID} is not on the analysed "
                                   "voxel grid")
    return k, mapping


def _code(value: str, scheme: str, meaning: str):
    from highdicom.sr import CodedConcept

    return CodedConcept(value, scheme, meaning)


def _own_code(code: tuple[str, str]):
    return _code(code[0], CODING_SCHEME, code[1])


def _terminology_code(entry: Sequence[str]):
    """A [scheme, value, meaning] triple of segmentation_file's terminology as a coded concept."""
    scheme, value, meaning = entry
    return _code(value, scheme, meaning)


def _probability_code(class_name: str):
    return _code(f"p-{class_name}"[:16], CODING_SCHEME, f"Probability of {class_name}")


def _unit():
    return _code("1", "UCUM", "no units")


class _Identity:
    """What every new object says about the software that made it (General Equipment module)."""

    def __init__(self, report: dict[str, Any]):
        model = report["model"]
        self.model_name = str(model["name"])[:64]
        self.sha256 = model["sha256"] or "none"
        self.notes = [RESEARCH_USE_ONLY] if model["trained"] else [RESEARCH_USE_ONLY, UNTRAINED_NOTE]
        self.content_description = self.notes[-1][:64]  # LO: the untrained note, else the research-use notice
        self.kwargs = {
            "manufacturer": SOFTWARE,
            "manufacturer_model_name": self.model_name,
            "software_versions": [f"{SOFTWARE} {__version__}", self.model_name, self.sha256],
            "device_serial_number": self.sha256[:16],  # this model: the start of its hash
        }

    def algorithm(self, aggregation: str):
        from highdicom.sr import AlgorithmIdentification

        return AlgorithmIdentification(name=f"{SOFTWARE} DRENet ({self.model_name})", version=__version__,
                                       parameters=[f"model sha256 {self.sha256}", f"aggregation {aggregation}", *self.notes])


def _build_objects(source: _SourceSeries, report: dict[str, Any], result_dir: Path) -> dict[str, Any]:
    """File name -> dataset, for every object of the module docstring."""
    from highdicom import UID

    identity = _Identity(report)
    slices = [SliceResult.from_report(s) for s in report["slices"]]
    objects = {SEG_FILE: _segmentation(source, slices, result_dir, identity, UID())}
    release_free_memory()
    gradcam = sitk.ReadImage(str(result_dir / GRADCAM_NRRD), sitk.sitkFloat32)
    objects[PM_FILE] = _parametric_map(source, slices, gradcam, identity, UID(), report["positive_class"])
    sc_series = UID()
    for rank, index in enumerate(report["top_slices"], start=1):
        objects[f"{SC_PREFIX}{rank}_slice{index}{DICOM_SUFFIX}"] = _secondary_capture(
            source, slices, index, rank, gradcam, identity, sc_series, report["positive_class"])
    objects[SR_FILE] = _measurement_report(source, report, slices, identity)
    objects[PDF_FILE] = _encapsulated_pdf(source, report, slices, gradcam, identity)
    return objects


def _segmentation(source: _SourceSeries, slices: list[SliceResult], result_dir: Path, identity: _Identity, series_uid):
    import highdicom as hd
    import slicerio
    from pydicom.sr.codedict import codes

    segmentation = slicerio.read_segmentation(str(result_dir / LUNGS_SEG_NRRD))
    voxels = np.asarray(segmentation["voxels"])
    if not np.allclose(segmentation["ijkToLPS"], geometry.ijk_to_lps_matrix(source.ct), atol=GRID_TOLERANCE_MM):
        raise UnreadableInputError(f"cannot read {result_dir / LUNGS_SEG_NRRD}: not on the analysed voxel grid")
    by_id = {s["id"]: s for s in segmentation["segments"]}
    lungs = []
    for segment in (RIGHT_LUNG_SEGMENT, LEFT_LUNG_SEGMENT):
        entry = by_id[segment["id"]]
        layer = voxels if voxels.ndim == 3 else voxels[entry["layer"]]  # slicerio: [i, j, k] or [layer, i, j, k]
        lungs.append((layer.transpose(2, 1, 0), entry["labelValue"]))  # [i, j, k] -> [k, j, i], a view
    boxes = [(box.ijk_min, box.ijk_max) for s in slices for box in s.boxes]

    def segments_of_slice(k: int) -> np.ndarray:
        """[j, i, segment] uint8 of slice k of the result grid: right lung, left lung, lesion regions."""
        plane = np.zeros(lungs[0][0].shape[1:] + (3,), np.uint8)
        for n, (layer, value) in enumerate(lungs):
            plane[..., n] = layer[k] == value
        for (i0, j0, k0), (i1, j1, k1) in boxes:
            if k0 <= k <= k1:
                plane[j0 : j1 + 1, i0 : i1 + 1, 2] = 1
        return plane

    pixels = source.frames(segments_of_slice)  # [frame, rows, columns, segment], no volume-sized mask of each segment

    algorithm = hd.AlgorithmIdentificationSequence(
        name=f"{SOFTWARE} ({identity.model_name})", version=__version__,
        family=codes.cid7162.ArtificialIntelligence, parameters={"model_sha256": identity.sha256[:64]})
    descriptions = []
    lesion = {"name": LESION_SEGMENT_LABEL, "terminology": LESION_TERMINOLOGY, "color": lesion_colors([1.0])[0]}
    for number, segment in enumerate((RIGHT_LUNG_SEGMENT, LEFT_LUNG_SEGMENT, lesion), start=1):
        terminology = segment["terminology"]
        region = terminology.get("anatomicRegion")
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=segment["name"],
            segmented_property_category=_terminology_code(terminology["category"]),
            segmented_property_type=_terminology_code(terminology["type"]),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            anatomic_regions=[_terminology_code(region)] if region else None,
            display_color=hd.color.CIELabColor.from_rgb(*(round(255 * c) for c in segment["color"])),  # lungs.seg.nrrd's
        ))
    number, description = SERIES["seg"]
    return hd.seg.Segmentation(
        source_images=source.datasets, pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=series_uid, series_number=number,
        sop_instance_uid=hd.UID(), instance_number=1, series_description=description,
        content_description=identity.content_description, content_label="COVIDCT_SEG", omit_empty_frames=True,
        **identity.kwargs)


def _parametric_map(source: _SourceSeries, slices: list[SliceResult], gradcam: sitk.Image, identity: _Identity,
                    series_uid, positive_class: str):
    import highdicom as hd

    keep = [source.image_of_slice(s.index) for s in sorted(slices, key=lambda s: s.index)]
    pixels = source.frames(sitk.GetArrayViewFromImage(gradcam).__getitem__, keep).astype(np.float32)
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=GRADCAM_LABEL, lut_explanation=f"Grad-CAM for {positive_class}, 0..1"[:64], unit=_unit(),
        value_range=(0.0, 1.0), slope=1.0, intercept=0.0)
    number, description = SERIES["pm"]
    parametric_map = hd.pm.ParametricMap(
        source_images=[source.datasets[n] for n in keep], pixel_array=pixels, series_instance_uid=series_uid,
        series_number=number, sop_instance_uid=hd.UID(), instance_number=1, contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping], voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.5, window_width=1.0)],
        series_description=description,
        content_description=identity.content_description, content_label=GRADCAM_LABEL, **identity.kwargs)
    return _with_body_part(parametric_map, source)


def _with_body_part(dataset, source: _SourceSeries):
    """The General Series module's BodyPartExamined (the source's, else CHEST): an unpaired body part, so no
    Laterality (without it, validators cannot tell that the conditional Laterality is not needed)."""
    dataset.BodyPartExamined = source.datasets[0].get("BodyPartExamined") or BODY_PART
    return dataset


def _figure_rgb(fig) -> np.ndarray:
    """A matplotlib Figure rendered to RGB pixels [rows, columns, 3], uint8."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.ascontiguousarray(np.asarray(canvas.buffer_rgba())[..., :3])


def _secondary_capture(source: _SourceSeries, slices: list[SliceResult], index: int, rank: int, gradcam: sitk.Image,
                       identity: _Identity, series_uid, positive_class: str):
    import highdicom as hd

    from .html_report import top_slices_figure

    fig = top_slices_figure(slices, [index], positive_class, source.ct, gradcam, dpi=SC_DPI)
    fig.text(0.5, 0.005, RESEARCH_USE_ONLY.upper(), color="white", fontsize=7, ha="center", va="bottom")
    number, description = SERIES["sc"]
    dataset = source.datasets[source.image_of_slice(index)]
    return _with_body_part(hd.sc.SCImage.from_ref_dataset(
        ref_dataset=dataset, pixel_array=_figure_rgb(fig), photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", patient_orientation=("L", "P"), series_instance_uid=series_uid,
        series_number=number, sop_instance_uid=hd.UID(), instance_number=rank, series_description=description,
        **{k: v for k, v in identity.kwargs.items() if k != "device_serial_number"}), source)


def _measurement_report(source: _SourceSeries, report: dict[str, Any], slices: list[SliceResult], identity: _Identity):
    import highdicom as hd
    from highdicom.coding_schemes import CodingSchemeIdentificationItem
    from highdicom.sr import (
        Comprehensive3DSR, DeviceObserverIdentifyingAttributes, FindingSite, GraphicTypeValues, ImageRegion, Measurement,
        MeasurementReport, MeasurementsAndQualitativeEvaluations, ObservationContext, ObserverContext,
        PlanarROIMeasurementsAndQualitativeEvaluations, QualitativeEvaluation, SourceImageForMeasurementGroup,
        SourceImageForRegion, TrackingIdentifier,
    )
    from pydicom.sr.codedict import codes

    patient = report["patient"]
    algorithm = identity.algorithm(patient["aggregation"])
    classes = list(report["model"]["classes"])

    def probabilities(values: dict[str, float], derivation=None) -> list:
        return [Measurement(name=_probability_code(c), value=float(values[c]), unit=_unit(), algorithm_id=algorithm,
                            derivation=derivation) for c in classes]

    groups = [MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=hd.UID(), identifier="patient"),
        algorithm_id=algorithm,
        measurements=probabilities(patient["probabilities"], _code(*MEAN) if patient["aggregation"] == "mean" else None),
        qualitative_evaluations=[QualitativeEvaluation(_own_code(MOST_LIKELY_CLASS),
                                                       _code(f"class-{patient['label']}"[:16], CODING_SCHEME, patient["label"]))],
    )]
    lung = _terminology_code(LESION_TERMINOLOGY["anatomicRegion"])
    groups += _involvement_groups(report.get("severity"), lung)
    for s in sorted(slices, key=lambda s: s.index):
        dataset = source.datasets[source.image_of_slice(s.index)]
        measurements = probabilities(s.probabilities)
        measurements.append(Measurement(name=_own_code(LUNG_FRACTION), value=float(s.lung_fraction), unit=_unit()))
        groups.append(MeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(uid=hd.UID(), identifier=f"slice {s.index}"),
            algorithm_id=algorithm, measurements=measurements,
            source_images=[SourceImageForMeasurementGroup.from_source_image(dataset)]))
        k, mapping = source.planes[source.image_of_slice(s.index)]
        for box in s.boxes:
            corners = np.array([mapping.index((i, j, 0)) for i, j in ((box.ijk_min[0], box.ijk_min[1]), (box.ijk_max[0], box.ijk_max[1]))])
            (c0, r0), (c1, r1) = corners[:, :2].min(0), corners[:, :2].max(0) + 1  # pixel edges: (0, 0) is the first pixel's corner
            outline = np.array([[c0, r0], [c1, r0], [c1, r1], [c0, r1], [c0, r0]], dtype=float)
            groups.append(PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=TrackingIdentifier(uid=hd.UID(), identifier=box_name(s.index, box.rank)),
                referenced_region=ImageRegion(GraphicTypeValues.POLYLINE, outline, SourceImageForRegion.from_source_image(dataset)),
                finding_type=_terminology_code(LESION_TERMINOLOGY["type"]), finding_sites=[FindingSite(lung)],
                algorithm_id=algorithm,
                measurements=[Measurement(name=_own_code(NAVIGATOR_SCORE), value=float(box.score), unit=_unit(),
                                          algorithm_id=algorithm)]))
    observer = ObserverContext(observer_type=codes.cid270.Device, observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
        uid=hd.UID(), name=SOFTWARE, manufacturer_name=SOFTWARE, model_name=identity.model_name))
    content = MeasurementReport(observation_context=ObservationContext(observer_device_context=observer),
                                procedure_reported=_code(*CHEST_CT), imaging_measurements=groups)
    referenced = sorted({source.image_of_slice(s.index) for s in slices})
    number, description = SERIES["sr"]
    return Comprehensive3DSR(
        evidence=[source.datasets[n] for n in referenced], content=content[0], series_instance_uid=hd.UID(),
        series_number=number, sop_instance_uid=hd.UID(), instance_number=1, is_complete=True, **identity.kwargs,
        series_description=description, content_qualification="RESEARCH",
        coding_schemes=[CodingSchemeIdentificationItem(CODING_SCHEME, name=f"{SOFTWARE} codes")])


def _involvement_groups(severity: dict[str, Any] | None, lung) -> list:
    """TID 1501 groups of the measured involvement: "involvement <lung>" for right, left and both lungs (volumes in mL,
    involved %; both lungs also the 6-zone score) and "involvement <lung> <zone>" per zone (also its 0-5 score)."""
    if not severity:
        return []
    import highdicom as hd
    from highdicom.sr import FindingSite, Measurement, MeasurementsAndQualitativeEvaluations, TrackingIdentifier

    sites = {"right": _terminology_code(RIGHT_LUNG_SEGMENT["terminology"]["type"]),
             "left": _terminology_code(LEFT_LUNG_SEGMENT["terminology"]["type"]), "both": lung}
    method = _own_code(MEASURED_METHOD)

    def group(name: str, site, values: dict[str, Any], score: tuple[tuple[str, str], int] | None):
        measurements = [Measurement(name=_code(code, CODING_SCHEME, meaning), value=float(values[key]),
                                    unit=_code(unit[0], "UCUM", unit[1]), method=method)
                        for key, code, meaning, unit in INVOLVEMENT_MEASUREMENTS]
        if score is not None:
            measurements.append(Measurement(name=_own_code(score[0]), value=float(score[1]), unit=_unit(), method=method))
        return MeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(uid=hd.UID(), identifier=name), finding_sites=[FindingSite(site)],
            method=method, measurements=measurements)

    groups = [group(f"involvement {name}", sites[name], values, (SEVERITY_SCORE, severity["score"]) if name == "both" else None)
              for name, values in severity["lungs"].items()]
    groups += [group(f"involvement {z['lung']} {z['zone']}", sites[z["lung"]], z, (ZONE_SCORE, z["score"]))
               for z in severity["zones"]]
    return groups


def _report_pdf(report: dict[str, Any], slices: list[SliceResult], source: _SourceSeries, gradcam: sitk.Image) -> bytes:
    """The report page as PDF bytes (matplotlib): result, trust, measured involvement, top slices, slice table."""
    from matplotlib.backends.backend_pdf import PdfPages
    from matplotlib.figure import Figure

    from .html_report import top_slices_figure
    from .performance import trust_sentence

    patient, model = report["patient"], report["model"]
    lines = [f"Input: series {report['input']['series_uid']}", "",
             f"Result: {patient['label']}" if model["trained"] else "UNTRAINED network: not a diagnosis",
             *(f"    P({c}) = {p:.2f}" for c, p in patient["probabilities"].items()),
             f"Aggregation: {patient['aggregation']} of {len(slices)} analysed slices"]
    if model["trained"]:
        lines.append(trust_sentence(model["performance"]))
    severity = report.get("severity")
    if severity:
        lines.append(f"Measured involvement: {severity['lungs']['both']['involved_percent']:.1f} % of both lungs; "
                     f"6-zone CT severity score {severity['score']} of 30")
    lines += [f"Warning: {w}" for w in report["warnings"]]
    lines += ["", f"Model: {model['name']} (sha256 {model['sha256'] or 'none'}), {SOFTWARE} {__version__}"]
    buffer = io.BytesIO()
    with PdfPages(buffer, metadata={"Title": "CovidCT report", "Creator": f"{SOFTWARE} {__version__}"}) as pdf:
        page = Figure(figsize=PDF_PAGE_INCHES)
        page.text(0.06, 0.96, "COVID-19 chest CT analysis", fontsize=16, weight="bold", va="top")
        page.text(0.06, 0.925, RESEARCH_USE_ONLY, fontsize=10, color="darkred", va="top")
        page.text(0.06, 0.89, "\n".join(lines), fontsize=8.5, va="top", wrap=True, family="DejaVu Sans")
        figure = top_slices_figure(slices, report["top_slices"], report["positive_class"], source.ct, gradcam)
        if figure is not None:
            pixels = _figure_rgb(figure)
            height = 0.92 * PDF_PAGE_INCHES[0] / PDF_PAGE_INCHES[1] * pixels.shape[0] / pixels.shape[1]
            ax = page.add_axes((0.04, 0.70 - height, 0.92, height))  # below the text, the image's own aspect
            ax.imshow(pixels)
            ax.set_axis_off()
            page.text(0.06, 0.69 - height, f"Most suspicious slices: lung window, Grad-CAM for {report['positive_class']}, "
                      "the navigator's regions (rank: score); patient's right on the left.", fontsize=7, va="top")
        pdf.savefig(page)
        table = Figure(figsize=PDF_PAGE_INCHES)
        table.text(0.06, 0.96, "Analysed slices", fontsize=13, weight="bold", va="top")
        classes = list(model["classes"])
        rows = [[str(s.index), f"{s.z_mm:.1f}", *(f"{s.probabilities[c]:.2f}" for c in classes), str(len(s.boxes))]
                for s in slices]
        ax = table.add_axes((0.06, 0.05, 0.88, 0.88))
        ax.set_axis_off()
        ax.table(cellText=rows, colLabels=["slice", "z mm", *(f"P({c})" for c in classes), "regions"], loc="upper center")
        table.text(0.06, 0.02, RESEARCH_USE_ONLY, fontsize=8, color="darkred")
        pdf.savefig(table)
    return buffer.getvalue()


def _encapsulated_pdf(source: _SourceSeries, report: dict[str, Any], slices: list[SliceResult], gradcam: sitk.Image,
                      identity: _Identity):
    """An Encapsulated PDF instance (PS3.3 A.45.1) in the source study: highdicom's SOP class base (patient, study,
    series, equipment, SOP common) and the Encapsulated Document module filled in with pydicom."""
    import highdicom as hd
    from pydicom.uid import EncapsulatedPDFStorage, ExplicitVRLittleEndian

    reference = source.datasets[0]
    number, description = SERIES["pdf"]
    now = datetime.now()
    dataset = hd.base.SOPClass(
        study_instance_uid=reference.StudyInstanceUID, series_instance_uid=hd.UID(), series_number=number,
        sop_instance_uid=hd.UID(), sop_class_uid=EncapsulatedPDFStorage, instance_number=1, modality="DOC",
        transfer_syntax_uid=ExplicitVRLittleEndian, patient_id=reference.get("PatientID"),
        patient_name=reference.get("PatientName"), patient_birth_date=reference.get("PatientBirthDate"),
        patient_sex=reference.get("PatientSex"), accession_number=reference.get("AccessionNumber"),
        study_id=reference.get("StudyID"), study_date=reference.get("StudyDate"), study_time=reference.get("StudyTime"),
        referring_physician_name=reference.get("ReferringPhysicianName"), series_description=description,
        content_date=now.date(), content_time=now.time(), **identity.kwargs)
    dataset.ConversionType = "SYN"  # SC Equipment module: a synthetic document
    dataset.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    dataset.BurnedInAnnotation = "YES"
    dataset.DocumentTitle = f"CovidCT report ({RESEARCH_SHORT})"
    dataset.ConceptNameCodeSequence = []
    dataset.MIMETypeOfEncapsulatedDocument = "application/pdf"
    pdf = _report_pdf(report, slices, source, gradcam)
    dataset.EncapsulatedDocumentLength = len(pdf)
    dataset.EncapsulatedDocument = pdf + b"\0" * (len(pdf) % 2)  # OB values have an even length
    return dataset
