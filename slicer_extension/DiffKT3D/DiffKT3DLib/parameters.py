"""The module's parameter node: the panel's settings and the case's inputs, saved with the scene.

Slicer modules keep their state in a `vtkMRMLScriptedModuleNode` that is a singleton of the scene
(tag = module name, as `ScriptedLoadableModuleLogic.getParameterNode` makes it), so "Save scene"
writes it and loading the scene (or an .mrb) brings the planner back to where they were. Stored:

* settings (text parameters): sampling steps, candidates, seed, Scorecard template, rater, live
  preview on/off;
* node references: the CT, the structures (their segments carry the role mapping as the tags
  `DiffKT3D.Role` / `DiffKT3D.PrescriptionGy`, saved with the segmentation) and the reference
  dose a prediction is compared with.

Works on any `vtkMRMLScene` (slicer-core in tests); Slicer's `parameterNodeWrapper` needs the
Qt application, which slicer-core has not, so the fields are read and written here explicitly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .constants import DEFAULT_STEPS, DEFAULT_TEMPLATE

MODULE_NAME = "DiffKT3D"
NODE_CLASS = "vtkMRMLScriptedModuleNode"
# node reference roles of the parameter node
CT_REFERENCE = "CT"
SEGMENTATION_REFERENCE = "Structures"
REFERENCE_DOSE_REFERENCE = "ReferenceDose"
NODE_REFERENCES = (CT_REFERENCE, SEGMENTATION_REFERENCE, REFERENCE_DOSE_REFERENCE)


@dataclass
class ModuleSettings:
    """The panel's settings (what a planner set up, kept with the scene)."""

    steps: int = DEFAULT_STEPS
    candidates: int = 2
    seed: int = 0
    template: str = DEFAULT_TEMPLATE
    rater: str = ""
    preview: bool = False


def _parse(text: str, kind: type) -> Any:
    if kind is bool:
        return text == "true"
    return kind(text)


def _text(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


class ParameterNode:
    """Read and write the module's singleton `vtkMRMLScriptedModuleNode` in `scene`."""

    def __init__(self, scene):
        self.scene = scene

    @property
    def node(self):
        """The scene's parameter node (created on first use, as Slicer's module logic does)."""
        node = self.scene.GetSingletonNode(MODULE_NAME, NODE_CLASS)
        if node is None:
            node = self.scene.CreateNodeByClass(NODE_CLASS)
            node.UnRegister(None)  # the scene keeps the reference (Slicer's own idiom)
            node.SetSingletonTag(MODULE_NAME)
            node.SetModuleName(MODULE_NAME)
            node = self.scene.AddNode(node)
        return node

    def settings(self) -> ModuleSettings:
        """Stored settings; a field never stored (or unreadable) keeps its default."""
        node, out = self.node, ModuleSettings()
        types = {"int": int, "str": str, "bool": bool}
        for f in dataclasses.fields(ModuleSettings):
            text = node.GetParameter(f.name)
            if text:
                try:
                    setattr(out, f.name, _parse(text, types[f.type] if isinstance(f.type, str) else f.type))
                except ValueError:
                    pass  # a hand-edited scene file: keep the default rather than fail to open the panel
        return out

    def save_settings(self, settings: ModuleSettings) -> None:
        node = self.node
        for f in dataclasses.fields(ModuleSettings):
            node.SetParameter(f.name, _text(getattr(settings, f.name)))

    def set_node(self, role: str, data_node) -> None:
        """Reference the CT / structures / reference dose (None clears it)."""
        if role not in NODE_REFERENCES:
            raise ValueError(f"unknown parameter node reference {role!r} (expected one of {NODE_REFERENCES})")
        self.node.SetNodeReferenceID(role, data_node.GetID() if data_node is not None else None)

    def get_node(self, role: str):
        return self.node.GetNodeReference(role)
