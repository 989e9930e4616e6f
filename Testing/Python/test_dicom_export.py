"""`--dicom-out`: the analysis as DICOM objects in the source study, checked with the field's tools.

dciodvfy (dicom3tools) validates every object; dcmqi's segimage2itkimage (what Slicer's QuantitativeReporting
uses) reads the SEG back; highdicom reads the SR back. On the chest phantom written as a CT DICOM series (its
voxel axes flipped against LPS, so the engine reorients it) and on the real P001 series (JPEG lossless).
Each is analysed once per module (`covidct analyze ... --dicom-out`).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

pytest.importorskip("highdicom", reason="DICOM export needs highdicom (Python >= 3.10)")
import highdicom as hd  # noqa: E402
import pydicom  # noqa: E402
import slicerio  # noqa: E402

from CovidCTDiagnosisLib import dicom_export  # noqa: E402
from CovidCTDiagnosisLib.cli import main  # noqa: E402
from CovidCTDiagnosisLib.dicom_export import PDF_FILE, PM_FILE, SEG_FILE, SR_FILE, export_dicom  # noqa: E402
from CovidCTDiagnosisLib.errors import NotACTError, OutputError, UnreadableInputError  # noqa: E402
from CovidCTDiagnosisLib.outputs import GRADCAM_NRRD, LUNGS_SEG_NRRD, read_report  # noqa: E402
from CovidCTDiagnosisLib.phantom import make_chest_phantom  # noqa: E402
from dicom_series import write_ct_series  # noqa: E402

P001 = ("ct", "covid-ct-md", "P001-covid")
FLIPPED = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)  # i towards the patient's right, j anterior: reoriented by the engine
CASES = ("phantom", "p001")


def _analyse(source: Path, where: Path) -> tuple[Path, Path, Path]:
    """`covidct analyze source --out where/result --dicom-out where/dicom`: (source, result folder, DICOM folder)."""
    result, dicom = where / "result", where / "dicom"
    assert main(["analyze", str(source), "--out", str(result), "--dicom-out", str(dicom), "--quiet"]) == 0
    return source, result, dicom


@pytest.fixture(scope="module")
def phantom_case(tmp_path_factory):
    where = tmp_path_factory.mktemp("phantom")
    image = make_chest_phantom(origin=(159.0, 127.0, -120.0), direction=FLIPPED).image
    write_ct_series(image, where / "ct")
    return _analyse(where / "ct", where)


@pytest.fixture(scope="module")
def p001_case(shared_data, tmp_path_factory):
    return _analyse(shared_data.joinpath(*P001), tmp_path_factory.mktemp("p001"))


@pytest.fixture(params=CASES)
def case(request):
    return request.getfixturevalue(f"{request.param}_case")


def _source_datasets(source: Path) -> list:
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(source.iterdir())]


def test_the_objects_written(case):
    source, result, dicom = case
    report = read_report(result)
    names = sorted(p.name for p in dicom.iterdir())
    top = [f"SC_top{n}_slice{k}.dcm" for n, k in enumerate(report["top_slices"], start=1)]
    assert names == sorted([SEG_FILE, PM_FILE, SR_FILE, PDF_FILE, *top])
    sources = _source_datasets(source)
    study, series = sources[0].StudyInstanceUID, report["input"]["series_uid"]
    source_uids = {ds.SOPInstanceUID for ds in sources}
    objects = [pydicom.dcmread(dicom / name) for name in names]
    sop_uids = {ds.SOPInstanceUID for ds in objects}
    assert len(sop_uids) == len(objects) and not sop_uids & source_uids  # new UIDs for every object
    assert len({ds.SeriesInstanceUID for ds in objects}) == 5 and series not in {ds.SeriesInstanceUID for ds in objects}
    model = report["model"]
    for ds in objects:
        assert ds.StudyInstanceUID == study and ds.PatientID == sources[0].get("PatientID", "")
        assert "research use only" in ds.SeriesDescription.lower()
        assert ds.Manufacturer == "CovidCTDiagnosis" and ds.ManufacturerModelName == model["name"]
        assert list(ds.SoftwareVersions) == ["CovidCTDiagnosis 0.1.0", model["name"], model["sha256"]]
    seg = pydicom.dcmread(dicom / SEG_FILE)
    assert [(s.SegmentLabel, s.SegmentedPropertyTypeCodeSequence[0].CodeValue) for s in seg.SegmentSequence] == [
        ("Right lung", "3341006"), ("Left lung", "44029006"), ("Lesion regions", "52988006")]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series
    assert {item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence} == source_uids
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    pdf = pydicom.dcmread(dicom / PDF_FILE)
    assert pdf.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert pdf.EncapsulatedDocument[: pdf.EncapsulatedDocumentLength].startswith(b"%PDF-")
    assert pdf.EncapsulatedDocument[: pdf.EncapsulatedDocumentLength].rstrip().endswith(b"%%EOF")


def test_every_object_passes_dciodvfy(case):
    dciodvfy = shutil.which("dciodvfy")
    if dciodvfy is None:
        pytest.skip("dciodvfy not installed (Debian package dicom3tools; Testing/install-system-packages.sh)")
    for path in sorted(case[2].iterdir()):
        run = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True)
        lines = (run.stdout + run.stderr).splitlines()
        errors = [line for line in lines if line.startswith("Error")]
        assert errors == [], f"{path.name}: {errors}"
        # the warnings we know: the private coding scheme's designator (declared in the SR) and PM's QUANTITY
        # pixel contrast (highdicom's, a defined term dciodvfy's tables lack)
        unknown = [line for line in lines if line.startswith("Warning") and "99COVIDCT" not in line and "<QUANTITY>" not in line]
        assert unknown == [], f"{path.name}: {unknown}"


def test_dcmqi_reads_the_seg_back_as_the_lungs_and_regions(case, tmp_path):
    """segimage2itkimage writes one image per segment; on the analysed grid they are exactly lungs.seg.nrrd's
    right (1) and left (2) lung, and the union of the lesion boxes (3)."""
    converter = shutil.which("segimage2itkimage") or shutil.which("segimage2itkimage", path=str(Path(sys.executable).parent))
    if converter is None:
        pytest.skip("dcmqi not installed (pip install dcmqi: segimage2itkimage)")
    _, result, dicom = case
    subprocess.run([converter, "--inputDICOM", str(dicom / SEG_FILE), "--outputDirectory", str(tmp_path), "--outputType", "nrrd"],
                   check=True, capture_output=True)
    grid = sitk.ReadImage(str(result / GRADCAM_NRRD))
    segmentation = slicerio.read_segmentation(str(result / LUNGS_SEG_NRRD))
    lungs_ijk = segmentation["voxels"][0] if segmentation["voxels"].ndim == 4 else segmentation["voxels"]
    regions_ijk = np.zeros_like(lungs_ijk, dtype=bool)
    for s in read_report(result)["slices"]:
        for box in s["boxes"]:
            (i0, j0, k0), (i1, j1, k1) = box["ijk_min"], box["ijk_max"]
            regions_ijk[i0 : i1 + 1, j0 : j1 + 1, k0 : k1 + 1] = True
    for number, expected in ((1, lungs_ijk == 1), (2, lungs_ijk == 2), (3, regions_ijk)):
        read_back = sitk.Resample(sitk.ReadImage(str(tmp_path / f"{number}.nrrd")), grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        voxels = sitk.GetArrayFromImage(read_back).transpose(2, 1, 0) > 0
        assert expected.any() and np.array_equal(voxels, expected), f"segment {number}"


def _texts(items, concept_value: str) -> list[str]:
    """The TEXT values of content items named by the DCM code `concept_value`, anywhere below `items`."""
    found = []
    for item in items:
        if item.get("ValueType") == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == concept_value:
            found.append(item.TextValue)
        found += _texts(item.get("ContentSequence", []), concept_value)
    return found


def test_highdicom_reads_the_sr_back_with_the_report(case):
    """The TID 1500 report: the patient's probabilities (the mean of the slices'), each analysed slice's, and each
    region's score, as in report.json; the algorithm with the model's SHA-256 and the aggregation."""
    _, result, dicom = case
    report = read_report(result)
    sr = hd.sr.srread(dicom / SR_FILE)
    assert sr.ContentQualification == "RESEARCH" and sr.CompletionFlag == "COMPLETE"
    groups = {g.tracking_identifier: g for g in sr.content.get_image_measurement_groups()}

    def probabilities(group) -> dict[str, float]:
        prefix = "Probability of "
        return {m.name.meaning[len(prefix):]: m.value for m in group.get_measurements() if m.name.meaning.startswith(prefix)}

    assert probabilities(groups["patient"]) == pytest.approx(report["patient"]["probabilities"], abs=1e-12)
    assert {m.derivation.meaning for m in groups["patient"].get_measurements()} == {"Mean"}
    involvement = {name: group for name, group in groups.items() if name.startswith("involvement ")}
    assert set(groups) - set(involvement) == {"patient", *(f"slice {s['index']}" for s in report["slices"])}
    severity = report["severity"]  # the measured involvement, as report.json's: per lung, both lungs, per zone
    zones = {f"involvement {z['lung']} {z['zone']}": z for z in severity["zones"]}
    assert set(involvement) == {f"involvement {name}" for name in severity["lungs"]} | set(zones)

    def values(group) -> dict[str, float]:
        return {m.name.meaning: m.value for m in group.get_measurements()}

    both = values(involvement["involvement both"])
    assert both["Involved share of the lung"] == pytest.approx(severity["lungs"]["both"]["involved_percent"], abs=1e-9)
    assert both["Ground-glass volume (-700 to -300 HU)"] == pytest.approx(severity["lungs"]["both"]["ground_glass_ml"], abs=1e-9)
    assert both["6-zone CT severity score (0-30)"] == severity["score"]
    for name, zone in zones.items():
        assert values(involvement[name])["Zone involvement score (0-5)"] == zone["score"]
        assert values(involvement[name])["Lung volume"] == pytest.approx(zone["lung_ml"], abs=1e-9)
    units = {m.unit.value for g in involvement.values() for m in g.get_measurements()}
    assert units == {"ml", "%", "1"}
    for s in report["slices"]:
        assert probabilities(groups[f"slice {s['index']}"]) == pytest.approx(s["probabilities"], abs=1e-12)
    regions = {g.tracking_identifier: g.get_measurements()[0].value for g in sr.content.get_planar_roi_measurement_groups()}
    expected = {f"slice {s['index']} box {b['rank']}": b["score"] for s in report["slices"] for b in s["boxes"]}
    assert expected and regions == pytest.approx(expected, abs=1e-12)
    parameters = _texts(groups["patient"], "111002")  # DCM Algorithm Parameters
    assert f"model sha256 {report['model']['sha256']}" in parameters
    assert f"aggregation {report['patient']['aggregation']}" in parameters


def test_the_parametric_map_holds_the_heat_map_of_the_analysed_slices(phantom_case):
    """One float frame per analysed slice, on its source image, with exactly gradcam.nrrd's values."""
    source, result, dicom = phantom_case
    report = read_report(result)
    gradcam = sitk.ReadImage(str(result / GRADCAM_NRRD))
    heat_kji = sitk.GetArrayFromImage(gradcam)
    pm = pydicom.dcmread(dicom / PM_FILE)
    assert pm.NumberOfFrames == len(report["slices"]) and pm.ContentQualification == "RESEARCH"
    frames = pm.pixel_array
    slices = []
    for frame, group in zip(frames, pm.PerFrameFunctionalGroupsSequence):
        position = [float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient]
        i, j, k = gradcam.TransformPhysicalPointToIndex(position)
        slices.append(k)
        # the files' pixel (0, 0) is the grid's voxel (i, j) = (0, 0), rows along j (test helper write_ct_series)
        assert (i, j) == (0, 0) and np.array_equal(frame, heat_kji[k])
    assert sorted(slices) == sorted(s["index"] for s in report["slices"])


def test_a_non_dicom_input_is_refused_before_any_work(tmp_path, capsys):
    volume = tmp_path / "ct.nrrd"
    sitk.WriteImage(make_chest_phantom(size=(32, 32, 8)).image, str(volume))
    code = main(["analyze", str(volume), "--out", str(tmp_path / "result"), "--dicom-out", str(tmp_path / "dicom"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--dicom-out needs a DICOM series input" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nrrd"]


def test_python_older_than_3_10_is_told_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "version_info", (3, 9, 18, "final", 0))
    assert dicom_export.unavailable_reason() == "DICOM export needs Python 3.10 or newer (highdicom); this is Python 3.9"
    code = main(["analyze", str(tmp_path), "--out", str(tmp_path / "result"), "--dicom-out", str(tmp_path / "dicom")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["covidct: error: DICOM export needs Python 3.10 or newer (highdicom); this is Python 3.9"]


def test_dicom_out_is_checked_before_any_work(phantom_case, tmp_path, capsys):
    source = phantom_case[0]
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    for dicom_out, code, message in ((tmp_path / "taken", 7, "holds other files than a previous DICOM export"),
                                     (tmp_path / "result" / "dicom", 2, "must be separate folders")):
        assert main(["analyze", str(source), "--out", str(tmp_path / "result"), "--dicom-out", str(dicom_out)]) == code
        assert message in capsys.readouterr().err
    assert [str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")] == ["taken", "taken/notes.txt"]


def test_a_series_too_large_to_export_is_refused_before_the_analysis(phantom_case, tmp_path, capsys, monkeypatch):
    """Over MAX_EXPORT_VOXELS (the export's 4 GB; here lowered below the phantom's size): one line, exit 4,
    nothing written; export_dicom refuses it as well, before reading any pixel."""
    source, result, _ = phantom_case
    monkeypatch.setattr(dicom_export, "MAX_EXPORT_VOXELS", 1000)
    code = main(["analyze", str(source), "--out", str(tmp_path / "result"), "--dicom-out", str(tmp_path / "dicom"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 4 and len(err) == 1 and "DICOM export (--dicom-out) takes at most 0 million" in err[0]
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(NotACTError, match="stay within 4 GB"):
        export_dicom(result, source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_enhanced_ct_is_refused_before_anything_is_written(tmp_path, capsys):
    """The DICOM objects reference single-frame CT images: a multi-frame Enhanced CT source is refused by
    `analyze --dicom-out` before the analysis (was: after it, with the result folder written, exit 2) and by
    `batch --dicom-out` before the case's result folder is written."""
    from dicom_series import enhanced_ct

    image = make_chest_phantom(origin=(159.0, 127.0, -120.0), direction=FLIPPED).image
    (tmp_path / "cases" / "enhanced").mkdir(parents=True)
    enhanced_ct(image, tmp_path / "made").save_as(tmp_path / "cases" / "enhanced" / "IM1")
    code = main(["analyze", str(tmp_path / "cases" / "enhanced"), "--out", str(tmp_path / "result"),
                 "--dicom-out", str(tmp_path / "dicom"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "is one multi-frame image (Enhanced CT)" in err[0]
    assert not (tmp_path / "result").exists() and not (tmp_path / "dicom").exists()
    code = main(["batch", str(tmp_path / "cases"), "--out", str(tmp_path / "results"), "--dicom-out", str(tmp_path / "dicoms"),
                 "--quiet"])
    assert code == 9 and "multi-frame image" in (tmp_path / "results" / "summary.csv").read_text()
    assert not (tmp_path / "results" / "enhanced").exists() and not (tmp_path / "dicoms" / "enhanced").exists()


def test_a_failed_export_leaves_no_result_folder(phantom_case, tmp_path, capsys, monkeypatch):
    """The export fails (a full disk: pydicom's message carries a traceback) or is interrupted after the result
    folder was written: the command's one line and exit code, and neither folder left (the result folder stayed)."""
    source = phantom_case[0]

    full_disk = OSError("With tag (7FE0,0010) got exception: [Errno 28] No space left on device\nTraceback (most recent call last):")
    for failure, code in ((full_disk, 7), (KeyboardInterrupt(), 130)):
        def export(*args, **kwargs):
            with dicom_export.staged_folder(tmp_path / "dicom", is_ours=dicom_export.is_ours):
                raise failure

        monkeypatch.setattr(dicom_export, "export_dicom", export)
        assert main(["analyze", str(source), "--out", str(tmp_path / "result"), "--dicom-out", str(tmp_path / "dicom"),
                     "--quiet"]) == code
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and ("No space left on device" in err[0] if code == 7 else err[0] == "covidct: interrupted")
        assert list(tmp_path.iterdir()) == []


def test_another_series_is_refused_and_a_previous_export_replaced(phantom_case, tmp_path):
    source, result, dicom = phantom_case
    other = tmp_path / "other"
    files = write_ct_series(make_chest_phantom(origin=(159.0, 127.0, -120.0), direction=FLIPPED).image, other)
    with pytest.raises(UnreadableInputError, match="no series"):  # the folder lacks the analysed series
        export_dicom(result, other, tmp_path / "out")
    with pytest.raises(UnreadableInputError, match="is not the analysed series"):
        export_dicom(result, files, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    target = tmp_path / "again"
    shutil.copytree(dicom, target)
    before = {p.name: pydicom.dcmread(p).SOPInstanceUID for p in target.iterdir()}
    written = export_dicom(result, sorted(source.iterdir()), target)  # the series as a list of its files
    after = {p.name: pydicom.dcmread(p).SOPInstanceUID for p in target.iterdir()}
    assert sorted(written) == sorted(target.iterdir()) and set(after) == set(before)
    assert not set(after.values()) & set(before.values())  # a new export: new instances
    (target / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="other files than a previous DICOM export"):
        export_dicom(result, source, target)
    assert {p.name: pydicom.dcmread(p).SOPInstanceUID for p in target.iterdir() if p.suffix == ".dcm"} == after


def test_batch_writes_a_dicom_folder_per_case(phantom_case, tmp_path, capsys):
    """A finished case gets its DICOM objects without a new analysis; a volume file fails in one line; a re-run skips."""
    source, result, _ = phantom_case
    cases, out, dicom = tmp_path / "cases", tmp_path / "out", tmp_path / "dicom"
    shutil.copytree(source, cases / "phantom")
    sitk.WriteImage(make_chest_phantom(size=(32, 32, 8)).image, str(cases / "volume.nrrd"))
    shutil.copytree(result, out / "phantom")  # analysed before: only the DICOM objects are missing
    args = ["batch", str(cases), "--out", str(out), "--dicom-out", str(dicom), "--quiet"]
    assert main(args) == 9
    assert sorted(p.name for p in dicom.iterdir()) == ["phantom"]
    assert (dicom / "phantom" / SEG_FILE).is_file()
    summary = (out / "summary.csv").read_text()
    assert "done" in summary and "--dicom-out needs a DICOM series input" in summary
    assert main(args) == 9 and ",skipped," in (out / "summary.csv").read_text()


def test_a_zipped_source_folder(phantom_case, tmp_path):
    """The source as the analysis reads it: a zipped DICOM folder is unzipped into a temporary folder, removed after."""
    source, result, dicom = phantom_case
    archive = shutil.make_archive(str(tmp_path / "ct"), "zip", root_dir=source.parent, base_dir=source.name)
    written = export_dicom(result, archive, tmp_path / "dicom")
    assert sorted(p.name for p in written) == sorted(p.name for p in dicom.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.zip", "dicom"]
