"""Segment roles (target with prescription / OAR / body) and their defaults from names.

`infer_role` is a copy of `diffkt3d.data.case.infer_role` (Slicer's Python has no `diffkt3d`);
tests/slicer_extension/test_lib_units.py checks both give the same answer on a list of names.
Pure Python: no Slicer import, so it also runs in the worker thread and in plain pytest.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .constants import IGNORE_ROLE, ROLES

_PTV_RE = re.compile(r"^(?:PTV|CTV|GTV)[_\- ]?(?:high|mid|low)?[_\- ]?(\d+(?:[.,]\d+)?)(?:\s*Gy)?$", re.I)
_TARGET_RE = re.compile(r"^(?:PTV|CTV|GTV|ITV)", re.I)
_BODY_RE = re.compile(r"^(?:body|external|skin|outline|possible_dose_mask)$", re.I)
_UNSAFE_RE = re.compile(r"[^A-Za-z0-9_.\-]+")
# File stems the server reads as something other than a structure (case-folder convention).
_RESERVED_STEMS = {"ct", "dose", "body", "possible_dose_mask", "beam_plate", "angle_plate",
                   "scorecard", "dose_pred", "ct_imputed"}


def infer_role(name: str) -> tuple[str, float | None]:
    """Role and prescription (Gy) from a structure name: `PTV70` -> ("target", 70.0).

    Prescriptions above 100 are read as cGy (`PTV_7000` -> 70 Gy). Body / External -> "body";
    any other name -> "oar".
    """
    if _BODY_RE.match(name):
        return "body", None
    m = _PTV_RE.match(name.strip())
    if m:
        value = float(m.group(1).replace(",", "."))
        if value > 100:
            value /= 100.0
        return "target", value
    if _TARGET_RE.match(name):
        return "target", None
    return "oar", None


@dataclass
class StructureRole:
    """How one segment enters a request.

    Args:
        segment_id: the segment's id in the segmentation node.
        name: the segment name shown to the user.
        role: one of ROLES or "ignore" (left out of the request).
        prescription_gy: total prescribed dose (Gy) for targets, else None.
    """

    segment_id: str
    name: str
    role: str = "oar"
    prescription_gy: float | None = None

    def validate(self) -> None:
        """Raise ValueError naming the segment when the role or prescription is unusable."""
        if self.role not in (*ROLES, IGNORE_ROLE):
            raise ValueError(f"segment {self.name!r}: unknown role {self.role!r} "
                             f"(expected one of {(*ROLES, IGNORE_ROLE)})")
        if self.prescription_gy is not None and not (0.0 < self.prescription_gy <= 200.0):
            raise ValueError(f"segment {self.name!r}: prescription {self.prescription_gy} Gy "
                             "is outside (0, 200] Gy")


def default_role(segment_id: str, name: str) -> StructureRole:
    """The role a segment gets before the user edits it (from its name)."""
    role, rx = infer_role(name)
    return StructureRole(segment_id=segment_id, name=name, role=role, prescription_gy=rx)


def file_stem(name: str, taken: set[str]) -> str:
    """A file stem for a segment name that the server reads back as the same structure.

    Characters outside [A-Za-z0-9_.-] become "_", reserved case-folder stems get a "_seg"
    suffix, and clashes get "_2", "_3" ... `taken` is updated.
    """
    stem = _UNSAFE_RE.sub("_", name.strip()).strip("._") or "structure"
    if stem.lower() in _RESERVED_STEMS:
        stem += "_seg"
    candidate, n = stem, 2
    while candidate.lower() in {t.lower() for t in taken}:
        candidate, n = f"{stem}_{n}", n + 1
    taken.add(candidate)
    return candidate


def request_plan(roles: list[StructureRole], stems: dict[str, str]) -> dict:
    """plan.json content (case-folder format of diffkt3d.io.case_folder) for the used segments.

    Args:
        roles: one entry per segment; "ignore" and "body" are not listed as structures
            (the body travels as body.nii.gz).
        stems: segment_id -> file stem as written.

    Raises:
        ValueError: no target with a prescription (a dose request needs one).
    """
    structures: dict[str, dict] = {}
    for r in roles:
        r.validate()
        if r.role in (IGNORE_ROLE, "body"):
            continue
        entry: dict = {"role": r.role}
        if r.role == "target" and r.prescription_gy is not None:
            entry["prescription_gy"] = float(r.prescription_gy)
        structures[stems[r.segment_id]] = entry
    return {"structures": structures}

