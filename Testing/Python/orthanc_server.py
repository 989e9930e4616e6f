"""A real PACS for the tests: Orthanc (Debian package `orthanc`) on 127.0.0.1, in a temporary folder.

`OrthancServer(folder)` writes its own configuration (its storage and index in `folder`, free HTTP and
DICOM ports, no plugins unless asked for, HTTP from this machine only, no authentication, any calling AE
title allowed to store) and starts the `Orthanc` binary with it: never the system service, nor /etc/orthanc's configuration.
`start()` waits (at most START_TIMEOUT_S) until the REST API answers; `stop()` terminates it and waits (kills it
after STOP_TIMEOUT_S); on Linux it also ends when the test process dies. `Testing/install-system-packages.sh` installs it for `make test`.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ORTHANC = "Orthanc"  # the binary of Debian's `orthanc` package
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")  # Debian's `orthanc-dicomweb` (loaded on request)
AET = "ORTHANC"
HOST = "127.0.0.1"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
HTTP_TIMEOUT_S = 10.0
PR_SET_PDEATHSIG = 1  # Linux prctl: a signal for the child when its parent dies


def _stop_with_parent() -> None:
    """In the child, before Orthanc starts (Linux): SIGTERM when the test process dies, even killed."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def orthanc_binary() -> str | None:
    """The path of the Orthanc binary, or None when it is not installed."""
    return shutil.which(ORTHANC)


def free_port() -> int:
    """A TCP port nothing listens on at 127.0.0.1 now (the system's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class OrthancServer:
    """One Orthanc process on 127.0.0.1 with its storage in `folder`.

    Args:
        folder: an empty temporary folder (configuration, storage, index and log go there).
        settings: Orthanc configuration options that replace the defaults here, e.g. DicomCheckCalledAet=True
            (refuse associations that call another AE title than AET).
    """

    def __init__(self, folder: Path, **settings):
        self.folder = Path(folder)
        self.http_port, self.dicom_port = free_port(), free_port()
        self.process: subprocess.Popen | None = None
        config = {
            "Name": "covidct-test", "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"), "Plugins": [], "LuaScripts": [],
            "HttpServerEnabled": True, "HttpPort": self.http_port, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "DicomServerEnabled": True, "DicomPort": self.dicom_port, "DicomAet": AET,
            "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True, "DicomModalities": {},
            "StorageCompression": False, "SaveJobs": False, **settings,
        }
        self.config_path = self.folder / "orthanc.json"
        self.config_path.write_text(json.dumps(config, indent=2))

    @property
    def destination(self) -> str:
        """`AET@127.0.0.1:PORT` for `covidct send --to`."""
        return f"{AET}@{HOST}:{self.dicom_port}"

    def get(self, path: str):
        """The JSON answer of Orthanc's REST API at `path` (e.g. "/studies")."""
        return json.loads(self.get_bytes(path))

    def get_bytes(self, path: str) -> bytes:
        """The answer of Orthanc's REST API at `path` (e.g. "/instances/<id>/file", the DICOM file it stores)."""
        with urllib.request.urlopen(f"http://{HOST}:{self.http_port}{path}", timeout=HTTP_TIMEOUT_S) as answer:
            return answer.read()

    def start(self) -> "OrthancServer":
        log = open(self.folder / "orthanc.log", "wb")
        self.process = subprocess.Popen([orthanc_binary() or ORTHANC, str(self.config_path)], cwd=self.folder,
                                        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        preexec_fn=_stop_with_parent if sys.platform == "linux" else None)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                self.get("/system")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer on port {self.http_port} within {START_TIMEOUT_S:.0f} s; its log: "
                           f"{(self.folder / 'orthanc.log').read_text(errors='replace')[-2000:]}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
