"""The extension's files as Slicer's build and the Extensions Index read them: the module CMake lists
name every file, the .ui has every widget the module uses, UI text is translatable, and the
extension metadata is complete and points at files that exist."""

from __future__ import annotations

import ast
import json
import re
import struct
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE_NAME = "CovidCTDiagnosis"
MODULE_DIR = REPO / MODULE_NAME
MODULE_FILE = MODULE_DIR / f"{MODULE_NAME}.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / f"{MODULE_NAME}.ui"
ICON_FILE = MODULE_DIR / "Resources" / "Icons" / f"{MODULE_NAME}.png"  # the module's, where Slicer's resourcePath() finds it
EXTENSION_ICON_FILE = REPO / "Resources" / "Icons" / f"{MODULE_NAME}.png"  # the extension's, for the catalog
CATALOG_ENTRY = REPO / "Resources" / f"{MODULE_NAME}.json"  # what Slicer's ExtensionsIndex holds for the extension
CATALOG_SCHEMA = REPO.parent / "shared" / "slicer-api" / "slicer-extension-catalog-entry-schema-v1.0.2.json"
EXTENSION_FIELDS = ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS")
ICON_SIZE = (128, 128)
TECHNICAL_PROPERTIES = {"SlicerParameterName", "nodeTypes"}  # values read by code, not shown: never translated
TRANSLATED_CALLS = {"errorDisplay", "confirmOkCancelDisplay", "tryWithErrorDisplay", "QPushButton", "getOpenFileName",
                    "getExistingDirectory", "RuntimeError", "ValueError"}


def _cmake_variables(path: Path) -> dict[str, list[str]]:
    """The set(NAME values...) of a CMakeLists.txt, with ${VAR} expanded (quoted values stay whole)."""
    tokens = re.findall(r'"[^"]*"|#[^\n]*|[()]|[^\s()"#]+', path.read_text(encoding="utf-8"))
    tokens = [t for t in tokens if not t.startswith("#")]
    variables: dict[str, list[str]] = {}
    for n, token in enumerate(tokens):
        if token.lower() == "set" and tokens[n + 1] == "(":
            end = tokens.index(")", n)
            name, values = tokens[n + 2], [v.strip('"') for v in tokens[n + 3 : end]]
            variables[name] = [re.sub(r"\$\{(\w+)\}", lambda m: " ".join(variables.get(m.group(1), [])), v) for v in values]
    return variables


def _project_files(folder: Path) -> set[str]:
    """Files under `folder` that git tracks or would track (ignored build outputs excluded), relative to it."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", str(folder)],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split()
    return {str(Path(p).relative_to(folder.relative_to(REPO))) for p in listed if (REPO / p).is_file()}


def test_module_cmake_lists_every_script_and_resource():
    variables = _cmake_variables(MODULE_DIR / "CMakeLists.txt")
    files = _project_files(MODULE_DIR) - {"CMakeLists.txt"}
    scripts = {f for f in files if f.endswith(".py")}
    resources = {f for f in files if f.startswith("Resources/")}
    assert set(variables["MODULE_PYTHON_SCRIPTS"]) == scripts, "MODULE_PYTHON_SCRIPTS differs from the .py files"
    assert set(variables["MODULE_PYTHON_RESOURCES"]) == resources, "MODULE_PYTHON_RESOURCES differs from Resources/"
    assert not files - scripts - resources, "files in the module folder that the build would not install"
    assert any(p.startswith(f"{MODULE_NAME}Lib/") for p in scripts)
    cmake = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    build = re.search(r"slicerMacroBuildScriptedModule\((.*?)\)", cmake, flags=re.S).group(1)
    assert "WITH_GENERIC_TESTS" in build
    assert re.search(r"slicer_add_python_unittest\(\s*SCRIPT\s+\$\{MODULE_NAME\}\.py\s*\)", cmake)


def _ui_tree() -> ET.Element:
    return ET.parse(UI_FILE).getroot()


def _parameter_fields() -> dict[str, str]:
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(ast.unparse(d) == "parameterNodeWrapper" for d in node.decorator_list):
            return {item.target.id: ast.unparse(item.annotation) for item in node.body if isinstance(item, ast.AnnAssign)}
    raise AssertionError("no @parameterNodeWrapper class in the module")


def test_ui_names_every_widget_the_module_uses():
    root = _ui_tree()
    assert root.findtext("class") == MODULE_NAME
    widgets = {w.get("name"): w.get("class") for w in root.iter("widget")}
    used = {
        node.attr
        for node in ast.walk(ast.parse(MODULE_FILE.read_text(encoding="utf-8")))
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and ast.unparse(node.value) == "self.ui"
    }
    assert used, "the module uses no widgets of its .ui"
    assert used <= set(widgets), f"widgets missing from the .ui: {sorted(used - set(widgets))}"
    for connection in root.iter("connection"):
        assert connection.findtext("sender") in widgets and connection.findtext("receiver") in widgets


def test_ui_parameter_widgets_match_the_parameter_node():
    fields = _parameter_fields()
    connected = {}
    for widget in _ui_tree().iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                connected[prop.findtext("string")] = widget.get("class")
    assert set(connected) <= set(fields), f"widgets name unknown parameters: {set(connected) - set(fields)}"
    assert set(fields) - set(connected) == {"model"}  # the model chooser is filled by the widget itself
    assert connected["inputVolume"] == "qMRMLNodeComboBox"
    assert all(connected[name] == "QComboBox" for name in ("device", "slices"))  # enum connectors need exactly QComboBox


def test_ui_text_is_translatable_and_technical_values_are_not():
    for prop in _ui_tree().iter("property"):
        for string in prop.iter("string"):
            technical = prop.get("name") in TECHNICAL_PROPERTIES
            assert (string.get("notr") == "true" or prop.find("stringlist") is not None and
                    prop.find("stringlist").get("notr") == "true") == technical, ET.tostring(prop, encoding="unicode")


def test_module_strings_shown_to_users_are_translatable():
    """Titles, help, message boxes, button labels and errors go through `_()` (slicer.i18n.tr)."""
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))

    def translated(node: ast.AST) -> bool:
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "_":
            return True
        return isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format" and translated(node.func.value)

    checked = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else ast.unparse(node.func)
            texts = [a for a in node.args if isinstance(a, (ast.Constant, ast.JoinedStr, ast.Call)) and not (
                isinstance(a, ast.Constant) and not isinstance(a.value, str))]
            if name in TRANSLATED_CALLS and texts and name not in ("getOpenFileName", "getExistingDirectory"):
                checked += 1
                assert translated(texts[0]), f"line {node.lineno}: {ast.unparse(node)[:80]}"
            if name in ("getOpenFileName", "getExistingDirectory"):
                checked += 1
                assert translated(node.args[1]), f"line {node.lineno}: dialog title not translated"
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute):
            target = ast.unparse(node.targets[0])
            literal = isinstance(node.value, ast.JoinedStr) or isinstance(node.value, ast.Constant) and bool(node.value.value)
            if target.endswith((".text", ".toolTip")):
                assert not literal, f"line {node.lineno}: {target} is set to an untranslated string"
            if target in ("self.parent.title", "self.parent.helpText", "self.parent.acknowledgementText"):
                checked += 1
                assert translated(node.value), f"line {node.lineno}: {target} not translated"
    assert checked >= 10


@pytest.mark.parametrize("icon", [ICON_FILE, EXTENSION_ICON_FILE], ids=["module", "extension"])
def test_icon_is_a_128_pixel_png(icon):
    header = icon.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", header[16:24]) == ICON_SIZE


def _extension_metadata() -> dict[str, list[str]]:
    return _cmake_variables(REPO / "CMakeLists.txt")


def test_extension_metadata_is_complete_and_its_urls_point_at_repository_files():
    variables = _extension_metadata()
    for name in EXTENSION_FIELDS:
        assert variables.get(f"EXTENSION_{name}") and all(variables[f"EXTENSION_{name}"]), f"EXTENSION_{name} is not set"
    assert variables["EXTENSION_DEPENDS"] == ["PyTorch"]
    assert variables["EXTENSION_HOMEPAGE"][0].startswith(variables["COVIDCT_REPOSITORY_URL"][0] + "/")
    assert "not for diagnosis" in variables["EXTENSION_DESCRIPTION"][0].lower()
    raw = variables["COVIDCT_RAW_URL"][0]
    urls = variables["EXTENSION_ICONURL"] + " ".join(variables["EXTENSION_SCREENSHOTURLS"]).split()
    for url in urls:
        assert url.startswith(raw + "/"), url
        assert (REPO / url[len(raw) + 1:]).is_file(), f"{url} names no file of the repository"
    assert variables["EXTENSION_ICONURL"][0] == f"{raw}/{EXTENSION_ICON_FILE.relative_to(REPO)}"
    assert all(url.startswith(f"{raw}/Resources/Screenshots/") for url in urls[1:])
    cmake = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(rf"add_subdirectory\(\s*{MODULE_NAME}\s*\)", cmake)
    assert re.search(r"project\(\s*" + MODULE_NAME + r"\s*\)", cmake)


def test_catalog_entry_is_valid_and_agrees_with_the_extension_metadata():
    """Resources/CovidCTDiagnosis.json, the entry to submit to Slicer's ExtensionsIndex, against Slicer's schema."""
    jsonschema = pytest.importorskip("jsonschema")
    entry = json.loads(CATALOG_ENTRY.read_text(encoding="utf-8"))
    variables = _extension_metadata()
    assert entry["category"] == variables["EXTENSION_CATEGORY"][0]
    assert entry["scm_url"] == variables["COVIDCT_REPOSITORY_URL"][0] + ".git"
    assert entry["build_dependencies"] == variables["EXTENSION_DEPENDS"]
    if not CATALOG_SCHEMA.is_file():
        pytest.skip(f"catalog schema not available: {CATALOG_SCHEMA} does not exist")
    schema = json.loads(CATALOG_SCHEMA.read_text(encoding="utf-8"))
    assert entry["$schema"] == schema["$id"]
    jsonschema.validate(entry, schema)
