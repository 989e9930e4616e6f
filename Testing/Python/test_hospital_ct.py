"""CT as hospitals store it (issue 11): each kind of odd DICOM series or volume file is read right or
refused in one line with exit 4, before any analysis and with no output folder left.

The inputs are made from every 5th slice of the real P001 series (../shared/data; skipped without
it), rewritten uncompressed with changed tags; the oversized headers need no data.
"""

from __future__ import annotations

import csv
import gzip
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from CovidCTDiagnosisLib.batch import run_batch
from CovidCTDiagnosisLib.checkpoint import save_checkpoint
from CovidCTDiagnosisLib.cli import ERROR_PREFIX, main
from CovidCTDiagnosisLib.drenet import DRENet, DRENetConfig
from CovidCTDiagnosisLib.errors import NotACTError
from CovidCTDiagnosisLib.result import ModelInfo
from CovidCTDiagnosisLib.volume_io import MAX_VOLUME_SIZE, MAX_VOXELS, read_volume

P001 = ("ct", "covid-ct-md", "P001-covid")
EVERY = 5  # keep every 5th slice: 30 slices 10 mm apart
STEP_MM = 2.0 * EVERY
TILT_DEG = 15.0
NOT_ACT = 4
TAG_POSITION, TAG_ORIENTATION, TAG_IMAGE_TYPE, TAG_SOP_UID = "0020|0032", "0020|0037", "0008|0008", "0008|0018"
TAG_SLICE_LOCATION, TAG_GANTRY_TILT = "0020|1041", "0018|1120"
TAG_SERIES_UID, TAG_KERNEL, TAG_THICKNESS = "0020|000e", "0018|1210", "0018|0050"


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    torch.manual_seed(0)
    return str(save_checkpoint(tmp_path_factory.mktemp("m") / "small.pt", DRENet(DRENetConfig(input_size=128)), trained=False))


@pytest.fixture(scope="module")
def p001(shared_data):
    """Every EVERY-th slice of P001, sorted by position: (2-D int16 HU plane, its DICOM tags)."""
    names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(shared_data.joinpath(*P001)))
    slices = []
    for name in names[::EVERY]:
        reader = sitk.ImageFileReader()
        reader.SetFileName(name)
        image = reader.Execute()
        slices.append((image[:, :, 0], {k: reader.GetMetaData(k) for k in reader.GetMetaDataKeys()}))
    return slices


def vector(text: str) -> np.ndarray:
    return np.array(text.split("\\"), dtype=float)


def text(values) -> str:
    return "\\".join(f"{v:.4f}" for v in values)


def write_series(folder, slices, prefix="img"):
    """(plane, tags) pairs as uncompressed DICOM files prefix000.dcm, ...; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for n, (plane, tags) in enumerate(slices):
        image = sitk.Image(plane)
        for key, value in tags.items():
            image.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"{prefix}{n:03d}.dcm"))
        writer.Execute(image)
    return folder


def with_tags(slices, change):
    """The slices with change(n, tags) -> dict of new tag values applied to each."""
    return [(plane, {**tags, **change(n, tags)}) for n, (plane, tags) in enumerate(slices)]


def volume_of(slices) -> sitk.Image:
    """The slices as one 3-D image on P001's grid (every 5th slice)."""
    volume = sitk.JoinSeries([plane for plane, _ in slices])
    volume.SetSpacing((*slices[0][0].GetSpacing(), STEP_MM))
    volume.SetOrigin(tuple(vector(slices[0][1][TAG_POSITION])))
    return volume


def refused(args, capfd) -> str:
    """Run `covidct`, check it exits with NOT_ACT and one stderr line; that line."""
    capfd.readouterr()
    code = main(args)
    err = capfd.readouterr().err
    assert code == NOT_ACT, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), err
    assert "Traceback" not in err and "WARNING" not in err and "ITK" not in err
    return lines[0]


def analyze_refused(source, tmp_path, small_model, capfd) -> str:
    out = tmp_path / "out"
    line = refused(["analyze", str(source), "--out", str(out), "--model", small_model, "--quiet"], capfd)
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())
    return line


# ---- 1. sheared grids in volume files --------------------------------------------------------


def sheared(volume: sitk.Image, tilt_deg: float) -> sitk.Image:
    """The volume with its slice axis tilted about the left-right axis (positions still along the table)."""
    tilted = sitk.Image(volume)
    t = np.radians(tilt_deg)
    tilted.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, np.sin(t), 0.0, 0.0, np.cos(t)))
    return tilted


def write_sheared_nifti(volume: sitk.Image, path, tilt_deg: float) -> None:
    """An uncompressed NIfTI whose sform (not its qform) holds a sheared grid, as some converters write."""
    sitk.WriteImage(volume, str(path))
    header = bytearray(path.read_bytes()[:348])
    spacing, origin, t = volume.GetSpacing(), volume.GetOrigin(), np.radians(tilt_deg)
    srow = np.array([  # RAS: x and y of LPS flipped
        [-spacing[0], 0.0, 0.0, -origin[0]],
        [0.0, -spacing[1], -np.sin(t) * spacing[2], -origin[1]],
        [0.0, 0.0, np.cos(t) * spacing[2], origin[2]],
    ], dtype="<f4")
    header[254:256] = np.array([1], "<i2").tobytes()  # sform_code
    header[280:328] = srow.tobytes()
    path.write_bytes(bytes(header) + path.read_bytes()[348:])


@pytest.mark.parametrize("suffix", [".mha", ".nrrd", ".nii"])
def test_sheared_volume_file_is_gantry_tilt(p001, tmp_path, small_model, capfd, suffix):
    path = tmp_path / f"sheared{suffix}"
    if suffix == ".nii":
        write_sheared_nifti(volume_of(p001), path, TILT_DEG)
    else:
        sitk.WriteImage(sheared(volume_of(p001), TILT_DEG), str(path))
    line = analyze_refused(path, tmp_path, small_model, capfd)
    assert f"gantry tilt of {TILT_DEG:.1f} degrees" in line and "sheared" in line


def test_sheared_image_in_memory_is_refused(p001):
    with pytest.raises(NotACTError, match=f"gantry tilt of {TILT_DEG:.1f} degrees"):
        read_volume(sheared(volume_of(p001), TILT_DEG))


def test_a_bug_in_one_case_fails_that_case_only(p001, tmp_path):
    """A sheared file and a case whose analysis hits a bug: both fail, each in one line, and summary.csv lists both."""
    cases = tmp_path / "cases"
    cases.mkdir()
    sitk.WriteImage(sheared(volume_of(p001), TILT_DEG), str(cases / "a-sheared.mha"))
    sitk.WriteImage(volume_of(p001), str(cases / "b-bug.mha"))

    class Analyzer:
        model_info = ModelInfo("stand-in", None, None, ["COVID-19", "Non-COVID-19"], "efficientnet_lite0", 224, False)

        def analyze(self, path, **options):
            read_volume(path)
            raise ValueError("a bug\nover two lines")

    outcomes = run_batch(Analyzer(), cases, tmp_path / "out")
    assert [o.status for o in outcomes] == ["failed", "failed"]
    assert "gantry tilt" in outcomes[0].error
    assert outcomes[1].error == "internal error (a bug: please report it): ValueError: a bug over two lines"
    with open(tmp_path / "out" / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["case_id"], r["status"]) for r in rows] == [("a-sheared", "failed"), ("b-bug", "failed")]


# ---- 2. gantry-tilted DICOM ------------------------------------------------------------------


def tilted_orientation(tilt_deg: float) -> str:
    t = np.radians(tilt_deg)
    return text((1.0, 0.0, 0.0, 0.0, np.cos(t), np.sin(t)))


TILTS = {
    # orientation tilted about the left-right axis, positions along the table (z) only
    "orientation": lambda n, tags: {TAG_ORIENTATION: tilted_orientation(TILT_DEG)},
    "orientation, other way": lambda n, tags: {TAG_ORIENTATION: tilted_orientation(-TILT_DEG), TAG_GANTRY_TILT: "-15"},
    # GantryDetectorTilt only: the orientation is written as if not tilted
    "GantryDetectorTilt": lambda n, tags: {TAG_GANTRY_TILT: f"{TILT_DEG:g}"},
}


@pytest.mark.parametrize("kind", list(TILTS))
def test_gantry_tilted_dicom(p001, tmp_path, small_model, capfd, kind):
    folder = write_series(tmp_path / "tilted", with_tags(p001, TILTS[kind]))
    line = analyze_refused(folder, tmp_path, small_model, capfd)
    assert f"gantry tilt of {TILT_DEG:.1f} degrees" in line


def test_tilted_slices_placed_along_their_normal_are_an_oblique_grid(p001, tmp_path):
    """Orientation, positions and GantryDetectorTilt agree: a rotated grid, read as it is (no refusal)."""
    t = np.radians(TILT_DEG)
    normal = np.array([0.0, -np.sin(t), np.cos(t)])
    start = vector(p001[0][1][TAG_POSITION])
    change = lambda n, tags: {  # noqa: E731
        TAG_ORIENTATION: tilted_orientation(TILT_DEG), TAG_GANTRY_TILT: f"{TILT_DEG:g}",
        TAG_POSITION: text(start + n * STEP_MM * normal),
    }
    loaded = read_volume(write_series(tmp_path / "oblique", with_tags(p001, change)))
    assert loaded.image.GetSpacing()[2] == pytest.approx(STEP_MM, abs=1e-3)
    assert np.reshape(loaded.image.GetDirection(), (3, 3))[:, 2] == pytest.approx(normal, abs=1e-4)


# ---- 3. uneven slice spacing -----------------------------------------------------------------


def at_steps(p001, steps_mm):
    """A change that places slice n the sum of the first n steps above P001's first slice (z only)."""
    first = vector(p001[0][1][TAG_POSITION])
    z = first[2] + np.concatenate([[0.0], np.cumsum(steps_mm)])

    def change(n, tags):
        position = vector(tags[TAG_POSITION])
        position[2] = z[n]
        return {TAG_POSITION: text(position), TAG_SLICE_LOCATION: f"{z[n]:.4f}"}
    return change


UNEVEN = {
    "8 then 10 mm": (np.resize([8.0, 10.0], 29), 8.0, 10.0),
    "7.5 then 10 mm": (np.array([7.5] * 14 + [10.0] * 15), 7.5, 10.0),  # 1.5 then 2.0 mm, five slices at a time
}


@pytest.mark.parametrize("kind", list(UNEVEN))
def test_uneven_slice_spacing(p001, tmp_path, small_model, capfd, kind):
    steps, low, high = UNEVEN[kind]
    folder = write_series(tmp_path / "uneven", with_tags(p001, at_steps(p001, steps)))
    line = analyze_refused(folder, tmp_path, small_model, capfd)
    assert f"uneven slice spacing: steps from {low:.2f} to {high:.2f} mm" in line


def test_slice_steps_within_one_percent_are_even(p001, tmp_path):
    steps = STEP_MM + np.resize([0.04, -0.04], 29)  # 0.8 % apart
    loaded = read_volume(write_series(tmp_path / "jitter", with_tags(p001, at_steps(p001, steps))))
    assert loaded.image.GetSpacing()[2] == pytest.approx(STEP_MM, abs=0.01)


# ---- 4. localizers in the series -------------------------------------------------------------


def localizer(p001, image_type: str, size: tuple[int, int]):
    plane, tags = p001[len(p001) // 2]
    return plane[: size[0], : size[1]], {
        **tags, TAG_SOP_UID: tags[TAG_SOP_UID] + ".999", TAG_IMAGE_TYPE: image_type,
        TAG_ORIENTATION: text((1.0, 0.0, 0.0, 0.0, 0.0, -1.0)), TAG_POSITION: text((-250.0, 0.0, 100.0)),
    }


LOCALIZERS = {
    "LOCALIZER, coronal, 512 x 256": ("ORIGINAL\\PRIMARY\\LOCALIZER", (512, 256)),
    "another orientation only": ("ORIGINAL\\PRIMARY\\AXIAL", (512, 512)),
}


@pytest.mark.parametrize("kind", list(LOCALIZERS))
def test_localizer_is_left_out(p001, tmp_path, kind):
    clean = read_volume(write_series(tmp_path / "clean", p001))
    folder = write_series(tmp_path / "with-scout", p001)
    write_series(folder, [localizer(p001, *LOCALIZERS[kind])], prefix="scout")
    loaded = read_volume(folder)
    assert np.array_equal(sitk.GetArrayViewFromImage(loaded.image), sitk.GetArrayViewFromImage(clean.image))
    for get in ("GetOrigin", "GetSpacing", "GetDirection"):
        assert getattr(loaded.image, get)() == pytest.approx(getattr(clean.image, get)(), abs=1e-6)
    assert loaded.info.notes[0].startswith(f"1 localizer image(s) left out (ImageType LOCALIZER or another "
                                           f"orientation than the other {len(p001)} images): scout000.dcm")


def test_localizer_note_in_the_reports(p001, tmp_path, small_model):
    folder = write_series(tmp_path / "with-scout", p001)
    write_series(folder, [localizer(p001, *LOCALIZERS["LOCALIZER, coronal, 512 x 256"])], prefix="scout")
    out = tmp_path / "out"
    assert main(["analyze", str(folder), "--out", str(out), "--model", small_model, "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["input"]["size"] == [512, 512, len(p001)]
    assert any(w.startswith("1 localizer image(s) left out") for w in report["warnings"])
    assert "1 localizer image(s) left out" in (out / "report.html").read_text()


# ---- 5, 6. two images at one position; one image of another size ------------------------------


def other_kernel(plane: sitk.Image) -> sitk.Image:
    """The plane as another reconstruction would hold it (a 3 x 1 smoothing, in numpy)."""
    array = sitk.GetArrayFromImage(plane).astype(np.int32)
    smooth = ((np.roll(array, 1, axis=1) + 2 * array + np.roll(array, -1, axis=1)) // 4).astype(np.int16)
    image = sitk.GetImageFromArray(smooth)
    image.CopyInformation(plane)
    return image


def test_two_reconstructions_under_one_series_uid(p001, tmp_path, small_model, capfd):
    folder = write_series(tmp_path / "two", p001, prefix="a")
    write_series(folder, [(other_kernel(plane), {**tags, TAG_SOP_UID: tags[TAG_SOP_UID] + ".2"}) for plane, tags in p001], prefix="b")
    line = analyze_refused(folder, tmp_path, small_model, capfd)
    assert "two images at the same position: a000.dcm and b000.dcm" in line or \
        "two images at the same position: b000.dcm and a000.dcm" in line
    assert "missing slices" not in line


def test_one_slice_of_another_matrix_size(p001, tmp_path, small_model, capfd):
    odd = 10
    slices = list(p001)
    plane, tags = slices[odd]
    slices[odd] = (sitk.Shrink(plane, (2, 2)), {**tags, "0028|0030": "1.4960937500\\1.4960937500"})
    folder = write_series(tmp_path / "odd-size", slices)
    line = analyze_refused(folder, tmp_path, small_model, capfd)
    assert f"img{odd:03d}.dcm is 256 x 256 pixels where the series' other {len(p001) - 1} images are 512 x 512" in line


# ---- 11. a small file whose header claims a huge volume --------------------------------------


def huge_nrrd(path, size):
    path.write_bytes(
        f"NRRD0004\ntype: int16\nendian: little\ndimension: 3\nsizes: {' '.join(map(str, size))}\nencoding: gzip\n"
        "space: left-posterior-superior\nspace directions: (1,0,0) (0,1,0) (0,0,1)\nspace origin: (0,0,0)\n\n".encode()
        + gzip.compress(bytes(1 << 20))
    )


def huge_mha(path, size):
    path.write_bytes(
        f"ObjectType = Image\nNDims = 3\nDimSize = {' '.join(map(str, size))}\nElementType = MET_SHORT\n"
        "CompressedData = True\nElementDataFile = LOCAL\n".encode() + gzip.compress(bytes(1 << 20))
    )


@pytest.mark.parametrize("writer, suffix, size", [
    (huge_nrrd, ".nrrd", (1400, 1400, 1400)),
    (huge_mha, ".mha", (512, 512, 9000)),
    (huge_nrrd, ".nrrd", (1025, 1025, 1000)),
])
def test_huge_header_is_refused_before_reading(tmp_path, small_model, capfd, writer, suffix, size):
    path = tmp_path / f"huge{suffix}"
    writer(path, size)
    start = time.perf_counter()
    line = analyze_refused(path, tmp_path, small_model, capfd)
    assert time.perf_counter() - start < 20  # the pixels (GB) were never read
    limit = " x ".join(map(str, MAX_VOLUME_SIZE))
    assert f"{' x '.join(map(str, size))} voxels, more than a chest CT has (at most {limit}" in line


@pytest.mark.parametrize("size", [(1024, 1024, 300), (512, 512, MAX_VOXELS // (512 * 512) + 1)])
def test_more_voxels_than_fit_in_memory_is_refused_before_reading(tmp_path, small_model, capfd, size):
    """Within MAX_VOLUME_SIZE but over MAX_VOXELS (the 4 GB budget): refused from the header, saying why."""
    path = tmp_path / "large.nrrd"
    huge_nrrd(path, size)
    start = time.perf_counter()
    line = analyze_refused(path, tmp_path, small_model, capfd)
    assert time.perf_counter() - start < 20
    assert f"{' x '.join(map(str, size))} voxels" in line and f"more than the {MAX_VOXELS / 1e6:.0f} million" in line
    assert "4 GB" in line


# ---- 12. several series of one study: the thin lung-kernel one -------------------------------


def test_thin_lung_kernel_series_is_preferred(p001, tmp_path):
    """P001's own series (30 images, 2 mm, D40s), a thin B70f one with fewer images, and a larger
    coronal reformat: the lung-kernel series is read, and the note says why and lists the others."""
    uid = p001[0][1][TAG_SERIES_UID].strip()
    lung, coronal = uid + ".1", uid + ".2"
    folder = write_series(tmp_path / "study", p001, prefix="a")
    write_series(folder, with_tags(p001[::2], lambda n, tags: {
        TAG_SERIES_UID: lung, TAG_SOP_UID: tags[TAG_SOP_UID] + ".1", TAG_KERNEL: "B70f", TAG_THICKNESS: "1"}), prefix="b")
    write_series(folder, with_tags(p001 + p001[:10], lambda n, tags: {
        TAG_SERIES_UID: coronal, TAG_SOP_UID: f"{uid}.2.{n}", TAG_ORIENTATION: text((1.0, 0.0, 0.0, 0.0, 0.0, -1.0)),
        TAG_POSITION: text((-172.0, -250.0 + n, 0.0)), TAG_KERNEL: "B70f", TAG_THICKNESS: "1"}), prefix="c")
    loaded = read_volume(folder)
    assert loaded.info.series_uid == lung and loaded.image.GetSize()[2] == len(p001[::2])
    assert loaded.info.notes == [
        f"3 series found; analysed {lung} ({len(p001[::2])} images, 1 mm, kernel B70f), chosen for its lung kernel; "
        f"the others: {uid} ({len(p001)} images, 2 mm, kernel D40s); {coronal} ({len(p001) + 10} images, 1 mm, kernel B70f); "
        "use --series UID for another"
    ]
    assert read_volume(folder, series_uid=uid).image.GetSize()[2] == len(p001)


# ---- 12. as PACS viewers and CDs export a study: folders below a DICOMDIR, a .zip -----------------


def cd_export(p001, root):
    """A CD-style export: a DICOMDIR beside DICOM/<study>/<series>/ folders; P001's slices split over two of them
    (one series in two folders, as some exports write more than a folder's limit of files)."""
    half = len(p001) // 2
    write_series(root / "DICOM" / "ST000" / "SE000", p001[:half])
    write_series(root / "DICOM" / "ST000" / "SE001", p001[half:], prefix="more")
    (root / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM")  # its records are not needed: the folders are read
    return root


def assert_same_volume(loaded, clean):
    assert np.array_equal(sitk.GetArrayViewFromImage(loaded.image), sitk.GetArrayViewFromImage(clean.image))
    for get in ("GetOrigin", "GetSpacing", "GetDirection"):
        assert getattr(loaded.image, get)() == pytest.approx(getattr(clean.image, get)(), abs=1e-6)


def test_cd_export_is_read_from_its_folder_or_its_dicomdir(p001, tmp_path):
    clean = read_volume(write_series(tmp_path / "clean", p001))
    root = cd_export(p001, tmp_path / "cd")
    for source in (root, root / "DICOMDIR"):
        loaded = read_volume(source)
        assert_same_volume(loaded, clean)
        assert loaded.info.format == "dicom"


def test_zipped_dicom_folder_is_read_and_its_errors_name_the_zip(p001, tmp_path, small_model, capfd):
    import zipfile

    clean = read_volume(write_series(tmp_path / "clean", p001))
    root = cd_export(p001, tmp_path / "cd")
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in sorted(root.rglob("*")):
            if f.is_file():
                z.write(f, f.relative_to(root))
    loaded = read_volume(archive)
    assert_same_volume(loaded, clean)
    assert loaded.info.path == str(archive)
    empty = tmp_path / "empty.zip"
    with zipfile.ZipFile(empty, "w") as z:
        z.writestr("readme.txt", "no images")
    capfd.readouterr()
    assert main(["analyze", str(empty), "--out", str(tmp_path / "out"), "--model", small_model, "--quiet"]) == 3
    err = capfd.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(empty) in err and "covidct-zip-" not in err
    (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04 not really")
    assert main(["analyze", str(tmp_path / "broken.zip"), "--out", str(tmp_path / "out"), "--model", small_model, "--quiet"]) == 3
    assert "not a readable zip file" in capfd.readouterr().err


def test_zip_larger_than_a_chest_ct_is_refused_before_unzipping(tmp_path, monkeypatch):
    import zipfile

    from CovidCTDiagnosisLib import volume_io

    archive = tmp_path / "big.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("a.dcm", b"\0" * 3000)
    monkeypatch.setattr(volume_io, "MAX_ZIP_BYTES", 2000)
    before = set(Path(tempfile.gettempdir()).glob("covidct-zip-*"))
    with pytest.raises(NotACTError, match="would unzip to .* not unzipped"):
        read_volume(archive)
    after = set(Path(tempfile.gettempdir()).glob("covidct-zip-*"))
    assert after == before  # nothing left behind


def test_a_truncated_metaimage_is_one_line(tmp_path, small_model, capfd):
    """ITK's MetaImage reader prints its own lines on a file shorter than its header says: held back, so
    the user reads only ours (exit 3, nothing written)."""
    path = tmp_path / "short.mha"
    path.write_bytes(b"ObjectType = Image\nNDims = 3\nDimSize = 64 64 20\nElementType = MET_SHORT\n"
                     b"ElementDataFile = LOCAL\n" + bytes(1000))
    capfd.readouterr()
    code = main(["analyze", str(path), "--out", str(tmp_path / "out"), "--model", small_model, "--quiet"])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 3 and err == [f"covidct: error: cannot read {path}: the file is corrupt or uses an unsupported encoding"]
    assert not (tmp_path / "out").exists()
