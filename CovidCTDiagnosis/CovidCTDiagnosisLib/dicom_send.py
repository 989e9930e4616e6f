"""Sending DICOM files to a PACS: C-STORE (DICOM PS3.4 Annex B, PS3.7 9.1.1) with pynetdicom, or DICOMweb
STOW-RS (PS3.18 10.5) with dicomweb-client.

`send_dicom(folder, "ORTHANC@pacs.example.org:4242")` stores every DICOM file under `folder` (e.g. what
`covidct analyze --dicom-out` wrote) in one association: one presentation context per SOP class and
transfer syntax found in the files, each file sent as it is stored (no re-encoding).
`send_dicom(folder, "https://pacs.example.org/dicom-web")` posts them to the DICOMweb service's /studies, in
requests of STOW_BATCH instances. Either every file is stored, or a `SendError` says how many of how many
were, and why the rest were not; waits are bounded (`CONNECT_TIMEOUT_S`, `ASSOCIATION_TIMEOUT_S`,
`STORE_TIMEOUT_S`; DICOMweb requests are not retried). pydicom, pynetdicom and dicomweb-client are imported
when a send runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple, Union
from urllib.parse import urlsplit

from .errors import InputNotFoundError, SendError, UnreadableInputError, UsageError

DEFAULT_CALLING_AET = "COVIDCT"
CONNECT_TIMEOUT_S = 10.0  # the TCP connection to the PACS
ASSOCIATION_TIMEOUT_S = 30.0  # the PACS's answer to the association request (ACSE)
STORE_TIMEOUT_S = 60.0  # each C-STORE response (DIMSE), and any silence on the connection
MAX_PRESENTATION_CONTEXTS = 128  # in one association: odd context IDs 1-255 (PS3.8 9.3.2.2)
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # a DICOMDIR's SOP class: an index of files, not sent
DESTINATION_FORM = "AET@HOST:PORT or http(s)://HOST[:PORT]/PATH (DICOMweb)"
STOW_BATCH = 32  # instances per STOW-RS request


@dataclass(frozen=True)
class Destination:
    """A DICOM node: its application entity title (called AET), host name or address, and TCP port."""

    aet: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.aet}@{self.host}:{self.port}"


@dataclass(frozen=True)
class DicomWebDestination:
    """A DICOMweb service: its base URL (STOW-RS posts to URL/studies)."""

    url: str

    def __str__(self) -> str:
        return self.url


def parse_destination(text: str) -> Union[Destination, DicomWebDestination]:
    """`AET@HOST:PORT` (e.g. ORTHANC@127.0.0.1:4242; an IPv6 host in brackets) as a Destination, or an http(s)
    URL (e.g. http://127.0.0.1:8042/dicom-web) as a DicomWebDestination.

    Raises:
        UsageError: neither form, an AE title that DICOM does not allow (PS3.5 6.2: 1-16 characters,
            no backslash or control characters, not only spaces), or a port outside 1-65535.
    """
    if text.lower().startswith(("http://", "https://")):
        try:
            url = urlsplit(text)
            valid = bool(url.hostname) and (url.port is None or url.port > 0)
        except ValueError:  # a port that is not a number or out of range
            valid = False
        if not valid:
            raise UsageError(f"--to {text}: not a usable http(s) URL of a DICOMweb service")
        return DicomWebDestination(text.rstrip("/"))
    aet, at, address = text.partition("@")
    host, colon, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not (at and colon and host and port.isdigit() and 1 <= int(port) <= 65535):
        raise UsageError(f"--to {text}: expected {DESTINATION_FORM}, e.g. ORTHANC@127.0.0.1:4242")
    return Destination(check_aet(aet, "the called AE title"), host, int(port))


def check_aet(aet: str, what: str) -> str:
    """`aet` if DICOM allows it as an AE title (pynetdicom's check); else a UsageError naming `what`."""
    from pynetdicom.utils import set_ae

    try:
        return set_ae(aet, what, allow_empty=False, allow_none=False)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{what} {aet!r} is not a DICOM AE title (1-16 characters, no backslash or control "
                         f"characters): {exc}") from exc


def find_dicom_files(source) -> List[Tuple[Path, str, str]]:
    """(path, SOP class UID, transfer syntax UID) of each DICOM file in `source` (a file, or a folder searched
    recursively; hidden files and DICOMDIR indexes left out), sorted by path.

    Raises:
        InputNotFoundError: `source` does not exist.
        UnreadableInputError: a file there is not a DICOM Part 10 file, or there is none.
    """
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    source = Path(source)
    if not source.exists():
        raise InputNotFoundError(f"cannot send {source}: no such file or folder")
    paths = [source] if source.is_file() else sorted(
        p for p in source.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(source).parts))
    found = []
    for path in paths:
        try:
            dataset = dcmread(path, stop_before_pixels=True)
            meta = dataset.file_meta  # pynetdicom sends a file as its meta says
            sop_class, syntax = str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)
        except (InvalidDicomError, AttributeError, OSError, ValueError) as exc:
            raise UnreadableInputError(f"cannot send {source}: {path} is not a readable DICOM file ({exc})") from exc
        if sop_class != MEDIA_STORAGE_DIRECTORY:
            found.append((path, sop_class, syntax))
    if not found:
        raise UnreadableInputError(f"cannot send {source}: no DICOM files in it")
    return found


def send_dicom(source, destination, calling_aet: str = DEFAULT_CALLING_AET) -> int:
    """Store every DICOM file of `source` on the PACS `destination`; the number stored (all of them).

    Args:
        source: a DICOM file, or a folder of them (searched recursively), as `find_dicom_files` reads it.
        destination: a Destination or `AET@HOST:PORT` text (C-STORE), or a DicomWebDestination or http(s) URL
            (STOW-RS).
        calling_aet: our AE title (the PACS may accept only AE titles it knows; not used by DICOMweb).

    Returns:
        The number of files stored: every file found. A warning status (e.g. 0xB000, elements coerced) counts as
        stored, as PS3.4 B.2.3 says the instance was; in DICOMweb, an instance the answer lists as stored.

    Raises:
        UsageError: a malformed destination or AE title; DICOMweb without dicomweb-client.
        InputNotFoundError, UnreadableInputError: see `find_dicom_files`; checked before connecting.
        SendError: the PACS did not answer in time or refused the connection, rejected the association or a
            SOP class/transfer syntax (then nothing was sent), or did not store every file (the message says how
            many of how many were stored, and the first failure's status).
    """
    node = parse_destination(destination) if isinstance(destination, str) else destination
    calling_aet = check_aet(calling_aet, "the calling AE title")
    files = find_dicom_files(source)
    if isinstance(node, DicomWebDestination):
        return _stow(files, node)
    return _c_store(files, node, calling_aet, source)


def _c_store(files, node: Destination, calling_aet: str, source) -> int:
    from pydicom.uid import UID
    from pynetdicom import AE, build_context, evt

    kinds = sorted({(sop_class, syntax) for _, sop_class, syntax in files})
    if len(kinds) > MAX_PRESENTATION_CONTEXTS:
        raise SendError(f"cannot send {source}: its files need {len(kinds)} presentation contexts (SOP class and "
                        f"transfer syntax pairs), more than the {MAX_PRESENTATION_CONTEXTS} of one association")
    ae = AE(ae_title=calling_aet)
    ae.connection_timeout = CONNECT_TIMEOUT_S
    ae.acse_timeout = ASSOCIATION_TIMEOUT_S
    ae.dimse_timeout = ae.network_timeout = STORE_TIMEOUT_S
    contexts = [build_context(sop_class, syntax) for sop_class, syntax in kinds]
    connected = []
    assoc = ae.associate(node.host, node.port, contexts=contexts, ae_title=node.aet,
                         evt_handlers=[(evt.EVT_CONN_OPEN, lambda event: connected.append(True))])
    if not assoc.is_established:
        raise SendError(f"{node}: {_why_not_established(assoc, bool(connected))}; nothing was sent")
    try:
        accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts}
        refused = [kind for kind in kinds if kind not in accepted]
        if refused:
            names = ", ".join(f"{UID(s).name} in {UID(t).name}" for s, t in refused)
            raise SendError(f"{node} does not store {names}; nothing was sent")
        stored, failure = 0, None
        for path, _, _ in files:
            if not assoc.is_established:
                failure = failure or "the association ended before every file was sent"
                break
            status = assoc.send_c_store(path)
            problem = _store_problem(status)
            if problem is None:
                stored += 1
            else:
                failure = failure or f"{path.name}: {problem}"
        if failure is not None:
            raise SendError(f"{node} stored {stored} of {len(files)} DICOM files; not stored: {failure}")
        return stored
    except KeyboardInterrupt:
        assoc.abort()  # at once: a release would wait for the PACS
        raise
    finally:
        if assoc.is_established:
            assoc.release()


def _why_not_established(assoc, connected: bool) -> str:
    if not connected:
        return f"cannot connect (refused, or no answer within {CONNECT_TIMEOUT_S:.0f} s)"
    if assoc.is_rejected:
        answer = assoc.acceptor.primitive
        return f"the association was rejected ({answer.reason_str}; {answer.result_str})"
    if assoc.is_aborted:
        return f"the association was aborted: the PACS accepts none of the files' SOP classes and transfer syntaxes, " \
               f"broke off, or did not answer within {ASSOCIATION_TIMEOUT_S:.0f} s"
    return f"no answer to the association request within {ASSOCIATION_TIMEOUT_S:.0f} s"


def _store_problem(status) -> "str | None":
    """None when a C-STORE response says stored (success or warning); else what went wrong, in words."""
    from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS, code_to_category

    if "Status" not in status:
        return "no C-STORE response (timed out, or the association was aborted)"
    code = int(status.Status)
    if code_to_category(code) in ("Success", "Warning"):
        return None
    category, text = STORAGE_SERVICE_CLASS_STATUS.get(code, ("Failure", "unknown status"))
    return f"status 0x{code:04X} ({category}: {text})"



def _stow(files, node: DicomWebDestination) -> int:
    """STOW-RS of `files` (find_dicom_files') to `node`, STOW_BATCH instances a request; the number stored (all).
    A request refused as a whole for its content (HTTP 400, 409) is sent again one instance a request, so that
    the count is exact; any other HTTP error stops the send."""
    try:
        import requests
        from dicomweb_client.api import DICOMwebClient
    except ImportError as exc:
        raise UsageError(f"sending to DICOMweb needs the Python package {exc.name} (pip install dicomweb-client; "
                         "Python >= 3.10)") from exc
    from pydicom import dcmread

    client = DICOMwebClient(str(node), timeout=(CONNECT_TIMEOUT_S, STORE_TIMEOUT_S))
    client.set_http_retry_params(retry=False)

    def post(batch) -> Tuple[int, "str | None", "int | None"]:
        """(number stored, the first problem, the HTTP status of a refused request) of one STOW-RS request."""
        datasets = [dcmread(path) for path, _, _ in batch]
        try:
            answer = client.store_instances(datasets)
        except requests.HTTPError as exc:
            return 0, f"HTTP {exc.response.status_code} {exc.response.reason}", exc.response.status_code
        done = {str(item.ReferencedSOPInstanceUID) for item in answer.get("ReferencedSOPSequence", [])}
        reasons = {str(item.ReferencedSOPInstanceUID): item.get("FailureReason")
                   for item in answer.get("FailedSOPSequence", [])}
        missing = [(path, str(ds.SOPInstanceUID)) for (path, _, _), ds in zip(batch, datasets)
                   if str(ds.SOPInstanceUID) not in done]
        problem = None
        if missing:
            path, uid = missing[0]
            reason = reasons.get(uid)
            problem = f"{path.name}: " + (f"failure reason 0x{int(reason):04X}" if reason is not None
                                          else "not among the stored instances of the answer")
        return len(batch) - len(missing), problem, None

    stored, failure = 0, None
    try:
        for start in range(0, len(files), STOW_BATCH):
            batch = files[start:start + STOW_BATCH]
            count, problem, status = post(batch)
            if status in (400, 409) and len(batch) > 1:
                problem = None  # a refused request says nothing of each instance: their own requests do
                for single in batch:
                    one, one_problem, _ = post([single])
                    count += one
                    problem = problem if one_problem is None else f"{single[0].name}: {one_problem}"
            stored += count
            failure = failure or problem
            if status is not None and status not in (400, 409):
                break
    except (requests.ConnectionError, requests.Timeout) as exc:
        if stored == 0:
            raise SendError(f"{node}: cannot connect or no answer (within {CONNECT_TIMEOUT_S:.0f} s to connect, "
                            f"{STORE_TIMEOUT_S:.0f} s to answer): {type(exc).__name__}; nothing was sent") from exc
        failure = failure or f"the connection failed: {type(exc).__name__}"
    if failure is not None:
        raise SendError(f"{node} stored {stored} of {len(files)} DICOM files; not stored: {failure}")
    return stored
