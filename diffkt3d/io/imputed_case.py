"""An imputation written as a complete case folder: the input case with the imputed structures in it.

`diffkt3d impute --write-case` uses this so an imputation can go on like any case: to
`diffkt3d export dicom` (an RTSTRUCT whose imputed ROIs say so), to the Slicer module, to
prediction. The output folder holds

* every file of the input case, copied unchanged, except those an imputed structure replaces;
* one `<Structure>.nii.gz` per imputed mask (uint8, the case grid);
* `plan.json`: the input's plan.json with every structure's role and prescription written out
  (`plan_to_dict`), and `imputed_by` (the model version) on each imputed structure, so nobody
  takes them for a clinician's contours.

The input folder is never written to (an output folder that is the input folder is refused), and
the output folder must not hold a case yet: files of an earlier case would mix with this one. The
case is written to a hidden sibling folder and renamed into place, and loaded back before that,
so a folder under the final name is always a case that loads.

An imputed mask without voxels is left out (an empty target makes a case unloadable, an empty OAR
says nothing); a structure of the input with that name stays as it was, and the report says so.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from diffkt3d.constants import PLAN_FILE
from diffkt3d.data.case import Case, Structure, infer_role
from diffkt3d.errors import CaseError
from diffkt3d.io.case_folder import load_case_folder, plan_to_dict, read_plan_json, save_nifti

# Role of the masks each imputation target produces.
MASK_ROLES = {"ptv": "target", "oar": "oar"}


@dataclass
class ImputedCase:
    """What `write_imputed_case` did.

    Args:
        folder: the case folder written.
        added: imputed structures the input did not have.
        replaced: input structures an imputed mask of the same name replaced.
        empty: imputed masks without voxels, left out (`kept`: those of them the input has).
        kept: input structures kept because their imputed counterpart is empty.
    """

    folder: Path
    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    empty: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{label} {', '.join(names)}" for label, names in
                 (("added", self.added), ("replaced", self.replaced), ("empty, not written", self.empty),
                  ("input kept", self.kept)) if names]
        return "; ".join(parts) or "no imputed structure written"


def _stem(file_name: str) -> str:
    return file_name[:-7] if file_name.endswith(".nii.gz") else file_name[:-4]


def _imputed_structure(name: str, mask: np.ndarray, target: str, model_version: str) -> Structure:
    role = MASK_ROLES[target]
    rx = infer_role(name)[1] if role == "target" else None
    return Structure(name=name, mask=np.asarray(mask, dtype=bool), role=role,  # type: ignore[arg-type]
                     prescription_gy=rx, imputed_by=model_version)


def write_imputed_case(source: str | Path, case: Case, masks: dict[str, np.ndarray], target: str,
                       model_version: str, out_dir: str | Path) -> ImputedCase:
    """Write `case` (loaded from `source`) with the imputed `masks` as a case folder at `out_dir`.

    Args:
        source: the input case folder.
        case: the case loaded from it (the imputation's input).
        masks: structure name -> bool mask on the case grid (an imputation's `masks`).
        target: "ptv" (masks become targets, prescription from the name: PTV70 -> 70 Gy) or "oar".
        model_version: the imputing model, recorded as each imputed structure's `imputed_by`.
        out_dir: the case folder to write (its name is the case id).

    Raises:
        CaseError: a target other than ptv / oar, `out_dir` is the input folder or already holds
            files, a mask not on the case grid.
    """
    source, out_dir = Path(source), Path(out_dir)
    if target not in MASK_ROLES:
        raise CaseError(f"only imputed structures (--target {' / '.join(MASK_ROLES)}) can be written into a case "
                        f"folder, not --target {target}", case=case.case_id)
    if out_dir.resolve() == source.resolve():
        raise CaseError("the output case folder is the input case folder; choose another --out (the input "
                        "case is never overwritten)", case=case.case_id, file=str(out_dir))
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CaseError("output case folder already holds files; choose a new --out (an earlier case's files "
                        "would mix with this one)", case=case.case_id, file=str(out_dir))
    report = ImputedCase(folder=out_dir)
    structures = dict(case.structures)
    for name, mask in masks.items():
        if tuple(mask.shape) != case.grid.shape:
            raise CaseError(f"imputed {name} has shape {tuple(mask.shape)}, expected the case grid {case.grid.shape}",
                            case=case.case_id)
        if not np.asarray(mask).any():
            report.empty.append(name)
            if name in structures:
                report.kept.append(name)
            continue
        (report.replaced if name in structures else report.added).append(name)
        structures[name] = _imputed_structure(name, mask, target, model_version)
    merged = replace(case, structures=structures)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".part", dir=out_dir.parent)) / out_dir.name
    try:
        tmp.mkdir()
        imputed = {*report.added, *report.replaced}
        for path in sorted(source.iterdir()):
            if path.is_file() and path.name.endswith((".nii.gz", ".nii")) and _stem(path.name) not in imputed:
                shutil.copy2(path, tmp / path.name)
        for name in sorted(imputed):
            save_nifti(structures[name].mask, case.grid, tmp / f"{name}.nii.gz", np.uint8)
        plan = read_plan_json(source / PLAN_FILE, case.case_id) if (source / PLAN_FILE).exists() else {}
        written = plan_to_dict(merged)
        # structures plan.json names that are not in case.structures (a body given by its role) stay listed
        written["structures"] = {**(plan.get("structures") or {}), **written["structures"]}
        plan.update(written)
        (tmp / PLAN_FILE).write_text(json.dumps(plan, indent=2))
        load_case_folder(tmp)  # what goes under the final name loads
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        tmp.replace(out_dir)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)
    return report
