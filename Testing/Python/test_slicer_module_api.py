"""Every Slicer API name the module uses exists in Slicer (3D Slicer cannot run here).

The module's source is read with `ast` and each name it takes from Slicer is looked up in
../shared/slicer-api/slicer-api.json, the listing of Slicer's own source (see its README):
`slicer.util.*`, `sitkUtils.*`, `slicer.vtkMRML*` classes and their static members,
`slicer.parameterNodeWrapper` and `slicer.ScriptedLoadableModule` names, methods the module's
classes call on their Slicer base classes, and methods called on MRML and VTK objects whose class
can be told from the code: nodes made by `AddNewNodeByClass("vtkMRML...")` or returned by
`slicer.util.load*`, annotated parameters, typed parameter-node fields, values returned by the
module's own functions, and a few getters (METHOD_RETURNS). Members are looked up through the
superclass chain, ending in the pip `vtk` package for plain VTK classes. Names the listing cannot
answer (Qt: `slicer.app`, widgets) are in explicit allowlists below. An unknown name fails the test
with its line.
"""

from __future__ import annotations

import ast
import importlib
import json
import unittest
from dataclasses import dataclass, field
from pathlib import Path

import pytest

vtk = pytest.importorskip("vtk")

REPO = Path(__file__).resolve().parents[2]
MODULE_FILE = REPO / "CovidCTDiagnosis" / "CovidCTDiagnosis.py"
API_FILE = REPO.parent / "shared" / "slicer-api" / "slicer-api.json"

# Return types of calls whose class cannot be read from an argument
FUNCTION_RETURNS = {
    "slicer.util.loadSegmentation": "vtkMRMLSegmentationNode",
    "slicer.util.loadVolume": "vtkMRMLScalarVolumeNode",
    "slicer.util.loadMarkups": "vtkMRMLMarkupsNode",
    "slicer.util.loadTable": "vtkMRMLTableNode",
    "slicer.util.addVolumeFromArray": "vtkMRMLScalarVolumeNode",
    "slicer.util.getNode": "vtkMRMLNode",
    "slicer.util.vtkMatrixFromArray": "vtkMatrix4x4",
    "sitkUtils.PushVolumeToSlicer": "vtkMRMLScalarVolumeNode",
    "slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode": "vtkMRMLSubjectHierarchyNode",
}
NODE_CLASS_ARGUMENT = {  # calls whose first argument names the class of what they return
    "slicer.mrmlScene.AddNewNodeByClass",
    "slicer.mrmlScene.GetFirstNodeByClass",
    "slicer.util.getFirstNodeByClassByName",
}
METHOD_RETURNS = {  # (class or a superclass, method) -> class of the returned object
    ("vtkMRMLSegmentationNode", "GetSegmentation"): "vtkSegmentation",
    ("vtkMRMLSegmentationNode", "GetDisplayNode"): "vtkMRMLSegmentationDisplayNode",
    ("vtkSegmentation", "GetSegment"): "vtkSegment",
    ("vtkMRMLScalarVolumeNode", "GetScalarVolumeDisplayNode"): "vtkMRMLScalarVolumeDisplayNode",
    ("vtkMRMLMarkupsROINode", "GetDisplayNode"): "vtkMRMLMarkupsROIDisplayNode",
    ("vtkMRMLVolumeNode", "GetImageData"): "vtkImageData",
    ("qMRMLSliceWidget", "sliceLogic"): "vtkMRMLSliceLogic",
}
QT_METHOD_RETURNS = {"sliceLogic": "vtkMRMLSliceLogic"}  # on Qt objects, whose class the code does not show
MODULE_LOGICS = {"markups": "vtkSlicerMarkupsLogic"}  # slicer.modules.<name>.logic()
# Not in the listing: the Qt application object (qSlicerApplication) and Slicer's Python packages
APP_NAMES = {"temporaryPath", "processEvents", "layoutManager"}
SLICER_TOP_LEVEL = {"util", "app", "mrmlScene", "modules", "i18n", "parameterNodeWrapper", "ScriptedLoadableModule"}
I18N_NAMES = {"tr", "translate"}
# Set on instances by ScriptedLoadableModule*.__init__ (Base/Python/slicer/ScriptedLoadableModule.py)
BASE_ATTRIBUTES = {
    "ScriptedLoadableModule": {"parent", "moduleName"},
    "ScriptedLoadableModuleWidget": {"parent", "moduleName", "layout", "developerMode"},
    "ScriptedLoadableModuleLogic": {"moduleName", "isSingletonParameterNode"},
    "ScriptedLoadableModuleTest": {"moduleTestNames", "enableScreenshots", "screenshotScaleFactor"},
}
# Put on every @parameterNodeWrapper class and instance (parameterNodeWrapper/wrapper.py)
WRAPPER_NAMES = {
    "parameterNode", "allParameters", "default", "isCached", "dataType", "getValue", "setValue", "connectGui",
    "connectParametersToGui", "disconnectGui", "StartModify", "EndModify", "AddObserver", "RemoveObserver", "Modified",
}


@pytest.fixture(scope="module")
def api():
    if not API_FILE.is_file():
        pytest.skip(f"Slicer API listing not available: {API_FILE} does not exist")
    return json.loads(API_FILE.read_text(encoding="utf-8"))


@dataclass
class _Class:
    """A class defined in the checked source."""

    bases: list[str]
    methods: dict[str, ast.FunctionDef] = field(default_factory=dict)
    attributes: dict[str, object] = field(default_factory=dict)  # self.<name> -> type (or None)
    fields: dict[str, object] = field(default_factory=dict)  # class-level annotated names -> type
    is_parameter_node: bool = False


class ApiChecker:
    """Walks a module's source and lists the Slicer names it uses that the listing lacks."""

    def __init__(self, api: dict):
        self.classes = api["classes"]
        self.python = api["python"]
        self.util = set(self.python["slicer.util"])
        self.base_methods = {name: set(info["class"]) for name, info in self.python["slicer.ScriptedLoadableModule"].items()}
        self.mixin_methods = set(self.python["slicer.util"]["VTKObservationMixin"]["class"])
        # Python namespaces of `slicer` and the names each defines
        self.namespaces = {
            "util": self.util,
            "parameterNodeWrapper": set(self.python["slicer.parameterNodeWrapper"]),
            "ScriptedLoadableModule": set(self.base_methods),
        }
        self.errors: list[str] = []
        self.checked: dict[str, int] = {}

    # -- names ---------------------------------------------------------------------------------
    def members(self, name: str) -> set[str] | None:
        """Members of a Slicer class through its superclasses, ending in the vtk package; None if unknown."""
        members, current = set(), name
        while current in self.classes:
            members |= set(self.classes[current]["members"])
            current = self.classes[current]["superclass"]
        vtk_class = getattr(vtk, current, None) if current else None
        if vtk_class is None:
            return members if name in self.classes else None
        return members | set(dir(vtk_class))

    def superclasses(self, name: str) -> list[str]:
        chain = [name]
        while chain[-1] in self.classes:
            chain.append(self.classes[chain[-1]]["superclass"])
        return chain

    def fail(self, node: ast.AST, message: str) -> None:
        self.errors.append(f"line {node.lineno}: {message}")

    def count(self, category: str) -> None:
        self.checked[category] = self.checked.get(category, 0) + 1

    # -- entry -----------------------------------------------------------------------------------
    def check(self, source: str) -> list[str]:
        tree = ast.parse(source)
        self.module_classes: dict[str, _Class] = {}
        self.module_functions: dict[str, ast.FunctionDef] = {}
        self.imported: dict[str, str] = {}  # local name -> dotted origin
        self.returns: dict[str, object] = {}
        self._collect(tree)
        for _ in range(3):  # return types and attributes of the module's own code depend on each other
            for scope, function in self._functions():
                self._infer_function(scope, function)
        self.errors = []
        self._check_imports(tree)
        for scope, function in self._functions():
            self._infer_function(scope, function, check=True)
        for statement in tree.body:
            if not isinstance(statement, (ast.FunctionDef, ast.ClassDef)):
                self._check_expressions(statement, {}, None)
        return self.errors

    def _functions(self):
        for function in self.module_functions.values():
            yield None, function
        for name, cls in self.module_classes.items():
            for function in cls.methods.values():
                yield name, function

    def _collect(self, tree: ast.Module) -> None:
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    self.imported[alias.asname or alias.name] = f"{node.module}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    self.imported[alias.asname or alias.name.split(".")[0]] = alias.name
            elif isinstance(node, ast.FunctionDef):
                self.module_functions[node.name] = node
            elif isinstance(node, ast.ClassDef):
                cls = _Class(bases=[ast.unparse(b) for b in node.bases])
                cls.is_parameter_node = any(ast.unparse(d) == "parameterNodeWrapper" for d in node.decorator_list)
                for item in node.body:
                    if isinstance(item, ast.FunctionDef):
                        cls.methods[item.name] = item
                    elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                        cls.fields[item.target.id] = self._annotation_type(item.annotation)
                    elif isinstance(item, ast.Assign):
                        cls.fields.update({t.id: None for t in item.targets if isinstance(t, ast.Name)})
                self.module_classes[node.name] = cls

    # -- types -----------------------------------------------------------------------------------
    def _class_name(self, node: ast.AST) -> str | None:
        """`vtkMRMLX` imported from slicer, `slicer.vtkMRMLX`, `vtk.vtkX`, or a module class."""
        text = ast.unparse(node)
        if text in self.module_classes:
            return text
        origin = self.imported.get(text, text)
        for prefix in ("slicer.", "vtk."):
            if origin.startswith(prefix) and origin[len(prefix):].startswith("vtk"):
                return origin[len(prefix):]
        return None

    def _annotation_type(self, node: ast.AST):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
            return self._annotation_type(node.left) or self._annotation_type(node.right)
        if isinstance(node, ast.Subscript) and ast.unparse(node.value) == "list":
            element = self._annotation_type(node.slice)
            return ("list", element) if element else None
        if isinstance(node, ast.Subscript) and ast.unparse(node.value) in ("Annotated", "Optional"):
            inner = node.slice.elts[0] if isinstance(node.slice, ast.Tuple) else node.slice
            return self._annotation_type(inner)
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return self._annotation_type(ast.parse(node.value, mode="eval").body)
        return self._class_name(node)

    def _dotted(self, node: ast.AST) -> str:
        """`slicer.util.loadVolume` for slicer.util.loadVolume and for loadVolume imported from slicer.util."""
        text = ast.unparse(node)
        head, _, rest = text.partition(".")
        origin = self.imported.get(head)
        return (origin + ("." + rest if rest else "")) if origin else text

    def _type(self, node: ast.AST, env: dict, scope: str | None):
        """The class (name) of an expression's value, ("list", class) for lists, or None if unknown."""
        if isinstance(node, ast.Name):
            return env.get(node.id)
        if isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id == "self" and scope:
                return self._attribute_of(scope, node.attr)
            owner = self._type(node.value, env, scope)
            if isinstance(owner, str) and owner in self.module_classes:
                return self._attribute_of(owner, node.attr)
            return None
        if isinstance(node, ast.Call):
            return self._call_type(node, env, scope)
        if isinstance(node, (ast.List, ast.Tuple)):
            element_types = set()
            for element in node.elts:
                t = self._type(element.value, env, scope) if isinstance(element, ast.Starred) else self._type(element, env, scope)
                if isinstance(element, ast.Starred):
                    t = t[1] if isinstance(t, tuple) else None
                if t is None:
                    return None
                element_types |= set(t) if isinstance(t, frozenset) else {t}
            return ("list", frozenset(element_types)) if element_types else None
        if isinstance(node, ast.ListComp):
            element = self._type(node.elt, env, scope)
            return ("list", element) if element else None
        if isinstance(node, ast.IfExp):
            return self._type(node.body, env, scope) or self._type(node.orelse, env, scope)
        if isinstance(node, ast.Subscript) and not isinstance(node.slice, ast.Slice):
            container = self._type(node.value, env, scope)
            return container[1] if isinstance(container, tuple) else None
        return None

    def _attribute_of(self, class_name: str, attribute: str):
        cls = self.module_classes[class_name]
        if attribute in cls.attributes:
            return cls.attributes[attribute]
        if attribute in cls.fields:
            return cls.fields[attribute]
        return None

    def _call_type(self, node: ast.Call, env: dict, scope: str | None):
        func = node.func
        dotted = self._dotted(func)
        if dotted in NODE_CLASS_ARGUMENT and node.args and isinstance(node.args[0], ast.Constant):
            return node.args[0].value
        if dotted in FUNCTION_RETURNS:
            return FUNCTION_RETURNS[dotted]
        if dotted.startswith("slicer.modules.") and dotted.endswith(".logic"):
            return MODULE_LOGICS.get(dotted.split(".")[2])
        constructed = self._class_name(func)
        if constructed:
            return constructed
        if isinstance(func, ast.Name) and func.id in self.module_functions:
            return self.returns.get(func.id)
        if isinstance(func, ast.Attribute):
            if isinstance(func.value, ast.Name) and func.value.id in ("self", "cls") and scope:
                return self.returns.get(f"{scope}.{func.attr}")
            if isinstance(func.value, ast.Call) and ast.unparse(func.value.func) == "super" and scope:
                return self.returns.get(f"{scope}.{func.attr}")
            if ast.unparse(func.value) in self.module_classes:
                return self.returns.get(f"{ast.unparse(func.value)}.{func.attr}")
            owner = self._type(func.value, env, scope)
            if isinstance(owner, str):
                if owner in self.module_classes:
                    return self.returns.get(f"{owner}.{func.attr}")
                for cls in self.superclasses(owner):
                    if (cls, func.attr) in METHOD_RETURNS:
                        return METHOD_RETURNS[(cls, func.attr)]
            elif owner is None and func.attr in QT_METHOD_RETURNS:
                return QT_METHOD_RETURNS[func.attr]
        return None

    # -- one function ----------------------------------------------------------------------------
    def _infer_function(self, scope: str | None, function: ast.FunctionDef, check: bool = False) -> None:
        env: dict = {}
        arguments = function.args.posonlyargs + function.args.args + function.args.kwonlyargs
        for argument in arguments:
            if argument.annotation is not None:
                env[argument.arg] = self._annotation_type(argument.annotation)
        returned = set()
        for statement in function.body:
            self._walk_statement(statement, env, scope, returned, check)
        key = f"{scope}.{function.name}" if scope else function.name
        if len(returned) == 1 and None not in returned:
            self.returns[key] = next(iter(returned))

    def _walk_statement(self, statement: ast.stmt, env: dict, scope, returned: set, check: bool) -> None:
        if check:
            self._check_expressions(statement, env, scope)
        if isinstance(statement, ast.Assign):
            for target in statement.targets:
                pairs = (
                    zip(target.elts, statement.value.elts)
                    if isinstance(target, ast.Tuple) and isinstance(statement.value, ast.Tuple) and len(target.elts) == len(statement.value.elts)
                    else [(target, statement.value)]
                )
                for single_target, value in pairs:
                    self._bind(single_target, self._type(value, env, scope), env, scope)
        elif isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
            env[statement.target.id] = self._annotation_type(statement.annotation)
        elif isinstance(statement, ast.Return) and statement.value is not None:
            returned.add(self._type(statement.value, env, scope))
        elif isinstance(statement, ast.For):
            iterated = self._type(statement.iter, env, scope)
            if isinstance(statement.target, ast.Name):
                env[statement.target.id] = iterated[1] if isinstance(iterated, tuple) else None
        for child in ("body", "orelse", "finalbody", "handlers"):
            for inner in getattr(statement, child, []):
                if isinstance(inner, ast.ExceptHandler):
                    for handled in inner.body:
                        self._walk_statement(handled, env, scope, returned, check)
                elif isinstance(inner, ast.stmt) and not isinstance(inner, (ast.FunctionDef, ast.ClassDef)):
                    self._walk_statement(inner, env, scope, returned, check)

    def _bind(self, target: ast.AST, value_type, env: dict, scope) -> None:
        if isinstance(target, ast.Name):
            env[target.id] = value_type
        elif isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self" and scope:
            attributes = self.module_classes[scope].attributes
            if attributes.get(target.attr) is None:
                attributes[target.attr] = value_type
        elif isinstance(target, ast.Tuple):
            for element in target.elts:
                self._bind(element, None, env, scope)

    # -- checks ----------------------------------------------------------------------------------
    def _check_imports(self, tree: ast.Module) -> None:
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("slicer"):
                for alias in node.names:
                    self._check_dotted(node, f"{node.module}.{alias.name}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("slicer.") or alias.name == "sitkUtils":
                        self._check_dotted(node, alias.name)

    def _check_expressions(self, statement: ast.stmt, env: dict, scope) -> None:
        """Checks the expressions of `statement` itself (not those of nested statements)."""
        nested = {id(s) for field_name in ("body", "orelse", "finalbody", "handlers") for s in getattr(statement, field_name, [])}
        stack = [child for child in ast.iter_child_nodes(statement) if id(child) not in nested]
        while stack:
            node = stack.pop()
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                self._check_attribute(node, env, scope)
            stack.extend(ast.iter_child_nodes(node))

    def _check_attribute(self, node: ast.Attribute, env: dict, scope) -> None:
        dotted = self._dotted(node)
        head = dotted.split(".")[0]
        if head in ("slicer", "sitkUtils", "vtk") and isinstance(node.value, (ast.Name, ast.Attribute)) and "(" not in dotted:
            self._check_dotted(node, dotted)
            return
        if isinstance(node.value, ast.Name) and node.value.id == "self" and scope:
            self._check_self(node, scope)
            return
        if isinstance(node.value, ast.Call) and ast.unparse(node.value.func) == "super" and scope:
            self._check_base_method(node, scope, node.attr)
            return
        owner = self._type(node.value, env, scope)
        if isinstance(owner, tuple):
            return
        for cls in sorted(owner) if isinstance(owner, frozenset) else [owner] if owner else []:
            self._check_member(node, cls, node.attr)

    def _check_member(self, node: ast.AST, cls: str, name: str) -> None:
        if cls in self.module_classes:
            module_class = self.module_classes[cls]
            known = set(module_class.methods) | set(module_class.attributes) | set(module_class.fields)
            if module_class.is_parameter_node:
                known |= WRAPPER_NAMES
            if name not in known and not self._base_has(cls, name):
                self.fail(node, f"{cls} has no attribute {name!r}")
            return
        members = self.members(cls)
        self.count("node methods")
        if members is None:
            self.fail(node, f"class {cls} is not in the Slicer API listing")
        elif name not in members:
            self.fail(node, f"{cls}.{name} is not in the Slicer API listing (nor in its superclasses)")

    def _base_has(self, cls: str, name: str) -> bool:
        """Whether a base class of module class `cls` has `name`: Slicer's from the listing, Python's by import."""
        for base in self.module_classes[cls].bases:
            origin = self.imported.get(base.split(".")[0], base.split(".")[0]) + base[len(base.split(".")[0]):]
            short = origin.split(".")[-1]
            if short in self.base_methods:
                extra = dir(unittest.TestCase) if short == "ScriptedLoadableModuleTest" else ()
                if name in self.base_methods[short] or name in BASE_ATTRIBUTES[short] or name in extra:
                    return True
            elif short == "VTKObservationMixin":
                if name in self.mixin_methods:
                    return True
            elif base in self.module_classes:
                if name in self.module_classes[base].methods or self._base_has(base, name):
                    return True
            elif "." in origin and not origin.startswith("slicer"):
                module_name, _, class_name = origin.rpartition(".")
                python_class = getattr(importlib.import_module(module_name), class_name)
                if any(name in vars(c) for c in python_class.__mro__):  # also finds Enum's member properties
                    return True
        return False

    def _check_self(self, node: ast.Attribute, scope: str) -> None:
        cls = self.module_classes[scope]
        if node.attr in cls.methods or node.attr in cls.attributes or node.attr in cls.fields:
            return
        self._check_base_method(node, scope, node.attr)

    def _check_base_method(self, node: ast.AST, scope: str, name: str) -> None:
        self.count("base class methods")
        if not self._base_has(scope, name) and name not in self.module_classes[scope].methods:
            self.fail(node, f"{name!r} is not a method of {scope}'s Slicer base classes")

    def _check_dotted(self, node: ast.AST, dotted: str) -> None:
        parts = dotted.split(".")
        if parts[0] == "sitkUtils":
            self.count("sitkUtils")
            if len(parts) > 1 and parts[1] not in self.python["sitkUtils"]:
                self.fail(node, f"sitkUtils.{parts[1]} is not in the Slicer API listing")
        elif parts[0] == "vtk":
            self.count("vtk")
            target = vtk
            for part in parts[1:]:
                if not hasattr(target, part):
                    self.fail(node, f"{'.'.join(parts[: parts.index(part) + 1])} is not in the vtk package")
                    return
                target = getattr(target, part)
        elif parts[0] == "slicer" and len(parts) > 1:
            self._check_slicer(node, parts[1:])

    def _check_slicer(self, node: ast.AST, parts: list[str]) -> None:
        first = parts[0]
        rest = parts[1:]
        if first in self.classes:
            self.count("slicer classes")
            if rest and rest[0] not in (self.members(first) or set()):
                self.fail(node, f"slicer.{first}.{rest[0]} is not in the Slicer API listing")
        elif first in self.namespaces:
            self.count(f"slicer.{first}")
            if rest and rest[0] not in self.namespaces[first]:
                self.fail(node, f"slicer.{first}.{rest[0]} is not in the Slicer API listing")
        elif first == "mrmlScene":
            if rest:
                self._check_member(node, "vtkMRMLScene", rest[0])
        elif first == "app":
            if rest and rest[0] not in APP_NAMES:
                self.fail(node, f"slicer.app.{rest[0]} is not in the checked list of application names (APP_NAMES)")
        elif first == "modules":
            if rest and rest[0] not in MODULE_LOGICS:
                self.fail(node, f"slicer.modules.{rest[0]}: unknown module (add its logic class to MODULE_LOGICS)")
        elif first == "i18n":
            if rest and rest[0] not in I18N_NAMES:
                self.fail(node, f"slicer.i18n.{rest[0]} is not a Slicer translation function")
        elif first not in SLICER_TOP_LEVEL:
            self.fail(node, f"slicer.{first} is not in the Slicer API listing")


def test_module_uses_only_slicer_api_names_that_exist(api):
    checker = ApiChecker(api)
    errors = checker.check(MODULE_FILE.read_text(encoding="utf-8"))
    assert not errors, "\n".join(errors)
    # the checker really looked at the module's Slicer calls (a vacuous pass would hide everything)
    for category, minimum in {"slicer.util": 10, "node methods": 60, "slicer classes": 2, "base class methods": 5,
                              "vtk": 3, "sitkUtils": 2}.items():
        assert checker.checked.get(category, 0) >= minimum, (category, checker.checked)


BOGUS_SOURCE = '''\
import enum
import sitkUtils
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode
from slicer.parameterNodeWrapper import parameterNodeWrapper, NoSuchValidator  # BOGUS slicer.parameterNodeWrapper.NoSuchValidator
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic, ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget
from slicer.util import VTKObservationMixin, noSuchHelper  # BOGUS slicer.util.noSuchHelper


class Choice(enum.Enum):
    A = "a"

    def label(self):
        text = self.value
        return text + self.noSuchEnumAttribute  # BOGUS 'noSuchEnumAttribute'


@parameterNodeWrapper
class Params:
    inputVolume: vtkMRMLScalarVolumeNode
    choice: Choice = Choice.A


class Widget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.setup)
        self.layout.addWidget(None)
        self.noSuchBaseMethod()  # BOGUS 'noSuchBaseMethod'
        self.logic = Logic()
        self.logic.missingLogicMethod()  # BOGUS 'missingLogicMethod'

    def first(self, rois: list[slicer.vtkMRMLMarkupsROINode]):
        rois[0].GetCenter([0.0, 0.0, 0.0])
        rois[0].GetCentre()  # BOGUS vtkMRMLMarkupsROINode.GetCentre

    def uses(self, params: Params | None):
        params.inputVolume.GetBogusName()  # BOGUS vtkMRMLScalarVolumeNode.GetBogusName
        params.connectGui(None)
        params.noSuchField  # BOGUS 'noSuchField'


class Logic(ScriptedLoadableModuleLogic):
    def getParameterNode(self):
        return Params(super().getParameterNode())

    def make(self):
        return slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode")

    def run(self, volume: vtkMRMLScalarVolumeNode):
        self.getParameterNode().inputVolume.GetName()
        self.getParameterNode().inputVolume.GetNameBogus()  # BOGUS vtkMRMLScalarVolumeNode.GetNameBogus
        slicer.util.loadVolumeBogus("x.nrrd")  # BOGUS slicer.util.loadVolumeBogus
        sitkUtils.PullVolumeFromSlicerBogus(volume)  # BOGUS sitkUtils.PullVolumeFromSlicerBogus
        table = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode")
        table.SetAndObserveTransformNodeID(None)  # BOGUS vtkMRMLTableNode.SetAndObserveTransformNodeID
        table.AddColumn()
        segmentation = slicer.util.loadSegmentation("s.seg.nrrd")
        segmentation.GetSegmentation().GetSegment("x").SetBogusColor(1, 0, 0)  # BOGUS vtkSegment.SetBogusColor
        roi = self.make()
        roi.SetSize(1, 2, 3)
        roi.SetSizeBogus(1, 2, 3)  # BOGUS vtkMRMLMarkupsROINode.SetSizeBogus
        rois = [self.make() for _ in range(2)]
        for node in [segmentation, *rois]:
            node.SetAndObserveTransformNodeID(None)
            node.SetName("x")
            node.SetCenter(0, 0, 0)  # BOGUS vtkMRMLSegmentationNode.SetCenter
        slicer.vtkMRMLBogusNode()  # BOGUS slicer.vtkMRMLBogusNode
        slicer.vtkMRMLSliceNode.JumpAllSlicesBogus()  # BOGUS slicer.vtkMRMLSliceNode.JumpAllSlicesBogus
        slicer.modules.markups.logic().JumpSlicesToLocation(0, 0, 0, True)
        slicer.modules.nosuchmodule.logic()  # BOGUS slicer.modules.nosuchmodule
        slicer.app.noSuchAppFunction()  # BOGUS slicer.app.noSuchAppFunction
        slicer.noSuchTopLevel  # BOGUS slicer.noSuchTopLevel
        m = vtk.vtkMatrix4x4()
        m.Invert()
        m.BogusVtkMethod()  # BOGUS vtkMatrix4x4.BogusVtkMethod
        vtk.vtkNoSuchClass()  # BOGUS vtk.vtkNoSuchClass
        volume.AddObserver(vtk.vtkCommand.ModifiedEvent, print)
        slicer.app.layoutManager().sliceWidget("Red").sliceLogic().GetSliceOffsetBogus()  # BOGUS vtkMRMLSliceLogic.GetSliceOffsetBogus


class Test(ScriptedLoadableModuleTest):
    def runTest(self):
        self.assertEqual(1, 1)
        self.delayDisplay("x")
        self.assertBogus()  # BOGUS 'assertBogus'
'''


def test_checker_reports_each_bogus_name_with_its_line(api):
    """Each line marked BOGUS gets an error naming the bogus name, and no other line gets one."""
    expected = {
        number: line.split("# BOGUS ")[1]
        for number, line in enumerate(BOGUS_SOURCE.splitlines(), start=1)
        if "# BOGUS " in line
    }
    errors = ApiChecker(api).check(BOGUS_SOURCE)
    by_line: dict[int, list[str]] = {}
    for error in errors:
        by_line.setdefault(int(error.split(":")[0].split()[1]), []).append(error)
    for number, name in expected.items():
        assert any(name in e for e in by_line.get(number, [])), f"line {number}: no error about {name}; got {errors}"
    false_alarms = {number: e for number, e in by_line.items() if number not in expected}
    assert not false_alarms, f"errors on valid calls: {false_alarms}"
