"""Static checks of the extension layout: CMake lists, .ui widgets, imports, module size.

Slicer cannot be installed here, so the CMake files are configured against a stand-in Slicer
package (written by the test) whose macros check what the extension passes them.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE = REPO / "slicer_extension" / "DiffKT3D"
LIB = MODULE / "DiffKT3DLib"
PURE = {"__init__", "candidates", "client", "client_jobs", "constants", "dvh", "imputation_quality", "parameters", "preview", "roles",
        "scorecard", "served_model", "slicerrt", "training", "worker"}


def _cmake_list(text: str, var: str) -> list[str]:
    body = re.search(rf"set\({var}\s+(.*?)\)", text, re.S).group(1)
    return [tok.replace("${MODULE_NAME}", "DiffKT3D") for tok in body.split()]


def test_module_cmake_lists_every_lib_script_and_resource():
    text = (MODULE / "CMakeLists.txt").read_text()
    scripts = set(_cmake_list(text, "MODULE_PYTHON_SCRIPTS"))
    expected = {"DiffKT3D.py"} | {f"DiffKT3DLib/{p.name}" for p in LIB.glob("*.py")}
    assert scripts == expected
    resources = _cmake_list(text, "MODULE_PYTHON_RESOURCES")
    assert all((MODULE / r).is_file() for r in resources)
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    assert "WITH_GENERIC_TESTS" in text


def test_top_level_cmake_has_extension_metadata():
    text = (REPO / "CMakeLists.txt").read_text()
    for var in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert re.search(rf"set\({var} ", text), var
    for line in ("find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})",
                 "add_subdirectory(slicer_extension/DiffKT3D)", "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
                 "include(${Slicer_EXTENSION_CPACK})"):
        assert line in text


STAND_IN = {
    "SlicerConfig.cmake": """
set(Slicer_USE_FILE ${CMAKE_CURRENT_LIST_DIR}/UseSlicer.cmake)
set(Slicer_EXTENSION_GENERATE_CONFIG ${CMAKE_CURRENT_LIST_DIR}/Empty.cmake)
set(Slicer_EXTENSION_CPACK ${CMAKE_CURRENT_LIST_DIR}/Empty.cmake)
""",
    "UseSlicer.cmake": """
foreach(var EXTENSION_HOMEPAGE EXTENSION_CATEGORY EXTENSION_DESCRIPTION EXTENSION_ICONURL EXTENSION_DEPENDS)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "${var} is not set")
  endif()
endforeach()
macro(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MY "WITH_GENERIC_TESTS" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  foreach(f ${MY_SCRIPTS} ${MY_RESOURCES})
    if(NOT EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/${f})
      message(FATAL_ERROR "listed file missing: ${f}")
    endif()
  endforeach()
  message(STATUS "STANDIN module ${MY_NAME} scripts=${MY_SCRIPTS}")
endmacro()
macro(slicer_add_python_unittest)
  cmake_parse_arguments(MY "" "SCRIPT" "" ${ARGN})
  message(STATUS "STANDIN unittest ${MY_SCRIPT}")
endmacro()
""",
    "Empty.cmake": "",
}


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_configures_against_a_stand_in_slicer(tmp_path):
    slicer_dir = tmp_path / "slicer"
    slicer_dir.mkdir()
    for name, text in STAND_IN.items():
        (slicer_dir / name).write_text(text)
    proc = subprocess.run(["cmake", "-S", str(REPO), "-B", str(tmp_path / "build"), f"-DSlicer_DIR={slicer_dir}",
                           "-DBUILD_TESTING=ON"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "STANDIN module DiffKT3D" in proc.stdout and "STANDIN unittest DiffKT3D.py" in proc.stdout


# Members of each widget class that panel.py may use (from the Qt / CTK / Slicer MRML widget APIs;
# PythonQt exposes Qt properties as attributes, e.g. `.text`, `.value`, `.enabled`).
_QOBJECT = {"enabled", "visible", "setVisible", "hide", "show", "toolTip", "blockSignals", "setEnabled"}
WIDGET_API = {
    "QLineEdit": {"text", "setText", "textChanged", "placeholderText"},
    "QLabel": {"text", "setText"},
    "QPushButton": {"clicked", "text", "setText", "toggled", "checked"},
    "QCheckBox": {"clicked", "text", "toggled", "checked", "setChecked"},
    "QSpinBox": {"value", "setValue", "valueChanged", "setRange", "minimum", "maximum"},
    "QComboBox": {"addItems", "addItem", "clear", "currentText", "setCurrentText", "currentTextChanged", "findText",
                  "count"},
    "QProgressBar": {"setRange", "value", "setValue"},
    "QTableWidget": {"setRowCount", "insertRow", "setItem", "setCellWidget", "rowCount", "cellWidget", "item"},
    "qMRMLNodeComboBox": {"currentNode", "setCurrentNode", "currentNodeChanged", "setMRMLScene"},
    "qMRMLTableView": {"setMRMLTableNode", "setMRMLScene"},
}


def _widget_classes_in_panel() -> dict[str, str]:
    tree = ast.parse((LIB / "panel.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "WIDGET_CLASSES" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("panel.py has no WIDGET_CLASSES")


def _ui_uses_in_panel() -> dict[str, set[str]]:
    """{widget name: members used on it} for every `ui.<name>` / `self.ui.<name>` in panel.py."""
    uses: dict[str, set[str]] = {}
    for node in ast.walk(ast.parse((LIB / "panel.py").read_text())):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui":
            uses.setdefault(node.attr, set())
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                and isinstance(node.value.value, ast.Attribute) and node.value.value.attr == "ui"):
            uses.setdefault(node.value.attr, set()).add(node.attr)
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                and isinstance(node.value.value, ast.Name) and node.value.value.id == "ui"):
            uses.setdefault(node.value.attr, set()).add(node.attr)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "ui":
            uses.setdefault(node.attr, set())
    return uses


def test_every_widget_the_panel_uses_exists_in_the_ui_with_the_expected_class():
    """The .ui was never loaded by Qt here: check it against what panel.py looks up, by name and class."""
    root = ET.parse(MODULE / "Resources" / "UI" / "DiffKT3D.ui").getroot()
    ui_classes = {w.get("name"): w.get("class") for w in root.iter("widget")}
    expected = _widget_classes_in_panel()
    uses = _ui_uses_in_panel()
    assert uses, "panel.py uses no widgets?"
    assert set(uses) == set(expected), (f"used but not in WIDGET_CLASSES: {sorted(set(uses) - set(expected))}; "
                                        f"declared but unused: {sorted(set(expected) - set(uses))}")
    wrong = {name: (cls, ui_classes.get(name)) for name, cls in expected.items() if ui_classes.get(name) != cls}
    assert not wrong, f"widget: (class panel.py expects, class in the .ui): {wrong}"
    for name, members in uses.items():
        allowed = WIDGET_API[expected[name]] | _QOBJECT
        assert members <= allowed, f"{name} ({expected[name]}) has no {sorted(members - allowed)}"
    # every MRML widget gets the scene from the module widget (a .ui connection), or it stays empty
    connected = {c.findtext("receiver") for c in root.iter("connection") if c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    mrml = {n for n, cls in ui_classes.items() if cls in ("qMRMLNodeComboBox", "qMRMLTableView")}
    assert mrml <= connected, f"MRML widgets without setMRMLScene: {sorted(mrml - connected)}"
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    custom = {cls for cls in ui_classes.values() if not cls.startswith("Q")}  # CTK and MRML widgets
    assert custom <= declared, f"undeclared custom widgets: {sorted(custom - declared)}"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


def test_lib_never_imports_the_core_and_pure_modules_need_no_slicer():
    for path in LIB.glob("*.py"):
        imports = _imports(path)
        assert "diffkt3d" not in imports, f"{path.name} imports diffkt3d (absent in Slicer's Python)"
        if path.stem in PURE:
            assert not imports & {"slicer", "vtk", "qt", "ctk"}, f"{path.name} should be pure Python"


def test_module_file_is_thin():
    text = (MODULE / "DiffKT3D.py").read_text()
    assert len(text.splitlines()) <= 100
    compile(text, "DiffKT3D.py", "exec")
    tree = ast.parse(text)
    classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    assert classes == {"DiffKT3D", "DiffKT3DWidget", "DiffKT3DLogic", "DiffKT3DTest"}


def test_icon_is_a_real_png():
    from PIL import Image

    with Image.open(MODULE / "Resources" / "Icons" / "DiffKT3D.png") as img:
        assert img.format == "PNG" and img.size == (128, 128)
        import numpy as np

        colours = np.unique(np.asarray(img.convert("RGB")).reshape(-1, 3), axis=0)
        assert len(colours) >= 5  # background, outline and isodose colours: not a blank square
