"""`covidct send` and `send_dicom`: DICOM files stored on a real PACS (Orthanc on 127.0.0.1, started by the test),
and every way a send can fail said in one line with exit code 10, never reported as stored."""

from __future__ import annotations

import io
import socket
import subprocess
import sys

import pydicom
import pytest

from CovidCTDiagnosisLib import dicom_send
from CovidCTDiagnosisLib.cli import main
from CovidCTDiagnosisLib.dicom_send import find_dicom_files, parse_destination, send_dicom
from CovidCTDiagnosisLib.errors import SendError
from orthanc_server import DICOMWEB_PLUGIN, HOST, free_port
from test_volume_io import small_ct, write_dicom_series  # noqa: F401 (a fixture)

P001 = "ct/covid-ct-md/P001-covid"
PRIVATE_SOP_CLASS = "1.2.826.0.1.3680043.2.1125.99.1"  # a SOP class no PACS knows


@pytest.fixture
def phantom_series(tmp_path, small_ct):  # noqa: F811
    """The small phantom CT as 12 DICOM files, in a sub-folder of the folder returned (sending searches below)."""
    folder = tmp_path / "dicom"
    write_dicom_series(small_ct, folder / "series1")
    return folder


def uids(files, keyword):
    return {str(pydicom.dcmread(path, stop_before_pixels=True).get(keyword)) for path in files}


def stored_uids(orthanc, level, keyword):
    return {item["MainDicomTags"][keyword] for item in orthanc.get(f"/{level}?expand")}


def run_send(capfd, *args):
    """(exit code, stdout, stderr lines) of `covidct send ...`."""
    code = main(["send", *map(str, args)])
    out, err = capfd.readouterr()
    return code, out, err.splitlines()


def test_real_series_is_stored_in_its_study(shared_data, orthanc, capfd):
    """The real P001 series (148 JPEG-lossless files) through the command line: Orthanc's REST API lists every
    instance, in P001's study and series and nothing else."""
    files = sorted((shared_data / P001).glob("*.dcm"))
    pacs = orthanc()
    code, out, err = run_send(capfd, shared_data / P001, "--to", pacs.destination, "--aet", "RADIOLOGY1")
    assert (code, out, err) == (0, "", [f"{pacs.destination}: {len(files)} of {len(files)} DICOM files stored"])
    assert stored_uids(pacs, "studies", "StudyInstanceUID") == uids(files, "StudyInstanceUID")
    assert stored_uids(pacs, "series", "SeriesInstanceUID") == uids(files, "SeriesInstanceUID")
    assert stored_uids(pacs, "instances", "SOPInstanceUID") == uids(files, "SOPInstanceUID")
    assert len(files) == 148


def test_round_trip_the_analysis_lands_in_the_ct_study(shared_data, orthanc, tmp_path, capfd):
    """The radiologist's round trip (README): P001 is in the PACS; `covidct analyze --dicom-out` and `covidct send`
    put the analysis into its study. Orthanc serves every object, in P001's study only, and the SEG it serves
    refers to P001's series."""
    pytest.importorskip("CovidCTDiagnosisLib.dicom_export", reason="DICOM export (dicom_export.py) is not in this tree")
    pytest.importorskip("highdicom", reason="DICOM export needs highdicom (Python >= 3.10)")
    source = shared_data / P001
    files = sorted(source.glob("*.dcm"))
    pacs = orthanc()
    assert main(["send", str(source), "--to", pacs.destination, "--quiet"]) == 0
    dicom = tmp_path / "dicom"
    assert main(["analyze", str(source), "--out", str(tmp_path / "result"), "--dicom-out", str(dicom), "--slices", "3",
                 "--quiet"]) == 0
    written = sorted(dicom.iterdir())
    capfd.readouterr()
    assert run_send(capfd, dicom, "--to", pacs.destination)[::2] == (
        0, [f"{pacs.destination}: {len(written)} of {len(written)} DICOM files stored"])
    assert stored_uids(pacs, "studies", "StudyInstanceUID") == uids(files, "StudyInstanceUID")
    assert stored_uids(pacs, "instances", "SOPInstanceUID") == uids(files + written, "SOPInstanceUID")
    segs = [s for s in pacs.get("/series?expand") if s["MainDicomTags"]["Modality"] == "SEG"]
    assert len(segs) == 1 and len(segs[0]["Instances"]) == 1
    served = pydicom.dcmread(io.BytesIO(pacs.get_bytes(f"/instances/{segs[0]['Instances'][0]}/file")))
    assert {str(r.SeriesInstanceUID) for r in served.ReferencedSeriesSequence} == uids(files, "SeriesInstanceUID")


def test_phantom_series_found_below_the_folder(phantom_series, orthanc):
    """A phantom written as a DICOM series, in a sub-folder, with a hidden file beside it that is not sent."""
    (phantom_series / ".DS_Store").write_bytes(b"not DICOM")
    files = sorted(phantom_series.rglob("*.dcm"))
    pacs = orthanc()
    assert send_dicom(phantom_series, pacs.destination) == len(files) == 12
    assert stored_uids(pacs, "instances", "SOPInstanceUID") == uids(files, "SOPInstanceUID")
    assert stored_uids(pacs, "series", "SeriesInstanceUID") == uids(files, "SeriesInstanceUID")


def test_unreachable_pacs(phantom_series, capfd):
    port = free_port()  # nothing listens there
    code, out, err = run_send(capfd, phantom_series, "--to", f"PACS@{HOST}:{port}")
    assert (code, out) == (10, "")
    assert err == [f"covidct: error: PACS@{HOST}:{port}: cannot connect (refused, or no answer within 10 s); "
                   "nothing was sent"]


def test_silent_pacs_times_out(phantom_series, monkeypatch):
    """A port that accepts the connection but never answers the association request: bounded by the ACSE timeout."""
    monkeypatch.setattr(dicom_send, "ASSOCIATION_TIMEOUT_S", 1.0)
    with socket.socket() as silent:
        silent.bind((HOST, 0))
        silent.listen()
        with pytest.raises(SendError, match="aborted.*did not answer within 1 s; nothing was sent"):
            send_dicom(phantom_series, f"PACS@{HOST}:{silent.getsockname()[1]}")


def test_rejected_association_sends_nothing(phantom_series, orthanc, capfd):
    pacs = orthanc(DicomCheckCalledAet=True)
    code, out, err = run_send(capfd, phantom_series, "--to", f"WRONG@{HOST}:{pacs.dicom_port}")
    assert (code, out) == (10, "")
    assert err == [f"covidct: error: WRONG@{HOST}:{pacs.dicom_port}: the association was rejected (Called AE title "
                   "not recognised; Rejected Permanent); nothing was sent"]
    assert pacs.get("/instances") == []


def test_refused_sop_class_sends_nothing(phantom_series, orthanc):
    """One file of a SOP class the PACS does not store: nothing is sent, not the eleven it would store."""
    one = sorted(phantom_series.rglob("*.dcm"))[3]
    dataset = pydicom.dcmread(one)
    dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID = PRIVATE_SOP_CLASS
    dataset.save_as(one)
    pacs = orthanc()
    with pytest.raises(SendError, match=rf"does not store {PRIVATE_SOP_CLASS} in .*; nothing was sent$"):
        send_dicom(phantom_series, pacs.destination)
    assert pacs.get("/instances") == []


def test_partial_failure_is_counted(phantom_series, orthanc, capfd):
    """Orthanc refuses an instance without a SeriesInstanceUID (status 0xA700): the other 11 are stored, and the
    send fails saying so."""
    files = sorted(phantom_series.rglob("*.dcm"))
    dataset = pydicom.dcmread(files[5])
    del dataset.SeriesInstanceUID
    dataset.save_as(files[5])
    pacs = orthanc()
    code, out, err = run_send(capfd, phantom_series, "--to", pacs.destination)
    assert (code, out) == (10, "")
    assert err == [f"covidct: error: {pacs.destination} stored 11 of 12 DICOM files; not stored: {files[5].name}: "
                   "status 0xA700 (Failure: Refused: Out of Resources)"]
    assert stored_uids(pacs, "instances", "SOPInstanceUID") == uids(files, "SOPInstanceUID") - uids(files[5:6], "SOPInstanceUID")


def test_bad_input_is_refused_before_connecting(phantom_series, tmp_path, capfd):
    unreachable = f"PACS@{HOST}:{free_port()}"
    (phantom_series / "notes.txt").write_text("not DICOM")
    code, _, err = run_send(capfd, phantom_series, "--to", unreachable)
    assert code == 3 and len(err) == 1 and "notes.txt is not a readable DICOM file" in err[0]
    (tmp_path / "empty").mkdir()
    assert run_send(capfd, tmp_path / "empty", "--to", unreachable)[::2] == (
        3, [f"covidct: error: cannot send {tmp_path / 'empty'}: no DICOM files in it"])
    assert run_send(capfd, tmp_path / "missing", "--to", unreachable)[::2] == (
        3, [f"covidct: error: cannot send {tmp_path / 'missing'}: no such file or folder"])


@pytest.mark.parametrize("to, aet", [("127.0.0.1:104", "COVIDCT"), ("PACS@127.0.0.1", "COVIDCT"),
                                     ("PACS@127.0.0.1:0", "COVIDCT"), ("SEVENTEEN_LETTERS@127.0.0.1:104", "COVIDCT"),
                                     ("PACS@127.0.0.1:104", "A\\B"), ("http://", "COVIDCT"),
                                     ("https://pacs.example.org:99999/dicom-web", "COVIDCT")])
def test_bad_destination_or_aet_is_a_usage_error(phantom_series, capfd, to, aet):
    code, out, err = run_send(capfd, phantom_series, "--to", to, "--aet", aet)
    assert (code, out, len(err)) == (2, "", 1)


def test_destination_forms():
    assert str(parse_destination("ORTHANC@pacs.example.org:4242")) == "ORTHANC@pacs.example.org:4242"
    assert parse_destination("PACS@[::1]:104").host == "::1"
    assert str(parse_destination("https://pacs.example.org/dicom-web/")) == "https://pacs.example.org/dicom-web"


def test_dicomdir_is_not_sent(shared_data, tmp_path):
    """A CD export's DICOMDIR is an index of the files, not an object to store."""
    from pydicom.fileset import FileSet

    fileset = FileSet()
    for path in sorted((shared_data / P001).glob("*.dcm"))[:3]:
        fileset.add(path)
    fileset.write(tmp_path / "export")
    found = find_dicom_files(tmp_path / "export")
    assert (tmp_path / "export" / "DICOMDIR").is_file() and len(found) == 3
    assert {sop_class for _, sop_class, _ in found} == {"1.2.840.10008.5.1.4.1.1.2"}  # CT Image Storage


def test_exit_code_documented_and_parser_imports_no_dicom_library():
    from CovidCTDiagnosisLib.cli import _exit_code_help

    assert " 10  send: the PACS could not be reached" in _exit_code_help()
    script = ("import sys; from CovidCTDiagnosisLib.cli import build_parser; build_parser(); "
              "print(sorted(m for m in ('pydicom', 'pynetdicom') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout == "[]\n"


# ---- DICOMweb (STOW-RS) --------------------------------------------------------------------------


@pytest.fixture
def dicomweb(orthanc, monkeypatch):
    """Orthanc with its DICOMweb plugin (Debian package orthanc-dicomweb, and no other plugin); STOW-RS requests of
    5 instances, so that the 12 files take three."""
    pytest.importorskip("dicomweb_client", reason="DICOMweb needs dicomweb-client (Python >= 3.10)")
    if not DICOMWEB_PLUGIN.is_file():
        pytest.skip(f"Orthanc's DICOMweb plugin is not installed ({DICOMWEB_PLUGIN}; Debian package orthanc-dicomweb)")
    monkeypatch.setattr(dicom_send, "STOW_BATCH", 5)
    pacs = orthanc(Plugins=[str(DICOMWEB_PLUGIN)], DicomWeb={"Enable": True, "Root": "/dicom-web/"})
    return pacs, f"http://{HOST}:{pacs.http_port}/dicom-web"


def test_dicomweb_stores_every_file(phantom_series, dicomweb, capfd):
    pacs, url = dicomweb
    files = sorted(phantom_series.rglob("*.dcm"))
    assert run_send(capfd, phantom_series, "--to", url)[::2] == (0, [f"{url}: 12 of 12 DICOM files stored"])
    assert stored_uids(pacs, "instances", "SOPInstanceUID") == uids(files, "SOPInstanceUID")
    assert stored_uids(pacs, "series", "SeriesInstanceUID") == uids(files, "SeriesInstanceUID")


def test_dicomweb_partial_failure_is_counted_exactly(phantom_series, dicomweb, capfd):
    """Orthanc refuses a request holding an instance without a SeriesInstanceUID (HTTP 400) but stores the rest of
    it: each of that request's instances is sent again alone, so the count and the file named are exact."""
    pacs, url = dicomweb
    files = sorted(phantom_series.rglob("*.dcm"))
    dataset = pydicom.dcmread(files[6])
    del dataset.SeriesInstanceUID
    dataset.save_as(files[6])
    code, out, err = run_send(capfd, phantom_series, "--to", url)
    assert (code, out) == (10, "")
    assert err == [f"covidct: error: {url} stored 11 of 12 DICOM files; not stored: {files[6].name}: HTTP 400 Bad Request"]
    assert stored_uids(pacs, "instances", "SOPInstanceUID") == uids(files, "SOPInstanceUID") - uids(files[6:7], "SOPInstanceUID")


def test_dicomweb_refusals(phantom_series, dicomweb, capfd):
    pacs, url = dicomweb
    wrong = f"http://{HOST}:{pacs.http_port}/no-dicom-web-here"
    assert run_send(capfd, phantom_series, "--to", wrong)[::2] == (
        10, [f"covidct: error: {wrong} stored 0 of 12 DICOM files; not stored: HTTP 404 Not Found"])
    unreachable = f"http://{HOST}:{free_port()}/dicom-web"
    code, out, err = run_send(capfd, phantom_series, "--to", unreachable)
    assert (code, out, len(err)) == (10, "", 1)
    assert err[0].startswith(f"covidct: error: {unreachable}: cannot connect") and err[0].endswith("nothing was sent")
    assert pacs.get("/instances") == []
