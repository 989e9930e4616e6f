"""Stand-ins for the Slicer modules the module file imports (`slicer`, `qt`, PyTorchUtils, ...): mocks
that accept any call, so tests check the module's own Python, not Slicer's behaviour (`vtk` is the
pip package where it is installed).

Standard library only, so that any Python (3.9 included) can import the module file with them.
The parameter-node decorator reads the class's annotations as Slicer's does (typing.get_type_hints).
"""

import types
import typing
from unittest import mock


class Node:
    """Stands for the MRML classes the module imports by name (usable in annotations)."""


def _parameter_node_wrapper(cls):
    """As slicer.parameterNodeWrapper: the annotations are evaluated, and the class wraps a parameter node (here its
    fields are the class's defaults until set)."""
    typing.get_type_hints(cls, include_extras=True)
    cls.__init__ = lambda self, parameterNode=None: None
    return cls


def _array_from_vtk_matrix(matrix):
    import numpy as np

    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def fake_slicer_modules(temporary_path) -> typing.Dict[str, types.ModuleType]:
    """Module name -> stand-in, to put into sys.modules; `slicer.app.temporaryPath` is `temporary_path`."""
    slicer = mock.MagicMock(name="slicer")
    slicer.vtkMRMLScalarVolumeNode = Node
    slicer.app.temporaryPath = str(temporary_path)
    slicer.util.VTKObservationMixin = type("VTKObservationMixin", (), {"__init__": lambda self: None})
    slicer.util.confirmOkCancelDisplay.return_value = True
    slicer.util.arrayFromVTKMatrix.side_effect = _array_from_vtk_matrix
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = _parameter_node_wrapper
    wrapper.WithinRange = lambda low, high: (low, high)
    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleTest"):
        setattr(slm, name, type(name, (), {"__init__": lambda self, *args: None}))
    slm.ScriptedLoadableModuleLogic = type("ScriptedLoadableModuleLogic", (), {
        "__init__": lambda self: None, "getParameterNode": lambda self: mock.MagicMock()})
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    pytorch = types.ModuleType("PyTorchUtils")
    pytorch.PyTorchUtilsLogic = lambda: mock.MagicMock(**{"torchInstalled.return_value": True})
    return {"slicer": slicer, "slicer.util": slicer.util, "slicer.parameterNodeWrapper": wrapper,
            "slicer.ScriptedLoadableModule": slm, "slicer.i18n": i18n, "qt": mock.MagicMock(name="qt"),
            "PyTorchUtils": pytorch, "sitkUtils": mock.MagicMock(name="sitkUtils")}


def load_module_file(path, name: str) -> types.ModuleType:
    """The Python file at `path` imported as module `name`, into sys.modules as an import puts it."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, str(path))
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[name] = loaded
    spec.loader.exec_module(loaded)
    return loaded
