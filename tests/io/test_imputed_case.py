"""An imputation written as a case folder (diffkt3d/io/imputed_case.py): what is added, replaced,
kept and refused, and that the input case folder is never written to."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diffkt3d.errors import CaseError
from diffkt3d.io.case_folder import load_case_folder
from diffkt3d.io.imputed_case import write_imputed_case


def _files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_imputed_structures_join_the_case_with_role_and_model(synthetic_case_dir, tmp_path):
    case = load_case_folder(synthetic_case_dir)
    before = _files(synthetic_case_dir)
    ptv70 = np.roll(case.structures["PTV70"].mask, 2, axis=0)
    masks = {"PTV70": ptv70, "PTV63": ptv70 & ~case.structures["PTV70"].mask,
             "PTV56": np.zeros(case.grid.shape, dtype=bool)}
    out = tmp_path / "out" / case.case_id
    report = write_imputed_case(synthetic_case_dir, case, masks, "ptv", "m@1", out)
    assert (report.added, report.replaced, report.empty, report.kept) == (["PTV63"], ["PTV70"], ["PTV56"], ["PTV56"])
    assert _files(synthetic_case_dir) == before  # the input is untouched
    written = load_case_folder(out)
    assert np.array_equal(written.structures["PTV70"].mask, ptv70)
    assert (written.structures["PTV63"].role, written.structures["PTV63"].prescription_gy,
            written.structures["PTV63"].imputed_by) == ("target", 63.0, "m@1")
    # the input's PTV56 stays as it was (its imputed counterpart is empty), not marked imputed
    assert np.array_equal(written.structures["PTV56"].mask, case.structures["PTV56"].mask)
    assert written.structures["PTV56"].imputed_by is None and written.structures["SpinalCord"].imputed_by is None
    assert np.array_equal(written.ct_hu, case.ct_hu) and np.array_equal(written.dose_gy, case.dose_gy)
    assert [p.name for p in out.parent.iterdir()] == [case.case_id]  # no temporary folder left behind


def test_structures_only_plan_json_knows_keep_their_role(synthetic_case_dir, tmp_path):
    """A body given by its role in plan.json (not by its name) is still the body in the written case."""
    case_dir = synthetic_case_dir
    (case_dir / "possible_dose_mask.nii.gz").rename(case_dir / "Patient.nii.gz")
    plan = json.loads((case_dir / "plan.json").read_text())
    plan["structures"]["Patient"] = {"role": "body"}
    plan["note"] = "kept"
    (case_dir / "plan.json").write_text(json.dumps(plan))
    case = load_case_folder(case_dir)
    mask = case.structures["SpinalCord"].mask
    out = tmp_path / "out" / case.case_id
    write_imputed_case(case_dir, case, {"SpinalCord": mask}, "oar", "m@1", out)
    written_plan = json.loads((out / "plan.json").read_text())
    assert written_plan["structures"]["Patient"] == {"role": "body"} and written_plan["note"] == "kept"
    assert written_plan["structures"]["SpinalCord"] == {"role": "oar", "imputed_by": "m@1"}
    assert np.array_equal(load_case_folder(out).body, case.body)


def test_refusals_name_the_problem_and_write_nothing(synthetic_case_dir, tmp_path):
    case = load_case_folder(synthetic_case_dir)
    before = _files(synthetic_case_dir)
    mask = {"SpinalCord": case.structures["SpinalCord"].mask}
    with pytest.raises(CaseError, match="is the input case folder"):
        write_imputed_case(synthetic_case_dir, case, mask, "oar", "m", synthetic_case_dir)
    busy = tmp_path / "busy" / case.case_id
    busy.mkdir(parents=True)
    (busy / "Old.nii.gz").write_bytes(b"x")
    with pytest.raises(CaseError, match="already holds files"):
        write_imputed_case(synthetic_case_dir, case, mask, "oar", "m", busy)
    with pytest.raises(CaseError, match="not --target ct"):
        write_imputed_case(synthetic_case_dir, case, mask, "ct", "m", tmp_path / "ct" / case.case_id)
    with pytest.raises(CaseError, match=r"imputed SpinalCord has shape \(2, 2, 2\), expected the case grid"):
        write_imputed_case(synthetic_case_dir, case, {"SpinalCord": np.ones((2, 2, 2), bool)}, "oar", "m",
                           tmp_path / "shape" / case.case_id)
    assert _files(synthetic_case_dir) == before and not (tmp_path / "shape").exists()
    assert [p.name for p in busy.iterdir()] == ["Old.nii.gz"]


def test_plan_json_imputed_by_must_be_a_model_version(synthetic_case_dir):
    plan = json.loads((synthetic_case_dir / "plan.json").read_text())
    plan["structures"]["SpinalCord"]["imputed_by"] = 3
    (synthetic_case_dir / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(CaseError, match="structure SpinalCord: imputed_by must be the model version"):
        load_case_folder(synthetic_case_dir)
