"""The command line's child process (`forked.ForkedCall`): values (images and arrays among them) and errors
come back, a dead child is reported, a child still working is stopped, and after torch is imported nothing
is forked."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

SCRIPT = """
import json, os, sys, time
from CovidCTDiagnosisLib.forked import ForkedCall
from CovidCTDiagnosisLib.preparation import read_ct

def outcome(call):
    try:
        return ["value", call.result()]
    except Exception as error:
        return [type(error).__name__, str(error)]

def crash():
    raise KeyError("bug")

def volumes():
    import numpy as np, SimpleITK as sitk
    image = sitk.GetImageFromArray(np.arange(40 * 50 * 60, dtype=np.int16).reshape(40, 50, 60))
    image.SetSpacing((0.7, 0.8, 2.5))
    return image, np.arange(10 ** 6, dtype=np.float32), "small"

found = {}
found["value"] = outcome(ForkedCall(os.getpid))
image, array, small = ForkedCall(volumes).result()  # large buffers come through shared memory, the rest pickled
expected = volumes()
import numpy as np, SimpleITK as sitk
array[0] = -1  # writable
found["volumes"] = [bool((sitk.GetArrayViewFromImage(image) == sitk.GetArrayViewFromImage(expected[0])).all()),
                    image.GetSpacing() == expected[0].GetSpacing(), bool((array[1:] == expected[1][1:]).all()), small]
found["input error"] = outcome(ForkedCall(read_ct, sys.argv[1]))
found["bug"] = outcome(ForkedCall(crash))
found["died"] = outcome(ForkedCall(os._exit, 3))
killed = ForkedCall(time.sleep, 60)
os.kill(killed.pid, 9)
found["killed"] = outcome(killed)
started = time.monotonic()
with ForkedCall(time.sleep, 60) as sleeping:
    child = sleeping.pid
found["stopped"] = [time.monotonic() - started < 10, os.WEXITSTATUS(sleeping._status) if os.WIFEXITED(sleeping._status) else "killed"]
import torch
found["after torch"] = outcome(ForkedCall(os.getpid))
print(json.dumps({"pid": os.getpid(), "child": child, "found": found}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the child is forked on Linux only")
def test_forked_call(tmp_path):
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "missing.nrrd")], capture_output=True, text=True,
                          timeout=120)
    report = json.loads(done.stdout.splitlines()[-1])
    found, pid = report["found"], report["pid"]
    assert found["value"][0] == "value" and found["value"][1] != pid  # computed in another process
    assert found["volumes"] == [True, True, True, "small"]
    assert found["input error"][0] == "InputNotFoundError" and "missing.nrrd" in found["input error"][1]
    assert found["bug"] == ["RuntimeError", "crash failed: KeyError: 'bug'"]
    assert "KeyError: 'bug'" in done.stderr  # the child's traceback, where it happened
    assert found["died"] == ["WorkerKilledError", "the process running _exit ended without a result (exit status 3)"]
    assert found["killed"] == ["WorkerKilledError", "the process running sleep was killed (signal 9; out of memory?)"]
    assert found["stopped"] == [True, "killed"] and report["child"] not in (None, pid)
    assert found["after torch"] == ["value", pid]  # torch's threads run: called here, not forked


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the child is forked on Linux only")
def test_the_child_dies_with_its_parent():
    """A parent killed (`kill -9`, Slicer's Cancel) takes its child along instead of leaving it working for nobody."""
    import os
    import signal
    import time

    script = ("import time; from CovidCTDiagnosisLib.forked import ForkedCall; c = ForkedCall(time.sleep, 60); "
              "print(c.pid, flush=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait(timeout=30)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and os.path.exists(f"/proc/{child}") and "Z" not in _state(child):
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{child}") or "Z" in _state(child)  # gone (or a zombie awaiting init)


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the child is forked on Linux only")
def test_the_child_never_returns_into_the_parents_code(tmp_path):
    """With stderr closed (`2>&-`: sys.stderr is None) the child's last flush raised, and the child went on as a
    second copy of the command from where it was forked."""
    marker = tmp_path / "escaped"
    script = f"""
import os, sys, time
from CovidCTDiagnosisLib.forked import ForkedCall
sys.stderr = None
try:
    call = ForkedCall(os.getpid)
except BaseException as error:
    open({str(marker)!r}, "a").write(f"{{os.getpid()}} {{error!r}}\\n")
    os._exit(0)
time.sleep(1.5)  # the child has long finished
print(call.result() != os.getpid())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "True" and not marker.exists(), marker.read_text() if marker.exists() else done.stderr

